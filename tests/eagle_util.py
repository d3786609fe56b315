"""Helpers shared by the EAGLE-family tests (test_eagle1, test_eagle3, test_hass, test_griffin); not a test
module."""
from __future__ import annotations

import torch

from conf.schema.drafter import Eagle1Config, Eagle3Config
from drafters.base import TargetSignal
from drafters.eagle1 import Eagle1Drafter
from drafters.eagle3 import Eagle3Drafter


def pseudo_counts(target):
    """Deterministic pseudo-counts over the whole vocabulary (a stand-in for data_gen's)."""
    return torch.randint(0, 1000, (target.vocab_size,), generator=torch.Generator().manual_seed(3))


def online_batch(target, B=2, T=16):
    """Online TargetSignal of random tokens (signal_for)."""
    g = torch.Generator().manual_seed(0)
    return signal_for(target, torch.randint(3, target.vocab_size, (B, T), generator=g))


def signal_for(target, ids):
    """Online TargetSignal over ids [B, T]: row 0 full, row 1 right-padded after 11 tokens; assistant
    tokens from 5 on."""
    B, T = ids.shape
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 11:] = 0
    ids[1, 11:] = 0
    lm = am.clone()
    lm[:, :5] = 0
    out = target(ids, attention_mask=am)
    return TargetSignal(input_ids=ids, attention_mask=am, loss_mask=lm, features=out.features,
                        last_hidden=out.last_hidden, lm_head=target.lm_head)


def eagle1_model(target, seed=0, **kw):
    torch.manual_seed(seed)
    return Eagle1Drafter.from_target(Eagle1Config(**kw), target)


def eagle3_model(target, seed=0, **kw):
    """A small EAGLE-3 (160-token draft vocabulary, 3 TTT steps) unless `kw` says otherwise."""
    torch.manual_seed(seed)
    cfg = Eagle3Config(**{"draft_vocab_size": 160, "ttt_steps": 3, **kw})
    return Eagle3Drafter.from_target(cfg, target, token_counts=pseudo_counts(target))
