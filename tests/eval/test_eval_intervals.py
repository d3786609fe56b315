"""The bootstrap intervals behind every τ, acceptance rate and speedup, and the paired comparison of two
drafters on the same prompts.

    python -m pytest -q tests/eval/test_eval_intervals.py
"""
from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import GenRecord, bootstrap, intervals, paired_difference, per_prompt, summarize


def ratio(s):
    return s[..., 0] / s[..., 1]


def tau_columns(n: int, seed: int = 1) -> np.ndarray:
    """n prompts of (cycle tokens, cycles): 5..40 cycles each, τ around 2 with spread between prompts."""
    rng = np.random.default_rng(seed)
    cycles = rng.integers(5, 40, n)
    return np.column_stack([np.round(cycles * rng.uniform(1.3, 2.7, n)), cycles])


def test_two_prompts_give_the_exact_resample_range():
    # prompt 1: 10 tokens / 4 cycles (τ 2.5), prompt 2: 6 / 4 (τ 1.5); resamples are {1,1} 2.5, {2,2} 1.5 (25 %
    # each) or mixed 2.0, so the 2.5 % and 97.5 % points are the two extremes
    assert bootstrap([[10, 4], [6, 4]], ratio) == (1.5, 2.5)


def test_interval_contains_the_point_and_is_reproducible():
    x = tau_columns(30)
    point = x[:, 0].sum() / x[:, 1].sum()
    lo, hi = bootstrap(x, ratio)
    assert lo < point < hi
    assert bootstrap(x, ratio) == (lo, hi)  # fixed seed: the same interval every time
    other = bootstrap(x, ratio, seed=1)
    assert other != (lo, hi)
    # 2000 resamples: another seed moves the ends by a small part of the width (bound generous: ~5 % seen)
    assert abs(other[0] - lo) < 0.2 * (hi - lo) and abs(other[1] - hi) < 0.2 * (hi - lo)
    wide = bootstrap(x, ratio, level=0.99)
    assert wide[0] < lo and wide[1] > hi


def test_interval_shrinks_with_more_prompts():
    # width ~ 1/sqrt(prompts): 16x the prompts from the same distribution, about a quarter of the width
    # (bound at a half, so sampling luck in the two draws cannot fail it)
    w10 = np.diff(bootstrap(tau_columns(10), ratio))[0]
    w160 = np.diff(bootstrap(tau_columns(160), ratio))[0]
    assert 0 < w160 < 0.5 * w10


def test_one_prompt_has_no_interval():
    assert bootstrap([[10, 4]], ratio) is None
    assert bootstrap(np.zeros((0, 2)), ratio) is None
    assert bootstrap([[3, 3], [5, 5]], ratio) == (1.0, 1.0)  # two prompts that agree: no spread to show


def test_each_resample_recomputes_the_ratio_of_sums():
    # one long prompt (1000 tokens / 500 cycles, τ 2) and nine one-cycle prompts (τ 1): the pooled τ of any
    # resample holding the long prompt is near 2, so the upper end is near 2; a mean of per-prompt τ would
    # stay under ~1.4 (at most a few copies of the long prompt among ten)
    x = np.array([[1000, 500]] + [[1, 1]] * 9)
    lo, hi = bootstrap(x, ratio)
    assert lo == 1.0 and hi > 1.95


def test_undefined_resamples_are_left_out():
    # only prompt 1 reached the depth: resamples without it are 0/0 and do not count as a rate
    lo, hi = bootstrap([[1, 2], [0, 0], [0, 0]], ratio)
    assert (lo, hi) == (0.5, 0.5)
    assert bootstrap([[0, 0], [0, 0]], ratio) is None


def _rec(tokens, cycles, tried=(), took=(), wall=1.0):
    return GenRecord(new_tokens=tokens, wall_s=wall, forwards=cycles, forward_tokens=tokens,
                     depth_attempted=list(tried), depth_accepted=list(took))


