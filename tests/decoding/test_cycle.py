"""The fixed-shape cycle (decoding/cycle.py) against the step-by-step loop it replaces, on the CPU:
- it drafts the same trees, cycle by cycle, the first cycle of a sequence included (a drafter whose per-node
  buffers grew in the middle of a tree once lost the nodes computed before, so every sequence's first tree
  differed), and gives the same tokens;
- a drafter that says its captured programs outlive a sequence (`keeps_programs`) really keeps every tensor
  they read as the same object from one generate to the next; on a GPU a rebound tensor would leave the
  replayed graph reading freed memory.

    python -m pytest -q tests/decoding/test_cycle.py
"""
from __future__ import annotations

import pytest
import torch

import decoding.decoder as decoder_module
from bench.bench_cycle import FAMILIES, TREES, Case, build, tiny_target
from decoding.cycle import FixedCycle

SUPPORTS = decoder_module.supports


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    prompt = [int(t) for t in torch.randint(3, target.vocab_size, (10,), generator=torch.Generator().manual_seed(4))]
    return target, prompt + prompt[:5]


def _paths(tree) -> dict[tuple[int, ...], float]:
    """The offered root-to-node token paths of a one-root tree (dead nodes left out) -> the node's log q."""
    toks, pars, logq = tree.tokens[0].tolist(), tree.parents[0].tolist(), tree.logq[0].tolist()
    live = tree.alive[0].tolist() if tree.alive is not None else [True] * len(toks)
    out = {}
    for i in range(len(toks)):
        if live[i]:
            path, j = [], i
            while j >= 0:
                path.append(toks[j])
                j = pars[j]
            out[tuple(reversed(path))] = logq[i]
    return out


def _sharpen(drafter, target) -> None:
    """Scale a random drafter's own weights (never the target's, which some families share) so that its
    outputs depend on its state: at init they are nearly uniform and would hide a lost hidden state."""
    model = getattr(drafter, "model", None)
    if not isinstance(model, torch.nn.Module):
        return
    shared = {p.data_ptr() for p in target.model.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.data_ptr() not in shared:
                p.mul_(4.0)


def _close(a: dict, b: dict, swaps: int) -> bool:
    """Trees a and b are the same up to float noise: the two paths compute the same sums in different orders
    (log q within 1e-2 on the sharpened drafters, where 3e-3 was the largest gap seen), so a near-tie at the
    node budget may swap a node for another (`swaps` such pairs allowed). A lost state moves far more."""
    return len(a.keys() ^ b.keys()) <= 2 * swaps and all(abs(a[k] - b[k]) <= 1e-2 for k in a.keys() & b.keys())


def _run(case, target, prompt, fixed: bool, monkeypatch):
    if not fixed:
        monkeypatch.setattr(decoder_module, "supports", lambda *a, **k: False)
    dec = build(case, target, prompt, 20)
    _sharpen(dec.drafter, target)
    trees = []
    got, _ = dec.generate(prompt, 20, eos_ids=[], on_cycle=lambda tree, acc: trees.append(_paths(tree)))
    if not fixed:
        monkeypatch.setattr(decoder_module, "supports", SUPPORTS)
    return got.tolist(), trees, dec._cycle is not None


# a dynamic tree whose partial trees outgrow the drafters' first per-node buffers (16 rows) while it is built
WIDE = {"kind": "dynamic", "depth": 4, "top_k": 6, "total_tokens": 30}


@pytest.mark.parametrize("tree", ["chain", "dynamic", "wide"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_cycle_drafts_the_step_by_step_trees(setup, family, tree, monkeypatch):
    target, prompt = setup
    monkeypatch.setitem(TREES, "wide", WIDE)
    case = Case(family, tree, "greedy")
    got, trees, took = _run(case, target, prompt, True, monkeypatch)
    want, want_trees, _ = _run(case, target, prompt, False, monkeypatch)
    assert took  # the fixed cycle ran
    assert got == want
    assert len(trees) == len(want_trees) and _close(trees[0], want_trees[0], swaps=0)
    # later cycles commit through different code (padded vs exact), so the states differ by float noise and
    # a random drafter's exact ties (Hydra++ has many) may break either way: two swaps at most
    assert all(_close(a, b, swaps=2) for a, b in zip(trees, want_trees))


def _tensors(obj, prefix="", seen=None) -> dict[str, int]:
    """attribute path -> id of every tensor a drafter holds (in lists, tuples and dicts too), its model's
    parameters aside."""
    seen = set() if seen is None else seen
    out = {}
    items = vars(obj).items() if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module) else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    for k, v in items:
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = id(v)
        elif isinstance(v, (dict, list, tuple)):
            out.update(_tensors(v, f"{prefix}{k}.", seen))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_programs_kept_across_sequences_read_the_same_tensors(setup, family, monkeypatch):
    """What the programs of the next sequence would read is what they were captured on: every tensor the
    drafter holds when the cycle begins is the same object at the next sequence's beginning (same prompt
    length, so nothing has to grow). Drafters that do not keep their programs are captured again each time."""
    target, prompt = setup
    dec = build(Case(family, "dynamic", "greedy"), target, prompt, 20)
    if not getattr(dec.drafter, "keeps_programs", False):
        pytest.skip(f"{family}: programs are captured again for every sequence")
    snaps = []
    begin = FixedCycle.begin

    def spy(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        snaps.append(_tensors(self.dec.drafter))
    monkeypatch.setattr(FixedCycle, "begin", spy)
    other = [int(t) for t in torch.randint(3, target.vocab_size, (len(prompt),), generator=torch.Generator().manual_seed(9))]
    for ids in (prompt, other, prompt):
        dec.generate(ids, 20, eos_ids=[])
    assert len(snaps) == 3 and snaps[0], family
    # the first sequence may allocate more (per-node state at its first tree); from then on nothing changes
    assert all(snaps[1].get(k) == v for k, v in snaps[0].items()), {k for k in snaps[0] if snaps[1].get(k) != snaps[0][k]}
    assert snaps[2] == snaps[1], {k for k in snaps[1] if snaps[2].get(k) != snaps[1][k]}
