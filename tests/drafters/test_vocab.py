"""Draft-vocabulary maps (drafters/vocab.py): top-V_d from counts, SGLang d2t/t2d conventions, fallbacks."""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from drafters.vocab import build_draft_vocab, maps_from_ids


def test_top_counts_sorted_ascending_with_sglang_offsets():
    counts = torch.tensor([5, 0, 9, 1, 9, 3, 0, 7])
    v = build_draft_vocab(8, 4, counts)
    # most frequent: 2 (9), 4 (9, tie -> lower id first), 7 (7), 0 (5); draft ids ascend by target id
    assert v.draft_ids.tolist() == [0, 2, 4, 7]
    assert v.d2t.tolist() == [0, 1, 2, 4]  # target_id = draft_id + d2t[draft_id]
    assert v.t2d.tolist() == [True, False, True, False, True, False, False, True]
    assert v.source == "token_counts" and v.size == 4 and v.target_size == 8


def test_round_trip_between_id_spaces():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (300,), generator=g)
    v = build_draft_vocab(300, 64, counts)
    draft = torch.arange(64)
    tgt = v.draft_to_target(draft)
    assert v.t2d[tgt].all() and int(v.t2d.sum()) == 64
    assert torch.equal(v.target_to_draft()[tgt], draft)
    assert (v.target_to_draft()[~v.t2d] == -1).all()
    # the kept ids really are the 64 most frequent (every kept count >= every dropped count)
    assert counts[v.t2d].min() >= counts[~v.t2d].max()
    assert torch.equal(v.t2d.nonzero().flatten(), tgt)


def test_ties_and_unseen_tokens_are_deterministic():
    v = build_draft_vocab(10, 5, torch.tensor([0, 0, 4, 0, 0, 0, 0, 0, 0, 2]))
    assert v.draft_ids.tolist() == [0, 1, 2, 3, 9]  # 2, 9 by count; then unseen ids lowest first


def test_full_vocab_when_none_or_too_large():
    for size in (None, 8, 100):
        v = build_draft_vocab(8, size, torch.ones(8))
        assert v.source == "full" and v.d2t.tolist() == [0] * 8 and v.t2d.all()


def test_without_counts_first_ids_with_warning():
    with pytest.warns(UserWarning, match="no token counts for the draft vocabulary: using the first 3 of 8"):
        v = build_draft_vocab(8, 3, None)
    assert v.draft_ids.tolist() == [0, 1, 2] and v.source == "first_ids"


def test_counts_shorter_than_embedding_are_padded():
    v = build_draft_vocab(6, 2, [1, 5, 3])  # tokenizer smaller than the embedding: extra rows never seen
    assert v.draft_ids.tolist() == [1, 2] and v.target_size == 6


def test_bad_inputs():
    with pytest.raises(DraftsmithError, match="token_counts has 9 entries but the target vocabulary has 8"):
        build_draft_vocab(8, 4, torch.ones(9))
    with pytest.raises(DraftsmithError, match="negative entries"):
        build_draft_vocab(8, 4, torch.tensor([1, -1, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(DraftsmithError, match="draft_vocab_size=0 must be >= 1"):
        build_draft_vocab(8, 0, None)
    with pytest.raises(ValueError, match="distinct ids"):
        maps_from_ids(torch.tensor([1, 1]), 4, "x")
