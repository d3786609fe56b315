"""DFlash's pieces that are not the drafter itself: the mask-token choice, the decoder layer whose keys and
values include the target's context, random anchors, and the training block mask (sdpa or FlexAttention).

    python -m pytest -q tests/drafters/test_dflash.py

Layer (parameter names = z-lab's DFlashDraftModel, a Qwen3 layer, so export is a plain dump):
    input_layernorm -> self_attn (q/k/v/o_proj, per-head q_norm / k_norm RMSNorm, RoPE) -> residual
    post_attention_layernorm -> mlp (SwiGLU gate/up/down_proj) -> residual
Queries come from the block only. Keys/values are [context ; block]: the context rows are the projected
target features (fc + hidden_norm, already normed, so no input_layernorm) through the same k_proj/v_proj,
k_norm and RoPE at their own positions; the block rows are the block's normed hidden states.
"""
from __future__ import annotations

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters.layers import DrafterDims, block_mask, flex_call, flex_kernel, masked_attention

# --------------------------------------------------------------------------------------------------
# The mask token
# --------------------------------------------------------------------------------------------------


def choose_mask_token(target, requested: int | None) -> tuple[int, str]:
    """(id, why) of the token fed at masked block positions. It must be a row of the target's embedding
    (the drafter reuses it and ships none of its own; a row resized in would be untrained and absent when
    serving). `requested` (drafter.mask_token_id) is only checked; null picks, in order: the tokenizer's
    mask token, a reserved row past the tokenizer's vocabulary (embedding tables padded to a multiple),
    the pad token when it is not an EOS token."""
    rows = int(target.vocab_size)
    if requested is not None:
        if not 0 <= requested < rows:
            raise DraftsmithError(
                f"drafter.mask_token_id={requested} is outside the target's {rows} embedding rows: give an id "
                f"below {rows} that never appears in text, or null to pick one from the tokenizer")
        return int(requested), "drafter.mask_token_id"
    tok = target.tokenizer
    mask = getattr(tok, "mask_token_id", None) if tok is not None else None
    if mask is not None and 0 <= mask < rows:
        return int(mask), f"the tokenizer's mask token {tok.mask_token!r}"
    used = len(tok) if tok is not None else rows
    if used < rows:
        return used, f"a reserved embedding row past the tokenizer's {used} tokens"
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is not None and 0 <= pad < rows and pad not in target.eos_token_ids:
        return int(pad), f"the pad token {tok.pad_token!r} (no mask token, no reserved row)"
    raise DraftsmithError(
        f"target {target.name} has no mask token, no reserved embedding row and no pad token apart from EOS: "
        f"set drafter.mask_token_id to an id below {rows} that never appears in text (e.g. a reserved special token)")


def resolve_taps(feature_layers: list[int], wanted: list[int] | None) -> list[int]:
    """Positions in target.feature_layers of the layers the drafter fuses (all of them when wanted is None)."""
    if wanted is None:
        return list(range(len(feature_layers)))
    missing = [i for i in wanted if i not in feature_layers]
    if missing:
        union = sorted(set(feature_layers) | set(wanted))
        raise DraftsmithError(
            f"drafter.target_layer_ids={list(wanted)} asks for layer(s) {missing}, which the target does not tap "
            f"(target.feature_layers={list(feature_layers)}): set target.feature_layers=[{','.join(map(str, union))}]")
    return [feature_layers.index(i) for i in wanted]


