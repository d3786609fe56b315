"""Aggregation of per-generation decoding records into the eval report's numbers.

    from eval.metrics import GenRecord, summarize
    row = summarize(spec_records, ar_records, depth=5)   # tau, accept@d, tok/s, speedup, time split

Every ratio is a ratio of sums over all generations (tokens / forwards, tokens / seconds), not a mean of
per-prompt ratios, so a long answer weighs by its tokens as it does in serving.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenRecord:
    """One generation (one turn of one prompt) by one decoder."""

    new_tokens: int
    wall_s: float
    forwards: int  # target forwards that produced those tokens (prefill excluded, as in tau's definition)
    # speculative only, one entry per verification cycle: draft tokens accepted, and the depth of the tree
    # drafted that cycle (a prompt-lookup drafter may draft shallower trees, or none)
    accept_lengths: list[int] = field(default_factory=list)
    tree_depths: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # drafter calls and tree building
    verify_s: float = 0.0  # the target's verification forward
    other_s: float = 0.0  # acceptance rule, cache bookkeeping, drafter commit...
    tokens: list[int] = field(default_factory=list)  # the generated ids (outputs are compared at T=0)


def acceptance_by_depth(accept_lengths: list[int], tree_depths: list[int], depth: int) -> list[float | None]:
    """alpha_d for d = 1..depth: of the cycles whose draft reached depth d with depths 1..d-1 accepted,
    the fraction that also accepted a depth-d token. None where no cycle got that far."""
    out: list[float | None] = []
    for d in range(1, depth + 1):
        reached = accepted = 0
        for n, t in zip(accept_lengths, tree_depths):
            if n >= d - 1 and t >= d:
                reached += 1
                accepted += n >= d
        out.append(accepted / reached if reached else None)
    return out


def summarize(spec: list[GenRecord], ar: list[GenRecord], depth: int) -> dict:
    """The report's numbers for one benchmark x temperature."""
    s_tok = sum(r.new_tokens for r in spec)
    a_tok = sum(r.new_tokens for r in ar)
    s_wall = sum(r.wall_s for r in spec)
    a_wall = sum(r.wall_s for r in ar)
    s_fwd = sum(r.forwards for r in spec)
    lengths = [n for r in spec for n in r.accept_lengths]
    depths = [t for r in spec for t in r.tree_depths]
    draft, verify, other = (sum(getattr(r, k) for r in spec) for k in ("draft_s", "verify_s", "other_s"))
    cycle = draft + verify + other
    tok_s_spec = s_tok / s_wall if s_wall > 0 else None
    tok_s_ar = a_tok / a_wall if a_wall > 0 else None
    return {
        "generations": len(spec),
        "new_tokens_spec": s_tok,
        "new_tokens_ar": a_tok,
        "target_forwards": s_fwd,
        "cycles": len(lengths),
        "tau": s_tok / s_fwd if s_fwd else None,
        "mean_accepted": sum(lengths) / len(lengths) if lengths else None,
        "accept_by_depth": acceptance_by_depth(lengths, depths, depth),
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
    }
