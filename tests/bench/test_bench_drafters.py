"""bench/bench_drafters.py's tables, dry-run on small fake eval results (the benchmark itself trains every
family for an hour and is run by hand).

    python -m pytest -q tests/bench/test_bench_drafters.py
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from conf.schema import PROJECT_ROOT
from eval.metrics import GenRecord, summarize


@pytest.fixture(scope="module")
def bd():
    spec = importlib.util.spec_from_file_location("bench_drafters", PROJECT_ROOT / "bench" / "bench_drafters.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results(tokens: list[int], cycles: int = 4) -> list[dict]:
    """Eval report rows at T=0 and T=1 for prompts "p0".. with the given speculative tokens per prompt (each
    over `cycles` target forwards); the autoregressive side takes twice the time."""
    def prompt(n):
        return ([GenRecord(new_tokens=n, wall_s=1.0, forwards=cycles, forward_tokens=n, tokens=[1], draft_s=0.2)],
                [GenRecord(new_tokens=n, wall_s=2.0, forwards=n, forward_tokens=n, tokens=[1])])

    ps = [prompt(n) for n in tokens]
    return [{"temperature": t, **summarize([s for s, _ in ps], [a for _, a in ps], [f"p{i}" for i in range(len(ps))])}
            for t in (0.0, 1.0)]


def _row(bd, variant: str, tokens: list[int]) -> dict:
    # through JSON, as bench_drafters.json stores rows (intervals come back as lists)
    return json.loads(json.dumps({"variant": variant, "table": bd.VARIANTS[variant][0], "start": None, "steps": 150,
                                  "tokens_per_s": 800.0, "final_loss": 2.5, "tau_sim": 1.8,
                                  **bd.eval_fields(_results(tokens))}))


def test_variant_table_has_intervals_prompts_and_cycles(bd):
    rows = [_row(bd, "eagle3", [10, 6]),
            {"variant": "medusa", "table": "drafters", "start": None, "error": "loss is NaN at step 3"}]
    lines = bd.table(rows).splitlines()
    assert lines[0] == ("| variant | from | steps | train tok/s | final loss | τ sim | prompts | cycles T=0 | "
                        "τ T=0 [95 %] | speedup T=0 [95 %] | cycles T=1 | τ T=1 [95 %] | speedup T=1 [95 %] | "
                        "= AR (T=0) | draft ms/cycle T=0 |")
    # two prompts, τ 2.5 and 1.5: resamples 1.5, 2.0, 2.5; speedup exactly 2 on both prompts
    assert lines[2] == ("| eagle3 | scratch | 150 | 800 | 2.500 | 1.80 | 2 | 8 | 2.00 [1.50, 2.50] | 2.00× [2.00×, 2.00×] "
                        "| 8 | 2.00 [1.50, 2.50] | 2.00× [2.00×, 2.00×] | 2/2 | 50.0 |")  # 2 x 0.2 s drafting over 8 cycles
    assert lines[3] == "| medusa | scratch | failed: loss is NaN at step 3 |" + " |" * 12
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)


def test_comparisons_pair_each_variant_with_its_control(bd):
    base = [8, 12, 6, 10, 9, 7, 11, 8, 10, 9]
    rows = [_row(bd, "eagle3", base),
            _row(bd, "eagle3+more", [n + 1 for n in base]),  # +0.25 τ on every prompt: outside the noise
            _row(bd, "eagle3+gto", [n + 1 + (1 if i % 2 else -1) for i, n in enumerate(base)]),  # ± its control
            _row(bd, "small+adaspec", base)]  # its control `small` did not run: no comparison
    comps = bd.comparisons(rows)
    assert [(c["variant"], c["control"], c["temperature"]) for c in comps] == [
        ("eagle3+more", "eagle3", 0.0), ("eagle3+more", "eagle3", 1.0),
        ("eagle3+gto", "eagle3+more", 0.0), ("eagle3+gto", "eagle3+more", 1.0)]
    more, gto = comps[0], comps[2]
    # every resample of +1 token per 4-cycle prompt differs by exactly 10/40 (sums of integers, the same divisor)
    assert (more["diff"], more["ci"], more["outside_noise"], more["prompts"]) == (0.25, (0.25, 0.25), True, 10)
    assert gto["diff"] == 0.0 and gto["ci"][0] < 0 < gto["ci"][1] and gto["outside_noise"] is False
    lines = bd.comparison_table(comps).splitlines()
    assert lines[0] == "| variant | vs | T | prompts | Δτ [95 %] | outside the noise |"
    assert lines[2] == "| eagle3+more | eagle3 | 0 | 10 | +0.25 [+0.25, +0.25] | yes |"
    assert lines[4].startswith("| eagle3+gto | eagle3+more | 0 | 10 | +0.00 [-") and lines[4].endswith(" | no |")
    few = bd.comparisons([_row(bd, "eagle3", base[:4]), _row(bd, "eagle3+more", base[:4])])
    assert bd.comparison_table(few).splitlines()[2].endswith("| - (under 10 prompts) |")
    other = bd.comparisons([_row(bd, "eagle3", base[:4]), _row(bd, "eagle3+more", base[:3])])
    assert other[0]["error"].startswith("paired_difference needs the same prompts on both sides: 3 prompts vs 4")
    assert bd.comparison_table(other).splitlines()[2] == "| eagle3+more | eagle3 | 0 | 3 | - | - (not the same prompts) |"


def test_controls_name_real_variants(bd):
    assert set(bd.CONTROL) <= set(bd.VARIANTS) and set(bd.CONTROL.values()) <= set(bd.VARIANTS)
    # a variant that starts from another one is compared with a run of equal training, never with nothing
    assert bd.CONTROL["eagle3+gto"] == "eagle3+more"


def test_cost_table_shows_drafter_forwards_per_cycle(bd):
    """Only drafters that count their forwards get a row: 8 forwards over 4 cycles = 2 per cycle."""
    def results(fwd):
        spec = [[GenRecord(new_tokens=8, wall_s=1.0, forwards=4, forward_tokens=8, tokens=[1], drafter_forwards=fwd)]]
        ar = [[GenRecord(new_tokens=8, wall_s=2.0, forwards=8, forward_tokens=8, tokens=[1])]]
        return [{"temperature": t, **summarize(spec, ar, ["p0"])} for t in (0.0, 1.0)]

    rows = [{"variant": v, **bd.eval_fields(results(f))} for v, f in (("small", 8), ("pard", 4), ("eagle3", None))]
    lines = bd.cost_table(rows).splitlines()
    assert lines[0] == ("| variant | drafter fwd/cycle T=0 | τ T=0 | tok/s T=0 | tok/s AR T=0 | drafter fwd/cycle T=1 | "
                        "τ T=1 | tok/s T=1 | tok/s AR T=1 |")
    assert lines[2:] == ["| small | 2.00 | 2.00 | 8.0 | 4.0 | 2.00 | 2.00 | 8.0 | 4.0 |",
                         "| pard | 1.00 | 2.00 | 8.0 | 4.0 | 1.00 | 2.00 | 8.0 | 4.0 |"]
    assert bd.cost_table(rows[2:]) == ""
