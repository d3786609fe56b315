"""Training-time draft trees and their reward (training/objectives/tree_reward.py): the batched trees are the
decoder's trees, the reward equals a brute-force enumeration of branches with plain target forwards, and
one target forward scores every tree of a sequence."""
from __future__ import annotations

import math

import pytest
import torch

from conf.schema.drafter import Eagle1Config, Eagle3Config
from conf.schema.eval import TreeConfig
from decoding.tree import build_tree
from drafters.eagle1 import Eagle1Drafter
from drafters.eagle3 import Eagle3Drafter
from drafters.target import Target
from tests.conftest import build_tiny_model
from training.objectives.tree_reward import (
    BatchedTreeDrafter,
    accepted_paths,
    chain_logprob,
    prefix_state,
    target_node_logprobs,
    tree_reward,
)

TREES = {
    "dynamic": TreeConfig(kind="dynamic", depth=4, top_k=3, total_tokens=10),
    "chain": TreeConfig(kind="chain", depth=4),
    "static": TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
}


@pytest.fixture(scope="module")
def small_target():
    """A 12-token Llama target, peaked (scaled LM head) so that trees have clear winners."""
    model = build_tiny_model("llama", vocab_size=12, seed=3, num_layers=4, hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return Target(model, tokenizer=None, name="tiny12")


def _drafter(target, family, seed=1):
    torch.manual_seed(seed)
    if family == "eagle3":
        return Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=None, ttt_steps=2), target).eval()
    return Eagle1Drafter.from_target(Eagle1Config(num_layers=2), target).eval()


def _sequence(target, T=14, seed=0):
    ids = torch.randint(0, target.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = target(ids)
    return ids, out


@pytest.mark.parametrize("family", ["eagle3", "eagle1"])
@pytest.mark.parametrize("kind", list(TREES))
def test_batched_trees_are_the_decoders_trees(small_target, family, kind):
    """The tree built at row t for many positions at once == the tree the decoder builds after committing
    x_0..x_{t+1} (tokens, parents, depths exactly; draft log-probs to float tolerance)."""
    m = _drafter(small_target, family)
    ids, out = _sequence(small_target)
    feats = getattr(out, m.feature_source)
    rows = torch.tensor([0, 3, 4, 8, 11])
    with torch.no_grad():
        state = prefix_state(m, ids, feats)[0]
    batched = build_tree(BatchedTreeDrafter(m, state, rows), TREES[kind], len(rows), sample=False)
    dec = m.as_drafter()
    for p, t in enumerate(rows.tolist()):
        dec.start(ids[:, :t + 2], feats[:, :t + 1])
        one = build_tree(dec, TREES[kind], 1, sample=False)
        assert torch.equal(batched.tokens[p], one.tokens[0]), (p, t)
        assert torch.equal(batched.parents[p], one.parents[0]) and torch.equal(batched.depths[p], one.depths[0])
        torch.testing.assert_close(batched.logq[p], one.logq[0], atol=1e-5, rtol=0)


def test_chain_logprob_is_the_trees_path_logprob(small_target):
    """log M(path) with gradient (GTO's ratio) == the sum of the tree's draft log-probs along the path."""
    m = _drafter(small_target, "eagle3")
    ids, out = _sequence(small_target)
    rows = torch.tensor([1, 2, 6, 9])
    with torch.no_grad():
        state = prefix_state(m, ids, out.features)[0]
    tree = build_tree(BatchedTreeDrafter(m, state, rows), TREES["dynamic"], 4, sample=False)
    leaf = tree.is_leaf().float().argmax(1)  # one root-to-leaf path per tree (first leaf)
    path = tree.path_nodes().gather(1, leaf[:, None, None].expand(-1, 1, tree.max_depth))[:, 0]
    lengths = (path >= 0).sum(1)
    tokens = tree.tokens.gather(1, path.clamp_min(0))
    want = torch.where(path >= 0, tree.logq.gather(1, path.clamp_min(0)), torch.zeros(())).sum(1)
    grad_state = prefix_state(m, ids, out.features)[0]
    got = chain_logprob(m, grad_state, rows, tokens, lengths)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.fc.weight, m.lm_head.weight,
                                                                     m.midlayer.self_attn.k_proj.weight))
    short = chain_logprob(m, grad_state, rows, tokens, lengths.clamp(max=1))  # only the first draft counts
    torch.testing.assert_close(short.detach(), tree.logq.gather(1, path[:, :1])[:, 0], atol=1e-5, rtol=0)


# target_node_logprobs scores all trees in one batched forward, the brute force below one plain forward per
# prefix: float32 results of different kernels (AVX-512 vs AVX2 blockings) that differ in the last bits. Where
# the plain forward's two most likely tokens are within TIE in probability, which one is the argmax is a coin
# toss between kernels, so the greedy flag is compared only where the top-2 margin exceeds TIE (1e-4, the
# tolerance the log-probabilities are compared at).
TIE = 1e-4


