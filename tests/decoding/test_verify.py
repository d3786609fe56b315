"""Acceptance rules on synthetic target/drafter tables, vectorised over thousands of trees.

The "world" is a bigram target p(. | last token) and a bigram drafter q(. | last token) over a tiny
vocabulary, so the exact distribution of any continuation is known. Each trial drafts a tree from
the root, verifies it, and completes the first three tokens by exact sampling from p where the cycle
produced fewer: losslessness = those three tokens follow p exactly (chi-square), whatever the tree.

    python -m pytest -q tests/decoding/test_verify.py
"""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from conf.schema.eval import TreeConfig
from decoding import verify
from decoding.tree import DraftTree, build_tree, warp_probs
from decoding.verify import SamplingRule, accept
from drafters.base import Drafter

V, ROOT = 4, 0
TV = "traversal"




class BigramDrafter(Drafter):
    """logits = table[last token on the path] (the root token at the root), vectorised over B."""

    def __init__(self, table, root=ROOT):
        self.table, self.root, self.vocab_size = table, root, table.shape[1]

    def start(self, input_ids, features):
        pass

    def commit(self, new_ids, new_features):
        pass

    def expand(self, tree, frontier):
        last = torch.where(frontier >= 0, tree.tokens.gather(1, frontier.clamp(min=0)) if tree.num_nodes
                           else torch.zeros_like(frontier), self.root)
        return self.table[last]


def world(seed=0, sharp=2.5):
    g = torch.Generator().manual_seed(seed)
    return sharp * torch.randn(V, V, generator=g), sharp * torch.randn(V, V, generator=g)


def target_logits(tree: DraftTree, table) -> torch.Tensor:
    """Verification logits [B, 1+N, V]: row 0 after the root, row i+1 after node i (bigram target)."""
    root = torch.full_like(tree.tokens[:, :1], ROOT)
    return table[torch.cat([root, tree.tokens], 1)]


def first_tokens(accepted, tree, P, g, m=3) -> torch.Tensor:
    """[B, m]: each cycle's produced tokens, completed by exact sampling from P where shorter."""
    toks = tree.tokens.tolist()
    rows = []
    for b, a in enumerate(accepted):
        seq = [toks[b][i] for i in a.path] + [a.bonus]
        rows.append((seq + [-1] * m)[:m])
    out = torch.tensor(rows)
    for j in range(1, m):
        miss = out[:, j] < 0
        if miss.any():
            out[miss, j] = torch.multinomial(P[out[miss, j - 1]], 1, generator=g).squeeze(-1)
    return out


def joint_pvalue(samples, P) -> float:
    """Chi-square p-value of 3-token samples against P[root] P[x] P[y]; cells p = 0 must stay empty."""
    expected = (P[ROOT][:, None, None] * P[:, :, None] * P[None, :, :]).flatten()
    idx = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    observed = torch.bincount(idx, minlength=V ** 3).double()
    n = samples.shape[0]
    assert observed[expected == 0].sum() == 0, "a token outside the warped support was produced"
    e = expected.double() * n
    big = e >= 5  # pool the rare cells so the chi-square approximation holds
    obs = torch.cat([observed[big], observed[~big & (e > 0)].sum()[None]])
    exp = torch.cat([e[big], e[~big & (e > 0)].sum()[None]])
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item()
                                 / exp[keep].sum().item()).pvalue)


CASES = {
    # name: (tree config, build kwargs, rule, trials)
    "chain-rule": (TreeConfig(kind="chain", depth=3), {}, SamplingRule(temperature=1.0), 12000),
    "chain-rule-top-p-top-k": (TreeConfig(kind="chain", depth=3), {},
                               SamplingRule(temperature=0.8, top_p=0.85, top_k=3), 12000),
    "specinfer-tree": (TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
                       {"sample": True}, SamplingRule(temperature=1.0), 12000),
    "specinfer-tree-top-p": (TreeConfig(kind="static", paths=[[0], [1], [0, 0], [0, 1], [1, 0]]),
                             {"sample": True}, SamplingRule(temperature=1.2, top_p=0.8), 12000),
    "deterministic-dynamic": (TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=5), {},
                              SamplingRule(temperature=1.0), 12000),
    "deterministic-static-top-k": (TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0], [0, 0, 0]]), {},
                                   SamplingRule(temperature=0.7, top_k=3, top_p=0.9), 12000),
    # Traversal Verification on every tree kind the decoder builds, T = 1 and 0.7, with top-p
    "traversal-chain": (TreeConfig(kind="chain", depth=3), {}, SamplingRule(temperature=1.0, acceptance=TV), 12000),
    "traversal-chain-top-p": (TreeConfig(kind="chain", depth=3), {},
                              SamplingRule(temperature=0.7, top_p=0.9, acceptance=TV), 12000),
    "traversal-sampled-tree": (TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
                               {"sample": True}, SamplingRule(temperature=1.0, acceptance=TV), 12000),
    "traversal-sampled-tree-top-p": (TreeConfig(kind="static", paths=[[0], [1], [0, 0], [0, 1], [1, 0]]),
                                     {"sample": True}, SamplingRule(temperature=0.7, top_p=0.85, acceptance=TV), 12000),
    "traversal-dynamic": (TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=5), {},
                          SamplingRule(temperature=1.0, acceptance=TV), 12000),
    "traversal-static-top-k": (TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0], [0, 0, 0]]), {},
                               SamplingRule(temperature=0.7, top_p=0.9, acceptance=TV), 12000),
    # delayed expansion: a single path first, the tree below it (both rules)
    "delayed-sampled-tree": (TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0]], delay=1), {"sample": True},
                             SamplingRule(temperature=1.0), 12000),
    "delayed-sampled-tree-traversal": (TreeConfig(kind="static", paths=[[0], [1], [0, 0]], delay=1), {"sample": True},
                                       SamplingRule(temperature=0.7, top_p=0.9, acceptance=TV), 12000),
    "delayed-dynamic": (TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=5, delay=1), {},
                        SamplingRule(temperature=1.0), 12000),
    "delayed-dynamic-traversal": (TreeConfig(kind="dynamic", depth=3, top_k=2, total_tokens=5, delay=2), {},
                                  SamplingRule(temperature=0.7, top_p=0.9, acceptance=TV), 12000),
}