def test_per_prompt_keeps_a_prompts_turns_together():
    spec = [[_rec(10, 4, [4, 2], [2, 1]), _rec(6, 4, [4], [1])], [_rec(3, 3, [3, 0], [0, 0])]]
    ar = [[_rec(10, 10, wall=2.0), _rec(6, 6, wall=1.0)], [_rec(3, 3, wall=0.5)]]
    pp = per_prompt(spec, ar, ["a", "b"])
    assert pp == {"prompt_ids": ["a", "b"], "cycle_tokens": [16, 3], "cycles": [8, 3], "new_tokens_spec": [16, 3],
                  "wall_s_spec": [2.0, 1.0], "new_tokens_ar": [16, 3], "wall_s_ar": [3.0, 0.5],
                  "depth_attempted": [[8, 2], [3, 0]], "depth_accepted": [[3, 1], [0, 0]]}
    row = summarize(spec, ar, ["a", "b"])
    assert row["tau"] == 19 / 11 and row["depth_attempted"] == [11, 2] and row["per_prompt"] == pp
    ci = row["ci"]
    # two prompts: τ resamples are 16/8 = 2.0, 3/3 = 1.0 or 19/11
    assert ci["tau"] == (1.0, 2.0)
    # depth 1: 3 of 8 and 0 of 3 -> spread; depth 2: only prompt a reached it -> no interval
    assert ci["accept_by_depth"][0] == (0.0, 3 / 8) and ci["accept_by_depth"][1] is None
    one = summarize(spec[:1], ar[:1])
    assert one["ci"] == {"tau": None, "speedup": None, "accept_by_depth": [None, None]}
    assert one["per_prompt"]["prompt_ids"] == ["0"]


def test_acceptance_at_zero_or_one_has_no_interval():
    # 7 cycles over 3 prompts reached depth 1 and none accepted: every resample says 0.0, which is no interval
    pp = {"cycle_tokens": [3, 2, 2], "cycles": [3, 2, 2], "new_tokens_spec": [3, 2, 2], "wall_s_spec": [1, 1, 1],
          "new_tokens_ar": [3, 2, 2], "wall_s_ar": [2, 2, 2], "depth_attempted": [[3], [2], [2]],
          "depth_accepted": [[0], [0], [0]]}
    assert intervals(pp)["accept_by_depth"] == [None]
    pp["depth_accepted"] = [[3], [2], [2]]
    assert intervals(pp)["accept_by_depth"] == [None]
    pp["depth_accepted"] = [[1], [2], [0]]
    lo, hi = intervals(pp)["accept_by_depth"][0]
    assert 0 <= lo < 3 / 7 < hi <= 1


def _pp(tokens, cycles, ids=None):
    return {"prompt_ids": ids or [str(i) for i in range(len(tokens))], "cycle_tokens": list(tokens),
            "cycles": list(cycles)}


def test_paired_difference_sees_a_small_consistent_gain_that_unpaired_intervals_hide():
    x = tau_columns(20)
    base = _pp(x[:, 0], x[:, 1])
    better = _pp(x[:, 0] + np.maximum(1, x[:, 1] // 10), x[:, 1])  # about +0.1 τ on every prompt
    d = paired_difference(better, base)
    assert d["diff"] == pytest.approx((sum(better["cycle_tokens"]) - sum(base["cycle_tokens"])) / sum(base["cycles"]))
    assert d["outside_noise"] is True and d["ci"][0] > 0 and d["prompts"] == 20
    # the two τ intervals on their own overlap: only the pairing shows the gain is real
    a, b = bootstrap(x, ratio), bootstrap(np.column_stack([better["cycle_tokens"], x[:, 1]]), ratio)
    assert a[1] > b[0]
    same = paired_difference(base, base)
    assert (same["diff"], same["ci"], same["outside_noise"]) == (0.0, (0.0, 0.0), False)
    mixed = paired_difference(_pp([12, 8, 10, 9] * 3, [5] * 12), _pp([10, 10, 9, 10] * 3, [5] * 12))
    assert mixed["ci"][0] < 0 < mixed["ci"][1] and mixed["outside_noise"] is False
    # 4 prompts that all moved up: the bootstrap says [+0.2, +0.2], too few prompts for a verdict
    few = paired_difference(_pp([6, 6, 6, 6], [5] * 4), _pp([5, 5, 5, 5], [5] * 4))
    assert few["ci"] == (pytest.approx(0.2), pytest.approx(0.2)) and few["outside_noise"] is None


def test_paired_difference_needs_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts on both sides: 2 prompts vs 2, first differing at 1"):
        paired_difference(_pp([1, 2], [1, 1], ["p0", "p1"]), _pp([1, 2], [1, 1], ["p0", "q1"]))
    one = paired_difference(_pp([4], [2]), _pp([2], [2]))
    assert one == {"diff": 1.0, "ci": None, "prompts": 1, "outside_noise": None}
