"""On a GPU (opt-in, `pytest -m gpu`): the fixed-shape cycle replayed as CUDA graphs gives the same tokens as the
same programs run eagerly (eval.cuda_graphs=false) and as autoregressive decoding, for every drafter family x
tree kind at T = 0 on a float32 target; and the graphs are really replayed. The CPU side of the same promise
(what a cycle would cost) is tests/decoding/test_cycle_counts.py.

    python -m pytest -q -m gpu tests/decoding/test_cycle_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from bench.bench_cycle import FAMILIES, Case, build, tiny_target

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup():
    target = tiny_target("cuda", dtype="fp32")
    prompt = [int(t) for t in torch.randint(3, target.vocab_size, (10,), generator=torch.Generator().manual_seed(2))]
    return target, prompt + prompt[:5]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic", "delayed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_change_no_token(setup, family, tree):
    target, prompt = setup
    case = Case(family, tree, "greedy")
    if case.skip_reason() is not None:
        pytest.skip(case.skip_reason())
    outs = {}
    for graphs in (False, True):
        dec = build(case, target, prompt, 24, graphs=graphs)
        for _ in range(3):  # past the eager warm-up calls: the last generate replays captured graphs
            got, st = dec.generate(prompt, 24, eos_ids=[])
        outs[graphs] = got.tolist()
        cycle = dec._cycle
    assert outs[True] == outs[False] == dec.generate_autoregressive(prompt, 24, eos_ids=[])[0].tolist()
    if cycle is not None:  # the fixed-shape path ran: both regions were captured and replayed
        assert cycle.draft.replays > 0 and cycle.verify.replays > 0, (family, tree)
