"""The planner's estimates, each a pure function of sizes (bytes, FLOPs, seconds), so tests can check them.

Notation: P = trainable drafter parameters, N = data-parallel ranks, a = bytes of an activation / weight in
the run's precision (2 for bf16, 4 for fp32), f = 4 (fp32), T = micro batch x sequence length (tokens of
one micro-step on one rank), H/I/V = the target's hidden size, MLP width, vocabulary, V_d = draft vocabulary.

What the train step holds at its peak (EAGLE-3, online; drafters/eagle3.py and training/signal.py):
- the frozen target's weights (every rank holds all of them: the target is not inside DeepSpeed);
- the drafter's model states (`model_state_bytes`: weights, gradients, fp32 master and AdamW moments by ZeRO stage);
- the target's signal: tapped features [T, taps*H] and last hidden [T, H] in a, and the target's logits
  [T, V] in fp32 (TargetSignal.logits), which the unrolled steps gather their soft targets from;
- per unrolled TTT step, the tensors autograd saves for backward (`eagle3_row_step_bytes`), dominated by the
  SwiGLU MLP (4aI per row) and, from step 1 on, the training-time-test attention's prefix block: every row
  keeps its scores over the whole sequence, softmax in fp32 (f*heads*S per row, plus the a copy);
- per step, linear_soft_ce's head gradient [V_d, H] in fp32, made in forward and kept until backward.
Gradient checkpointing keeps only each step's inputs and recomputes one step at a time in backward.
"""
from __future__ import annotations

from plan.shapes import TargetShape

F32 = 4
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements): ZeRO-2's gradient bucket


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
def decoder_layer_params(s: TargetShape, attn_in: int, input_norm: bool, hidden_norm: bool) -> int:
    """drafters/layers.py DecoderLayer: q/k/v read attn_in, o_proj, SwiGLU MLP of the target's width, norms."""
    q, kv, H = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden
    return attn_in * q + 2 * attn_in * kv + q * H + 3 * H * s.intermediate + H * (1 + input_norm + hidden_norm)


