"""Pieces every serving format shares: dtypes, tensor files, config files, and the violation collector
that `check_format` fills.

A *violation* is one line naming the file, the field or tensor, what it is and what the consumer needs,
e.g. `model.safetensors: d2t is torch.int32, expected torch.int64 (SGLang adds arange to it)`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
README = "README.md"
README_HEADER = "# draftsmith export"  # first line of every README we write: marks a folder as ours


def export_dtype(name: str) -> torch.dtype:
    """The torch dtype of export.dtype (one of conf.schema.export.EXPORT_DTYPES, checked by ExportConfig)."""
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ExportContext:
    """What a format writer needs beyond the drafter and the target."""

    dtype: torch.dtype = torch.bfloat16
    target_ref: str = ""  # what serving configs name as the target: a hub id, or the placeholder <path of NAME>
    speculative_tokens: int = 5  # draft length the serving config proposes (vLLM speculative_tokens)
    top_k: int = 8  # README command lines: tree branching
    draft_tokens: int = 32  # README command lines: verified tokens per step
    final_dir: Path | None = None  # where the folder will live when written elsewhere first (paths in files)


def target_ref(path: str, out: Path | None = None) -> str:
    """How an export folder names its target in config files and README commands.

    A hub id stays a hub id, and so does a local snapshot in the Hugging Face cache
    (.../models--org--name/snapshots/<rev> -> org/name): it resolves on every machine, from every directory.
    A local folder has no such name: an absolute path breaks the folder on every other machine, and a
    relative one resolves against the consumer's working directory (speculators, medusa-llm, vLLM and TGI
    pass it to from_pretrained as it is), so it breaks as soon as they run anywhere but one place. It becomes
    the placeholder `<path of NAME>`, and the README's commands take the target explicitly (`TARGET=`), as
    every consumer allows. (`out`, the folder, is not needed any more: kept for callers that pass it.)"""
    from conf.schema import project_path

    local = project_path(path)
    if not os.path.isdir(local):
        return path
    parts = Path(local).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return placeholder(Path(local).resolve().name)


def placeholder(name: str) -> str:
    """What an exported file writes where a path of this machine would be (the README says to replace it)."""
    return f"<path of {name}>"


def is_hub_id(ref: str) -> bool:
    """True for what target_ref keeps as a hub id (not a placeholder, not a path)."""
    return not ref.startswith((".", "<")) and not os.path.isabs(ref)


def cast_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (on CPU, contiguous, no shared storage); integer/bool maps unchanged."""
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": what transformers' loaders require


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def rope_fields(rope: dict) -> dict:
    """RoPE settings in both spellings: transformers v5 `rope_parameters`, and the v4 `rope_theta` +
    `rope_scaling` that SGLang and vLLM read (without them they fall back to theta 10000)."""
    rope = dict(rope)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
        "rope_parameters": rope,
    }


def read_rope(cfg: dict) -> dict:
    """The RoPE dict (rope_type, rope_theta, ...) from a config written with `rope_fields`, or any
    v4/v5 Llama config."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_type" in rp:
        return dict(rp)
    out = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    out.setdefault("rope_type", out.pop("type", "default"))
    out["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    return out


def layer_config(dims, num_layers: int, dtype: torch.dtype, **extra) -> dict:
    """A Llama decoder-layer config dict (the draft layer's sizes; vocab = the target's)."""
    return {
        "model_type": "llama",
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": dims.rms_norm_eps,
        "max_position_embeddings": dims.max_position_embeddings,
        "vocab_size": dims.vocab_size,
        "num_hidden_layers": num_layers,
        **rope_fields(dims.rope_parameters),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(dtype),
        **extra,
    }


def dims_from_layer_config(cfg: dict, num_taps: int):
    """drafters.layers.DrafterDims back from a `layer_config` dict."""
    from drafters.layers import DrafterDims

    H, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return DrafterDims(
        hidden_size=H, num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads), intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg["rms_norm_eps"]), max_position_embeddings=int(cfg["max_position_embeddings"]),
        vocab_size=int(cfg["vocab_size"]), num_taps=num_taps, rope_parameters=read_rope(cfg))


@dataclass
class Checker:
    """Collects violations of one exported folder against its format's spec."""

    folder: Path
    violations: list[str] = field(default_factory=list)

    def fail(self, where: str, msg: str) -> None:
        self.violations.append(f"{where}: {msg}")

    def file(self, name: str) -> Path | None:
        p = self.folder / name
        if not p.is_file():
            self.fail(name, "missing")
            return None
        return p

    def json(self, name: str = CONFIG) -> dict:
        p = self.file(name)
        if p is None:
            return {}
        try:
            obj = json.loads(p.read_text())
        except ValueError as e:
            self.fail(name, f"not valid JSON ({e})")
            return {}
        if not isinstance(obj, dict):
            self.fail(name, "is not a JSON object")
            return {}
        return obj

    def tensors(self, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
        p = self.file(name)
        if p is None:
            return {}
        try:
            return load_tensors(p)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one violation, not a crash
            self.fail(name, f"not a readable safetensors file ({type(e).__name__}: {e})")
            return {}

    def equal(self, where: str, obj: dict, key: str, want) -> None:
        if key not in obj:
            self.fail(where, f"{key} is missing, expected {want!r}")
        elif obj[key] != want:
            self.fail(where, f"{key} is {obj[key]!r}, expected {want!r}")

    def int_field(self, where: str, obj: dict, key: str, minimum: int = 1) -> int | None:
        v = obj.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            self.fail(where, f"{key} is {v!r}, expected an integer >= {minimum}")
            return None
        return v

    def number_field(self, where: str, obj: dict, key: str) -> None:
        v = obj.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            self.fail(where, f"{key} is {v!r}, expected a positive number")

    def names(self, where: str, tensors: dict, want: set[str]) -> None:
        """The tensor name set must be exactly `want` (consumers load by name, strictly or silently)."""
        have = set(tensors)
        for name in sorted(want - have):
            self.fail(where, f"tensor {name} is missing")
        for name in sorted(have - want):
            self.fail(where, f"unexpected tensor {name} (the consumer does not load it)")

    def shape(self, where: str, tensors: dict, name: str, shape: tuple) -> None:
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != tuple(shape):
            self.fail(where, f"{name} has shape {list(t.shape)}, expected {list(shape)}")

    def float_dtypes(self, where: str, tensors: dict, skip: set[str] = frozenset()) -> None:
        """All weight tensors share one floating dtype (engines cast the whole draft model at once)."""
        kinds = {str(t.dtype) for k, t in tensors.items() if k not in skip}
        bad = [k for k, t in tensors.items() if k not in skip and not t.is_floating_point()]
        for k in bad:
            self.fail(where, f"{k} is {tensors[k].dtype}, expected a floating dtype")
        if len(kinds) > 1 and not bad:
            self.fail(where, f"weights mix dtypes {sorted(kinds)}: export them in one dtype")
