"""Draft-tree builders on hand-made drafters: exact chains, static paths and EAGLE-2 reranks, the shared
warp (checked against transformers' own warpers), tree masks and KV-cache surgery, config errors.

    python -m pytest -q tests/decoding/test_tree.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.eval import TreeConfig
from decoding.tree import (
    DraftTree,
    build_tree,
    fit_depth,
    keep_cache_entries,
    tree_attention_mask,
    tree_nodes,
    warp_probs,
)
from tests.tree_util import PathDrafter, dynamic_world, shifted


def test_chain_greedy_follows_argmax():
    d = PathDrafter(10, shifted(10))
    tree = build_tree(d, TreeConfig(kind="chain", depth=4))
    assert tree.tokens.tolist() == [[1, 2, 3, 4]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]] and tree.depths.tolist() == [[1, 2, 3, 4]]
    assert tree.q is None and tree.is_chain()
    want = torch.tensor(shifted(10)(0, ())).log_softmax(-1)[1]
    torch.testing.assert_close(tree.logq[0], want.expand(4))
    assert d.calls == [[[()]], [[(1,)]], [[(1, 2)]], [[(1, 2, 3)]]]


def test_static_paths_exact_tree_batched():
    paths = [[1, 0], [0], [0, 0, 0], [1], [0, 1], [0, 0]]  # unsorted on purpose
    d = PathDrafter(10, shifted(10, offset=5))
    tree = build_tree(d, TreeConfig(kind="static", paths=paths), batch=2)
    # node order: (0) (1) (0,0) (0,1) (1,0) (0,0,0); path (i, j) = i-th best child, then its j-th best
    assert tree.parents.tolist() == [[-1, -1, 0, 0, 1, 2]] * 2
    assert tree.depths.tolist() == [[1, 1, 2, 2, 2, 3]] * 2
    assert tree.tokens.tolist() == [[1, 2, 2, 3, 3, 3], [6, 7, 2, 3, 3, 8]]
    # root, then the two depth-1 parents, then the one depth-2 parent
    assert d.calls[1] == [[(1,), (2,)], [(6,), (7,)]] and d.calls[2] == [[(1, 2)], [(6, 2)]]


def test_dynamic_rerank_exact():
    V, fn = dynamic_world()
    d = PathDrafter(V, fn)
    tree = build_tree(d, TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=6))
    # candidates: a .6, ac .33, b .3, acg .297, be .24, ad .21 | bei .144, bej .072, bf .03, ach .0165
    assert tree.tokens.tolist() == [[1, 2, 3, 4, 5, 7]]
    assert tree.parents.tolist() == [[-1, -1, 0, 0, 1, 2]]
    assert tree.depths.tolist() == [[1, 1, 2, 2, 2, 3]]
    torch.testing.assert_close(tree.cumulative_logq()[0].exp(), torch.tensor([.6, .3, .33, .21, .24, .297]))
    # depth 3 expands only the best top_k of the depth-2 candidates: ac (.33) and be (.24)
    assert d.calls == [[[()]], [[(1,), (2,)]], [[(1, 3), (2, 5)]]]
    assert tree.is_leaf().tolist() == [[False, False, False, True, True, True]]
    assert tree.path_nodes().tolist() == [[[0, -1, -1], [1, -1, -1], [0, 2, -1], [0, 3, -1], [1, 4, -1], [0, 2, 5]]]
    seven = build_tree(PathDrafter(V, fn), TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=7))
    assert seven.tokens.tolist() == [[1, 2, 3, 4, 5, 7, 9]] and seven.parents.tolist()[0][-1] == 4


def reference_eagle2(fn, V, k, depth, total):
    """EAGLE-2 written plainly: [(path, score)] of the kept nodes."""
    def top(path, base):
        lp = torch.tensor(fn(0, path)).log_softmax(-1)
        v, i = lp.topk(k)
        return [(path + (int(t),), base + float(s)) for s, t in zip(v, i)]
    level = top((), 0.0)
    everything = list(level)
    for _ in range(depth - 1):
        front = sorted(level, key=lambda x: -x[1])[:k]
        level = [c for p, s in front for c in top(p, s)]
        everything += level
    return sorted(everything, key=lambda x: -x[1])[:total]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_matches_plain_reference_on_random_drafters(seed):
    V, k, depth, total = 9, 3, 4, 11

    def fn(b, path):
        g = torch.Generator().manual_seed(hash((seed, b, path)) % (2**31))
        return (2 * torch.randn(V, generator=g)).tolist()

    tree = build_tree(PathDrafter(V, fn), TreeConfig(kind="dynamic", depth=depth, top_k=k, total_tokens=total),
                      batch=2)
    anc = tree.ancestor_mask()
    for b in range(2):
        want = reference_eagle2(lambda _, p, b=b: fn(b, p), V, k, depth, total)
        got = {tuple(tree.tokens[b][anc[b, i]].tolist()): float(s)
               for i, s in enumerate(tree.cumulative_logq()[b])}
        assert set(got) == {p for p, _ in want}
        for p, s in want:
            assert got[p] == pytest.approx(s, abs=1e-5)
        par = tree.parents[b]
        assert bool((par < torch.arange(total)).all())  # topological, connected (parents kept)


def test_ancestor_mask_matches_walking_parents():
    g = torch.Generator().manual_seed(0)
    B, N = 3, 15
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, N)])
                           for _ in range(B)])
    depths = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        for i in range(N):
            depths[b, i] = 1 + (depths[b, parents[b, i]] if parents[b, i] >= 0 else 0)
    tree = DraftTree(tokens=torch.zeros(B, N, dtype=torch.long), parents=parents, depths=depths,
                     logq=torch.zeros(B, N))
    anc = tree.ancestor_mask()
    for b in range(B):
        for i in range(N):
            want, j = {i}, int(parents[b, i])
            while j >= 0:
                want.add(j)
                j = int(parents[b, j])
            assert set(anc[b, i].nonzero().flatten().tolist()) == want


def test_sampled_chain_records_q():
    V = 7
    d = PathDrafter(V, lambda b, p: [float((3 * v + len(p)) % V) for v in range(V)])
    g = torch.Generator().manual_seed(0)
    tree = build_tree(d, TreeConfig(kind="chain", depth=3), batch=4, temperature=2.0, top_k=4, generator=g)
    assert tree.q.shape == (4, 4, V)
    for depth in range(3):
        want = warp_probs(torch.tensor(d.fn(0, (0,) * depth)), 2.0, top_k=4)
        torch.testing.assert_close(tree.q[:, depth], want.expand(4, V))
        assert bool((want[tree.tokens[:, depth]] > 0).all())  # drawn inside the top-k
        torch.testing.assert_close(tree.logq[:, depth], want[tree.tokens[:, depth]].log())
    assert not tree.q[:, 3].any()  # the leaf's row
    again = build_tree(d, TreeConfig(kind="chain", depth=3), batch=4, temperature=2.0, top_k=4,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, tree.tokens)


def test_sampled_static_siblings_are_iid_draws():
    V = 5
    d = PathDrafter(V, lambda b, p: [0.0, 1.0, 2.0, 0.5, -1.0])
    tree = build_tree(d, TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0]]), batch=3000, temperature=1.0,
                      sample=True, generator=torch.Generator().manual_seed(0))
    q = torch.tensor(d.fn(0, ())).softmax(-1)
    torch.testing.assert_close(tree.q[0, 0], q)
    torch.testing.assert_close(tree.q[0, 1], q)  # node 0 has a child
    assert not tree.q[0, 2:].any()
    freq = torch.bincount(tree.tokens[:, :3].flatten(), minlength=V).float() / 9000
    assert (freq - q).abs().max() < 0.02
    assert bool((tree.tokens[:, 0] == tree.tokens[:, 1]).any())  # with replacement: duplicates happen


def test_warp_matches_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for t, p, k in [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 5), (0.5, 0.6, 10), (1.0, 0.05, 0)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        torch.testing.assert_close(warp_probs(logits, t, p, k), x.softmax(-1), atol=1e-6, rtol=0)
    assert warp_probs(logits, 0.0).argmax(-1).tolist() == logits.argmax(-1).tolist()
    assert torch.equal(warp_probs(logits, 0.0).sum(-1), torch.ones(6))


def test_tree_attention_mask_layout():
    vis = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    m = tree_attention_mask(vis, past_len=2, dtype=torch.float32, prefix=1)
    assert m.shape == (1, 1, 3, 5)
    see = (m[0, 0] == 0).int().tolist()
    assert see == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert m[0, 0, 0, 3] == float("-inf")


def test_keep_cache_entries():
    from transformers import DynamicCache

    cache = DynamicCache()
    vals = torch.arange(7.0).view(1, 1, 7, 1).expand(1, 2, 7, 3)
    for layer in range(2):
        cache.update(vals.clone(), -vals.clone(), layer)
    keep_cache_entries(cache, 2, [0, 2, 4])
    for layer in cache.layers:
        assert layer.keys[0, 1, :, 0].tolist() == [0, 1, 2, 4, 6]
        assert layer.values[0, 0, :, 2].tolist() == [0, -1, -2, -4, -6]
    assert cache.get_seq_length() == 5
    keep_cache_entries(cache, 3, [0, 1])  # a prefix: a plain crop
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 4, 6]
    keep_cache_entries(cache, 3, [])
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("kw, msg", [
    (dict(kind="beam"), "eval.tree.kind='beam' is not a tree kind: use one of chain, static, dynamic, opt"),
    (dict(kind="chain", depth=0), "eval.tree.depth=0 must be >= 1"),
    (dict(kind="dynamic", depth=0), "eval.tree.depth=0 must be >= 1"),
    (dict(kind="dynamic", total_tokens=0), "eval.tree.total_tokens=0 must be >= 1"),
    (dict(kind="dynamic", top_k=0), "eval.tree.top_k=0 must be >= 1"),
    (dict(kind="static"), "eval.tree.kind=static needs eval.tree.paths"),
    (dict(kind="static", paths=[[0], [1, 0]]), r"has \[1, 0\] but not its prefix \[1\]"),
    (dict(kind="static", paths=[[0], [0]]), r"eval.tree.paths has \[0\] twice"),
    (dict(kind="static", paths=[[0], [-1]]), r"eval.tree.paths has \[-1\]: each path must be"),
    (dict(kind="static", paths=[[0], []]), r"eval.tree.paths has \[\]: each path must be"),
    (dict(kind="dynamic", depth=3, delay=3), r"eval.tree.delay=3 must be < eval.tree.depth=3"),
    (dict(kind="static", paths=[[0]], depth=3, delay=3), r"eval.tree.delay=3 must be < eval.tree.depth=3"),
    (dict(kind="dynamic", delay=-1), r"eval.tree.delay=-1 must be >= 0"),
    (dict(kind="chain", delay=1), r"eval.tree.delay=1 needs a branching tree: a chain never branches"),
])
def test_bad_tree_config(kw, msg):
    """Refused when the config is built (the schema's __post_init__), and again by build_tree for a config
    changed in code afterwards."""
    with pytest.raises(DraftsmithError, match=msg):
        TreeConfig(**kw)
    cfg = TreeConfig(kind="chain")
    for key, value in kw.items():
        setattr(cfg, key, value)
    with pytest.raises(DraftsmithError, match=msg):
        build_tree(PathDrafter(5, shifted(5)), cfg)


def test_static_paths_are_put_in_node_order_once():
    cfg = TreeConfig(kind="static", paths=[[1, 0], [0], [0, 0, 0], [1], [0, 1], [0, 0]])
    assert cfg.paths == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    cfg.check()  # idempotent
    assert cfg.paths == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_delayed_static_tree_hangs_the_paths_below_a_trunk():
    d = PathDrafter(10, shifted(10))
    tree = build_tree(d, TreeConfig(kind="static", paths=[[0], [1], [0, 0]], delay=2))
    # trunk 1 -> 2 (top-1), then below 2: its best (3) and second (4) children, and 3's best (4)
    assert tree.tokens.tolist() == [[1, 2, 3, 4, 4]]
    assert tree.parents.tolist() == [[-1, 0, 1, 1, 2]] and tree.depths.tolist() == [[1, 2, 3, 3, 4]]
    assert tree.depth_limit == 4 and not tree.is_chain()
    assert d.calls == [[[()]], [[(1,)]], [[(1, 2)]], [[(1, 2, 3)]]]


def test_delayed_sampled_tree_keeps_every_draw_distribution():
    g = torch.Generator().manual_seed(0)
    d = PathDrafter(6, lambda b, path: [float(v % 3) for v in range(6)])
    tree = build_tree(d, TreeConfig(kind="static", paths=[[0], [1], [0, 0]], delay=1), batch=3, temperature=1.0,
                      generator=g, sample=True)
    q = torch.tensor([float(v % 3) for v in range(6)]).softmax(-1)
    assert tree.parents.tolist() == [[-1, 0, 0, 1]] * 3
    # rows: root (the trunk's draw), trunk node (its two children), node 1 (its child), then leaves: zero
    for row in (0, 1, 2):
        torch.testing.assert_close(tree.q[:, row], q.expand(3, 6))
    assert tree.q[:, 3:].abs().sum() == 0


def test_delay_counts_in_nodes_and_follows_a_cut_depth():
    assert tree_nodes(TreeConfig(kind="static", paths=[[0], [1]], delay=3)) == 5
    assert tree_nodes(TreeConfig(kind="dynamic", total_tokens=20, delay=2)) == 20
    cut = fit_depth(TreeConfig(kind="dynamic", depth=5, delay=4), 3)  # a 3-head drafter
    assert (cut.depth, cut.delay) == (3, 2)
    assert fit_depth(TreeConfig(kind="dynamic", depth=5, delay=1), 3).delay == 1


def test_delayed_dynamic_tree_keeps_depth_and_budget():
    V, fn = dynamic_world()
    d = PathDrafter(V, fn)
    tree = build_tree(d, TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=5, delay=1))
    # trunk a (.6); below it ac .33, ad .21; then acg .297, ad's best (uniform: .21 / 12 = .0175), ach .0165
    assert tree.tokens[0, :4].tolist() == [1, 3, 4, 7]  # ad's children tie, so its kept one is any token
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 2]]
    assert tree.depths.tolist() == [[1, 2, 2, 3, 3]]
    torch.testing.assert_close(tree.cumulative_logq()[0].exp(), torch.tensor([.6, .33, .21, .297, .21 / 12]))
    assert d.calls == [[[()]], [[(1,)]], [[(1, 3), (1, 4)]]]


def test_bad_build_arguments():
    d = PathDrafter(5, shifted(5))
    with pytest.raises(DraftsmithError, match=r"temperature=-0.5 must be >= 0 \(0 = greedy\)"):
        build_tree(d, TreeConfig(kind="chain"), temperature=-0.5)
    with pytest.raises(DraftsmithError, match="dynamic .* cannot be sampled"):
        build_tree(d, TreeConfig(kind="dynamic"), temperature=1.0, sample=True)
    with pytest.raises(DraftsmithError, match="rank-6 child but the vocabulary has only 5 tokens"):
        build_tree(d, TreeConfig(kind="static", paths=[[6]]))
