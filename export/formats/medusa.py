"""Medusa heads as the Medusa ecosystem loads them (`export.format=medusa`).

    python -m pytest -q tests/export/test_export_heads.py

Layout (FasterDecoding/Medusa's training script output; TGI reads the same config + safetensors file):
  config.json                   the target's config fields + medusa_num_heads, medusa_num_layers,
                                base_model_name_or_path (the model the heads sit on), and one dtype
                                (dtype = torch_dtype = the heads' export dtype)
  medusa_lm_head.safetensors    the heads' state dict without a prefix (what TGI reads):
                                {k}.{j}.linear.weight / .bias   ResBlock j of head k
                                {k}.{num_layers}.weight          head k's Linear(H -> V)
  medusa_lm_head.pt             the same dict, torch.save'd: FasterDecoding/Medusa's
                                MedusaModel.from_pretrained torch.loads exactly this file and
                                load_state_dict(strict=False)s it into its ModuleList of
                                Sequential(ResBlock..., Linear) (medusa-llm 0.1, medusa/model/medusa_model.py:133-139)
  base/  (Medusa-2 only)        the jointly trained target with its LoRA adapter merged in: a plain HF
                                causal-LM folder + tokenizer. The heads were trained on *this* model's
                                hidden states, so it is what must serve them.
base_model_name_or_path: Medusa-2's is `base`; Medusa-1's is the target's hub id when it has one, else the
placeholder `<path of NAME>` (export.formats.common.target_ref): both loaders resolve the field against their
working directory (MedusaModel.from_pretrained passes it to from_pretrained as is, medusa_model.py:123-126),
so no path to a local folder works from everywhere, and an absolute one would break the folder on any other
machine. The README's commands pass the target explicitly. medusa-llm 0.1's MedusaModel.from_pretrained
builds the base with its own KV-cache Llama, which fails under transformers 5 (KeyError: 'type'); the README
gives the path that works (a MedusaModel over a transformers base, medusa_lm_head.pt loaded into its heads).
Every ResBlock has its own weights here. FasterDecoding/Medusa's own model class repeats one block object
num_layers times (medusa_model.py:87), so with medusa_num_layers > 1 only TGI reads these heads faithfully.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from conf.errors import DraftsmithError
from export.formats.common import (
    CONFIG,
    Checker,
    ExportContext,
    cast_tensors,
    dtype_name,
    save_tensors,
)
from runtime.files import write_json

HEADS = "medusa_lm_head.safetensors"
HEADS_PT = "medusa_lm_head.pt"  # FasterDecoding/Medusa's loader reads only this name
BASE = "base"


def head_names(num_heads: int, num_layers: int) -> set[str]:
    names = set()
    for k in range(num_heads):
        for j in range(num_layers):
            names |= {f"{k}.{j}.linear.weight", f"{k}.{j}.linear.bias"}
        names.add(f"{k}.{num_layers}.weight")
    return names


def write(model, target, out: Path, ctx: ExportContext) -> None:
    """medusa_lm_head.safetensors + .pt + config.json (+ base/ for Medusa-2)."""
    heads = cast_tensors({k.removeprefix("medusa_head."): v for k, v in model.heads_state_dict().items()}, ctx.dtype)
    save_tensors(out / HEADS, heads)
    torch.save(heads, out / HEADS_PT)
    base_ref = ctx.target_ref
    if model.cfg.joint:
        base = out / BASE
        # the adapter was merged into target.model when the checkpoint loaded (MedusaDrafter.from_pretrained)
        if hasattr(target.model, "peft_config"):
            raise DraftsmithError("the Medusa-2 target still carries its LoRA adapter: load the drafter with "
                                  "MedusaDrafter.from_pretrained(folder, target) (it merges the adapter)")
        state = cast_tensors(target.model.state_dict(), ctx.dtype)
        target.model.save_pretrained(str(base), state_dict=state)
        target.tokenizer.save_pretrained(str(base))
        _set_dtype(base / CONFIG, ctx.dtype)
        base_ref = BASE
    cfg = target.config.to_dict()
    for drop in ("_name_or_path", "transformers_version"):
        cfg.pop(drop, None)
    cfg.update(medusa_num_heads=model.cfg.num_heads, medusa_num_layers=model.cfg.num_layers,
               base_model_name_or_path=base_ref, dtype=dtype_name(ctx.dtype), torch_dtype=dtype_name(ctx.dtype))
    write_json(out / CONFIG, cfg)


def _set_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    cfg["dtype"] = cfg["torch_dtype"] = dtype_name(dtype)
    write_json(path, cfg)


def check(ck: Checker, cfg: dict) -> None:
    K = ck.int_field(CONFIG, cfg, "medusa_num_heads")
    L = ck.int_field(CONFIG, cfg, "medusa_num_layers", minimum=0)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        ck.fail(CONFIG, "base_model_name_or_path is missing (Medusa loads the base model from it)")
    elif os.path.isabs(base):
        ck.fail(CONFIG, f"base_model_name_or_path {base} is an absolute path: use the target's hub id or a path "
                        "relative to this folder (it breaks on any other machine)")
    elif base == BASE and not (ck.folder / BASE / CONFIG).is_file():
        ck.fail(CONFIG, f"base_model_name_or_path is {BASE!r} but {BASE}/{CONFIG} is missing")
    dtypes = {cfg.get(k) for k in ("dtype", "torch_dtype") if k in cfg}
    if len(dtypes) != 1:
        ck.fail(CONFIG, f"dtype/torch_dtype are {sorted(map(str, dtypes))}, expected one dtype (the heads')")
    if not isinstance(cfg.get("model_type"), str):
        ck.fail(CONFIG, "model_type is missing (the base model's config fields belong in config.json)")
    H = cfg.get("hidden_size", cfg.get("n_embd"))
    V = cfg.get("vocab_size")
    if not isinstance(H, int) or not isinstance(V, int):
        ck.fail(CONFIG, f"hidden_size {H!r} / vocab_size {V!r} are missing: copy the base model's config fields")
    t = ck.tensors(HEADS)
    if K is None or L is None:
        return
    ck.names(HEADS, t, head_names(K, L))
    ck.float_dtypes(HEADS, t)
    if t and len(dtypes) == 1 and {str(v.dtype).removeprefix("torch.") for v in t.values()} != dtypes:
        ck.fail(HEADS, f"tensors are not in the config's dtype {next(iter(dtypes))}")
    pt = ck.file(HEADS_PT)
    if pt is not None and t:
        try:
            same = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one violation, not a crash
            ck.fail(HEADS_PT, f"not readable by torch.load ({type(e).__name__}: {e})")
        else:
            if not isinstance(same, dict) or set(same) != set(t) or not all(
                    torch.equal(same[k], t[k]) and same[k].dtype == t[k].dtype for k in t):
                ck.fail(HEADS_PT, f"does not hold the same tensors as {HEADS}")
    if isinstance(H, int) and isinstance(V, int):
        for k in range(K):
            for j in range(L):
                ck.shape(HEADS, t, f"{k}.{j}.linear.weight", (H, H))
                ck.shape(HEADS, t, f"{k}.{j}.linear.bias", (H,))
            ck.shape(HEADS, t, f"{k}.{L}.weight", (V, H))


def base_path(folder: Path) -> Path | None:
    """The exported Medusa-2 base model folder (the target to decode with), None for Medusa-1."""
    p = Path(folder) / BASE
    return p if (p / CONFIG).is_file() else None


def load(folder: Path, cfg: dict, target):
    """A MedusaDrafter holding the exported heads (in the file's dtype). For Medusa-2 decode with the
    target loaded from `base_path(folder)`."""
    from conf.schema.drafter import MedusaConfig
    from drafters.medusa import MedusaDrafter
    from export.formats.common import load_tensors

    H = cfg.get("hidden_size", cfg.get("n_embd"))
    for key, have, want in (("hidden_size", H, target.hidden_size), ("vocab_size", cfg["vocab_size"], target.vocab_size)):
        if have != want:
            raise DraftsmithError(f"{folder} holds Medusa heads for a model with {key} {have}, but {target.name} "
                                  f"has {want}: load the base model it was exported for")
    tensors = load_tensors(Path(folder) / HEADS)
    mcfg = MedusaConfig(num_heads=int(cfg["medusa_num_heads"]), num_layers=int(cfg["medusa_num_layers"]))
    model = MedusaDrafter(mcfg, target.hidden_size, target.vocab_size).to(target.device)
    model.to(next(iter(tensors.values())).dtype)
    missing, unexpected = model.load_state_dict(
        {f"medusa_head.{k}": v.to(target.device) for k, v in tensors.items()}, strict=False)
    if [m for m in missing if m.startswith("medusa_head.")] or unexpected:
        raise DraftsmithError(f"{folder}/{HEADS} does not match medusa_num_heads/medusa_num_layers: re-export it")
    model._target_fp = {"path": str(target.name), "vocab_size": int(target.vocab_size),
                        "hidden_size": int(target.hidden_size)}
    return model.eval()
