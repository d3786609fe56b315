"""Aggregation of per-generation decoding records into the eval report's numbers, with 95 % intervals.

    from eval.metrics import GenRecord, summarize
    row = summarize(spec_by_prompt, ar_by_prompt)   # tau, accept@d, tok/s, speedup, time split, row["ci"]

Every ratio is a ratio of sums over all generations (tokens / forwards, tokens / seconds), not a mean of
per-prompt ratios, so a long answer weighs by its tokens as it does in serving.

Intervals: a percentile bootstrap over prompts (the unit that is sampled: an MT-bench prompt's two turns
stay together). Each resample draws as many prompts as there are, with replacement, and recomputes the same
ratio of sums over them; the interval is the central 95 % of those values. The seed is fixed, so a report's
intervals are reproducible from its per-prompt columns (kept in report.json as row["per_prompt"]).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95
REPS = 2000  # resamples: between seeds the interval's ends vary by ~1-2 % of its width (sd, 20 prompts)
SEED = 0
BOOTSTRAP = {"method": "percentile bootstrap over prompts", "level": LEVEL, "reps": REPS, "seed": SEED}
# below this many prompts a comparison gives no verdict: the percentile bootstrap's intervals come out too
# narrow for a handful of units (4 prompts that all moved the same way would read as "outside the noise")
MIN_VERDICT_PROMPTS = 10


@dataclass
class GenRecord:
    """One generation (one turn of one prompt) by one decoder."""

    new_tokens: int  # tokens returned (the prefill's first token included; cut at EOS / max_new_tokens)
    wall_s: float  # the whole call, prefill included
    forwards: int  # target forwards after the prefill (spec: verification cycles)
    forward_tokens: int  # tokens those forwards produced (accepted + bonus), before any cut
    # speculative only, [d-1] = cycles that tried / accepted a depth-d draft token (a depth counts as tried
    # when every shallower one was accepted and the tree went that deep: a prompt-lookup drafter may not)
    depth_attempted: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # drafter calls and tree building
    verify_s: float = 0.0  # the target's verification forward and the acceptance rule
    other_s: float = 0.0  # cache trimming, drafter commit, bookkeeping
    tokens: list[int] = field(default_factory=list)  # the generated ids (outputs are compared at T=0)
    drafter_forwards: int | None = None  # the drafter model's forwards, for drafters that count them


def acceptance_by_depth(records: list[GenRecord]) -> list[float | None]:
    """alpha_d for d = 1.. the deepest tried: of the cycles that tried a depth-d token (depths 1..d-1
    accepted), the share that accepted it. None where no cycle got that far."""
    depth = max((len(r.depth_attempted) for r in records), default=0)
    tried, took = [0] * depth, [0] * depth
    for r in records:
        for d, (t, a) in enumerate(zip(r.depth_attempted, r.depth_accepted)):
            tried[d] += t
            took[d] += a
    return [a / t if t else None for a, t in zip(took, tried)]


def bootstrap(columns, statistic: Callable[[np.ndarray], np.ndarray], *, level: float = LEVEL, reps: int = REPS,
              seed: int = SEED) -> tuple[float, float] | None:
    """The `level` percentile-bootstrap interval of statistic(column sums) over rows (prompts).

    columns: [prompts, k] per-prompt numbers; statistic maps sums [..., k] to values [...] (vectorised, e.g.
    `lambda s: s[..., 0] / s[..., 1]`). None with fewer than 2 prompts: one prompt says nothing about the
    spread between prompts. Resamples where the statistic is undefined (0 / 0: no resampled prompt reached a
    depth) are left out."""
    x = np.asarray(columns, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=reps)  # [reps, prompts]: times each prompt is drawn
    with np.errstate(divide="ignore", invalid="ignore"):
        values = statistic(counts @ x)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ratio(s):
    return s[..., 0] / s[..., 1]


def _ratio_of_ratios(s):  # speedup: (spec tokens / spec seconds) / (AR tokens / AR seconds)
    return (s[..., 0] / s[..., 1]) / (s[..., 2] / s[..., 3])


def _ratio_difference(s):
    return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]


def per_prompt(spec: list[list[GenRecord]], ar: list[list[GenRecord]], prompt_ids: list[str] | None = None) -> dict:
    """Per-prompt sums (each prompt's turns together), as JSON-ready columns: what the intervals and the
    paired comparisons between drafters resample."""
    depth = max((len(r.depth_attempted) for p in spec for r in p), default=0)

    def col(recs, key):
        return [sum(getattr(r, key) for r in p) for p in recs]

    def depth_col(key):
        return [[sum(getattr(r, key)[d] for r in p if d < len(getattr(r, key))) for d in range(depth)] for p in spec]

    return {"prompt_ids": list(prompt_ids) if prompt_ids is not None else [str(i) for i in range(len(spec))],
            "cycle_tokens": col(spec, "forward_tokens"), "cycles": col(spec, "forwards"),
            "new_tokens_spec": col(spec, "new_tokens"), "wall_s_spec": col(spec, "wall_s"),
            "new_tokens_ar": col(ar, "new_tokens"), "wall_s_ar": col(ar, "wall_s"),
            "depth_attempted": depth_col("depth_attempted"), "depth_accepted": depth_col("depth_accepted")}


def intervals(pp: dict, **kw) -> dict:
    """95 % intervals of tau, speedup and acceptance at each depth from per_prompt() columns (None where
    there are fewer than 2 prompts, and for a depth without spread, see _spread); kw goes to bootstrap()."""
    tau = bootstrap(np.column_stack([pp["cycle_tokens"], pp["cycles"]]), _ratio, **kw)
    speedup = bootstrap(np.column_stack([pp["new_tokens_spec"], pp["wall_s_spec"], pp["new_tokens_ar"],
                                         pp["wall_s_ar"]]), _ratio_of_ratios, **kw)
    tried, took = np.asarray(pp["depth_attempted"], float), np.asarray(pp["depth_accepted"], float)
    depth = tried.shape[1] if tried.ndim == 2 else 0
    acc = [bootstrap(np.column_stack([took[:, d], tried[:, d]]), _ratio, **kw) if _spread(took[:, d], tried[:, d])
           else None for d in range(depth)]
    return {"tau": tau, "speedup": speedup, "accept_by_depth": acc}


def _spread(took: np.ndarray, tried: np.ndarray) -> bool:
    """Whether a depth's acceptance has an interval: at least 2 prompts reached it, and its cycles did not all
    accept or all reject (then every resample gives the same rate: a zero-width interval claiming a
    certainty that, say, 0 of 7 cycles does not give)."""
    return int((tried > 0).sum()) >= 2 and 0 < took.sum() < tried.sum()


def paired_difference(a: dict, b: dict, num: str = "cycle_tokens", den: str = "cycles", **kw) -> dict:
    """sum(num)/sum(den) of a minus that of b (per_prompt() columns of two drafters on the same prompts), with
    the interval of the difference from resampling the same prompts for both (prompt-to-prompt difficulty
    then cancels). `outside_noise`: the interval excludes 0; None (no verdict) under MIN_VERDICT_PROMPTS
    prompts. Different prompt lists are a ValueError."""
    if a["prompt_ids"] != b["prompt_ids"]:
        raise ValueError(f"paired_difference needs the same prompts on both sides: {len(a['prompt_ids'])} prompts "
                         f"vs {len(b['prompt_ids'])}, first differing at "
                         f"{next((i for i, (x, y) in enumerate(zip(a['prompt_ids'], b['prompt_ids'])) if x != y), None)}")
    cols = np.column_stack([a[num], a[den], b[num], b[den]])
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = float(_ratio_difference(cols.sum(0)))
    ci = bootstrap(cols, _ratio_difference, **kw)
    return {"diff": diff if np.isfinite(diff) else None, "ci": ci, "prompts": len(a["prompt_ids"]),
            "outside_noise": None if ci is None or len(a["prompt_ids"]) < MIN_VERDICT_PROMPTS
            else bool(ci[0] > 0 or ci[1] < 0)}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two generations differ (a shorter one that is a prefix of the
    other differs where it ends); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(spec: list[list[GenRecord]], ar: list[list[GenRecord]], prompt_ids: list[str] | None = None) -> dict:
    """The report's numbers for one benchmark x temperature; spec[i] / ar[i]: prompt i's turns (the same
    turns on both sides)."""
    pp = per_prompt(spec, ar, prompt_ids)
    spec, ar = [r for p in spec for r in p], [r for p in ar for r in p]
    s_tok = sum(r.new_tokens for r in spec)
    a_tok = sum(r.new_tokens for r in ar)
    s_wall = sum(r.wall_s for r in spec)
    a_wall = sum(r.wall_s for r in ar)
    s_fwd = sum(r.forwards for r in spec)
    s_fwd_tok = sum(r.forward_tokens for r in spec)
    draft, verify, other = (sum(getattr(r, k) for r in spec) for k in ("draft_s", "verify_s", "other_s"))
    cycle = draft + verify + other
    d_fwd = [r.drafter_forwards for r in spec]
    tok_s_spec = s_tok / s_wall if s_wall > 0 else None
    tok_s_ar = a_tok / a_wall if a_wall > 0 else None
    return {
        "generations": len(spec),
        "new_tokens_spec": s_tok,
        "new_tokens_ar": a_tok,
        "target_forwards": s_fwd,
        "tau": s_fwd_tok / s_fwd if s_fwd else None,
        # drafter forwards per target forward (an autoregressive LM drafter: one per tree level; PARD: one)
        "drafter_forwards_per_cycle": (sum(d_fwd) / s_fwd if s_fwd and d_fwd and None not in d_fwd else None),
        "accept_by_depth": acceptance_by_depth(spec),
        "tok_s_spec": tok_s_spec,
        "tok_s_ar": tok_s_ar,
        "speedup": tok_s_spec / tok_s_ar if tok_s_spec and tok_s_ar else None,
        "wall_s_spec": s_wall,
        "wall_s_ar": a_wall,
        "draft_s": draft,  # drafter calls and tree building, seconds over every generation
        "time_split": {k: (v / cycle if cycle > 0 else None)
                       for k, v in (("draft", draft), ("verify", verify), ("other", other))},
        # what speculative decoding adds on top of the target: everything but its verification forward
        "outside_target": (draft + other) / cycle if cycle > 0 else None,
        "identical_outputs": sum(s.tokens == a.tokens for s, a in zip(spec, ar)),
        "depth_attempted": [sum(d) for d in zip(*pp["depth_attempted"])],  # the cycles behind each acceptance rate
        "ci": intervals(pp), "bootstrap": BOOTSTRAP, "per_prompt": pp,
        # where the outputs part (meaningful at T = 0): the mean over the generations that differ at all
        "first_divergence_mean": _mean([d for s, a in zip(spec, ar)
                                        if (d := first_divergence(s.tokens, a.tokens)) is not None]),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