def tree_depth(cfg: TreeConfig) -> int:
    return cfg.delay + max(map(len, cfg.paths)) if cfg.kind == "static" else cfg.depth


def run_case(name, seed=0):
    cfg, kw, rule, n = CASES[name]
    LT, LD = world(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tree = build_tree(BigramDrafter(LD), cfg, batch=n, temperature=rule.temperature, top_p=rule.top_p,
                      top_k=rule.top_k, generator=g, **kw)
    acc = accept(tree, target_logits(tree, LT), rule, g)
    P = warp_probs(LT, rule.temperature, rule.top_p, rule.top_k)
    return first_tokens(acc, tree, P, g), P, acc


@pytest.mark.parametrize("name", list(CASES))
def test_lossless_first_three_tokens(name):
    samples, P, acc = run_case(name)
    assert sum(len(a.path) for a in acc) > 0.3 * len(acc)  # drafts really get accepted...
    depth = tree_depth(CASES[name][0])
    assert sum(len(a.path) < depth for a in acc) > 0.05 * len(acc)  # ...and rejected
    assert joint_pvalue(samples, P) > 1e-3


@pytest.mark.parametrize("name", ["chain-rule", "specinfer-tree"])
def test_chi_square_catches_a_wrong_residual(name, monkeypatch):
    """Negative control: resampling from p instead of norm(max(0, p - q)) after a rejection is biased,
    and the same test must see it."""
    monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    samples, P, _ = run_case(name)
    assert joint_pvalue(samples, P) < 1e-6


def test_chi_square_catches_a_wrong_traversal_update(monkeypatch):
    """Negative control for traversal: a parent that keeps its weight after a child is rejected (the residual
    itself right) accepts too often, and the same test must see it."""
    right = verify._still_owed
    monkeypatch.setattr(verify, "_still_owed", lambda a, p, q: (a, right(a, p, q)[1]))
    samples, P, _ = run_case("traversal-sampled-tree")
    assert joint_pvalue(samples, P) < 1e-6


def block_tau(p, q, gamma=2) -> float:
    """Exact E[tokens per forward] of traversal (= block) verification on a chain of 2 i.i.d. drafts from
    context-free q against p: tau = 1 + P(x1 accepted) + P(both accepted), enumerated over (x1, x2)."""
    assert gamma == 2
    a1 = (p / q).clamp(max=1)  # [x1]
    a2 = (a1[:, None] * p[None] / q[None]).clamp(max=1)  # [x1, x2]: the leaf's sequence-level weight
    eta = (a1[:, None] * p[None] - q[None]).clamp(min=0).sum(-1)  # [x1]
    a1_after = eta / (eta + 1 - a1)  # x1's weight once x2 is rejected
    qq = q[:, None] * q[None]
    both = (qq * a2).sum()
    one = (qq * (1 - a2) * a1_after[:, None]).sum()
    return float(1 + both + one + both)


def test_traversal_is_block_verification_on_a_chain():
    """On a sampled chain traversal judges the block: depth 1 accepts with alpha = sum(min(p, q)) like the
    chain rule; depth 2 reaches the exact block-verification tau, above the chain rule's."""
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(V, generator=g), torch.randn(V, generator=g)
    p, q = lp.softmax(-1), lq.softmax(-1)
    alpha = float(torch.minimum(p, q).sum())
    rule = SamplingRule(temperature=1.0, acceptance=TV)
    taus = {}
    for gamma in (1, 2):
        tree = build_tree(BigramDrafter(lq.expand(V, V)), TreeConfig(kind="chain", depth=gamma), batch=40000,
                          temperature=1.0, generator=g)
        acc = accept(tree, lp.expand(40000, gamma + 1, V), rule, g)
        taus[gamma] = sum(len(a.path) + 1 for a in acc) / len(acc)
    chain_rule = 1 + alpha + alpha ** 2
    exact = block_tau(p, q)
    assert taus[1] == pytest.approx(1 + alpha, abs=0.01)  # binomial sd ~0.0025
    assert exact > chain_rule + 0.02  # the world has room for the block to win...
    assert taus[2] == pytest.approx(exact, abs=0.015)  # ...and the rule takes it (sd ~0.004)


def test_traversal_at_zero_temperature_is_greedy():
    """T = 0 goes to the greedy rule; and the traversal walk itself, fed the one-hot argmax (the T -> 0
    limit), picks the same path and bonus on top-k trees."""
    tree = hand_tree()
    for rows in ([7, 0, 3, 0, 0, 6, 4], [7, 0, 3, 0, 0, 8, 4], [5, 1, 0, 2, 0, 0, 0], [9, 1, 3, 0, 0, 8, 4]):
        logits = greedy_logits(rows)
        want = accept(tree, logits, SamplingRule())[0]
        got = accept(tree, logits, SamplingRule(acceptance=TV))[0]
        onehot = warp_probs(logits, 0.0)
        path, bonus = verify._traversal(tree, onehot, torch.Generator().manual_seed(0), tree.ancestor_mask())
        walked = [i for i in path[0].tolist() if i >= 0]
        assert (got.path, got.bonus) == (want.path, want.bonus) == (walked, int(bonus))


def test_tau_matches_alpha_formula():
    """Context-free p and q: per-token acceptance alpha = sum(min(p, q)); a chain of gamma drafts gives
    E[tokens per forward] = (1 - alpha^(gamma+1)) / (1 - alpha)."""
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(V, generator=g), torch.randn(V, generator=g)
    p, q = lp.softmax(-1), lq.softmax(-1)
    alpha = float(torch.minimum(p, q).sum())
    assert 0.3 < alpha < 0.9
    for gamma in (1, 3, 5):
        tree = build_tree(BigramDrafter(lq.expand(V, V)), TreeConfig(kind="chain", depth=gamma), batch=20000,
                          temperature=1.0, generator=g)
        acc = accept(tree, lp.expand(20000, gamma + 1, V), SamplingRule(temperature=1.0), g)
        tau = sum(len(a.path) + 1 for a in acc) / len(acc)
        assert tau == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha), abs=0.03)
        first = sum(len(a.path) >= 1 for a in acc) / len(acc)
        assert first == pytest.approx(alpha, abs=0.015)