def position_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[B] loss weight of each block position: 0 for the anchor (it is given), exp(-(k-1)/gamma) for k >= 1
    (DFlash's position decay: an early miss ends the accepted prefix, so early positions matter more);
    gamma = 0 gives uniform weights."""
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma) if gamma > 0 else torch.ones(block_size)
    w[0] = 0.0
    return w


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, h, T, d] with cos/sin [B, T, d] (the rotate-half convention of Llama/Qwen3)."""
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class BlockAttention(nn.Module):
    """Qwen3-style attention (per-head q/k RMSNorm) whose keys/values also cover the target context."""

    def __init__(self, dims: DrafterDims):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        H, self.heads, self.kv, self.hd = dims.hidden_size, dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        self.q_proj = nn.Linear(H, self.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.heads * self.hd, H, bias=False)
        self.q_norm = LlamaRMSNorm(self.hd, dims.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(self.hd, dims.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.hd).transpose(1, 2)

    def kv_of(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values [B, kv, T, d] of rows x [B, T, H]."""
        k = _rope(self.k_norm(self._heads(self.k_proj(x), self.kv)), cos, sin)
        return k, self._heads(self.v_proj(x), self.kv)

    def forward(self, x, cos, sin, ctx_k, ctx_v, attend) -> torch.Tensor:
        q = _rope(self.q_norm(self._heads(self.q_proj(x), self.heads)), cos, sin)
        k, v = self.kv_of(x, cos, sin)
        o = attend(q, torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2))
        return self.o_proj(o.transpose(1, 2).flatten(2))


class BlockLayer(nn.Module):
    """One DFlash decoder layer over block rows; `attend(q, keys, values)` decides what each query sees."""

    def __init__(self, dims: DrafterDims):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        self.input_layernorm = LlamaRMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.self_attn = BlockAttention(dims)
        self.post_attention_layernorm = LlamaRMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = LlamaMLP(dims.llama_config())

    def forward(self, h, cos, sin, ctx_k, ctx_v, attend) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


# --------------------------------------------------------------------------------------------------
# Training blocks
# --------------------------------------------------------------------------------------------------
def sample_anchors(loss_mask: torch.Tensor, attention_mask: torch.Tensor, n: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [B, N], keep [B, N]): up to n distinct random anchors per row, ascending. Anchor a is eligible
    when the token after it, x_{a+1} (the block's first draft), is a scored, real token. N = the most any
    row can hold (<= n); rows with fewer eligible positions fill the rest with keep=False. Draws from
    torch's global generator unless one is given (checkpoints save its state: a resumed run draws the same)."""
    B, T = loss_mask.shape
    ok = torch.zeros(B, T, dtype=torch.bool, device=loss_mask.device)
    ok[:, :-1] = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    count = ok.sum(1)
    N = min(n, int(count.max()) if B else 0)
    r = torch.rand(B, T, generator=generator).to(loss_mask.device)
    r = torch.where(ok, r, torch.full_like(r, 2.0))  # ineligible positions sort last
    picks = r.argsort(1)[:, :N]
    # ascending, eligible picks first (a row with fewer than N eligible positions has ineligible picks too)
    anchors = torch.where(ok.gather(1, picks), picks, picks + T).sort(1).values % T
    keep = torch.arange(N, device=ok.device)[None] < count[:, None].clamp(max=N)
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


def block_visibility(anchors: torch.Tensor, keep: torch.Tensor, T: int, block: int) -> torch.Tensor:
    """[B, 1, N*block, T + N*block] bool (True = see) over keys [context 0..T-1 ; blocks]: a block sees the
    context strictly before its anchor (the target has read x_0..x_{a-1} when x_a is the anchor) and its own
    block, bidirectionally; never another block. A dropped block (keep False) sees only itself, so no row
    is empty (sdpa would give NaN); its positions carry no loss."""
    B, N = anchors.shape
    dev = anchors.device
    qb = torch.arange(N * block, device=dev) // block  # block of each query
    a = anchors.gather(1, qb[None].expand(B, -1))  # [B, Q] its anchor
    k = keep.gather(1, qb[None].expand(B, -1))
    ctx = (torch.arange(T, device=dev)[None, None] < a[..., None]) & k[..., None]
    own = (qb[:, None] == qb[None, :]).expand(B, -1, -1)
    return torch.cat([ctx, own], dim=2)[:, None]


def sdpa_attend(vis: torch.Tensor):
    """attend(q, keys, values) with a materialised bool mask (any device, any torch)."""
    return lambda q, k, v: masked_attention(q, k, v, vis)


def flex_attend(anchors: torch.Tensor, keep: torch.Tensor, T: int, block: int):
    """The same visibility as block_visibility as a FlexAttention BlockMask: only the key tiles a block can
    see are computed (on GPU the context tiles after every anchor are skipped). Torch without FlexAttention,
    or a CPU backward (unsupported there), is a one-line error (drafters.layers.flex_kernel)."""
    B, N = anchors.shape
    fn = flex_kernel(anchors.device, "drafter.attention")

    def mask_mod(b, h, q, kv):
        qb = q // block
        a = anchors[b, qb]
        ctx = (kv < T) & (kv < a) & keep[b, qb]
        own = (kv >= T) & ((kv - T) // block == qb)
        return ctx | own

    mask = block_mask(mask_mod, N * block, T + N * block, anchors.device, batch=B)
    return lambda q, k, v: flex_call(fn, q, k, v, mask)