def small_shape(s: TargetShape, hidden: int | None) -> tuple[int, int, int, int]:
    """drafters/small_lm.py fresh_config: (hidden, heads, kv heads, MLP width) of the small drafter."""
    H = int(hidden or max(1, (s.heads + 1) // 2) * s.head_dim)
    heads = H // s.head_dim
    kv = max(1, heads * s.kv_heads // s.heads)
    while heads % kv:
        kv -= 1
    return H, heads, kv, s.intermediate * H // s.hidden


def drafter_params(family: str, s: TargetShape, d, taps: int) -> int:
    """Trainable parameters of a drafter family built on target shape `s` with drafter config `d`
    (tests/plan/test_estimate.py checks each against the real drafter on the demo target)."""
    H, V = s.hidden, s.vocab
    if family == "eagle3":
        vd = min(d.draft_vocab_size or V, V)
        router = H * H + H * d.head_groups if d.head_groups else 0
        return taps * H * H + decoder_layer_params(s, 2 * H, True, True) + H + vd * H + router
    if family == "eagle1":
        return 2 * H * H + H + sum(decoder_layer_params(s, H, i > 0, False) for i in range(d.num_layers))
    if family == "medusa":
        return d.num_heads * (d.num_layers * (H * H + H) + H * V)
    if family == "hydra":
        heads = sum(2 * (k + 1) * H * H + H + (d.mlp_layers - 1) * (H * H + H) + H * V
                    for k in range(1, d.num_heads + 1))
        prefix = s.attention_params() + 3 * H * s.intermediate + 2 * H if d.prefix_layer else 0
        return heads + prefix
    if family in ("small", "pard"):
        Hs, heads, kv, inter = small_shape(s, d.hidden_size)
        rows = V + (1 if family == "pard" and d.mask_token_id is None else 0)
        q, k = heads * s.head_dim, kv * s.head_dim
        layer = Hs * q + 2 * Hs * k + q * Hs + 3 * Hs * inter + 2 * Hs
        return rows * Hs * (1 if s.tied else 2) + d.num_layers * layer + Hs
    if family == "kangaroo":
        return s.attention_params() + 2 * H
    return 0  # ngram, target: nothing to train


# --------------------------------------------------------------------------------------------------
# Model states (weights, gradients, optimizer) by ZeRO stage
# --------------------------------------------------------------------------------------------------
def largest_module_params(family: str, s: TargetShape, d, taps: int) -> int:
    """The biggest piece ZeRO-3 gathers whole at once (a decoder layer, one head, an embedding)."""
    H, V = s.hidden, s.vocab
    if family == "eagle3":
        return max(decoder_layer_params(s, 2 * H, True, True), min(d.draft_vocab_size or V, V) * H)
    if family == "eagle1":
        return decoder_layer_params(s, H, True, False)
    if family in ("medusa", "hydra"):
        return drafter_params(family, s, d, taps) // max(1, d.num_heads)
    if family in ("small", "pard"):
        return V * small_shape(s, d.hidden_size)[0]
    return drafter_params(family, s, d, taps)


def model_state_bytes(P: int, precision: str, zero: int, world: int, offload: bool = False,
                      live: int | None = None) -> dict:
    """Per-rank bytes of the trainable drafter's weights, gradients and optimizer states, and the host RAM
    offload moves there. bf16/fp16 (DeepSpeed's mixed precision): a-byte weights and gradients, fp32 master
    weights and the two AdamW moments (12 bytes/param), fp32 gradient partitions for ZeRO >= 1 (4 bytes).
    fp32 (CPU runs: torch AdamW under DeepSpeed, no master copy): 4 + 4 + 8. ZeRO-1 partitions the optimizer
    states, ZeRO-2 also the gradients (plus one reduce bucket), ZeRO-3 also the weights, but an EAGLE drafter
    gathers its pieces module by module: `live` parameters (twice: the one in use and the one prefetched). Offload keeps the
    optimizer states (and fp32 gradients) in host RAM."""
    a = 4 if precision == "fp32" else 2
    mixed = a == 2
    opt = (12 if mixed else 8) * P  # fp32 master (mixed only) + exp_avg + exp_avg_sq
    fp32_grads = 4 * P if mixed and zero >= 1 else 0
    w, g = a * P, a * P
    if zero == 0:
        parts = {"weights": w, "gradients": g, "optimizer": opt}
    elif zero == 1:
        parts = {"weights": w, "gradients": g, "optimizer": (opt + fp32_grads) / world}
    elif zero == 2:
        parts = {"weights": w, "gradients": g / world + min(P, DS_REDUCE_BUCKET) * a,
                 "optimizer": (opt + fp32_grads) / world}
    else:
        parts = {"weights": w / world + (2 * a * min(P, live or P) if world > 1 else 0), "gradients": g / world + min(P, DS_REDUCE_BUCKET) * a,
                 "optimizer": (opt + fp32_grads) / world}
    host = 0
    if offload and zero >= 1:
        host = parts["optimizer"]
        parts["optimizer"] = 0
    return {**{k: int(v) for k, v in parts.items()}, "host_offload": int(host)}


# --------------------------------------------------------------------------------------------------
# Activations of one micro-step
# --------------------------------------------------------------------------------------------------
def _norm_saved(H: int, a: int) -> int:
    """LlamaRMSNorm with a gradient: the fp32 copy of its input (the input itself when a = fp32) and its
    normed output in a (kept by the weight's multiply)."""
    return F32 * H + a * H


def eagle3_row_step_bytes(s: TargetShape, seq: int, step: int, a: int) -> int:
    """Bytes autograd keeps per unrolled row for TTT step `step` (0 = the causal pass over true features)."""
    H, q, kv, inter = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    common = (a * H  # input_layernorm(embed): the normed embeddings
              + _norm_saved(H, a)  # hidden_norm(hidden)
              + 2 * a * H  # concat -> q/k/v input
              + 2 * a * q + 3 * a * kv  # RoPE keeps q, rotate_half(q), k, rotate_half(k); v is kept for later steps
              + a * q  # attention output reshaped for o_proj
              + _norm_saved(H, a)  # post_attention_layernorm
              + 4 * a * inter  # SwiGLU: gate, silu(gate), up, their product
              + a * H + _norm_saved(H, a) + a * H)  # scored rows: out[pick], the final norm, linear_soft_ce's grad_h
    rep = s.heads != s.kv_heads  # grouped-query attention: repeat_kv copies k and v to every query head
    if step == 0:
        return common + (3 if rep else 1) * a * q  # SDPA keeps the repeated k, v (copies only under GQA), its output
    # ttt_rows_attend: repeated k_j and v_j of steps 1..i (GQA copies), the prefix block's fp32 softmax (+ its a
    # copy), v0's rows
    return common + (2 * step * a * q if rep else 0) + (F32 + (a if a != F32 else 0)) * s.heads * seq + a * q


def eagle3_activation_bytes(s: TargetShape, micro: int, seq: int, steps: int, vd: int, taps: int, a: int,
                            checkpointing: bool = False) -> dict:
    """Peak bytes of one EAGLE-3 micro-step beyond the model states (an upper bound: every row scored)."""
    T = micro * seq
    signal = T * taps * s.hidden * a + T * s.hidden * a + T * s.vocab * F32
    rows = [T * eagle3_row_step_bytes(s, seq, i, a) for i in range(steps)]
    head_grads = steps * vd * s.hidden * F32
    if checkpointing:  # each step's inputs (hidden, embeddings, its k/v), and one step recomputed at a time
        saved = steps * T * (3 * a * s.hidden + 2 * a * s.kv_heads * s.head_dim) + max(rows) + vd * s.hidden * F32
    else:
        saved = sum(rows) + head_grads
    transient = T * vd * F32  # one step's gathered soft targets [T, V_d] (fp32, from the fp32 logits)
    return {"signal": int(signal), "saved": int(saved), "transient": int(transient)}


def lm_activation_bytes(hidden: int, heads: int, layers: int, inter: int, vocab: int, micro: int, seq: int,
                        a: int, outputs: int = 1, checkpointing: bool = False) -> int:
    """A generic transformer's saved activations (the Korthikanti et al. count with flash attention,
    SwiGLU's 4I) plus `outputs` full-vocabulary fp32 logits with their softmax: the other families'
    estimate (Medusa/Hydra heads: outputs = heads; small/PARD/Kangaroo: their own layers)."""
    T = micro * seq
    per_layer = T * (a * (10 * hidden + 4 * inter) + F32 * 2 * hidden)
    layer_total = (layers * T * a * hidden + per_layer) if checkpointing else layers * per_layer
    return int(layer_total + outputs * T * vocab * F32 * 2)


def target_forward_bytes(s: TargetShape, batch: int, seq: int, a: int, keep_hidden: bool = True) -> int:
    """The frozen target's no-grad forward: every layer's hidden state (output_hidden_states, which
    drafters.target.Target always asks for) and one layer's MLP intermediates."""
    T = batch * seq
    hidden = (s.layers + 1) * T * s.hidden * a if keep_hidden else 2 * T * s.hidden * a
    return int(hidden + 3 * T * s.mlp_width_per_token * a)


def kv_cache_bytes(s: TargetShape, batch: int, tokens: int, a: int) -> int:
    """Keys and values of every layer for `tokens` positions of `batch` sequences."""
    return int(2 * s.layers * s.kv_heads * s.head_dim * batch * tokens * a)


# --------------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------------
def feature_cache_bytes(tokens: int, scored: int, rows: int, files: int, hidden: int, taps: int, topk: int,
                        features: bool) -> int:
    """data_gen/cache.py's safetensors files: per token the tapped features and the last hidden state in
    bf16 (2 (taps + 1) H); per scored position (next token an assistant token) the top-k logits (bf16) and
    ids (int32) and the position (int32); per row its offsets (int64, one table per kind); per file a header
    (about 600 bytes of JSON: measured on the demo cache)."""
    b = 2 * (taps + 1) * hidden * tokens if features else 0
    if topk:
        b += scored * (topk * (2 + 4) + 4)
    tables = (1 if features or not topk else 0) + (1 if topk else 0)
    return int(b + 8 * (rows + files) * max(tables, 1) + 600 * files)


def checkpoint_bytes(P: int, precision: str) -> int:
    """One DeepSpeed checkpoint of the drafter: weights in a, optimizer states (fp32 master + moments)."""
    a = 4 if precision == "fp32" else 2
    return int(a * P + (12 if a == 2 else 8) * P)


# --------------------------------------------------------------------------------------------------
# FLOPs and time
# --------------------------------------------------------------------------------------------------
def target_forward_flops(s: TargetShape, tokens: int, seq: int, logits: bool) -> float:
    """2 x active non-embedding parameters per token, causal attention (4 x q-width x S/2 per token per
    layer), and the LM head when its logits are needed."""
    nonembed = s.active_params - s.vocab * s.hidden * (1 if s.tied else 2)
    attn = 4 * s.heads * s.head_dim * (seq + 1) / 2 * s.layers
    return tokens * (2 * nonembed + attn + (2 * s.vocab * s.hidden if logits else 0))


def eagle3_train_flops(s: TargetShape, tokens: int, seq: int, steps: int, vd: int, taps: int, online: bool) -> float:
    """bench/bench_train_mfu.py's useful FLOPs with every row scored: the target's forward (online; offline
    runs only its LM head over the cached last hidden state) + 3 x the drafter's forward."""
    target = target_forward_flops(s, tokens, seq, True) if online else tokens * 2 * s.vocab * s.hidden
    layer = decoder_layer_params(s, 2 * s.hidden, True, True)
    q = s.heads * s.head_dim
    draft = tokens * (2 * taps * s.hidden * s.hidden
                      + sum(2 * layer + 2 * vd * s.hidden + 4 * q * ((seq + 1) / 2 + i) for i in range(steps)))
    return target + 3 * draft


def seconds(flops: float, devices: int, peak: float | None, util: float) -> float | None:
    return None if not peak else flops / (devices * peak * util)


def fmt_bytes(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.0f} KiB"


def fmt_seconds(t: float | None) -> str:
    if t is None:
        return "n/a"
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    if t >= 60:
        return f"{t / 60:.1f} min"
    return f"{t:.0f} s" if t >= 1 else f"{t:.2f} s"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

