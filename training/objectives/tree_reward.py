"""Draft-tree rewards at training time: the decoder's trees for many positions at once, and their exact
expected accepted length under the target (GTO's "draft tree reward").

    python -m pytest -q tests/training/test_gto_reward.py

Pieces, all batched over P roots = P training positions of one sequence:
- `prefix_state(model, ids, feats)`: the EAGLE drafter's step 0 over the whole sequence (the committed
  pairs (f_t, x_{t+1}) of every position), run once; the keys/values every root then attends to.
- `BatchedTreeDrafter`: a drafters.base.Drafter whose `expand` computes tree nodes for all P roots at once
  from that state. decoding.tree.build_tree drives it exactly as the decoder drives EagleDecoding, so
  the tree at row t is the tree the decoder builds after committing x_0..x_{t+1} (tests prove it).
- `chain_logprob`: log M(path) along given paths, with gradient (GTO's ratio).
- `target_node_logprobs`: the target reads the teacher-forced prefix once (KV cache), then ONE forward per
  group of roots reads every node of their trees (a 4D mask: a node sees the prefix up to its root and its
  own ancestors) and returns log p_target of each node's token given its path, and whether it is the
  target's argmax there.
- `tree_reward`: L_i = sum_{j<=l_i} prod_{k<=j} p(x_k | prefix, x_<k) per branch (root-to-leaf path), the
  exact expected accepted length of that branch when drafts are point masses (accept x with prob p(x)),
  and r = (1/eta) log sum_i exp(eta L_i).

Row t is the position whose committed pair is (f_t, x_{t+1}): its tree's root is x_{t+1}, depth-1 nodes
draft x_{t+2}, a depth-d node sits at position t + d (drafter) / t + 1 + d (target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from decoding.tree import keep_cache_entries
from drafters.base import Drafter
from drafters.common import shifted
from drafters.layers import causal_attend, repeat_kv


@dataclass
class PrefixState:
    """Step 0 of an EAGLE drafter over one sequence: outputs [n, H] (row t = the root state of position
    t) and per layer (keys, values) [1, kv_heads, n, head_dim]."""

    out: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def detach(self) -> PrefixState:
        return PrefixState(self.out.detach(), [(k.detach(), v.detach()) for k, v in self.kv])


def prefix_state(model, input_ids: torch.Tensor, features: torch.Tensor) -> list[PrefixState]:
    """Step 0 over rows t = 0..T-2 of every sequence [S, T] (features [S, T, D]: the target output the
    family reads, `model.feature_source`), with gradient when enabled. One PrefixState per sequence."""
    S, T = input_ids.shape
    n = max(T - 1, 1)
    hidden = model.project(shifted(features, 0, n))
    positions = torch.arange(n, device=hidden.device).expand(S, n)
    out, kvs = model.core(hidden, model.embed(shifted(input_ids, 1, n)), positions,
                          [causal_attend] * model.num_kv_layers)
    return [PrefixState(out[s], [(k[s:s + 1], v[s:s + 1]) for k, v in kvs]) for s in range(S)]


def attend_blocks(q, k_self, v_self, k0, v0, rows, k_old=None, v_old=None, vis_old=None):
    """Attention of F new tree nodes per root: q [P, h, F, d], their own k/v [P, kv, F, d]. Each root p
    sees the prefix keys k0/v0 [1, kv, n, d] at columns <= rows[p] (shared by all roots, never copied),
    earlier tree nodes k_old/v_old [P, kv, M, d] where vis_old [P, F, M], and itself. One softmax over
    the three blocks, in fp32 (as drafters.layers.ttt_attend)."""
    P, h, F, d = q.shape
    kv = k0.shape[1]
    rep = h // kv
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(P, kv, rep * F, d)  # head i uses kv head i // rep (repeat_kv's order)
    s0 = torch.matmul(qg, k0.transpose(-1, -2)).float() * scale  # [P, kv, rep*F, n]
    n = k0.shape[2]
    seen = torch.arange(n, device=q.device)[None, :] <= rows[:, None]  # [P, n]
    s0 = s0.masked_fill(~seen[:, None, None, :], float("-inf"))
    s_self = (q * repeat_kv(k_self, rep)).sum(-1).float().reshape(P, kv, rep * F, 1) * scale
    blocks = [s0, s_self]
    if k_old is not None and k_old.shape[2]:
        s_old = torch.matmul(qg, k_old.transpose(-1, -2)).float() * scale  # [P, kv, rep*F, M]
        vis = vis_old[:, None, None].expand(P, 1, rep, F, vis_old.shape[-1]).reshape(P, 1, rep * F, -1)
        blocks.append(s_old.masked_fill(~vis, float("-inf")))
    p = torch.softmax(torch.cat(blocks, -1), -1).to(q.dtype)
    out = torch.matmul(p[..., :n], v0) + p[..., n:n + 1] * repeat_kv(v_self, rep).reshape(P, kv, rep * F, d)
    if len(blocks) == 3:
        out = out + torch.matmul(p[..., n + 1:], v_old)
    return out.reshape(P, h, F, d)


def _run_nodes(model, state: PrefixState, rows, hidden_in, tokens, depths, old):
    """Core output [P, F, H] and per-layer (k, v) of F new nodes per root; `old(layer)` gives the earlier
    nodes' (k, v, visibility) or None."""
    def attend_for(layer):
        k0, v0 = state.kv[layer]

        def attend(q, k, v):
            prev = old(layer)
            return attend_blocks(q, k, v, k0, v0, rows, *(prev or (None, None, None)))
        return attend
    positions = rows[:, None] + depths
    return model.core(hidden_in, model.embed(tokens), positions, [attend_for(i) for i in range(model.num_kv_layers)])


