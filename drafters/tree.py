"""Draft trees: the data structure shared by the speculative decoder and tree-reward training.

A tree hangs off a root (the last committed token, not stored as a node). Nodes are stored in
topological order (every parent before its children), batched over B independent roots:

    tokens  [B, N]  drafted token ids
    parents [B, N]  index of the parent node, -1 = the root
    depths  [B, N]  1 = child of the root
    logq    [B, N]  log draft probability of the token under its parent's (temperature-warped) draft
                    distribution
    q       [B, N+1, V] | None  the draft distribution each node's children were *sampled* from (row 0 =
                    the root, row i+1 = node i); None when children were chosen deterministically (top-k),
                    which the verifier treats as point masses (accept x with prob p(x), then zero p(x)).
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

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> DraftTree:
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(tokens=z, parents=z.clone(), depths=z.clone(), logq=torch.zeros(batch, 0, device=device))

    def ancestor_mask(self) -> torch.Tensor:
        """[B, N, N] bool: mask[b, i, j] = node j is node i or one of its ancestors."""
        B, N = self.tokens.shape
        mask = torch.eye(N, dtype=torch.bool, device=self.tokens.device).expand(B, N, N).clone()
        for i in range(N):  # topological order: a parent's row is complete before its children's
            p = self.parents[:, i]
            has = p >= 0
            if has.any():
                rows = mask[has.nonzero(as_tuple=True)[0], p[has]]
                mask[has, i] |= rows
        return mask

    def children(self, b: int, node: int) -> list[int]:
        """Indices of the children of `node` (-1 = root) in tree b, in stored (sibling-rank) order."""
        return (self.parents[b] == node).nonzero(as_tuple=True)[0].tolist()
