"""Tree verification: the target's inputs for one forward over [root + every tree node], and the rules
that turn its logits into the accepted path plus one bonus token.

    python -m pytest -q tests/decoding/test_verify.py

Rules (tests/decoding/test_verify.py checks each; all but `typical` keep the target's output distribution):
  greedy (T = 0)        a node is accepted when it equals the target's argmax after its parent; the
                        deepest node whose whole path is accepted wins; bonus = the argmax after it.
  deterministic (T > 0) children chosen by top-k are point masses. "Try child x with prob p(x), else zero
                        p(x), renormalise, next sibling" is the same as drawing y ~ p once per node and
                        moving to the child whose token is y (the bonus is y when no child matches), so
                        it is vectorised exactly like greedy with a sample in place of the argmax.
  sampled (T > 0)       children were drawn i.i.d. from q (tree.q): chain rule / SpecInfer multi-round:
                        accept x with min(1, p'(x) / q(x)), else p' <- norm(max(0, p' - q)) and try the
                        next sibling; bonus ~ p' when every sibling fails (p at a leaf).
  traversal (T > 0)     Traversal Verification (Weng et al. 2025): sequence-level, leaf to root. Every node
                        carries a weight a (root 1; child x of Y: min(1, a_Y p_Y(x) / q_Y(x))), the first
                        leaf in depth-first order is accepted with probability a, whole path and all; a
                        rejected node is deleted and its parent Y moves to the residual
                        p_Y <- norm(max(0, a_Y p_Y - q_Y)), a_Y <- eta / (eta + 1 - a_Y), eta = the residual's
                        mass, before its next child is weighed; a parent whose children are all gone is a
                        leaf. Bonus ~ p of the accepted node. On a sampled chain this is block verification
                        (the whole block is judged at once, never worse than the chain rule); top-k children
                        are point masses q = onehot(x) (see _traversal).
  typical (opt-in)      Medusa's p(x) > min(eps, alpha * exp(-H(p))): NOT lossless, flagged by the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.tree import DraftTree, tree_attention_mask, warp_probs


@dataclass
class SamplingRule:
    """How tokens are drawn from the target: shared by verification and autoregressive decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    acceptance: str = "lossless"  # conf.schema.eval.ACCEPTANCE: lossless | traversal | typical (lossy, Medusa)
    typical_epsilon: float = 0.09  # Medusa's posterior_threshold
    typical_alpha: float = 0.3  # Medusa's posterior_alpha

    @property
    def lossy(self) -> bool:
        return self.acceptance == "typical" and self.temperature > 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp_probs(logits, self.temperature, self.top_p, self.top_k)

    def next_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of logits [B, V] -> [B]: argmax at T = 0, else a sample of the warped p."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=generator).squeeze(-1)


@dataclass
class Accepted:
    path: list[int]  # accepted node indices, root -> leaf (depth order)
    bonus: int  # the target's own token after the last accepted node


def tree_block(tree: DraftTree, root: torch.Tensor, ancestors: torch.Tensor | None = None):
    """(input_ids [B, 1+N], relative positions [B, 1+N], visible [B, 1+N, 1+N], ancestors [B, N, N]) of one
    verification forward over [root, nodes]: row i sees column j of the block when j is the root or an
    ancestor-or-self of i. A node at depth d sits d positions after the root, as in the plain sequence."""
    anc = tree.ancestor_mask() if ancestors is None else ancestors
    dev = tree.tokens.device
    B, N = tree.tokens.shape
    ids = torch.cat([root.view(-1, 1).to(dev), tree.tokens], 1)
    pos = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1)
    vis = torch.zeros(B, 1 + N, 1 + N, dtype=torch.bool, device=dev)
    vis[:, :, 0] = True
    vis[:, 1:, 1:] = anc
    return ids, pos, vis, anc


def tree_inputs(tree: DraftTree, root: torch.Tensor, past_len: int, dtype: torch.dtype):
    """(input_ids [B, 1+N], additive 4D mask [B, 1, 1+N, past_len+1+N], position_ids [B, 1+N], ancestors
    [B, N, N]) for one target forward over the root and every node on top of `past_len` cached tokens
    (a DynamicCache: the mask spans exactly the cache)."""
    ids, pos, _, anc = tree_block(tree, root)
    mask = tree_attention_mask(anc, past_len, dtype, prefix=1)
    return ids, mask, past_len + pos, anc


def accept(tree: DraftTree, logits: torch.Tensor, rule: SamplingRule, generator: torch.Generator | None = None,
           ancestors: torch.Tensor | None = None) -> list[Accepted]:
    """Apply `rule` to the target logits [B, 1+N, V] (row 0 = after the root, row i+1 = after node i)."""
    path, bonus = accept_paths(tree, logits, rule, generator, ancestors)
    return [Accepted([i for i in row if i >= 0], int(b)) for row, b in zip(path.tolist(), bonus.tolist())]