class BatchedTreeDrafter(Drafter):
    """The decoding-time EAGLE drafter for P positions of one training sequence at once (B = P roots).

    Root p is row rows[p]: its draft distribution is step 0's output there; a depth-d node reads its
    parent's output, its own token at position rows[p] + d, and attends to the committed pairs 0..rows[p]
    plus its ancestors - what EagleDecoding computes one sequence state at a time. Nodes are computed
    lazily (ancestors of the frontier, depth by depth, vectorised over roots), cached, and never recomputed
    unless the tree changes under them (then all state is dropped)."""

    uses_features = True

    def __init__(self, model, state: PrefixState, rows: torch.Tensor):
        self.model, self.state, self.rows = model, state.detach(), rows
        self.name, self.feature_source = model.family, model.feature_source
        self.vocab_size = int(model.dims.vocab_size)
        self.device = rows.device
        self._st: dict | None = None

    def start(self, input_ids, features):
        raise TypeError("BatchedTreeDrafter is built from a training prefix; decode with model.as_drafter()")

    def commit(self, new_ids, new_features):
        raise TypeError("BatchedTreeDrafter is built from a training prefix; decode with model.as_drafter()")

    def _buffers(self, tree) -> dict:
        """Per-node state buffers for `tree`, grown as it grows (keeping what was computed); dropped when
        an already-seen node changed."""
        P, N = tree.tokens.shape
        st = self._st
        if st is not None:
            m = st["seen"]
            if m > N or not (torch.equal(st["tokens"][:, :m], tree.tokens[:, :m])
                             and torch.equal(st["parents"][:, :m], tree.parents[:, :m])):
                st = None
        if st is None or N > st["cap"]:
            old, cap = st, max(N, 2 * (st["cap"] if st else 0), 16)  # + one spare slot (index cap) for padding
            d, dev, dt = self.model.dims, self.device, self.model.param_dtype
            L = self.model.num_kv_layers

            def grow(key, shape, dim, dtype=dt, fill=0):
                new = torch.full(shape, fill, dtype=dtype, device=dev)
                if old is not None:
                    new.narrow(dim, 0, old["cap"]).copy_(old[key].narrow(dim, 0, old["cap"]))
                return new
            kv_shape = (P, d.num_key_value_heads, cap + 1, d.head_dim)
            st = {"cap": cap, "seen": old["seen"] if old else 0,
                  "hidden": grow("hidden", (P, cap + 1, d.hidden_size), 1),
                  "done": grow("done", (P, cap + 1), 1, torch.bool, False),
                  "tokens": grow("tokens", (P, cap + 1), 1, torch.long, -1),
                  "parents": grow("parents", (P, cap + 1), 1, torch.long, -2)}
            for key in ("k", "v"):
                st[key] = [torch.zeros(kv_shape, dtype=dt, device=dev) for _ in range(L)]
                if old is not None:
                    for new, was in zip(st[key], old[key]):
                        new[:, :, :old["cap"]] = was[:, :, :old["cap"]]
            self._st = st
        st["tokens"][:, :N], st["parents"][:, :N], st["seen"] = tree.tokens, tree.parents, N
        return st

    @torch.no_grad()
    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        P, N = tree.tokens.shape
        if P != self.rows.shape[0] or frontier.shape[0] != P:
            raise ValueError(f"tree has {P} roots and frontier {frontier.shape[0]} rows, but this drafter has "
                             f"{self.rows.shape[0]} positions")
        st = self._buffers(tree)
        H = st["hidden"].shape[-1]
        if N and (frontier >= 0).any():
            anc = tree.ancestor_mask()
            f_anc = anc.gather(1, frontier.clamp_min(0)[..., None].expand(-1, -1, N)) & (frontier >= 0)[..., None]
            need = f_anc.any(1) & ~st["done"][:, :N]
            for d in tree.depths[need].unique().tolist():  # ancestors first
                sel = need & (tree.depths == d)
                count = sel.sum(1)
                order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :int(count.max())]
                ok = torch.arange(order.shape[1], device=self.device)[None] < count[:, None]
                self._compute(st, tree, anc, torch.where(ok, order, st["cap"]), ok)
        hidden = self.state.out[self.rows][:, None].expand(P, frontier.shape[1], H)
        if N:
            nodes = st["hidden"].gather(1, frontier.clamp_min(0)[..., None].expand(-1, -1, H))
            hidden = torch.where((frontier < 0)[..., None], hidden, nodes)
        return self.model.target_vocab_logits(hidden)

    def _compute(self, st: dict, tree, anc: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> None:
        """State of nodes idx [P, F] (one depth; padded entries point at the spare slot)."""
        N = tree.num_nodes
        safe = torch.where(ok, idx, 0)
        par = tree.parents.gather(1, safe)
        H = st["hidden"].shape[-1]
        root = self.state.out[self.rows][:, None].expand_as(st["hidden"][:, :idx.shape[1]])
        hidden_in = torch.where((par < 0)[..., None], root,
                                st["hidden"].gather(1, par.clamp_min(0)[..., None].expand(-1, -1, H)))
        vis = anc.gather(1, safe[..., None].expand(-1, -1, N)) & st["done"][:, None, :N]  # ancestors, not self

        def old(layer):
            return st["k"][layer][:, :, :N], st["v"][layer][:, :, :N], vis
        out, kvs = _run_nodes(self.model, self.state, self.rows, hidden_in, tree.tokens.gather(1, safe),
                              tree.depths.gather(1, safe), old)
        st["hidden"].scatter_(1, idx[..., None].expand_as(out), out)
        for layer, (k, v) in enumerate(kvs):
            at = idx[:, None, :, None].expand_as(k)
            st["k"][layer].scatter_(2, at, k)
            st["v"][layer].scatter_(2, at, v)
        st["done"].scatter_(1, idx, True)
        st["done"][:, st["cap"]] = False


def token_logprobs(model, out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log q(tokens | states out) [...] from core outputs [..., H] and target-vocab token ids [...]. Over
    the draft vocabulary when the family has one (the same numbers as target_vocab_logits, without a
    [.., V] tensor); -inf for a token the drafter cannot emit."""
    if hasattr(model, "draft_logits"):
        lp = model.draft_logits(out).log_softmax(-1)
        idx = torch.cumsum(model.t2d.long(), 0) - 1
        tok = tokens.clamp(0, model.t2d.shape[0] - 1)
        got = lp.gather(-1, idx[tok].clamp_min(0)[..., None])[..., 0]
        return torch.where(model.t2d[tok], got, torch.full_like(got, float("-inf")))
    lp = model.target_vocab_logits(out).log_softmax(-1)
    return lp.gather(-1, tokens.clamp_min(0)[..., None])[..., 0]


def chain_logprob(model, state: PrefixState, rows: torch.Tensor, tokens: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """sum_{k < lengths[p]} log q(tokens[p, k] | root p, tokens[p, :k]) [P]: the drafter's log-probability
    of drafting the path `tokens` [P, D] (first lengths[p] entries) from root p, with gradient through
    `state` and the weights (the same computation as the tree's nodes, along one chain)."""
    P = rows.shape[0]
    D = int(lengths.max()) if P else 0
    total = torch.zeros(P, device=rows.device)
    if D == 0:
        return total
    hidden = state.out[rows][:, None]  # [P, 1, H]
    lp = token_logprobs(model, hidden[:, 0], tokens[:, 0])
    total = total + torch.where(lengths >= 1, lp, torch.zeros_like(lp))
    ks = [[] for _ in range(model.num_kv_layers)]
    vs = [[] for _ in range(model.num_kv_layers)]
    for d in range(1, D):
        vis = torch.ones(P, 1, d - 1, dtype=torch.bool, device=rows.device)

        def old(layer, d=d, vis=vis):
            return (torch.cat(ks[layer], 2), torch.cat(vs[layer], 2), vis) if d > 1 else None
        depth = torch.full((P, 1), d, dtype=torch.long, device=rows.device)
        out, kvs = _run_nodes(model, state, rows, hidden, tokens[:, d - 1:d], depth, old)
        for layer, (k, v) in enumerate(kvs):
            ks[layer].append(k)
            vs[layer].append(v)
        lp = token_logprobs(model, out[:, 0], tokens[:, d])
        total = total + torch.where(lengths > d, lp, torch.zeros_like(lp))
        hidden = out
    return total


@torch.no_grad()
def target_node_logprobs(target, input_ids: torch.Tensor, rows: torch.Tensor, trees: list,
                         roots_per_forward: int | None = None,
                         chunk: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For every node of every tree (each over the same P roots of sequence `input_ids` [T]): log p_target
    of its token given the prefix x_0..x_{rows+1} and its ancestors, and whether that token is the target's
    argmax there. The target reads the prefix once into a KV cache; then ONE forward per group of
    `roots_per_forward` roots (default all) reads every node of those roots' trees on top of it, with a 4D
    mask (a node sees the prefix up to its root and its own ancestors) and depth-correct positions."""
    from transformers import DynamicCache

    T, P, dev = input_ids.shape[0], rows.shape[0], input_ids.device
    sizes = [t.num_nodes for t in trees]
    S = sum(sizes)
    if S == 0 or P == 0:
        return [(torch.zeros(P, n, device=dev), torch.zeros(P, n, dtype=torch.bool, device=dev)) for n in sizes]
    toks = torch.cat([t.tokens for t in trees], 1)  # [P, S]: every node of a root, tree after tree
    depths = torch.cat([t.depths for t in trees], 1)
    vis = torch.zeros(P, S, S, dtype=torch.bool, device=dev)  # ancestors (and self) within the same tree
    parents, off = [], 0
    for t, n in zip(trees, sizes):
        vis[:, off:off + n, off:off + n] = t.ancestor_mask()
        parents.append(torch.where(t.parents >= 0, t.parents + off, -1))
        off += n
    parents = torch.cat(parents, 1)
    cache = DynamicCache(config=target.config)
    prefix_h = target(input_ids[None], cache=cache, use_cache=True, logits=False).last_hidden[0]
    node_h = prefix_h.new_empty(P, S, prefix_h.shape[-1])
    g = roots_per_forward or P
    for a in range(0, P, g):
        r = rows[a:a + g]
        G = r.shape[0]
        see = torch.cat([(torch.arange(T, device=dev)[None] <= r[:, None] + 1).repeat_interleave(S, 0),
                         torch.block_diag(*vis[a:a + g])], 1)
        mask = torch.zeros(see.shape, dtype=target.dtype, device=dev).masked_fill(~see, float("-inf"))
        out = target(toks[a:a + g].reshape(1, G * S), attention_mask=mask[None, None],
                     position_ids=(r[:, None] + 1 + depths[a:a + g]).reshape(1, G * S), cache=cache,
                     use_cache=True, logits=False)
        keep_cache_entries(cache, T, [])  # the next group sees the prefix only
        node_h[a:a + g] = out.last_hidden[0].view(G, S, -1)
    # the state whose next-token distribution drafts each node: its parent's, or the root's (prefix row t+1)
    query = torch.where((parents < 0)[..., None], prefix_h[rows + 1][:, None],
                        node_h.gather(1, parents.clamp_min(0)[..., None].expand_as(node_h))).flatten(0, 1)
    flat = toks.flatten()
    logp = torch.empty(P * S, device=dev)
    best = torch.empty(P * S, dtype=torch.bool, device=dev)
    for a in range(0, P * S, chunk):  # full-vocabulary logits only for a chunk of nodes at a time
        lg = target.lm_head(query[a:a + chunk]).float()
        logp[a:a + chunk] = lg.log_softmax(-1).gather(-1, flat[a:a + chunk, None])[:, 0]
        best[a:a + chunk] = lg.argmax(-1) == flat[a:a + chunk]
    logp, best = logp.view(P, S), best.view(P, S)
    res, off = [], 0
    for n in sizes:
        res.append((logp[:, off:off + n], best[:, off:off + n]))
        off += n
    return res


def branch_lengths(logp: torch.Tensor, tree, anc: torch.Tensor | None = None) -> torch.Tensor:
    """[P, N]: for the branch ending at node u, sum over its nodes v (root to u) of prod_{w <= v} p(w),
    where p(w) = exp(logp[w]) is the target's probability of w's token given its path."""
    anc = tree.ancestor_mask() if anc is None else anc
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    cum = torch.where(anc, logp[:, None, :], zero).sum(-1)  # log prod along the path to each node
    return torch.where(anc, cum.exp()[:, None, :], zero).sum(-1)


def tree_reward(logp: torch.Tensor, tree, eta: float = 1.0, anc: torch.Tensor | None = None):
    """r = (1/eta) log sum over branches (root-to-leaf paths) of exp(eta L_i), L_i = branch_lengths at
    the leaf: a smooth max of the branches' expected accepted lengths. Returns (r [P], L [P, N])."""
    L = branch_lengths(logp, tree, anc)
    leaf = tree.is_leaf()
    r = torch.logsumexp(torch.where(leaf, eta * L, torch.full_like(L, float("-inf"))), -1) / eta
    return r, L


def accepted_paths(tree, greedy: torch.Tensor, anc: torch.Tensor | None = None):
    """The path a greedy (T = 0) verification accepts in each tree: its tokens [P, D] (D = max depth;
    padding = 0) and length [P]; greedy [P, N] = the node's token is the target's argmax given its path."""
    anc = tree.ancestor_mask() if anc is None else anc
    accepted = ~(anc & ~greedy[:, None, :]).any(-1)  # every node on the path is the target's argmax
    depth = torch.where(accepted, tree.depths, torch.zeros_like(tree.depths))
    length, node = depth.max(1) if tree.num_nodes else (depth.new_zeros(tree.batch_size),) * 2
    path = tree.path_nodes(anc).gather(1, node[:, None, None].expand(-1, 1, tree.max_depth))[:, 0]
    keep = torch.arange(path.shape[1], device=path.device)[None] < length[:, None]
    tokens = torch.where(keep, tree.tokens.gather(1, path.clamp_min(0)), torch.zeros_like(path))
    return tokens, length
