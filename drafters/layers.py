"""Building blocks shared by drafters that run their own decoder layers.

    dims = DrafterDims.from_target(target)                 # every size comes from target.config
    layer = DecoderLayer(dims, attn_in=2 * dims.hidden_size, input_layernorm=True, hidden_norm=True)
    out, k, v = layer(attn_in, residual, cos, sin, attend=causal_attend)

The layer is Llama-shaped whatever the target is (RMSNorm, RoPE, SwiGLU MLP, no biases), because that is
what serving engines load for EAGLE drafters (SGLang LlamaForCausalLMEagle / LlamaForCausalLMEagle3).
Parameter names follow transformers' Llama (self_attn.q_proj, mlp.gate_proj, post_attention_layernorm...),
so exports are plain state-dict dumps.

Attention is pluggable: the layer computes q/k/v (RoPE applied) and hands them to an `attend(q, k, v)`
callable, which decides what the queries see: a causal window (training), a cached prefix plus a 4D
tree mask (decoding), or EAGLE-3's training-time-test pattern (`ttt_attend`, `ttt_rows_attend`).

Training attention has two backends (train.attention, `resolve_attention`): sdpa (repeat_kv for grouped
queries, a materialised mask per sequence) and FlexAttention (`flex_causal_attend`, `ttt_flex_attend`: one
BlockMask call over all rows, grouped queries read their shared key head via enable_gqa, nothing repeated).
`flex_kernel` is the one place that knows where FlexAttention runs and how (DFlash's block mask uses it too).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from conf.errors import DraftsmithError
from conf.schema.training import ATTENTIONS

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Dimensions
# --------------------------------------------------------------------------------------------------
@dataclass
class DrafterDims:
    """Sizes of a Llama-style drafter layer, derived from the target's config (never from YAML)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    vocab_size: int  # the target's embedding rows
    num_taps: int  # tapped target layers (EAGLE-3 fuses num_taps * hidden_size features)
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})

    @classmethod
    def from_target(cls, target) -> DrafterDims:
        """Llama/Qwen2-style configs give every size directly; GPT-2-style ones (n_embd, n_head, n_inner)
        map onto the same fields (no GQA, 4H MLP, default RoPE since GPT-2 has learned positions)."""
        c = target.config
        H = int(target.hidden_size)
        heads = int(getattr(c, "num_attention_heads", None) or c.n_head)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        if H % heads and not getattr(c, "head_dim", None):
            raise DraftsmithError(f"target hidden size {H} is not divisible by its {heads} attention heads")
        eps = getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_epsilon", None) or 1e-6
        return cls(
            hidden_size=H, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=int(getattr(c, "head_dim", None) or H // heads),
            intermediate_size=int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * H),
            rms_norm_eps=float(eps),
            max_position_embeddings=int(getattr(c, "max_position_embeddings", None)
                                        or getattr(c, "n_positions", None) or 2048),
            vocab_size=int(target.vocab_size), num_taps=int(target.num_taps),
            rope_parameters=_rope_parameters(c),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def llama_config(self, **extra):
        """A transformers LlamaConfig with these sizes (RoPE tables here; export writes it as config.json)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rope_parameters=dict(self.rope_parameters),
            hidden_act="silu", attention_bias=False, mlp_bias=False, **extra)


def _rope_parameters(c) -> dict:
    """The target's RoPE settings as a plain dict (per-layer-type dicts: the full-attention one)."""
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_type" not in rp:
        rp = rp.get("full_attention") or next((v for v in rp.values() if isinstance(v, dict)), None)
    if not isinstance(rp, dict) or "rope_type" not in rp:
        theta = getattr(c, "rope_theta", None)
        return {"rope_type": "default", "rope_theta": float(theta or 10000.0)}
    return json.loads(json.dumps(dict(rp)))  # plain JSON types only


class Rotary:
    """RoPE cos/sin from transformers' LlamaRotaryEmbedding (all rope types). Deliberately *not* an
    nn.Module attribute of the drafter: engines that cast the model to bf16 would round inv_freq."""

    def __init__(self, dims: DrafterDims):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.emb = LlamaRotaryEmbedding(dims.llama_config())

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, head_dim] for positions [B, T], in x's dtype."""
        if self.emb.inv_freq.device != x.device:
            self.emb.to(x.device)
        return self.emb(x, positions)


# --------------------------------------------------------------------------------------------------
# Attention patterns
# --------------------------------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, T, d] -> [B, kv_heads * n_rep, T, d] (grouped-query attention)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention. With right padding no real query ever sees a padded key, so no
    padding mask is needed (padded rows produce values that losses mask out)."""
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), is_causal=True)


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, h, Tq, d] over explicit keys/values [B, kv, S, d] with a bool mask [B|1, 1, Tq, S] (True = see)."""
    n = q.shape[1] // keys.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(keys, n), repeat_kv(values, n), attn_mask=mask)


