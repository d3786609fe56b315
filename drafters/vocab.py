"""Reduced draft vocabularies (EAGLE-3): the V_d most frequent assistant tokens and the maps between ids.

    from drafters.vocab import build_draft_vocab
    vocab = build_draft_vocab(vocab_size=128256, draft_vocab_size=32000, token_counts=counts)
    target_ids = vocab.draft_to_target(draft_argmax)      # draft id -> target id
    keep = vocab.t2d[target_argmax]                        # is a target token in the draft vocab?

Conventions are SGLang's (LlamaForCausalLMEagle3 checkpoints), so export is a plain tensor dump:
  d2t [V_d] int64   offsets: target_id = draft_id + d2t[draft_id]   (SGLang's hot_token_id = d2t + arange)
  t2d [V]   bool    t2d[target_id] = the token is in the draft vocabulary
Draft ids are the kept target ids in ascending order, so d2t is non-negative and non-decreasing and
t2d.nonzero() lists the same ids as d2t + arange.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from conf.errors import DraftsmithError


@dataclass
class DraftVocab:
    d2t: torch.Tensor  # [V_d] long offsets (SGLang convention)
    t2d: torch.Tensor  # [V] bool
    source: str  # "full" | "token_counts" | "first_ids": how the vocabulary was chosen (kept in checkpoints)

    @property
    def size(self) -> int:
        return self.d2t.shape[0]

    @property
    def target_size(self) -> int:
        return self.t2d.shape[0]

    @property
    def draft_ids(self) -> torch.Tensor:
        """[V_d] target id of each draft id (ascending)."""
        return self.d2t + torch.arange(self.size, device=self.d2t.device)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft ids (any shape) to target ids."""
        return draft_ids + self.d2t[draft_ids]

    def target_to_draft(self) -> torch.Tensor:
        """[V] long: the draft id of each target id, -1 where the target token is not in the draft vocab."""
        out = torch.full((self.target_size,), -1, dtype=torch.long, device=self.d2t.device)
        out[self.draft_ids] = torch.arange(self.size, device=self.d2t.device)
        return out


def maps_from_ids(ids: torch.Tensor, vocab_size: int, source: str) -> DraftVocab:
    """DraftVocab keeping exactly the target ids `ids` (any order, no duplicates)."""
    ids = torch.as_tensor(ids, dtype=torch.long).sort().values
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= vocab_size or (ids[1:] == ids[:-1]).any():
        raise ValueError(f"draft ids must be distinct ids in [0, {vocab_size})")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return DraftVocab(d2t=ids - torch.arange(ids.numel()), t2d=t2d, source=source)


def build_draft_vocab(vocab_size: int, draft_vocab_size: int | None, token_counts=None) -> DraftVocab:
    """Choose the draft vocabulary.

    - draft_vocab_size None or >= vocab_size: the full target vocabulary (d2t all zeros).
    - token_counts given ([<= V] counts of assistant tokens from data_gen): the draft_vocab_size most
      frequent ids; ties (and ids never seen) go to the lower id, so the choice is deterministic.
    - no counts: the first draft_vocab_size ids, with a warning. Byte-level BPE vocabularies put bytes and
      early (frequent) merges first, so this is a usable fallback, but frequency counts are far better:
      run data_gen first (it writes the counts) or set drafter.draft_vocab_size=null for the full vocab.
    """
    if draft_vocab_size is not None and draft_vocab_size < 1:
        raise DraftsmithError(f"drafter.draft_vocab_size={draft_vocab_size} must be >= 1 (or null = full vocab)")
    if draft_vocab_size is None or draft_vocab_size >= vocab_size:
        return maps_from_ids(torch.arange(vocab_size), vocab_size, "full")
    if token_counts is None:
        warnings.warn(
            f"no token counts for the draft vocabulary: using the first {draft_vocab_size} of {vocab_size} target "
            "ids; run data_gen first (it counts assistant tokens) or set drafter.draft_vocab_size=null",
            UserWarning, stacklevel=2)
        return maps_from_ids(torch.arange(draft_vocab_size), vocab_size, "first_ids")
    counts = torch.as_tensor(token_counts).flatten().to(torch.float64)
    if counts.numel() > vocab_size:
        raise DraftsmithError(
            f"token_counts has {counts.numel()} entries but the target vocabulary has {vocab_size}: "
            "the counts come from another tokenizer; rerun data_gen with this target")
    if (counts < 0).any():
        raise DraftsmithError("token_counts has negative entries: pass data_gen's assistant token counts")
    counts = torch.cat([counts, counts.new_zeros(vocab_size - counts.numel())])  # tokenizer < embedding rows
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: ties keep ascending ids
    return maps_from_ids(order[:draft_vocab_size], vocab_size, "token_counts")


def on_target_vocab(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [.., k] of the token ids `ids` [k] as a [.., vocab_size] row, -inf elsewhere: what a drafter with
    a reduced vocabulary returns, since the Drafter protocol's logits are over the target vocabulary."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, ids, logits)
