"""OPT-Tree (Wang et al. 2024): each cycle, the draft tree that maximises the expected acceptance length
under a node budget, with the budget chosen from a cost model so that expected tokens per second is highest.

    from decoding.tree import build_tree
    tree = build_tree(drafter, TreeConfig(kind="opt", depth=5, top_k=8, total_tokens=60), cost=OptCost(...))

A node's value is p̂ = the product of the drafter's probabilities along its path (the chance the target
accepts the whole path, if the drafter were calibrated), and E[accepted] of a tree = Σ p̂ over its nodes.
p̂ never grows from parent to child, so for any budget n the best tree of n nodes is simply the n nodes with
the largest p̂ (a connected tree: a parent always outranks its children). The tree grows depth by depth
with the drafter; after d drafter steps the cost model picks

    n* = argmax_n (E_d(n) + 1) / (t_verify(n) + d · t_draft),   E_d(n) = Σ of the n largest p̂,

the expected tokens (accepted + the bonus) per second of a cycle that verifies those n nodes.
`opt_budget=fixed` keeps n = total_tokens (the paper's node budget) instead.

Choices the paper leaves open, and why:
- Stopping. The paper stops when a depth adds less than a threshold δ to E. Unless `opt_threshold`
  gives δ, we use the cost model's break-even δ_d = rate_d · t_draft: one more drafter step is worth
  it only if it adds at least the expected tokens the current tree yields in that step's time. The gain
  of depth d+1 is judged by the gain of depth d (measured at the largest budget): a depth's new mass is
  at most the mass of the nodes it expands (children's p̂ sum to at most their parent's), so gains shrink.
- Width. The paper expands every node of the newest depth that is in the tree; we expand at most
  `top_k` of them (the best), so the drafter's step cost stays bounded and is the same as EAGLE-2's at
  equal top_k, which makes the two comparable at equal budgets. Each expanded node proposes its best
  total_tokens children (no more can fit in the budget).
- Pool. Only candidates that enter the current best-total_tokens set are appended: a node that falls out
  of it never returns (scores only get added below it), so the partial tree the drafter sees stays at
  most total_tokens nodes per depth.
- Batches. One verification forward serves every root, so one n* is chosen for all (the best mean rate),
  and drafting goes deeper while any root still gains.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from conf.errors import DraftsmithError
from decoding.draft_tree import DraftTree, expand_logits, keep_best


@dataclass
class OptCost:
    """The cost model: verification forward time by node count (linear between points, flat beyond them)
    and one drafter step's time (a running mean of measured steps unless given). `history` keeps
    (nodes, drafter steps, expected accepted tokens Σ p̂ of the tree, mean over roots) of every tree built
    with it: set against the measured τ - 1, the last says how well the drafter's probabilities predict
    acceptance, which is what the budget choice rests on."""

    verify_points: list[tuple[int, float]]  # (nodes, ms)
    draft_ms: float | None = None
    source: str = "given"  # given | measured
    history: list[tuple[int, int, float]] = field(default_factory=list)
    _draft_seen: int = 0

    @classmethod
    def from_config(cls, tree_cfg) -> OptCost | None:
        """The cost model the config gives; None when it asks for a measured one."""
        if tree_cfg.opt_verify_ms is None:
            return None
        return cls([(int(n), float(ms)) for n, ms in zip(tree_cfg.opt_verify_nodes, tree_cfg.opt_verify_ms)],
                   float(tree_cfg.opt_draft_ms))

    def verify_ms(self, n_max: int) -> torch.Tensor:
        """[n_max] float64: t_verify(n) for n = 1..n_max."""
        pts = sorted(self.verify_points)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return torch.from_numpy(np.interp(np.arange(1, n_max + 1), xs, ys))

    def observe_draft(self, ms: float) -> None:
        """One measured drafter step: the mean of every step so far (a measured model only)."""
        if self.source == "given":
            return
        self._draft_seen += 1
        prev = self.draft_ms or 0.0
        self.draft_ms = prev + (ms - prev) / self._draft_seen

    def mean_budget(self) -> float | None:
        return sum(h[0] for h in self.history) / len(self.history) if self.history else None

    def mean_steps(self) -> float | None:
        return sum(h[1] for h in self.history) / len(self.history) if self.history else None

    def mean_expected(self) -> float | None:
        """Mean predicted E[accepted] per cycle (compare with the measured τ - 1)."""
        return sum(h[2] for h in self.history) / len(self.history) if self.history else None


def needs_cost(tree_cfg) -> bool:
    """Whether building this tree needs a cost model (to pick the budget or the stopping point)."""
    return tree_cfg.opt_budget == "cost" or tree_cfg.opt_threshold is None


def measure_counts(n_max: int) -> list[int]:
    """Node counts the decoder times the verification at: powers of two below n_max, and n_max."""
    out, n = [], 1
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def _timed_expand(drafter, tree, frontier, cost: OptCost | None) -> torch.Tensor:
    """The drafter's logits [B, F, V], its time fed to a measured cost model (a device sync on CUDA: the
    builder reads its stopping decision on the host after each depth anyway)."""
    t0 = time.perf_counter()
    logits = expand_logits(drafter, tree, frontier)
    if cost is not None and cost.source != "given":
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        cost.observe_draft(1000 * (time.perf_counter() - t0))
    return logits


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Node indices best first; ties keep stored order, so a parent always precedes its equal-scored child."""
    return torch.sort(-scores, dim=1, stable=True).indices


