"""Where an EAGLE-3 training step's time goes, and a FLOP counter that survives grouped-query attention; used
by bench/bench_train_mfu.py.

    clock = PhaseClock(device); undo = clock.attach(engine, drafter, target)
    ... train_step(...) ...; clock.end_step(); undo()
    print("\\n".join(phase_table(clock.mean(), ttt_steps)))

PhaseClock times the train stage's own step without changing it: it wraps the callables the step goes
through (training.stage.make_signal = the target's forward with its feature taps, the target's LM head that
the loss reads lazily, the engine's forward / backward / step, and inside the drafter's forward `core` =
one unrolled TTT step's decoder layer, `_step_loss` = that step's draft head + loss). On CUDA each span is a
pair of CUDA events read after the step's own synchronisation (no sync is added inside the step); on the
CPU, where kernels run synchronously, perf_counter.

counted_flops runs torch's FlopCounterMode with our own formula for the scaled-dot-product-attention
kernels: torch 2.11's formula asserts equal query and key/value heads and so raised
`sdpa_flop_count: query/key/value shapes are incompatible` on the target's GQA attention (enable_gqa).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from runtime.clock import DeviceClock


# --------------------------------------------------------------------------------------------------
# FLOPs under grouped-query attention
# --------------------------------------------------------------------------------------------------
def attention_flops(q_shape, k_shape, v_shape, backward: bool = False) -> int:
    """FLOPs of softmax(q k^T) v as the kernel executes it (every entry, masked ones included), for q [b, h_q,
    s_q, d] and k/v [b, h_kv, s_k, d | d_v] where h_kv divides h_q (GQA: each query head reads its group's
    key/value head, so the work is h_q heads' whatever h_kv is). Forward: q k^T and p v, 2*b*h_q*s_q*s_k*(d +
    d_v). Backward: the scores recomputed, then dP = dO v^T, dV = p^T dO, dQ = dS k, dK = dS^T q:
    2*b*h_q*s_q*s_k*(3*d + 2*d_v)."""
    b, h_q, s_q, d = q_shape
    bk, h_kv, s_k, dk = k_shape
    d_v = v_shape[-1]
    if bk != b or dk != d or tuple(v_shape[:3]) != (b, h_kv, s_k) or h_q % h_kv:
        raise ValueError(f"attention shapes q={list(q_shape)}, k={list(k_shape)}, v={list(v_shape)} do not fit")
    return 2 * b * h_q * s_q * s_k * ((3 * d + 2 * d_v) if backward else (d + d_v))


def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape, backward=True)


# the dense kernels F.scaled_dot_product_attention dispatches to (CUDA: flash, efficient, cudnn; the CPU's
# flash): all take (query, key, value, ...) forward and (grad_out, query, key, value, ...) backward
SDPA_KERNELS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def gqa_flop_mapping() -> dict:
    """custom_mapping for FlopCounterMode: our attention_flops for every sdpa kernel this torch has."""
    aten, out = torch.ops.aten, {}
    for name in SDPA_KERNELS:
        for op, fn in ((name, _fwd), (name + "_backward", _bwd)):
            if hasattr(aten, op):
                out[getattr(aten, op)] = fn
    return out


def counted_flops(fn) -> int:
    """FLOPs FlopCounterMode counts while fn() runs (matmuls, and attention by attention_flops)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=gqa_flop_mapping())
    with counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Time by phase
