"""Reference drafters that need no training: the target drafting for itself, and prompt lookup (n-grams).

    python train.py stage=eval drafter=target eval.tree.kind=chain eval.tree.depth=4   # tau = 5 at T=0
    python train.py stage=eval drafter=ngram drafter.max_ngram=3

Both build from (cfg, target) through `from_config`, so `drafters.registry.drafter_class(name)` can
construct them like any other family.
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from decoding.tree import DraftTree
from drafters.base import Drafter
from drafters.lm_drafter import LMTreeDrafter


class TargetDrafter(LMTreeDrafter):
    """The target as its own drafter (own KV cache, shared weights): an exactness check and an upper bound,
    tau = depth + 1 at T = 0 with a chain."""

    def __init__(self, target):
        super().__init__(target.model, vocab_size=target.vocab_size, name=f"target:{target.name}")

    @classmethod
    def from_config(cls, cfg, target) -> TargetDrafter:
        return cls(target)


class NgramDrafter(Drafter):
    """Prompt lookup: find the longest recent n-gram (max_ngram down to min_ngram) ending the context that
    also occurred earlier, and propose the tokens that followed it, most recent and longest match first.

    Proposals are logits (rank r gets PROPOSAL_LOGIT - r, every other token 0), so every tree builder works
    and sampled drafts get a proper q for lossless verification. With no match every token scores 0 (the
    builder's pick is arbitrary and simply gets rejected)."""

    name = "ngram"
    uses_features = False
    PROPOSAL_LOGIT = 20.0

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, max_candidates: int = 8,
                 device: torch.device | str = "cpu"):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftsmithError(f"drafter.min_ngram={min_ngram} and max_ngram={max_ngram}: need "
                                  "1 <= min_ngram <= max_ngram")
        self.vocab_size = int(vocab_size)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_candidates = max_candidates
        self.device = torch.device(device)
        self.context: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, cfg, target) -> NgramDrafter:
        return cls(target.vocab_size, cfg.max_ngram, cfg.min_ngram, device=target.device)

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> None:
        self.context = [row.detach().cpu().long() for row in input_ids]

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None = None) -> None:
        self.context = [torch.cat([c, n.detach().cpu().long()]) for c, n in zip(self.context, new_ids)]

    def candidates(self, seq: torch.Tensor) -> list[int]:
        """Distinct next tokens after earlier occurrences of the context's final n-gram, best first."""
        L = seq.shape[0]
        out: list[int] = []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = seq[:L - 1].unfold(0, n, 1)  # window i = seq[i:i+n], followed by seq[i+n]
            hits = (windows == seq[L - n:]).all(1).nonzero().flatten().tolist()
            for i in reversed(hits):  # most recent first
                t = int(seq[i + n])
                if t not in out:
                    out.append(t)
                    if len(out) == self.max_candidates:
                        return out
        return out

    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        B, F = frontier.shape
        logits = torch.zeros(B, F, self.vocab_size)
        front = frontier.cpu().tolist()
        anc = tree.ancestor_mask().cpu() if tree.num_nodes else None
        tokens = tree.tokens.cpu()
        for b in range(B):
            for f, node in enumerate(front[b]):
                path = tokens[b][anc[b, node]] if node >= 0 else tokens[b, :0]  # index order = depth order
                cands = self.candidates(torch.cat([self.context[b], path]))
                if cands:
                    logits[b, f, cands] = self.PROPOSAL_LOGIT - torch.arange(len(cands), dtype=torch.float)
        return logits.to(self.device)