def _rates(scores: torch.Tensor, n_max: int, steps: int, cost: OptCost | None, fixed: bool):
    """(expected accepted of the best n_max nodes [B], the budget n* (n_max when `fixed`), expected rate per
    row at n* [B] or None without a cost model, expected accepted at n* [B])."""
    n = min(n_max, scores.shape[1])
    best = scores.gather(1, _ranked(scores)[:, :n]).double().exp().cumsum(1)  # [B, n]: E(1..n)
    if cost is None:
        return best[:, -1], n, None, best[:, -1]
    denom = cost.verify_ms(n).to(best.device) + steps * cost.draft_ms  # [n]
    rate = (best + 1) / denom
    pick = n if fixed else int(rate.mean(0).argmax()) + 1
    return best[:, -1], pick, rate[:, pick - 1], best[:, pick - 1]


def opt_tree(drafter, tree_cfg, B: int, device, cost: OptCost | None):
    """Build the OPT-Tree for B roots (see the module docstring); `cost` may be None only when it is not
    needed (opt_budget=fixed with opt_threshold)."""
    if cost is None and needs_cost(tree_cfg):
        raise DraftsmithError("eval.tree.kind=opt needs a cost model here: give eval.tree.opt_verify_nodes, "
                              "opt_verify_ms and opt_draft_ms (the speculative decoder measures its own), or use "
                              "opt_budget=fixed with an opt_threshold")
    fixed = tree_cfg.opt_budget == "fixed"
    N, k = tree_cfg.total_tokens, tree_cfg.top_k
    tree = DraftTree.empty(B, device)
    frontier = torch.full((B, 1), -1, dtype=torch.long, device=device)
    lp = _timed_expand(drafter, tree, frontier, cost).log_softmax(-1)  # [B, 1, V]
    c = min(N, lp.shape[-1])  # no node can own more children than the budget
    scores, topi = lp[:, 0].topk(c, dim=-1)  # cumulative log p̂ of every pooled node
    dev = scores.device
    tree = tree.extend(topi, frontier.to(dev).expand(B, c), scores)
    last = torch.arange(c, device=dev).expand(B, c)  # the newest depth's nodes
    steps = 1
    e_prev, pick, rate, e_pick = _rates(scores, N, steps, cost, fixed)
    gain = e_prev
    while steps < tree_cfg.depth:
        thr = tree_cfg.opt_threshold if tree_cfg.opt_threshold is not None else rate * cost.draft_ms
        if not bool((gain >= thr).any()):
            break
        # expand the best (at most top_k) newest nodes that are in the best-N set: no other node can have
        # a child there, since a child never outranks its parent
        order = _ranked(scores)
        member = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :N], True)
        live = member.gather(1, last)
        F = min(k, int(live.sum(1).max()))
        if F == 0:
            break
        ls = torch.where(live, scores.gather(1, last), float("-inf"))
        frontier = last.gather(1, _ranked(ls)[:, :F])
        lp = _timed_expand(drafter, tree, frontier, cost).log_softmax(-1)  # [B, F, V]
        steps += 1
        topv, topi = lp.topk(c, dim=-1)  # [B, F, c]
        cand = (scores.gather(1, frontier).unsqueeze(-1) + topv).flatten(1)  # [B, F * c]
        # append only the candidates that enter the best-N set (the most any root needs, best first)
        both = torch.cat([scores, cand], 1)
        entering = torch.zeros_like(both, dtype=torch.bool).scatter_(1, _ranked(both)[:, :N], True)
        M = int(entering[:, scores.shape[1]:].sum(1).max())
        if M == 0:
            break
        take = _ranked(cand)[:, :M]
        n0 = tree.num_nodes
        tree = tree.extend(topi.flatten(1).gather(1, take), frontier.repeat_interleave(c, dim=1).gather(1, take),
                           topv.flatten(1).gather(1, take))
        scores = torch.cat([scores, cand.gather(1, take)], 1)
        last = torch.arange(n0, tree.num_nodes, device=dev).expand(B, -1)
        e_now, pick, rate, e_pick = _rates(scores, N, steps, cost, fixed)
        gain, e_prev = e_now - e_prev, e_now
    if cost is not None:
        cost.history.append((pick, steps, float(e_pick.mean())))
    return keep_best(tree, scores, pick)
