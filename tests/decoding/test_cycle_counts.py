"""What one decode cycle would cost a GPU, counted on the CPU (decoding/counting.py): for every drafter family x
tree kind x acceptance rule, at most one host sync and at most 40 ops outside the graph regions per cycle; the
setups that decide on the host each cycle (OPT-Tree's budget, Kangaroo's early exit on a delayed tree's
trunk or under traversal, the n-gram host walk) take the step-by-step path, and the harness itself catches
what it must.

    python -m pytest -q tests/decoding/test_cycle_counts.py
"""
from __future__ import annotations

import pytest
import torch

from bench.bench_cycle import FAMILIES, RULES, TREES, Case, count, tiny_target
from decoding.counting import CycleCounter
from decoding.regions import captured, decode_loop

# the step-by-step cases (decoding/cycle.py `supports`): the host decides something every cycle
EXIT = "kangaroo+drafter.exit_layer=1"  # Kangaroo with its early exit (threshold 0.6: a random model stops at once)
STEP_BY_STEP = {("opt", None), ("delayed", EXIT)}


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    prompt = [int(t) for t in torch.randint(3, target.vocab_size, (10,), generator=torch.Generator().manual_seed(1))]
    return target, prompt + prompt[:5]


def _cases():
    # every family x tree at T = 0, every rule x tree on one family (the rules' code is the drafter's own
    # business only through expand); the whole matrix is bench/bench_cycle.py's table
    for fam in FAMILIES:
        for tree in TREES:
            every_rule = fam.startswith("ngram") or fam == EXIT  # the rules' own code, and the early exit's cut
            for rule in RULES if every_rule else ["greedy"]:
                case = Case(fam, tree, rule)
                host = {(tree, None), (tree, fam)} & STEP_BY_STEP or (fam, tree, rule) == (EXIT, "chain", "traversal")
                if case.skip_reason() is None and not host:
                    yield pytest.param(case, id=f"{fam.split('+')[0]}{'-exit' if fam.endswith('exit_layer=1') else ''}"
                                                f"-{tree}-{rule}")


@pytest.mark.parametrize("case", list(_cases()))
def test_one_sync_and_few_eager_ops_per_cycle(setup, case):
    target, prompt = setup
    r = count(case, target, prompt, tokens=8)  # after a warm-up generate: the steady state
    assert r["cycles"] >= 1
    assert r["syncs"] <= 1, r["sync_ops"]
    assert r["eager"] <= 40, r["eager_ops"]
    assert r["captured"] > 0  # the work happened inside the regions


@pytest.mark.parametrize("tree,family", [("opt", "ngram+drafter.lookup=device"),
                                         ("delayed", EXIT),
                                         ("chain", "ngram+drafter.lookup=host")])
def test_host_decisions_take_the_step_by_step_path(setup, tree, family):
    """OPT-Tree's per-cycle budget, Kangaroo's early exit on a delayed tree's trunk and the n-gram host walk
    decide on the host: more than one sync a cycle (the step-by-step loop)."""
    target, prompt = setup
    r = count(Case(family, tree, "greedy"), target, prompt, tokens=8, warm=False)
    assert r["syncs"] > 1


def test_counter_sees_syncs_and_regions():
    """Negative controls: item / nonzero / tolist / host data inside the loop count as syncs, ops outside a
    region as eager, inside as captured; nothing outside the loop counts."""
    x = torch.arange(6)
    with CycleCounter() as c:
        x.sum().item()  # outside the loop: not counted
        with decode_loop():
            int(x[0])
            x.nonzero()
            x.tolist()
            torch.tensor([1, 2])
            x[x > 2]
            y = x + 1
            with captured("draft"):
                y * 2
                y.view(2, 3)  # a view: no kernel, not counted
    assert dict(c.sync_ops) == {"_local_scalar_dense": 1, "nonzero": 1, "tolist": 1, "torch.tensor(host data)": 1,
                                "index": 1}
    assert c.ops["captured"] == 1
    assert c.eager_ops["add"] == 1 and c.eager_ops["gt"] == 1
