"""Aggregation of per-generation decoding records into the eval report's numbers.

    from eval.metrics import GenRecord, summarize
    row = summarize(spec_records, ar_records)   # tau, accept@d, tok/s, speedup, time split

Every ratio is a ratio of sums over all generations (tokens / forwards, tokens / seconds), not a mean of
per-prompt ratios, so a long answer weighs by its tokens as it does in serving.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two generations differ (a shorter one that is a prefix of the
    other differs where it ends); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(spec: list[GenRecord], ar: list[GenRecord]) -> dict:
    """The report's numbers for one benchmark x temperature."""
    s_tok = sum(r.new_tokens for r in spec)
    a_tok = sum(r.new_tokens for r in ar)
    s_wall = sum(r.wall_s for r in spec)
    a_wall = sum(r.wall_s for r in ar)
    s_fwd = sum(r.forwards for r in spec)
    s_fwd_tok = sum(r.forward_tokens for r in spec)
    draft, verify, other = (sum(getattr(r, k) for r in spec) for k in ("draft_s", "verify_s", "other_s"))
    cycle = draft + verify + other
    tok_s_spec = s_tok / s_wall if s_wall > 0 else None
    tok_s_ar = a_tok / a_wall if a_wall > 0 else None
    return {
        "generations": len(spec),
        "new_tokens_spec": s_tok,
        "new_tokens_ar": a_tok,
        "target_forwards": s_fwd,
        "tau": s_fwd_tok / s_fwd if s_fwd else None,
        "accept_by_depth": acceptance_by_depth(spec),
        "tok_s_spec": tok_s_spec,
        "tok_s_ar": tok_s_ar,
        "speedup": tok_s_spec / tok_s_ar if tok_s_spec and tok_s_ar else None,
        "wall_s_spec": s_wall,
        "wall_s_ar": a_wall,
        "time_split": {k: (v / cycle if cycle > 0 else None)
                       for k, v in (("draft", draft), ("verify", verify), ("other", other))},
        # what speculative decoding adds on top of the target: everything but its verification forward
        "outside_target": (draft + other) / cycle if cycle > 0 else None,
        "identical_outputs": sum(s.tokens == a.tokens for s, a in zip(spec, ar)),
        # where the outputs part (meaningful at T = 0): the mean over the generations that differ at all
        "first_divergence_mean": _mean([d for s, a in zip(spec, ar)
                                        if (d := first_divergence(s.tokens, a.tokens)) is not None]),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
