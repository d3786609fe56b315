"""On a GPU (opt-in, `pytest -m gpu`): the fixed-shape cycle replayed as CUDA graphs gives the same tokens and
drafts the same trees as the same programs run eagerly (eval.cuda_graphs=false), and the tokens of
autoregressive decoding, for every drafter family x tree kind at T = 0 on a float32 target, on a second
prompt after a first (programs kept across sequences must not read the first one's state); and the graphs
are really replayed. The CPU side of the same promises is tests/decoding/test_cycle.py and
tests/decoding/test_cycle_counts.py.

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
    g = torch.Generator().manual_seed(2)
    first, second = ([int(t) for t in torch.randint(3, target.vocab_size, (10,), generator=g)] for _ in range(2))
    return target, first + first[:5], second + second[:5]


def _paths(tree) -> frozenset:
    toks, pars = tree.tokens[0].tolist(), tree.parents[0].tolist()
    live = tree.alive[0].tolist() if tree.alive is not None else [True] * len(toks)
    out = set()
    for i in range(len(toks)):
        path, j = [], i
        while j >= 0:
            path.append(toks[j])
            j = pars[j]
        if live[i]:
            out.add(tuple(reversed(path)))
    return frozenset(out)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic", "delayed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_change_no_token_and_no_tree(setup, family, tree):
    target, first, second = setup
    case = Case(family, tree, "greedy")
    if case.skip_reason() is not None:
        pytest.skip(case.skip_reason())
    outs = {}
    for graphs in (False, True):
        dec = build(case, target, first, 24, graphs=graphs)
        for _ in range(3):  # past the eager warm-up calls: later cycles replay captured graphs
            dec.generate(first, 24, eos_ids=[])
        if family == "oracle":
            dec.drafter.replay_autoregressive(dec, second, 24)
        trees = []
        got, _ = dec.generate(second, 24, eos_ids=[], on_cycle=lambda t, a, trees=trees: trees.append(_paths(t)))
        outs[graphs] = (got.tolist(), trees)
        cycle = dec._cycle
    assert outs[True][0] == outs[False][0] == dec.generate_autoregressive(second, 24, eos_ids=[])[0].tolist()
    assert outs[True][1] == outs[False][1], (family, tree)
    if cycle is not None and cycle.graphs:  # the fixed-shape path ran: both regions were captured and replayed
        assert cycle.draft.replays > 0 and cycle.verify.replays > 0, (family, tree)