def ttt_attend(k0: torch.Tensor, v0: torch.Tensor, prev_k: list[torch.Tensor],
               prev_v: list[torch.Tensor]) -> Attend:
    """EAGLE-3 training-time test, unrolled step i >= 1, over every row: q/k/v and prev_k/prev_v are
    [B, heads, T, d] like k0/v0. The pattern is ttt_rows_attend's (this runs it with all B*T rows)."""
    B, _, T, _ = k0.shape
    batch = torch.arange(B, device=k0.device).repeat_interleave(T)
    pos = torch.arange(T, device=k0.device).repeat(B)
    rows = ttt_rows_attend(k0, v0, [_as_rows(k) for k in prev_k], [_as_rows(v) for v in prev_v], batch, pos)

    def attend(q, k, v):
        out = rows(_as_rows(q), _as_rows(k), _as_rows(v))  # [1, h, B*T, d]
        return out[0].unflatten(1, (B, T)).transpose(0, 1)
    return attend


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, h, T, d] -> [1, h, B*T, d], rows in (batch, position) order."""
    return x.transpose(0, 1).flatten(1, 2)[None]


def ttt_rows_attend(k0: torch.Tensor, v0: torch.Tensor, prev_k: list[torch.Tensor], prev_v: list[torch.Tensor],
                    batch: torch.Tensor, pos: torch.Tensor) -> Attend:
    """EAGLE-3 training-time test, unrolled step i >= 1, for a subset of rows. Row r (sequence batch[r],
    position pos[r]; rows sorted by sequence, then position) is the chain of drafts that starts after committed pair
    pos[r]: its step-i query sees the causal prefix 0..pos[r] of step 0's keys k0/v0 [B, kv, n, d] (the
    pairs built from true target features) and its own entries of steps 1..i (its earlier drafts and
    itself) - exactly the keys a depth-i tree node sees at decode time. q/k/v and prev_k/prev_v (steps
    1..i-1) are [1, heads, N, d] over the rows. Scores of the prefix block and the i "diagonal" columns
    share one softmax (in fp32). Rows whose drafts are never scored need not be here: nothing else reads
    them, which is what lets training skip them (EagleBase.unroll). Per sequence the prefix block is
    [heads, rows, n] (the official code materialises it for every row, as this does for the rows given);
    gradient checkpointing recomputes it."""
    prev_k, prev_v = list(prev_k), list(prev_v)  # snapshot: checkpoint recomputation reruns this later
    counts = torch.bincount(batch, minlength=k0.shape[0])
    ends = torch.cumsum(counts, 0)
    last = pos[(ends - 1).clamp_min(0)] if len(pos) else ends
    # per sequence: its rows [lo, hi) and the keys up to its last row's position (later ones are masked)
    spans = [(b, e - c, e, p + 1) for b, (c, e, p) in enumerate(zip(*(x.tolist() for x in (counts, ends, last))))
             if c]
    keys = torch.arange(k0.shape[2], device=pos.device)

    def attend(q, k, v):
        n = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        ks, vs = [*prev_k, k], [*prev_v, v]
        diag = torch.stack([(q * repeat_kv(kj, n)).sum(-1).float() * scale for kj in ks], dim=-1)  # [1,h,N,i]
        outs = []
        for b, lo, hi, L in spans:
            # the causal prefix as an additive mask (0 = seen, -inf = not), added inside the score matmul
            hide = torch.zeros(hi - lo, L, dtype=q.dtype, device=q.device).masked_fill_(
                pos[lo:hi, None] < keys[None, :L], float("-inf"))
            kb = repeat_kv(k0[b:b + 1, :, :L], n)[0].transpose(-1, -2)
            s0 = torch.baddbmm(hide, q[0, :, lo:hi], kb, alpha=scale).float()[None]  # [1, h, rows, L]
            p = torch.softmax(torch.cat([s0, diag[:, :, lo:hi]], dim=-1), dim=-1).to(q.dtype)
            out = torch.matmul(p[..., :L], repeat_kv(v0[b:b + 1, :, :L], n))
            for j, vj in enumerate(vs):
                out = out + p[..., L + j, None] * repeat_kv(vj[:, :, lo:hi], n)
            outs.append(out)
        return torch.cat(outs, dim=2) if outs else torch.zeros_like(q)
    return attend


# --------------------------------------------------------------------------------------------------
# FlexAttention: where it runs, and the training patterns as BlockMasks
# --------------------------------------------------------------------------------------------------
def flex_supported() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(choice: str, device) -> str:
    """train.attention -> the backend used: auto is flex on CUDA when torch has FlexAttention, else sdpa. Not
    on the CPU: torch (2.13 included) raises NotImplementedError for FlexAttention's backward there, and
    its eager CPU forward is a reference loop, not a kernel; so training on the CPU stays on sdpa."""
    if choice not in ATTENTIONS:
        raise DraftsmithError(f"train.attention={choice!r}: use one of {', '.join(ATTENTIONS)}")
    if choice != "auto":
        return choice
    return "flex" if torch.device(device).type == "cuda" and flex_supported() else "sdpa"


def flex_kernel(device, setting: str = "train.attention"):
    """flex_attention to call on `device`: compiled once per process on CUDA (its fused kernels exist only
    compiled), eager elsewhere (slow but exact). No FlexAttention in this torch, or a CPU call that will need
    a backward (grad enabled), is a one-line error naming `setting`, the key that asked for flex."""
    if not flex_supported():
        raise DraftsmithError(f"{setting}=flex needs torch.nn.attention.flex_attention (torch >= 2.5; this is "
                              f"{torch.__version__}): use {setting}=sdpa")
    from torch.nn.attention.flex_attention import flex_attention

    dev = torch.device(device)
    if dev.type == "cpu" and torch.is_grad_enabled():
        raise DraftsmithError(f"{setting}=flex cannot train on CPU (FlexAttention has no CPU backward in "
                              f"torch {torch.__version__}): use {setting}=sdpa there (or auto)")
    if dev.type != "cuda":
        return flex_attention
    if flex_attention not in _COMPILED:
        _COMPILED[flex_attention] = torch.compile(flex_attention, dynamic=True)
    return _COMPILED[flex_attention]


_COMPILED: dict = {}


def block_mask(mask_mod, q_len: int, kv_len: int, device, batch: int | None = None):
    """A FlexAttention BlockMask of mask_mod(b, h, q, kv) -> bool (True = see), shared by every head."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def flex_call(fn, q, k, v, mask) -> torch.Tensor:
    """fn (flex_kernel's) over q [B, h, Tq, d] and k/v [B, kv, S, d]: grouped heads via enable_gqa."""
    return fn(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def flex_causal_attend(n: int, device) -> Attend:
    """causal_attend over n positions as a FlexAttention BlockMask (the tiles above the diagonal skipped)."""
    fn = flex_kernel(device)
    mask = block_mask(lambda b, h, q, kv: kv <= q, n, n, device)
    return lambda q, k, v: flex_call(fn, q, k, v, mask)


def ttt_flex_attend(k0: torch.Tensor, v0: torch.Tensor, prev_k: list[torch.Tensor], prev_v: list[torch.Tensor],
                    batch: torch.Tensor, pos: torch.Tensor) -> Attend:
    """ttt_rows_attend's pattern in one FlexAttention call: keys = [step 0's keys of every sequence, flattened
    to B*n rows ; steps 1..i, N rows each]. Row r sees key j < B*n when j is in its sequence at a position
    <= pos[r], and key B*n + s*N + r' when r' == r (its own entry of step s + 1). One softmax covers both, as
    in ttt_rows_attend; the other sequences' key tiles are skipped, not computed and masked."""
    prev_k, prev_v = list(prev_k), list(prev_v)  # snapshot: checkpoint recomputation reruns this later
    B, _, n, _ = k0.shape
    base, N = B * n, len(pos)
    fn = flex_kernel(k0.device)
    k0r, v0r = _as_rows(k0), _as_rows(v0)

    def mask_mod(b, h, q, kv):
        prefix = (kv < base) & (kv // n == batch[q]) & (kv % n <= pos[q])
        return prefix | ((kv >= base) & ((kv - base) % N == q))
    mask = block_mask(mask_mod, N, base + N * (len(prev_k) + 1), k0.device, batch=1)

    def attend(q, k, v):
        keys, values = torch.cat([k0r, *prev_k, k], dim=2), torch.cat([v0r, *prev_v, v], dim=2)
        return flex_call(fn, q, keys, values, mask)
    return attend


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Llama attention whose q/k/v read `in_features` (2H for EAGLE-3's concat(embed, hidden))."""

    def __init__(self, dims: DrafterDims, in_features: int):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dims.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend: Attend):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = attend(q, k, v).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(o), k, v


class DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer returning the residual stream (pre-final-norm) and its k/v.

    The caller builds the attention input (normed hidden, or EAGLE-3's concat of normed embeddings and
    normed hidden) with this layer's `input_layernorm` / `hidden_norm`, which exist only when asked for:
    EAGLE-1's first layer has no input norm (its input is the fc output), as in the official code."""

    def __init__(self, dims: DrafterDims, attn_in: int, input_layernorm: bool = True, hidden_norm: bool = False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        H, eps = dims.hidden_size, dims.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(H, eps) if input_layernorm else None
        self.hidden_norm = LlamaRMSNorm(H, eps) if hidden_norm else None
        self.self_attn = Attention(dims, attn_in)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps)
        self.mlp = LlamaMLP(dims.llama_config())

    def forward(self, attn_in, residual, cos, sin, attend: Attend):
        a, k, v = self.self_attn(attn_in, cos, sin, attend)
        h = residual + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v
