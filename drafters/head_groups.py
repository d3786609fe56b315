"""CORAL's LM-head weight grouping (Weng et al., 2025) for EAGLE-3: drafter.head_groups / active_groups.

    python train.py stage=train drafter=eagle3 drafter.head_groups=8 drafter.active_groups=2
    python -m pytest -q tests/training/test_coral.py

The draft LM head [V_d, H] is cut into G groups of ceil(V_d / G) consecutive draft ids (the last may be
shorter). A small router reads the normed hidden state h the head reads and scores the groups:
    router(h) = W2 (silu(W1 h) + h)          W1 [H, H], W2 [G, H]  (the paper's residual MLP)
At decode time each row keeps the logits of its top-`active` groups and -inf elsewhere, so the head
multiplies only those groups' rows. The target still verifies every drafted token over its full
vocabulary, so this changes which tokens get drafted (tau), never the output.

Why consecutive ids: the rows of the active groups are contiguous blocks of the head's weight, and a
row's groups are read with one gather; a learned clustering would need a permutation the draft vocab
maps (d2t) would have to carry as well.

Training: the router learns alongside the drafter, by cross-entropy to the group of the target's argmax
token at every unrolled step, on a detached h: the router never changes what the drafter learns, and
Adam's per-parameter scaling makes a weight on a loss that only the router's parameters see pointless.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_size(vocab: int, groups: int) -> int:
    """Draft ids per group: group k holds ids [k * size, (k + 1) * size)."""
    return math.ceil(vocab / groups)


class HeadRouter(nn.Module):
    """Scores the G head groups from the normed hidden state [.., H] -> [.., G]."""

    def __init__(self, hidden_size: int, groups: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w2 = nn.Linear(hidden_size, groups, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(h)) + h)


def grouped_logits(h: torch.Tensor, weight: torch.Tensor, router_logits: torch.Tensor,
                   active: int) -> torch.Tensor:
    """Head logits [.., V] (float) from h [.., H] and the head weight [V, H]: each row's top-`active`
    groups by router_logits [.., G] get h @ weight.T, every other entry is -inf.

    Group by group, only the rows that picked it multiply that group's block of rows of the weight (a view,
    never a copy): weight traffic is the union of the rows' groups, arithmetic is each row's own groups."""
    V, G = weight.shape[0], router_logits.shape[-1]
    size = group_size(V, G)
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    picks = router_logits.reshape(-1, G).topk(active, dim=-1).indices  # [N, active]
    out = torch.full((h2.shape[0], V), float("-inf"), dtype=torch.float32, device=h.device)
    for k in picks.unique().tolist():
        rows = (picks == k).any(-1).nonzero().squeeze(1)
        lo, hi = k * size, min((k + 1) * size, V)
        out[rows, lo:hi] = (h2[rows] @ weight[lo:hi].t()).float()
    return out.view(*lead, V)
