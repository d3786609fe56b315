"""Every trainable drafter family decodes losslessly through the built-in decoder (greedy == target greedy),
on each target shape, for a chain and an EAGLE-2 dynamic tree."""
from __future__ import annotations

import pytest
import torch

from conf.schema import load_config
from decoding.decoder import SpeculativeDecoder
from drafters.registry import drafter_class

OPTIONS = ["eagle1", "eagle3", "medusa", "medusa2", "hydra", "hydra_pp", "small", "pard", "dflash"]  # conf/drafter/<option>.yaml


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", ["chain", "dynamic"])
def test_greedy_equals_target_greedy(tiny_target, option, kind):
    cfg = load_config([f"drafter={option}", f"eval.tree.kind={kind}", "eval.tree.depth=3",
                       "eval.tree.top_k=3", "eval.tree.total_tokens=8"])
    torch.manual_seed(0)
    model = drafter_class(cfg.drafter.name).from_target(cfg.drafter, tiny_target)
    dec = SpeculativeDecoder.from_config(tiny_target, model.as_drafter(tiny_target), cfg.eval, 0.0)
    ids = torch.randint(0, tiny_target.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    out, stats = dec.generate(ids, 24, eos_ids=[], generator=None)
    ref, _ = dec.generate_autoregressive(ids, 24, eos_ids=[], generator=None)
    assert out.tolist() == ref.tolist()
    assert stats.new_tokens == 24 and stats.cycles >= 1
