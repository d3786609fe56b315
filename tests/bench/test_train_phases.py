"""bench/train_phases.py: FLOPs of grouped-query attention, and the training step's time by phase.

    python -m pytest -q tests/bench/test_train_phases.py
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bench.train_phases import attention_flops, counted_flops


def test_gqa_attention_is_counted_as_the_query_heads_work():
    """sdpa with enable_gqa (4 query heads over 2 key heads), forward and backward under FlopCounterMode with
    our mapping: attention_flops' forward + backward, which for the forward equals what the counter gives the
    same attention written as two matmuls over repeated keys (an independent count by torch's own mm
    formula). torch 2.11's sdpa formula raised on these shapes."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 8, 16, generator=g, requires_grad=True) for _ in range(2))

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    fwd, bwd = attention_flops(q.shape, k.shape, v.shape), attention_flops(q.shape, k.shape, v.shape, backward=True)
    assert counted_flops(run) == fwd + bwd
    kr, vr = k.detach().repeat_interleave(2, 1), v.detach().repeat_interleave(2, 1)
    with torch.no_grad():
        as_matmuls = counted_flops(lambda: torch.softmax(q @ kr.transpose(-1, -2), -1) @ vr)
    assert fwd == as_matmuls == 2 * 2 * 4 * 8 * 8 * (16 + 16)
    assert bwd == 2 * 2 * 4 * 8 * 8 * (3 * 16 + 2 * 16)


def test_attention_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        attention_flops((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16))  # 3 key heads do not divide 4


def test_dry_run_prints_the_phase_table(tmp_path, capsys):
    """The CPU dry run of bench_train_mfu: every phase of the step in the table (target forward, each TTT
    step's layer and loss, backward, optimizer), the phases add up to the step, the FLOP count is positive
    (GQA target included) and the step's callables are put back afterwards."""
    import training.stage as stage
    from bench.bench_train_mfu import main, report

    before = stage.make_signal
    out = tmp_path / "r.jsonl"
    assert main(["--random-llama", "tiny", "--device", "cpu", "--batch", "1", "--seq", "32", "--steps", "1",
                 "--warmup", "1", "--threads", "1", "--override", "drafter.ttt_steps=2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    names = [p[0] for p in r["phases"]]
    assert names[:5] == ["target forward + feature taps", "drafter layer forward, TTT step 1",
                         "draft head + loss, TTT step 1", "drafter layer forward, TTT step 2",
                         "draft head + loss, TTT step 2"]
    assert {"backward", "optimizer step"} <= set(names) and all(p[1] >= 0 for p in r["phases"][:-1])
    assert sum(p[1] for p in r["phases"]) == pytest.approx(r["step_s"], rel=0.05)
    assert r["flops_counted"] > 0 and r["attention"] == "sdpa"
    assert "| backward |" in text and "| optimizer step |" in text and "Time by phase" in text
    assert stage.make_signal is before
    # a counter that failed is said in the report, not a crash (gpu_report reads these records too)
    assert "FlopCounterMode could not count the step (RuntimeError: x)" in report({**r, "flops_counted": "RuntimeError: x"})
