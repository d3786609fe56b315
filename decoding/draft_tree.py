"""The draft tree: the data structure shared by the speculative decoder and tree-reward training, and the
few operations every builder needs (decoding/tree.py: chain, static, dynamic; decoding/opt_tree.py: OPT-Tree).
Both builder modules import this one and never each other's internals, so the imports form no circle.

A tree hangs off a root (the last committed token, not stored as a node). Nodes are stored in
topological order (every parent before its children; siblings in the order the verifier tries them),
batched over B independent roots:

    tokens  [B, N]  drafted token ids
    parents [B, N]  index of the parent node, -1 = the root
    depths  [B, N]  1 = child of the root
    logq    [B, N]  log draft probability of the token under the distribution it was chosen from: the
                    warped draft distribution when sampled, the drafter's plain log-softmax when chosen by
                    top-k (EAGLE-2's ranking score is the sum of these along the path)
    q       [B, N+1, V] | None  the draft distribution each node's children were *sampled* from (row 0 =
                    the root, row i+1 = node i; all-zero for nodes without children); None when children
                    were chosen deterministically (top-k), which the verifier treats as point masses
                    (accept x with prob p(x), then zero p(x)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    logq: torch.Tensor
    q: torch.Tensor | None = None
    # Host-side facts the builder knows, so the decoder's hot loop needs no device sync to learn them:
    # an upper bound on the depth (None = read it from `depths`) and "this is a chain".
    depth_bound: int | None = None
    chain: bool = False
    width_bound: int | None = None  # at most this many children per node (None = read it from `parents`)
    # [B, N] bool, None = every node: the nodes the verifier may accept. A chain cut short on the device
    # (Kangaroo's early exit in the fixed-shape cycle) keeps its shape and marks the nodes after the cut dead.
    alive: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if self.num_nodes else 0

    @property
    def depth_limit(self) -> int:
        """An upper bound on max_depth known without a device sync when the builder set depth_bound."""
        return self.max_depth if self.depth_bound is None else self.depth_bound

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> DraftTree:
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(tokens=z, parents=z.clone(), depths=z.clone(), logq=torch.zeros(batch, 0, device=device),
                   depth_bound=0)

    def extend(self, tokens: torch.Tensor, parents: torch.Tensor, logq: torch.Tensor) -> DraftTree:
        """A new tree with F nodes [B, F] appended (parents index existing nodes or -1). `q` is not
        carried: builders attach it once the tree is complete."""
        has = parents >= 0
        pdepth = self.depths.gather(1, parents.clamp(min=0)) if self.num_nodes else torch.zeros_like(parents)
        depths = torch.where(has, pdepth, 0) + 1
        bound = None if self.depth_bound is None else self.depth_bound + (tokens.shape[1] > 0)
        return DraftTree(tokens=torch.cat([self.tokens, tokens], 1), parents=torch.cat([self.parents, parents], 1),
                         depths=torch.cat([self.depths, depths], 1),
                         logq=torch.cat([self.logq, logq.to(self.logq.dtype)], 1), depth_bound=bound)

    def ancestor_mask(self) -> torch.Tensor:
        """[B, N, N] bool: mask[b, i, j] = node j is node i or one of its ancestors."""
        B, N = self.tokens.shape
        dev = self.tokens.device
        # one spare column absorbs the writes of rows whose walk already reached the root
        mask = torch.zeros(B, N, N + 1, dtype=torch.bool, device=dev)
        idx = torch.arange(N, device=dev).expand(B, N)
        mask.scatter_(2, idx.unsqueeze(-1), True)
        cur = self.parents
        for _ in range(self.depth_limit - 1):  # pointer jumping: one step up per iteration
            ok = cur >= 0
            mask.scatter_(2, torch.where(ok, cur, N).unsqueeze(-1), True)
            cur = torch.where(ok, self.parents.gather(1, cur.clamp(min=0)), -1)
        return mask[..., :N]

    def cumulative_logq(self) -> torch.Tensor:
        """[B, N] sum of logq along the path root -> node (EAGLE-2's ranking score)."""
        anc = self.ancestor_mask()
        return torch.where(anc, self.logq[:, None, :], torch.zeros((), dtype=self.logq.dtype,
                                                                     device=self.logq.device)).sum(-1)

    def is_leaf(self) -> torch.Tensor:
        """[B, N] bool: the node has no children (the ends of the branches tree rewards score)."""
        B, N = self.tokens.shape
        has_child = torch.zeros(B, N + 1, dtype=torch.bool, device=self.tokens.device)
        has_child.scatter_(1, self.parents + 1, True)
        return ~has_child[:, 1:]

    def path_nodes(self, ancestors: torch.Tensor | None = None, depth: int | None = None) -> torch.Tensor:
        """[B, N, D] long: the nodes on the path root -> node i in depth order, -1 padded (D = `depth`, by
        default the max depth)."""
        anc = self.ancestor_mask() if ancestors is None else ancestors
        B, N = self.tokens.shape
        D = self.max_depth if depth is None else depth
        slot = torch.where(anc, self.depths[:, None, :] - 1, D)  # column D absorbs non-ancestors
        out = torch.full((B, N, D + 1), -1, dtype=torch.long, device=self.tokens.device)
        out.scatter_(2, slot, torch.arange(N, device=self.tokens.device).expand(B, N, N))
        return out[..., :D]

    def children(self, b: int, node: int) -> list[int]:
        """Indices of the children of `node` (-1 = root) in tree b, in stored (sibling-rank) order."""
        return (self.parents[b] == node).nonzero(as_tuple=True)[0].tolist()

    def is_chain(self) -> bool:
        """True when every tree is a single path (node i's parent is node i-1)."""
        if self.chain:
            return True
        want = torch.arange(-1, self.num_nodes - 1, device=self.parents.device)
        return bool((self.parents == want).all())


def expand_logits(drafter, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
    """`drafter.expand(tree, frontier)` checked for shape [B, F, V], as float32."""
    logits = drafter.expand(tree, frontier)
    B, F = frontier.shape
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, F):
        raise ValueError(f"{type(drafter).__name__}.expand returned logits of shape {tuple(logits.shape)}, "
                         f"expected [B={B}, F={F}, V]")
    return logits.float()


def keep_best(tree: DraftTree, scores: torch.Tensor, total_tokens: int) -> DraftTree:
    """The `total_tokens` nodes of `tree` with the best scores [B, N] (cumulative draft log-probabilities), in
    stored order. A child never outscores its parent and a parent is stored before its children, so the
    first M entries of a *stable* sort are a connected tree."""
    B, dev = scores.shape[0], scores.device
    M = min(total_tokens, tree.num_nodes)
    keep = torch.sort(-scores, dim=1, stable=True).indices[:, :M].sort(dim=1).values
    new_of_old = torch.full_like(tree.parents, -1)
    new_of_old.scatter_(1, keep, torch.arange(M, device=dev).expand(B, M))
    old_par = tree.parents.gather(1, keep)
    parents = torch.where(old_par >= 0, new_of_old.gather(1, old_par.clamp(min=0)), -1)
    return DraftTree(tokens=tree.tokens.gather(1, keep), parents=parents, depths=tree.depths.gather(1, keep),
                     logq=tree.logq.gather(1, keep), depth_bound=tree.depth_bound)
