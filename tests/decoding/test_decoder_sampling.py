"""Speculative sampling end to end is lossless: on a Llama with a 5-token vocabulary, the 2nd and 3rd
generated tokens (both decided by tree verification, the 3rd possibly in a second cycle) follow the
target's own warped distribution, computed exactly from its logits (chi-square). Chain rule, SpecInfer
trees, top-k point-mass trees with prompt lookup, OPT-Trees (given, fixed and measured cost models),
Traversal Verification on chains, sampled and dynamic trees, delayed tree expansion, and plain
autoregressive sampling, with top-p / top-k.
Drafters that cost no forward keep it quick: losslessness depends on the verifier, not on who drafts.

    python -m pytest -q tests/decoding/test_decoder_sampling.py
"""
from __future__ import annotations

import pytest
import torch

from conf.schema.eval import TreeConfig
from decoding import verify
from decoding.decoder import SpeculativeDecoder, autoregressive_generate
from decoding.tree import warp_probs
from decoding.verify import SamplingRule
from drafters.base import Drafter
from drafters.reference import NgramDrafter
from drafters.target import Target
from tests.sampling_util import PROMPT, V, exact_pairs, pvalue, sample_pairs, tiny_llama

N = 200  # samples per case: the negative control below still fails at p < 1e-20 with this many


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


CASES = {
    "chain-rule-top-k": (dict(tree=TreeConfig(kind="chain", depth=2), drafter="table"),
                         SamplingRule(temperature=1.0, top_k=3)),
    "specinfer-tree-top-p": (dict(tree=TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0]]), drafter="table",
                                  sample=True), SamplingRule(temperature=1.0, top_p=0.95)),
    "top-k-tree-ngram": (dict(tree=TreeConfig(kind="dynamic", depth=2, top_k=2, total_tokens=4), drafter="ngram"),
                         SamplingRule(temperature=1.2)),
    # OPT-Tree: top-k point-mass trees whose shape (budget, depth) the cost model picks from draft probabilities
    "opt-tree-t1": (dict(tree=TreeConfig(kind="opt", depth=3, top_k=2, total_tokens=4, opt_verify_nodes=[1, 4], opt_verify_ms=[1.0, 2.0],
                                         opt_draft_ms=0.2), drafter="table"), SamplingRule(temperature=1.0)),
    "opt-tree-t0.7-top-p": (dict(tree=TreeConfig(kind="opt", depth=2, top_k=2, total_tokens=4, opt_budget="fixed",
                                                 opt_threshold=0.05), drafter="table"),
                            SamplingRule(temperature=0.7, top_p=0.8)),
    "opt-tree-measured-top-p": (dict(tree=TreeConfig(kind="opt", depth=2, top_k=2, total_tokens=4), drafter="table"),
                                SamplingRule(temperature=1.0, top_p=0.9)),
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
    12000-tree test in tests/decoding/test_verify.py to show.)"""
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