def hand_tree():
    # root -> 5 (node 0) -> 1 (node 2);  root -> 7 (node 1) -> 2 (node 3), 3 (node 4) -> 6 (node 5)
    return DraftTree(tokens=torch.tensor([[5, 7, 1, 2, 3, 6]]), parents=torch.tensor([[-1, -1, 0, 1, 1, 4]]),
                     depths=torch.tensor([[1, 1, 2, 2, 2, 3]]), logq=torch.zeros(1, 6))


def greedy_logits(argmax_rows, V=10):
    out = torch.zeros(1, len(argmax_rows), V)
    for r, t in enumerate(argmax_rows):
        out[0, r, t] = 5.0
    return out


@pytest.mark.parametrize("rows, path, bonus", [
    ([7, 0, 3, 0, 0, 6, 4], [1, 4, 5], 4),  # 7 -> 3 -> 6, then the target says 4
    ([7, 0, 3, 0, 0, 8, 4], [1, 4], 8),  # 6 is rejected: bonus = the argmax after 3
    ([5, 1, 0, 2, 0, 0, 0], [0, 2], 2),  # the first sibling's branch
    ([9, 1, 3, 0, 0, 8, 4], [], 9),  # nothing matches at depth 1
])
def test_greedy_accepts_longest_matching_path(rows, path, bonus):
    a = accept(hand_tree(), greedy_logits(rows), SamplingRule())[0]
    assert (a.path, a.bonus) == (path, bonus)


def test_typical_acceptance_is_medusas_rule():
    tree = hand_tree()
    logits = torch.zeros(1, 7, 10)
    logits[0, 0, 7], logits[0, 0, 5] = 2.0, 1.9  # two near-equal favourites after the root
    rule = SamplingRule(temperature=1.0, acceptance="typical", typical_epsilon=0.09, typical_alpha=0.3)
    probs = rule.probs(logits)
    ok = verify._typical_ok(tree, probs, rule)
    ent = -(probs * (probs + 1e-5).log()).sum(-1)
    thr = torch.clamp(0.3 * torch.exp(-ent), max=0.09)
    want = probs[0, tree.parents[0] + 1, tree.tokens[0]] > thr[0, tree.parents[0] + 1]
    assert ok[0].tolist() == want.tolist()
    assert ok[0, :2].tolist() == [True, True]  # both favourites pass, which lossless sampling would not promise
    assert rule.lossy and not SamplingRule(temperature=0.0, acceptance="typical").lossy
