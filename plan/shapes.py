"""A target's shape from its config.json (never its weights), and the parameter counts that follow from it.

    from plan.shapes import read_target_config, TargetShape
    shape = TargetShape.from_config(read_target_config("meta-llama/Llama-3.1-70B-Instruct")[0])
    shape.params, shape.active_params      # 70.55e9, 70.55e9 (a MoE activates only its routed experts)

Where a config comes from, first hit wins: a local folder with config.json; the bundled copy
`assets/target-configs/<hub id>/config.json` (the common targets of conf/target/, so planning works offline);
the hub (config.json alone is downloaded). Multimodal configs nest the language model under `text_config`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT, project_path

BUNDLED = PROJECT_ROOT / "assets" / "target-configs"
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "olmo2", "gemma3_text")  # per-head RMSNorm on q and k (2 x head_dim)


def read_target_config(path: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a local folder, a bundled hub id, or the hub."""
    local = Path(project_path(path))
    if local.is_dir():
        f = local / "config.json"
        if not f.exists():
            raise DraftsmithError(f"target.path {path!r} has no config.json: it is not a Hugging Face model folder")
        return json.loads(f.read_text()), str(f)
    bundled = BUNDLED / path / "config.json"
    if path.count("/") == 1 and bundled.exists():
        return json.loads(bundled.read_text()), f"bundled {bundled.relative_to(PROJECT_ROOT)}"
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1:
        raise DraftsmithError(f"target.path {path!r} does not exist: give a local model folder or a hub id like org/name")
    try:
        from huggingface_hub import hf_hub_download

        f = hf_hub_download(path, "config.json")
    except Exception as e:  # offline, gated, misspelt: one line
        raise DraftsmithError(f"could not fetch config.json of {path!r} ({type(e).__name__}); check the hub id and "
                              f"your network or HF_TOKEN, or give a local folder (bundled offline: "
                              f"{', '.join(bundled_ids())})") from None
    return json.loads(Path(f).read_text()), f"hub {path}"


def bundled_ids() -> list[str]:
    return sorted(str(p.parent.relative_to(BUNDLED)) for p in BUNDLED.glob("*/*/config.json"))


@dataclass(frozen=True)
class TargetShape:
    """The sizes every estimate reads. MoE: `experts` routed experts of width `moe_intermediate`, `top_k` per token."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    attention_bias: bool = False
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: int = 0  # layers whose MLP is the MoE block

    @classmethod
    def from_config(cls, c: dict) -> TargetShape:
        c = c.get("text_config") or c
        g = c.get
        H = int(g("hidden_size") or g("n_embd"))
        heads = int(g("num_attention_heads") or g("n_head"))
        L = int(g("num_hidden_layers") or g("n_layer"))
        experts = int(g("num_experts") or g("num_local_experts") or g("n_routed_experts") or 0)
        sparse = 0
        if experts:
            step = int(g("decoder_sparse_step") or 1)
            dense = set(g("mlp_only_layers") or [])
            sparse = sum(1 for i in range(L) if i not in dense and (i + 1) % step == 0)
        return cls(model_type=str(g("model_type") or ""), layers=L, hidden=H,
                   intermediate=int(g("intermediate_size") or g("n_inner") or 4 * H), heads=heads,
                   kv_heads=int(g("num_key_value_heads") or heads), head_dim=int(g("head_dim") or H // heads),
                   vocab=int(g("vocab_size")), tied=bool(g("tie_word_embeddings", False)),
                   attention_bias=bool(g("attention_bias", False) or g("model_type") == "qwen2"),
                   experts=experts, top_k=int(g("num_experts_per_tok") or 0),
                   moe_intermediate=int(g("moe_intermediate_size") or g("intermediate_size") or 0) if experts else 0,
                   shared_intermediate=int(g("shared_expert_intermediate_size") or 0), sparse_layers=sparse)

    # --- parameter counts (tests/plan/test_shapes.py checks them against transformers on the meta device) ---
    def attention_params(self) -> int:
        H, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = q + 2 * kv if self.attention_bias else 0
        qk_norm = 2 * self.head_dim if self.model_type in QK_NORM_TYPES else 0
        return H * q + 2 * H * kv + q * H + bias + qk_norm

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def moe_mlp_params(self, experts: int | None = None) -> int:
        """Routed experts (all, or `experts` of them), router, shared expert and its gate."""
        e = self.experts if experts is None else experts
        shared = 3 * self.hidden * self.shared_intermediate + self.hidden if self.shared_intermediate else 0
        return e * 3 * self.hidden * self.moe_intermediate + self.hidden * self.experts + shared

    def layer_params(self, sparse: bool, experts: int | None = None) -> int:
        mlp = self.moe_mlp_params(experts) if sparse else self.dense_mlp_params()
        return self.attention_params() + mlp + 2 * self.hidden

    def _total(self, experts: int | None) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        layers = (self.sparse_layers * self.layer_params(True, experts)
                  + (self.layers - self.sparse_layers) * self.layer_params(False))
        return embed + layers + self.hidden

    @property
    def params(self) -> int:
        return self._total(None)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through (= params for a dense model)."""
        return self._total(self.top_k) if self.experts else self.params

    @property
    def mlp_width_per_token(self) -> int:
        """MLP intermediate activations one token makes in one layer (a MoE: top_k experts)."""
        if self.experts and self.sparse_layers:
            return self.top_k * self.moe_intermediate + self.shared_intermediate
        return self.intermediate

    def feature_layers(self) -> list[int]:
        """EAGLE-3's default taps (drafters.target.default_feature_layers without importing torch)."""
        L = self.layers
        want = sorted(min(max(i, 0), L - 1) for i in (2, L // 2, L - 3))
        taps: list[int] = []
        for i in want:
            taps.append(max(i, taps[-1] + 1) if taps else i)
        while taps[-1] > L - 1 and taps[0] > 0:
            taps = [t - 1 for t in taps]
        return [min(t, L) for t in taps]