def accept_paths(tree: DraftTree, logits: torch.Tensor, rule: SamplingRule, generator: torch.Generator | None = None,
                 ancestors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept` as tensors, for the decoder's hot loop: (path [B, D] accepted node indices root -> leaf, -1
    padded, D = tree.depth_limit; bonus [B]). No host sync for greedy, deterministic, typical and sampled
    chains, sampled trees and traversal (those loop a fixed number of times: over depth and sibling rank, or 2N + 1
moves), as long as the builder set the tree's host-side bounds (depth_bound, width_bound)."""
    if ancestors is None:
        ancestors = tree.ancestor_mask()
    parent_rows = tree.parents + 1
    if rule.temperature == 0:
        y = logits.argmax(-1)  # [B, 1+N]
        return _deepest(tree, tree.tokens == y.gather(1, parent_rows), y, ancestors)
    probs = rule.probs(logits)
    B, R, V = probs.shape  # R = 1 + N rows
    if rule.acceptance == "typical":
        y = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, R)
        return _deepest(tree, _typical_ok(tree, probs, rule), y, ancestors)
    if rule.acceptance == "traversal":
        return _traversal(tree, probs, generator, ancestors)
    if tree.q is None:
        y = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, R)
        return _deepest(tree, tree.tokens == y.gather(1, parent_rows), y, ancestors)
    if tree.chain:  # the builder's host-side fact (a static tree that happens to be a chain takes the tree rule)
        path, bonus = _chain_rule(tree, probs, generator)
    else:
        path, bonus = _sampled_tree(tree, probs, generator)
    D = tree.depth_limit
    if path.shape[1] < D:
        path = torch.cat([path, path.new_full((B, D - path.shape[1]), -1)], 1)
    return path, bonus


def _deepest(tree: DraftTree, node_ok: torch.Tensor, y: torch.Tensor, anc: torch.Tensor):
    """Deepest node whose whole path (itself and every ancestor) is ok; ties go to the first stored
    (higher-ranked) sibling. bonus = y at the row after that node (row 0 when nothing is accepted)."""
    B, N = tree.tokens.shape
    D = tree.depth_limit
    if N == 0:
        return torch.full((B, D), -1, dtype=torch.long, device=y.device), y[:, 0]
    if tree.alive is not None:  # nodes after a device-side cut are never accepted
        node_ok = node_ok & tree.alive
    valid = ~(anc & ~node_ok[:, None, :]).any(-1)  # [B, N]
    key = torch.where(valid, tree.depths, 0)
    best = key.argmax(1)
    has = key.gather(1, best[:, None]) > 0  # [B, 1]
    ar = torch.arange(B, device=anc.device)
    path = torch.where(has, tree.path_nodes(anc, D)[ar, best], -1)
    bonus = y.gather(1, torch.where(has, best[:, None] + 1, 0)).squeeze(1)
    return path, bonus


def _typical_ok(tree: DraftTree, probs: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """Medusa's typical acceptance per node: p(x) > min(eps, alpha * exp(-H(p))) under the parent's row."""
    ent = -(probs * (probs + 1e-5).log()).sum(-1)  # [B, 1+N], Medusa's smoothed entropy
    thr = torch.clamp(rule.typical_alpha * torch.exp(-ent), max=rule.typical_epsilon)
    rows = tree.parents + 1
    ar = torch.arange(probs.shape[0], device=probs.device)[:, None]
    return probs[ar, rows, tree.tokens] > thr.gather(1, rows)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row; p itself where the residual has no mass (p == q up to rounding,
    where a rejection has probability zero and is only reachable through rounding)."""
    r = (p - q).clamp(min=0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp(min=1e-30), p)


def _chain_rule(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan/Chen speculative sampling for sampled chains, vectorised over depth: node i's parent is
    node i-1, so the row its token was drawn from is row i."""
    B, N = tree.tokens.shape
    x = tree.tokens.unsqueeze(-1)
    px = probs[:, :N].gather(2, x).squeeze(-1)
    qx = tree.q[:, :N].gather(2, x).squeeze(-1)
    u = torch.rand(B, N, generator=generator, device=probs.device)
    ok = u * qx < px  # u < min(1, p/q)
    if tree.alive is not None:  # a dead node's q row is zero, so the residual after it is p: a plain end
        ok = ok & tree.alive
    n = ok.long().cumprod(1).sum(1)  # leading accepts
    ar = torch.arange(B, device=probs.device)
    # rejected at n < N: residual of row n; all accepted: q's row N is zero (a leaf), so this is p
    resid = _residual(probs[ar, n], tree.q[ar, n])
    bonus = torch.multinomial(resid, 1, generator=generator).squeeze(-1)
    steps = torch.arange(N, device=probs.device)
    return torch.where(steps < n[:, None], steps, -1), bonus


def _sampled_tree(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecInfer multi-round speculative sampling down trees whose siblings were drawn i.i.d. from q,
    vectorised over B: the only loops are over depth and sibling rank."""
    B, N = tree.tokens.shape
    dev = probs.device
    ar = torch.arange(B, device=dev)
    earlier = torch.ones(N, N, dtype=torch.bool, device=dev).tril(-1)  # [i, j]: j stored before i
    rank = ((tree.parents[:, :, None] == tree.parents[:, None, :]) & earlier).sum(-1)  # rank among siblings
    # host-side bounds (no sync): siblings per parent and depth, as the builder knows them
    W = tree.width_bound if tree.width_bound is not None else int(rank.max()) + 1
    D = tree.depth_limit
    child = torch.full((B, N + 1, W), -1, dtype=torch.long, device=dev)  # [b, parent row, rank] -> node
    child[ar[:, None], tree.parents + 1, rank] = torch.arange(N, device=dev).expand(B, N)
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)
    resid = probs[:, 0]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    path = torch.full((B, D), -1, dtype=torch.long, device=dev)
    for d in range(D):
        row = cur + 1
        qrow = tree.q[ar, row]  # [B, V]: the distribution the current node's children were drawn from
        moved = torch.zeros_like(done)
        nxt = cur
        for j in range(W):
            c = child[ar, row, j]
            active = ~done & ~moved & (c >= 0)
            x = tree.tokens[ar, c.clamp(min=0)]
            u = torch.rand(B, generator=generator, device=dev)
            ok = active & (u * qrow[ar, x] < resid[ar, x])  # u < min(1, p'(x) / q(x))
            nxt = torch.where(ok, c, nxt)
            moved |= ok
            resid = torch.where((active & ~ok)[:, None], _residual(resid, qrow), resid)
        done |= ~moved  # every sibling failed (or none existed): the bonus comes from resid
        path[:, d] = torch.where(moved, nxt, -1)
        cur = nxt
        resid = torch.where(moved[:, None], probs[ar, cur + 1], resid)
    bonus = torch.multinomial(resid, 1, generator=generator).squeeze(-1)
    return path, bonus


def _tree_links(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    """(first child [B, 1+N] per row (row 0 = the root, row i+1 = node i), next sibling [B, N] per node), in
    stored order, -1 = none: the depth-first walk's moves."""
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    ids = torch.arange(N, device=dev).expand(B, N)
    first = torch.full((B, N + 1), N, dtype=torch.long, device=dev)
    first.scatter_reduce_(1, tree.parents + 1, ids, reduce="amin")
    later = torch.ones(N, N, dtype=torch.bool, device=dev).triu(1)  # [i, j]: j stored after i
    sib = (tree.parents[:, :, None] == tree.parents[:, None, :]) & later
    nxt = torch.where(sib, ids[:, None, :], N).amin(-1) if N else ids
    return torch.where(first < N, first, -1), torch.where(nxt < N, nxt, -1)


def _still_owed(a: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """After a child drawn from q [B, V] is rejected under weight a [B] and target p [B, V]: the parent's new
    weight eta / (eta + 1 - a) and target norm(max(0, a p - q)), eta = sum(max(0, a p - q)). The rejection
    had probability eta + 1 - a, and a p - min(a p, q) is the mass that trial still owes."""
    res = (a[:, None] * p - q).clamp(min=0)
    eta = res.sum(-1)
    den = eta + 1 - a
    # den = 0 only when a = 1 and p <= q everywhere (p = q): a rejection that only rounding reaches
    a_new = torch.where(den > 0, eta / den.clamp(min=1e-30), a)
    return a_new, torch.where((eta > 0)[:, None], res / eta.clamp(min=1e-30)[:, None], p)


def _traversal(tree: DraftTree, probs: torch.Tensor, generator, ancestors: torch.Tensor):
    """Traversal Verification, vectorised over B: every tree walks its own nodes depth-first, one move per
    iteration (enter a node, or judge one), so at most 2N + 1 iterations.

    Why it is lossless (induction over subtrees): judging the subtree of Y with weight a_Y accepts through Y
    with probability a_Y, and then Y's next token follows p_Y and everything after it follows the target.
    A child c of Y holding token x is itself such a subtree with weight min(1, a_Y p_Y(x) / q_Y(x)), so from
    Y's side it is one speculative-sampling trial of the sub-probability a_Y p_Y against q_Y; after a
    rejection the mass still owed is max(0, a_Y p_Y - q_Y), which is the residual and its weight above.

    q_Y, the distribution c was drawn from: tree.q's row for sampled trees (siblings i.i.d., so the same q
    for every sibling). Top-k children (tree.q is None) were not drawn at random; the choice made here is to
    treat the j-th child as a draw from the point mass on its token, which is exactly how it was produced
    given the tree so far, so the rule stays lossless (a child's weight is then a_Y p_Y(x), and a rejection
    zeroes x in p_Y). Weighing top-k children by the drafter's own q instead would claim draws that never
    happened and bias the output. With point masses the chance of accepting any path equals its target
    probability, as under the token-level rule: traversal gains nothing on top-k trees, only on sampled ones."""
    B, N = tree.tokens.shape
    dev = probs.device
    ar = torch.arange(B, device=dev)
    first, nxt = _tree_links(tree)
    P = probs.clone()  # [B, 1+N, V]: each row's current (residual) target distribution
    a = torch.ones(B, N + 1, device=dev, dtype=probs.dtype)  # each row's current weight (root: 1)
    cur = first[:, 0]  # node to enter, or (when judging) the row to judge
    judge = cur < 0  # a tree without nodes: the root is judged (and accepted) at once
    cur = torch.where(judge, 0, cur)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    row = torch.zeros(B, dtype=torch.long, device=dev)  # the accepted row
    for _ in range(2 * N + 1):
        # enter: the node's weight from its parent's current state; go down to its first child, or judge it
        n = cur.clamp(min=0, max=max(N - 1, 0))
        entering = ~done & ~judge
        if N:
            pr, x = tree.parents[ar, n] + 1, tree.tokens[ar, n]
            qx = tree.q[ar, pr, x].clamp(min=1e-30) if tree.q is not None else 1.0
            w = (a[ar, pr] * P[ar, pr, x] / qx).clamp(max=1.0)
            a[ar, n + 1] = torch.where(entering, w, a[ar, n + 1])
            child = first[ar, n + 1]
            cur = torch.where(entering, torch.where(child >= 0, child, n + 1), cur)
            judge = judge | (entering & (child < 0))
        # judge row r: accept it (and its whole path) with probability a_r; the root is always accepted
        u = torch.rand(B, generator=generator, device=dev)
        judging = ~done & judge
        r = cur
        ok = judging & ((r == 0) | (u < a[ar, r]))
        row = torch.where(ok, r, row)
        done = done | ok
        bad = judging & ~ok
        # no early exit: a fixed 2N + 1 moves (a finished walk's moves change nothing), so no host sync
        # reject node r - 1: delete it, move its parent Y to the residual, then its next sibling or Y itself
        m = (r - 1).clamp(min=0)
        y = tree.parents[ar, m] + 1
        # (a point mass built by scatter: one_hot would check its input's range on the host)
        qrow = (tree.q[ar, y] if tree.q is not None
                else torch.zeros_like(P[:, 0]).scatter_(1, tree.tokens[ar, m][:, None], 1.0))
        aY, pY = a[ar, y], P[ar, y]
        a_new, p_new = _still_owed(aY, pY, qrow)
        a[ar, y] = torch.where(bad, a_new, aY)
        P[ar, y] = torch.where(bad[:, None], p_new, pY)
        s = nxt[ar, m]
        cur = torch.where(bad, torch.where(s >= 0, s, y), cur)
        judge = torch.where(bad, s < 0, judge)
    D = tree.depth_limit
    if N == 0:
        path = torch.full((B, D), -1, dtype=torch.long, device=dev)
    else:
        path = torch.where((row > 0)[:, None], tree.path_nodes(ancestors, D)[ar, (row - 1).clamp(min=0)], -1)
    bonus = torch.multinomial(P[ar, row], 1, generator=generator).squeeze(-1)
    return path, bonus


def cycle_summary(tree: DraftTree, path: torch.Tensor, bonus: torch.Tensor,
                  toks: torch.Tensor | None = None) -> torch.Tensor:
    """[bonus, next depth attempted, accepted n, tree depth, path (D), path tokens (D)] for one root (path [D],
    bonus [1]) as one long tensor, so a cycle moves everything the host needs in a single transfer. Dead
    nodes (`tree.alive`) were never offered: they neither count as attempted nor deepen the tree."""
    n = (path >= 0).sum()
    last = torch.where(n > 0, path.gather(0, (n - 1).clamp(min=0).view(1))[0], -1)  # no 0-d index: .item()
    nodes = tree.parents[0] == last
    depths = tree.depths[0]
    if tree.alive is not None:
        nodes = nodes & tree.alive[0]
        depths = torch.where(tree.alive[0], depths, 0)
    depth = depths.max() if tree.num_nodes else n.new_zeros(())
    if toks is None:
        toks = tree.tokens[0].gather(0, path.clamp(min=0))
    head = torch.stack([bonus[0], nodes.any().long(), n, depth.long()])
    return torch.cat([head, path, toks])