def _plain_probs(target, prefix: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(target(torch.tensor([prefix])).logits[0, -1].float(), -1)


@pytest.mark.parametrize("eta", [1.0, 2.5])
def test_tree_reward_equals_brute_force_enumeration(small_target, eta):
    """For every branch, L_i = sum_j prod_{k<=j} p(x_k | prefix, x_<k) with each p from a separate plain
    forward of the target over prefix + path; r = (1/eta) log sum_i exp(eta L_i). Also the greedy flags
    and the accepted path against argmaxes of the same forwards."""
    m = _drafter(small_target, "eagle3")
    ids, out = _sequence(small_target, seed=4)
    rows = torch.tensor([2, 7, 10])
    with torch.no_grad():
        state = prefix_state(m, ids, out.features)[0]
    tree = build_tree(BatchedTreeDrafter(m, state, rows), TREES["dynamic"], 3, sample=False)
    (logp, greedy), = target_node_logprobs(small_target, ids[0], rows, [tree])
    r, L = tree_reward(logp, tree, eta)
    acc_tokens, acc_len = accepted_paths(tree, greedy)
    leaves = tree.is_leaf()
    seen_miss = 0
    for p, t in enumerate(rows.tolist()):
        prefix = ids[0, :t + 2].tolist()
        branch_L, best = [], []
        for leaf in leaves[p].nonzero().flatten().tolist():
            path = []
            node = leaf
            while node >= 0:
                path.insert(0, node)
                node = int(tree.parents[p, node])
            total, prod, ok = 0.0, 1.0, True
            for k, node in enumerate(path):
                probs = _plain_probs(small_target, prefix + tree.tokens[p, path[:k]].tolist())
                tok = int(tree.tokens[p, node])
                assert math.log(probs[tok]) == pytest.approx(float(logp[p, node]), abs=1e-4)
                top2 = probs.topk(2).values
                if float(top2[0] - top2[1]) > TIE:
                    is_greedy = int(probs.argmax()) == tok
                    assert bool(greedy[p, node]) == is_greedy
                else:  # a near-tie: either answer is right, so the path follows the batched forward's
                    is_greedy = bool(greedy[p, node])
                prod *= float(probs[tok])
                total += prod
                ok = ok and is_greedy
                if ok:
                    best.append((k + 1, tree.tokens[p, path[:k + 1]].tolist()))
            branch_L.append(total)
            assert float(L[p, leaf]) == pytest.approx(total, abs=1e-5)
        want_r = math.log(sum(math.exp(eta * x) for x in branch_L)) / eta
        assert float(r[p]) == pytest.approx(want_r, abs=1e-5)
        longest = max(best, default=(0, []))
        assert int(acc_len[p]) == longest[0] and acc_tokens[p, :longest[0]].tolist() == longest[1]
        seen_miss += int(acc_len[p]) < tree.max_depth
    assert len(branch_L) > 1 and seen_miss  # the case has several branches and a rejection


def test_one_target_forward_per_group_of_trees(small_target, monkeypatch):
    """The prefix is read once; then one forward per group of roots scores every node of both trees (current
    and reference drafter) of those roots, never one per branch; grouping does not change any number."""
    ids, out = _sequence(small_target)
    rows = torch.tensor([1, 3, 5, 7, 9])
    trees = []
    for seed in (1, 2):
        m = _drafter(small_target, "eagle3", seed=seed)
        with torch.no_grad():
            state = prefix_state(m, ids, out.features)[0]
        trees.append(build_tree(BatchedTreeDrafter(m, state, rows), TREES["dynamic"], 5, sample=False))
    calls = []
    forward = small_target.model.forward
    monkeypatch.setattr(small_target.model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[1])
                        or forward(*a, **k))
    grouped = target_node_logprobs(small_target, ids[0], rows, trees, roots_per_forward=2)
    assert calls == [14, 2 * 20, 2 * 20, 20]  # prefix, then 2 + 2 + 1 roots x (10 + 10) nodes
    calls.clear()
    whole = target_node_logprobs(small_target, ids[0], rows, trees)
    assert calls == [14, 5 * 20]
    monkeypatch.setattr(small_target.model, "forward", forward)
    for tree, (lp, g), (lp_all, g_all) in zip(trees, grouped, whole):
        alone, ga = target_node_logprobs(small_target, ids[0], rows, [tree], roots_per_forward=1)[0]
        torch.testing.assert_close(lp, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp_all, alone, atol=1e-5, rtol=0)
        assert torch.equal(g, ga) and torch.equal(g_all, ga)


def test_reward_of_a_hand_built_tree():
    """Two branches a-b and c: L = p_a + p_a p_b and p_c; r = log(e^L1 + e^L2)."""
    from decoding.tree import DraftTree

    tree = DraftTree(tokens=torch.tensor([[5, 6, 7]]), parents=torch.tensor([[-1, -1, 0]]),
                     depths=torch.tensor([[1, 1, 2]]), logq=torch.zeros(1, 3))
    pa, pc, pb = 0.6, 0.3, 0.5
    logp = torch.tensor([[math.log(pa), math.log(pc), math.log(pb)]])
    r, L = tree_reward(logp, tree, 1.0)
    assert L[0].tolist() == pytest.approx([pa, pc, pa + pa * pb])
    assert float(r[0]) == pytest.approx(math.log(math.exp(pa + pa * pb) + math.exp(pc)))
    tokens, n = accepted_paths(tree, torch.tensor([[True, False, False]]))
    assert n.tolist() == [1] and tokens[0, :1].tolist() == [5]
