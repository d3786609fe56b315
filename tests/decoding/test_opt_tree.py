"""OPT-Tree (eval.tree.kind=opt): the tree is the best tree of its budget (checked against brute force), the
stopping rules and the cost model's budget choice on hand-computed examples, greedy decoding with it equals
the target's own greedy output, and config errors. Losslessness at T > 0: tests/decoding/test_decoder_sampling.py.

    python -m pytest -q tests/decoding/test_opt_tree.py
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.eval import TreeConfig
from decoding.decoder import SpeculativeDecoder
from decoding.opt_tree import OptCost
from decoding.tree import build_tree
from tests.decoder_util import hf_greedy, make_drafter, random_prompt, small_target
from tests.tree_util import PathDrafter, dynamic_world


def opt(**kw) -> TreeConfig:
    return TreeConfig(kind="opt", **kw)


def paths_and_values(tree, b=0) -> dict:
    anc = tree.ancestor_mask()
    return {tuple(tree.tokens[b][anc[b, i]].tolist()): float(v) for i, v in enumerate(tree.cumulative_logq()[b].exp())}


def test_fixed_budget_exact():
    """dynamic_world's values: a .6, b .3, ac .33, ad .21, be .24, acg .297 are the best six of all paths."""
    V, fn = dynamic_world()
    d = PathDrafter(V, fn)
    tree = build_tree(d, opt(depth=3, top_k=2, total_tokens=6, opt_budget="fixed", opt_threshold=0.0))
    assert tree.tokens.tolist() == [[1, 2, 3, 5, 4, 7]]  # pool order: appended best first, depth by depth
    assert tree.parents.tolist() == [[-1, -1, 0, 1, 0, 2]]
    got = paths_and_values(tree)
    want = {(1,): .6, (2,): .3, (1, 3): .33, (2, 5): .24, (1, 4): .21, (1, 3, 7): .297}
    assert got.keys() == want.keys() and all(got[p] == pytest.approx(v, abs=1e-5) for p, v in want.items())
    # depth 2 expands the best top_k = 2 of the depth-1 nodes, depth 3 the two best depth-2 ones
    assert d.calls == [[[()]], [[(1,), (2,)]], [[(1, 3), (2, 5)]]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_tree_of_its_budget_equals_brute_force(seed):
    """With top_k >= total_tokens (no width cap) the tree is the total_tokens paths of largest Π q among every
    path up to `depth` (all V + V² + V³ of them), for each of 2 roots."""
    V, depth, N = 5, 3, 7

    def fn(b, path):
        g = torch.Generator().manual_seed(hash((seed, b, path)) % (2**31))
        return (2 * torch.randn(V, generator=g)).tolist()

    tree = build_tree(PathDrafter(V, fn), opt(depth=depth, top_k=N, total_tokens=N, opt_budget="fixed",
                                              opt_threshold=0.0), batch=2)
    for b in range(2):
        value = {}
        for n in range(1, depth + 1):
            for path in itertools.product(range(V), repeat=n):
                lp = [torch.tensor(fn(b, path[:i])).log_softmax(-1)[path[i]] for i in range(n)]
                value[path] = math.exp(float(sum(lp)))
        want = sorted(value, key=lambda p: -value[p])[:N]
        got = paths_and_values(tree, b)
        assert set(got) == set(want)
        assert all(got[p] == pytest.approx(value[p], rel=1e-5) for p in want)
        assert bool((tree.parents[b] < torch.arange(N)).all())  # topological and connected


@pytest.mark.parametrize("threshold, calls", [(0.35, 3), (0.2, 4)])
def test_threshold_stops_drafting(threshold, calls):
    """Best-6 E after each depth: .6+.3+4×.01 = .94, then .6+.33+.3+.24+.21+.03 = 1.71 (gain .77), then
    .6+.33+.3+.297+.24+.21 = 1.977 (gain .267): δ = .35 stops after 3 drafter steps, δ = .2 drafts a 4th."""
    V, fn = dynamic_world()
    d = PathDrafter(V, fn)
    build_tree(d, opt(depth=4, top_k=2, total_tokens=6, opt_budget="fixed", opt_threshold=threshold))
    assert len(d.calls) == calls


@pytest.mark.parametrize("per_node, budget", [(10.0, 1), (1.0, 2)])
def test_cost_model_picks_the_budget(per_node, budget):
    """One drafter step (depth=1): E(1) = .6, E(2) = .9, E(3) = .91. t_verify(n) = 10 + per_node·n ms, a 1 ms
    step: per_node 10 -> rates 1.6/21 > 1.9/31, one node; per_node 1 -> 1.6/12 < 1.9/13 > 1.91/14, two."""
    V, fn = dynamic_world()
    cost = OptCost([(1, 10 + per_node), (60, 10 + 60 * per_node)], draft_ms=1.0)
    tree = build_tree(PathDrafter(V, fn), opt(depth=1, top_k=2, total_tokens=6), cost=cost)
    assert tree.tokens.tolist() == [[1, 2][:budget]]
    assert cost.history[0][:2] == (budget, 1) and cost.history[0][2] == pytest.approx([.6, .9][budget - 1])


@pytest.mark.parametrize("draft_ms, calls", [(1000.0, 1), (1e-6, 3)])
def test_break_even_stop(draft_ms, calls):
    """Without opt_threshold a depth must add at least rate × t_draft expected tokens: never for a very slow
    drafter (one step), always for a free one (every depth)."""
    V, fn = dynamic_world()
    d = PathDrafter(V, fn)
    cost = OptCost([(1, 10.0), (6, 12.0)], draft_ms=draft_ms)
    build_tree(d, opt(depth=3, top_k=2, total_tokens=6), cost=cost)
    assert len(d.calls) == calls and cost.history[0][1] == calls


@pytest.mark.parametrize("drafter_kind", ["sometimes", "ngram", "always"])
def test_greedy_equals_target_greedy(drafter_kind):
    """T = 0 with a cost model measured on this machine (so budgets vary from cycle to cycle): token for
    token the target's own greedy output and our autoregressive decoding's."""
    target = small_target("llama")
    prompt = random_prompt(target, seed=3)
    want = hf_greedy(target, prompt, 20, eos=None)
    dec = SpeculativeDecoder(target, make_drafter(drafter_kind, target, seed=3), opt(depth=4, top_k=3, total_tokens=12))
    got, st = dec.generate(prompt, 20, eos_ids=[])
    assert got.tolist() == want.tolist()
    assert dec.generate_autoregressive(prompt, 20, eos_ids=[])[0].tolist() == want.tolist()
    cost = dec.opt_cost
    assert cost.source == "measured" and [n for n, _ in cost.verify_points] == [1, 2, 4, 8, 12]
    ms = [m for _, m in cost.verify_points]
    assert ms[0] > 0 and ms == sorted(ms) and cost.draft_ms > 0  # never cheaper with more nodes
    assert len(cost.history) == st.cycles and all(1 <= n <= 12 and 1 <= s <= 4 and 0 < e < n for n, s, e in cost.history)
    if drafter_kind == "always":
        assert st.depth_accepted == st.depth_attempted
    again, _ = dec.generate(prompt, 20, eos_ids=[])
    assert again.tolist() == want.tolist() and dec.opt_cost is cost  # measured once per decoder


def test_given_cost_model_is_used_as_given():
    cfg = opt(depth=2, top_k=2, total_tokens=6, opt_verify_nodes=[6, 1], opt_verify_ms=[8.0, 5.0], opt_draft_ms=2.0)
    cost = OptCost.from_config(cfg)
    torch.testing.assert_close(cost.verify_ms(6), torch.tensor([5.0, 5.6, 6.2, 6.8, 7.4, 8.0], dtype=torch.float64))
    cost.observe_draft(100.0)
    assert cost.draft_ms == 2.0  # a given model is not overwritten by measurements


@pytest.mark.parametrize("kw, msg", [
    (dict(opt_budget="auto"), "eval.tree.opt_budget='auto': use cost"),
    (dict(opt_threshold=-1.0), "eval.tree.opt_threshold=-1.0 must be >= 0"),
    (dict(opt_verify_ms=[5.0]), "opt_verify_nodes, opt_verify_ms and opt_draft_ms go together"),
    (dict(opt_verify_nodes=[0], opt_verify_ms=[5.0], opt_draft_ms=1.0),
     r"opt_verify_nodes=\[0\] / opt_verify_ms=\[5.0\]: give as many node counts"),
    (dict(opt_verify_nodes=[1, 2], opt_verify_ms=[5.0], opt_draft_ms=1.0), "give as many node counts"),
    (dict(opt_verify_nodes=[1], opt_verify_ms=[5.0], opt_draft_ms=0.0), "opt_draft_ms=0.0 must be > 0"),
    (dict(total_tokens=0), "eval.tree.total_tokens=0 must be >= 1"),
    (dict(top_k=0), "eval.tree.top_k=0 must be >= 1"),
    (dict(depth=0), "eval.tree.depth=0 must be >= 1"),
])
def test_bad_opt_config(kw, msg):
    """Refused when the config is built (TreeConfig's __post_init__), before any tree."""
    with pytest.raises(DraftsmithError, match=msg):
        opt(**kw)


def test_an_opt_tree_outside_the_decoder_needs_a_given_cost_model():
    with pytest.raises(DraftsmithError, match="eval.tree.kind=opt needs a cost model here"):
        build_tree(PathDrafter(5, lambda b, p: [0.0] * 5), opt())


def test_opt_trees_are_not_sampled():
    with pytest.raises(DraftsmithError, match="opt trees pick children by top-k score and cannot be sampled"):
        build_tree(PathDrafter(5, lambda b, p: [0.0] * 5), opt(opt_budget="fixed", opt_threshold=0.1),
                   temperature=1.0, sample=True)


def test_eval_stage_reports_the_budgets(cfg_for):
    """eval=opt_tree through the eval stage: lossless at T=0, and report.json says which budgets the measured
    cost model chose (the timed cycles only) and the model itself."""
    from eval.stage import run

    cfg = cfg_for("drafter=ngram", "eval=opt_tree", "eval.tree.total_tokens=8", "eval.tree.depth=3",
                  "eval.max_new_tokens=12", "eval.num_prompts=2", "eval.max_prompt_tokens=160", "eval.warmup=1")
    r = run(cfg)["report"]["results"][0]
    assert r["identical_outputs"] == r["generations"] == 2
    o = r["opt_tree"]
    assert o["cost_model"] == "measured" and [n for n, _ in o["verify_ms"]] == [1, 2, 4, 8] and o["draft_ms"] > 0
    assert 1 <= o["mean_nodes"] <= 8 and 1 <= o["mean_drafter_steps"] <= 3


def test_eval_stage_bad_opt_value_is_one_error(cfg_for):
    from eval.stage import validate

    with pytest.raises(DraftsmithError, match=r"^eval.tree.opt_budget='auto': use cost"):
        validate(cfg_for("eval=opt_tree", "eval.tree.opt_budget=auto"))
