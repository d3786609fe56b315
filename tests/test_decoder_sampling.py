"""Speculative sampling end to end is lossless: on a Llama with a 5-token vocabulary, the 2nd and 3rd
generated tokens (both decided by tree verification, the 3rd possibly in a second cycle) follow the
target's own warped distribution, computed exactly from its logits (chi-square). Chain rule, SpecInfer
trees, top-k point-mass trees with prompt lookup, Traversal Verification on chains, sampled and dynamic trees,
delayed tree expansion, and plain autoregressive sampling, with top-p / top-k.
Drafters that cost no forward keep it quick: losslessness depends on the verifier, not on who drafts.

    python -m pytest -q tests/test_decoder_sampling.py
"""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from conf.schema.eval import TreeConfig
from decoding import verify
from decoding.decoder import SpeculativeDecoder, autoregressive_generate
from decoding.tree import warp_probs
from decoding.verify import SamplingRule
from drafters.base import Drafter
from drafters.reference import NgramDrafter
from drafters.target import Target

V = 5
PROMPT = torch.tensor([[1, 3, 0, 2, 3]])
N = 200  # samples per case: the negative control below still fails at p < 1e-20 with this many




def tiny_llama(seed: int, scale: float):
    """A 1-layer Llama over V tokens; lm_head scaled up so its distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


class TableDrafter(Drafter):
    """Costs no forward: logits = a fixed random table indexed by the last token (root or node)."""

    vocab_size = V

    def __init__(self, seed=1):
        self.table = 2 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed))

    def start(self, input_ids, features):
        self.last = int(input_ids[0, -1])

    def commit(self, new_ids, new_features):
        self.last = int(new_ids[0, -1])

    def expand(self, tree, frontier):
        node_tok = tree.tokens.gather(1, frontier.clamp(min=0)) if tree.num_nodes else frontier
        return self.table[torch.where(frontier >= 0, node_tok, self.last)]


@pytest.fixture(scope="module")
def target():
    return Target(tiny_llama(0, 14.0), None, name="tiny-v5")


def exact_pairs(target, rule: SamplingRule) -> torch.Tensor:
    """P(token 2, token 3) [V, V] under the warped target: sum over token 1 of p(t1) p(t2|t1) p(t3|t1,t2)."""
    P = PROMPT.shape[1]
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (t1, t2)
    seqs = torch.cat([PROMPT.expand(V * V, P), pairs], 1)
    with torch.no_grad():
        probs = rule.probs(target.model(seqs).logits.float())
    p1 = probs[0, P - 1]
    p2 = probs[:, P].view(V, V, V)[:, 0]  # [t1, t2]
    p3 = probs[:, P + 1].view(V, V, V)  # [t1, t2, t3]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)


def sample_pairs(generate, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(n):
        toks = generate(g)
        counts[toks[1] * V + toks[2]] += 1
    return counts


def pvalue(counts, probs) -> float:
    expected = probs.flatten().double() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token outside the warped support was produced"
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(stats.chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue)


CASES = {
    "chain-rule-top-k": (dict(tree=TreeConfig(kind="chain", depth=2), drafter="table"),
                         SamplingRule(temperature=1.0, top_k=3)),
    "specinfer-tree-top-p": (dict(tree=TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0]]), drafter="table",
                                  sample=True), SamplingRule(temperature=1.0, top_p=0.95)),
    "top-k-tree-ngram": (dict(tree=TreeConfig(kind="dynamic", depth=2, top_k=2, total_tokens=4), drafter="ngram"),
                         SamplingRule(temperature=1.2)),
    # Traversal Verification: chain (block verification), sampled static tree, EAGLE-2 dynamic tree
    "traversal-chain": (dict(tree=TreeConfig(kind="chain", depth=2), drafter="table"),
                        SamplingRule(temperature=1.0, acceptance="traversal")),
    "traversal-sampled-tree-top-p": (dict(tree=TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0]]),
                                          drafter="table", sample=True),
                                     SamplingRule(temperature=0.7, top_p=0.95, acceptance="traversal")),
    "traversal-dynamic": (dict(tree=TreeConfig(kind="dynamic", depth=2, top_k=2, total_tokens=4), drafter="table"),
                          SamplingRule(temperature=0.7, acceptance="traversal")),
    # delayed expansion: one drafted token, then the tree
    "delayed-sampled-tree": (dict(tree=TreeConfig(kind="static", paths=[[0], [1]], delay=1), drafter="table",
                                  sample=True), SamplingRule(temperature=1.0, top_p=0.95)),
    "delayed-dynamic-traversal": (dict(tree=TreeConfig(kind="dynamic", depth=2, top_k=2, total_tokens=3, delay=1),
                                       drafter="table"), SamplingRule(temperature=1.0, acceptance="traversal")),
}


def speculative(target, case):
    spec, rule = CASES[case]
    drafter = TableDrafter() if spec["drafter"] == "table" else NgramDrafter(V, 2, 1)
    return SpeculativeDecoder(target, drafter, spec["tree"], rule.temperature, rule.top_p, rule.top_k,
                              rule.acceptance, sample=spec.get("sample")), rule


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_matches_target(target, case):
    dec, rule = speculative(target, case)
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), N)
    assert pvalue(counts, exact_pairs(target, rule)) > 1e-3


def test_autoregressive_sampling_matches_target(target):
    rule = SamplingRule(temperature=0.8, top_p=0.9, top_k=4)
    counts = sample_pairs(lambda g: autoregressive_generate(target, PROMPT, 3, rule, [], g)[0].tolist(), N)
    assert pvalue(counts, exact_pairs(target, rule)) > 1e-3


def test_end_to_end_test_catches_a_wrong_residual(target, monkeypatch):
    """Negative control: resampling from p instead of the residual after a rejection must fail the same test."""
    monkeypatch.setattr(verify, "_residual", lambda p, q: p)
    dec, rule = speculative(target, "specinfer-tree-top-p")
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), N)
    assert pvalue(counts, exact_pairs(target, rule)) < 1e-6


def test_end_to_end_test_catches_a_wrong_traversal_update(target, monkeypatch):
    """Negative control for traversal: a parent that keeps its target p after a child's rejection (instead of
    the residual) must fail the same test. (A subtler bug, a parent that keeps its weight, needs the
    12000-tree test in tests/test_verify.py to show.)"""
    right = verify._still_owed
    monkeypatch.setattr(verify, "_still_owed", lambda a, p, q: (right(a, p, q)[0], p))
    dec, rule = speculative(target, "traversal-sampled-tree-top-p")
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), N)
    assert pvalue(counts, exact_pairs(target, rule)) < 1e-6


def test_the_warp_is_not_vacuous(target):
    """The target's distributions are far from uniform and top-p / top-k really cut tokens."""
    with torch.no_grad():
        logits = target.model(PROMPT).logits[0, -1]
    p = warp_probs(logits, 1.0)
    assert 0.4 < p.max() < 0.9 and p.min() < 0.05
    for rule in (CASES["chain-rule-top-k"][1], CASES["specinfer-tree-top-p"][1]):
        assert int((rule.probs(logits) > 0).sum()) < V