# --------------------------------------------------------------------------------------------------
class PhaseClock:
    """Spans of named phases within training steps (see the module docstring); seconds per step by phase."""

    def __init__(self, device: torch.device):
        self.clock = DeviceClock(device)
        self.cuda = self.clock.cuda
        self.spans: list[tuple[str, object, object]] = []
        self.steps: list[dict[str, float]] = []
        self.ttt = 0  # unrolled step index inside the current drafter forward
        self.in_forward = False

    def wrap(self, name, fn, when=None):
        """fn timed as phase `name` (a str, or a function of the clock giving one); `when()` False: untimed."""
        def timed(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            label = name if isinstance(name, str) else name(self)
            start = self.clock.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((label, start, self.clock.mark()))
        return timed

    def attach(self, eng, drafter, target):
        """Wrap the step's callables; returns a function that puts them back."""
        import training.stage as stage

        saved = [(stage, "make_signal", stage.make_signal), (target, "lm_head", target.lm_head),
                 (eng, "forward", eng.forward), (eng, "backward", eng.backward), (eng, "step", eng.step),
                 (drafter, "core", drafter.core), (drafter, "_step_loss", drafter._step_loss)]
        forward = eng.forward

        def run_forward(*args, **kwargs):  # the unrolled steps are counted per forward
            self.ttt, self.in_forward = 0, True
            try:
                return forward(*args, **kwargs)
            finally:
                self.in_forward = False

        def core_name(clock):
            clock.ttt += 1
            return f"drafter layer forward, TTT step {clock.ttt}"

        inside = lambda: self.in_forward  # noqa: E731 - checkpoint recomputation in backward is backward's time
        stage.make_signal = self.wrap("target forward + feature taps", stage.make_signal)
        target.lm_head = self.wrap("target LM head (soft targets, read by the loss)", target.lm_head)
        eng.forward = self.wrap("drafter forward", run_forward)
        eng.backward = self.wrap("backward", eng.backward)
        eng.step = self.wrap("optimizer step", eng.step)
        drafter.core = self.wrap(core_name, drafter.core, inside)
        drafter._step_loss = self.wrap(lambda c: f"draft head + loss, TTT step {c.ttt}", drafter._step_loss, inside)

        def undo():
            for obj, attr, value in saved:
                if obj is stage or attr not in vars(obj):
                    setattr(obj, attr, value)
                else:
                    delattr(obj, attr)  # an instance wrapper over a bound method: drop it
        return undo

    def begin_step(self) -> None:
        self.spans, self.t0 = [], self.clock.mark()

    def end_step(self) -> None:
        """Close the step (call after the step's own synchronisation) and keep its seconds by phase."""
        end = self.clock.mark()
        if self.cuda:
            torch.cuda.synchronize()
        secs = self.clock.span
        by = defaultdict(float)
        for name, a, b in self.spans:
            by[name] += secs(a, b)
        by["step"] = secs(self.t0, end)
        self.steps.append(dict(by))

    def mean(self) -> dict[str, float]:
        """Seconds per step by phase, averaged over the steps kept."""
        names = {k for s in self.steps for k in s}
        return {k: sum(s.get(k, 0.0) for s in self.steps) / len(self.steps) for k in names}


def phase_rows(mean: dict[str, float]) -> list[tuple[str, float]]:
    """(phase, seconds) in step order, exclusive: the drafter forward less its layers and losses, and
    'other' = the step less every phase (token counts, metric reduction, host reads)."""
    ttt = sorted({int(k.rsplit(" ", 1)[1]) for k in mean if "TTT step" in k})
    rows = [("target forward + feature taps", mean.get("target forward + feature taps", 0.0))]
    inner = 0.0
    for i in ttt:
        for kind in ("drafter layer forward", "draft head + loss"):
            v = mean.get(f"{kind}, TTT step {i}", 0.0)
            rows.append((f"{kind}, TTT step {i}", v))
            inner += v
    head = mean.get("target LM head (soft targets, read by the loss)", 0.0)
    rows.append(("target LM head (soft targets, read by the loss)", head))
    rows.append(("drafter forward, rest (fc, gathers, masks)", mean.get("drafter forward", 0.0) - inner - head))
    rows += [(k, mean.get(k, 0.0)) for k in ("backward", "optimizer step")]
    rows.append(("other (counts, metric reduction, host reads)", mean.get("step", 0.0) - sum(v for _, v in rows)))
    return rows


def phase_table(phases: list, how: str) -> list[str]:
    """Markdown table of [(phase, seconds)] with ms/step and the share of the step."""
    total = sum(v for _, v in phases) or 1.0
    out = [f"Time by phase ({how}):", "", "| phase | ms/step | % of step |", "|---|---|---|"]
    out += [f"| {name} | {1000 * v:.2f} | {100 * v / total:.1f} |" for name, v in phases]
    return out + [f"| step | {1000 * total:.2f} | 100.0 |"]
