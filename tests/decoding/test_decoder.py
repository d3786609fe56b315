"""The speculative decoder end to end on tiny Llama / Qwen2 / GPT-2 targets: greedy output equals the
target's own greedy decoding for every tree kind and drafters that never, always and sometimes agree;
the target drafting for itself reaches tau = depth + 1; KV caches after partial acceptance equal a fresh
forward; clear errors.

    python -m pytest -q tests/decoding/test_decoder.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.eval import TreeConfig
from decoding.decoder import DecodeStats, SpeculativeDecoder, autoregressive_generate
from decoding.tree import DraftTree, build_tree, keep_cache_entries
from decoding.verify import SamplingRule, accept, tree_inputs
from drafters.lm_drafter import LMTreeDrafter
from drafters.reference import NgramDrafter, OracleDrafter, TargetDrafter
from tests.decoder_util import TREES, NoisyTargetDrafter, hf_greedy, make_drafter, random_prompt, small_target

GREEDY_CASES = ([("llama", t, d) for t in TREES for d in ("never", "always", "sometimes", "ngram")]
                + [("qwen2", "chain", "sometimes"), ("qwen2", "static", "never"), ("qwen2", "dynamic", "ngram"),
                   ("gpt2", "chain", "ngram"), ("gpt2", "static", "sometimes"), ("gpt2", "dynamic", "never")])


@pytest.mark.parametrize("arch, tree_name, drafter_kind", GREEDY_CASES)
def test_greedy_equals_target_greedy(arch, tree_name, drafter_kind):
    """Tree kinds x drafters that never / always / sometimes agree / prompt lookup: token for token the
    target's own greedy output (HF generate), stopping at the same EOS."""
    target = small_target(arch)
    seed = GREEDY_CASES.index((arch, tree_name, drafter_kind))
    prompt = random_prompt(target, seed=seed)
    want = hf_greedy(target, prompt, 14, eos=None)
    # an EOS the target really emits, first at position >= 4: both must stop right after it
    firsts = [i for i, x in enumerate(want.tolist()) if want.tolist().index(x) == i and i >= 4]
    eos = [int(want[firsts[-1]])] if firsts else []
    want = want[:firsts[-1] + 1] if firsts else want
    dec = SpeculativeDecoder(target, make_drafter(drafter_kind, target, seed=seed), TREES[tree_name])
    got, st = dec.generate(prompt, 14, eos_ids=eos)
    assert got.tolist() == want.tolist()
    assert st.new_tokens == len(want) and st.cycles >= 1
    if drafter_kind == "always":
        assert st.depth_accepted == st.depth_attempted
    if drafter_kind == "never" and tree_name == "chain":
        assert st.tau == 1.0 and sum(st.depth_accepted) == 0
    if drafter_kind == "sometimes":
        base, bst = dec.generate_autoregressive(prompt, 14, eos_ids=eos)
        assert base.tolist() == want.tolist() and bst.tau == 1.0


@pytest.mark.parametrize("tree", [TREES["chain"], TREES["static"], TREES["dynamic"],
                                  TreeConfig(kind="static", paths=[[0], [1], [0, 0]], delay=2),
                                  TreeConfig(kind="dynamic", depth=4, top_k=3, total_tokens=12, delay=2)])
def test_traversal_and_delayed_trees_at_t0_are_target_greedy(tree):
    """eval.acceptance=traversal and delayed trees keep T = 0 output token for token the target's greedy."""
    target = small_target("llama")
    prompt = random_prompt(target, seed=7)
    want = hf_greedy(target, prompt, 14, eos=None)
    dec = SpeculativeDecoder(target, make_drafter("sometimes", target, seed=3), tree, acceptance="traversal")
    got, st = dec.generate(prompt, 14, eos_ids=[])
    assert got.tolist() == want.tolist() and st.tau > 1


@pytest.mark.parametrize("depth", [1, 3])
def test_target_drafter_reaches_depth_plus_one(tiny_target, depth):
    """The real loaded targets (with tokenizer) of all three shapes."""
    dec = SpeculativeDecoder(tiny_target, TargetDrafter(tiny_target), TreeConfig(kind="chain", depth=depth))
    tokens, st = dec.generate(random_prompt(tiny_target, 7), 1 + 5 * (depth + 1), eos_ids=[])
    assert len(tokens) == 1 + 5 * (depth + 1)
    assert st.cycles == 5 and st.tau == depth + 1
    assert st.depth_attempted == st.depth_accepted == [5] * depth


def test_measured_tau_matches_alpha_formula():
    """A chain drafter whose top-1 agrees with the target independently with probability alpha per token:
    tau = (1 - alpha^(gamma+1)) / (1 - alpha) (about 3 standard errors of tolerance)."""
    target = small_target("llama")
    alpha, gamma = 0.6, 3
    dec = SpeculativeDecoder(target, NoisyTargetDrafter(target, alpha, seed=1), TreeConfig(kind="chain", depth=gamma))
    st = DecodeStats.total([dec.generate(random_prompt(target, s), 150, eos_ids=[])[1] for s in range(2)])
    assert st.cycles > 120
    assert st.tau == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha), abs=0.3)
    assert st.depth_rate[0] == pytest.approx(alpha, abs=0.13)


def greedy_tokens(target, prompt, n):
    return hf_greedy(target, prompt, n, eos=None).tolist() if n else []


def test_target_cache_after_partial_acceptance(tiny_target):
    """One verification whose accepted path is not a prefix of the node order; the kept cache then equals
    a fresh forward's, and decoding continues with the same logits."""
    from transformers import DynamicCache

    t = tiny_target
    prompt = random_prompt(t, 3, n=9)
    g = greedy_tokens(t, prompt, 5)  # g[0] is the root (the target's first token)
    w = [(x + 1) % t.vocab_size for x in g]  # wrong guesses
    cache = DynamicCache(config=t.config)
    t(prompt, cache=cache, use_cache=True)
    # root -> w1 (0), g1 (1); g1 -> w2 (2), g2 (3); w1 -> w3 (4); g2 -> g3 (5), w4 (6)
    tree = DraftTree(tokens=torch.tensor([[w[1], g[1], w[2], g[2], w[3], g[3], w[4]]]),
                     parents=torch.tensor([[-1, -1, 1, 1, 0, 3, 3]]), depths=torch.tensor([[1, 1, 2, 2, 2, 3, 3]]),
                     logq=torch.zeros(1, 7))
    P = prompt.shape[1]
    ids, mask, pos, anc = tree_inputs(tree, torch.tensor([g[0]]), P, t.dtype)
    out = t(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    acc = accept(tree, out.logits, SamplingRule(), ancestors=anc)[0]
    assert acc.path == [1, 3, 5] and acc.bonus == g[4]
    keep_cache_entries(cache, P, [0] + [1 + i for i in acc.path])
    seq = torch.cat([prompt, torch.tensor([g[:5]])], 1)
    fresh_cache = DynamicCache(config=t.config)
    fresh = t(seq, cache=fresh_cache, use_cache=True)
    for mine, ref in zip(cache.layers, fresh_cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys[..., :-1, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.values, ref.values[..., :-1, :], atol=1e-5, rtol=0)
    nxt = t(torch.tensor([[g[4]]]), position_ids=torch.tensor([[P + 4]]), cache=cache, use_cache=True)
    torch.testing.assert_close(nxt.logits[0, -1], fresh.logits[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_drafter_state_equals_fresh_forwards(arch):
    """LMTreeDrafter's logits for tree nodes, and for the root after a commit of two of the four tree nodes
    (re-read causally with the bonus token, the tree entries dropped), equal a plain forward of its model
    over the same context."""
    from tests.conftest import build_tiny_model

    model = build_tiny_model(arch, 50, seed=3, num_layers=2)
    d = LMTreeDrafter(model, vocab_size=60)  # a padded target vocabulary: -inf beyond the model's 50
    ids = torch.tensor([[4, 9, 17, 3, 22]])

    def fresh(*extra):
        with torch.no_grad():
            return model(torch.cat([ids, torch.tensor([list(extra)], dtype=torch.long)], 1)).logits[0, -1]

    d.start(ids, None)
    tree = DraftTree.empty(1)
    l0 = d.expand(tree, torch.tensor([[-1]]))
    assert l0.shape == (1, 1, 60) and bool(torch.isinf(l0[0, 0, 50:]).all())
    torch.testing.assert_close(l0[0, 0, :50], fresh(), atol=1e-5, rtol=0)
    tree = tree.extend(torch.tensor([[11, 12]]), torch.tensor([[-1, -1]]), torch.zeros(1, 2))
    l1 = d.expand(tree, torch.tensor([[0, 1]]))
    torch.testing.assert_close(l1[0, 0, :50], fresh(11), atol=1e-5, rtol=0)
    torch.testing.assert_close(l1[0, 1, :50], fresh(12), atol=1e-5, rtol=0)
    tree = tree.extend(torch.tensor([[13, 14]]), torch.tensor([[0, 1]]), torch.zeros(1, 2))
    l2 = d.expand(tree, torch.tensor([[3, 2]]))
    torch.testing.assert_close(l2[0, 0, :50], fresh(12, 14), atol=1e-5, rtol=0)
    torch.testing.assert_close(l2[0, 1, :50], fresh(11, 13), atol=1e-5, rtol=0)
    d.commit(torch.tensor([[12, 14, 30]]), None)  # accepted 12 -> 14 (tree entries 2 and 4), bonus 30
    assert d.past == ids.shape[1] and d.pending.tolist() == [[12, 14, 30]]
    l3 = d.expand(DraftTree.empty(1), torch.tensor([[-1]]))
    assert d.past == ids.shape[1] + 3 and d.run.pending == 0  # read, and the four tree entries dropped
    torch.testing.assert_close(l3[0, 0, :50], fresh(12, 14, 30), atol=1e-5, rtol=0)
    d.commit(torch.tensor([[7, 8]]), None)  # a draft never read by the drafter: both stay pending
    torch.testing.assert_close(d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0, :50],
                               fresh(12, 14, 30, 7, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("lookup", ["device", "host"])
def test_ngram_candidates(lookup):
    d = NgramDrafter(20, max_ngram=3, min_ngram=1, lookup=lookup)
    assert d.fixed_shape == (lookup == "device")
    seq = torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 5, 4, 2, 3])
    assert d.candidates(seq) == [7, 9]  # (2, 3) seen twice: most recent continuation first
    assert d.candidates(torch.tensor([5, 6, 5, 8, 6])) == [5]
    assert NgramDrafter(20, 3, min_ngram=2).candidates(torch.tensor([5, 6, 7, 8])) == []
    d.start(torch.tensor([[1, 2, 3, 9, 1, 2, 3, 7, 1, 2]]), None)
    tree = DraftTree.empty(1).extend(torch.tensor([[3]]), torch.tensor([[-1]]), torch.zeros(1, 1))
    logits = d.expand(tree, torch.tensor([[-1, 0]]))
    assert logits[0, 0, 3] == 20 and logits[0, 0].count_nonzero() == 1  # the root: ... 1, 2 -> 3
    assert logits[0, 1, 7] == 20 and logits[0, 1, 9] == 19 and logits[0, 1].count_nonzero() == 2  # ... 1, 2, 3
    with pytest.raises(DraftsmithError, match="need 1 <= min_ngram <= max_ngram"):
        NgramDrafter(20, max_ngram=2, min_ngram=3)
    with pytest.raises(DraftsmithError, match="drafter.lookup='gpu': use auto, device or host"):
        NgramDrafter(20, lookup="gpu")


def test_ngram_device_lookup_equals_the_walk_on_random_contexts():
    """The one-pass device lookup (every n-gram length in one compare) ranks exactly the tokens the host walk
    finds, on 300 random contexts: short ones (fewer tokens than max_ngram), small vocabularies (long and
    overlapping matches), every min/max n-gram pair up to 4, any number of candidates."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        V, n, lo = (int(torch.randint(a, b, (1,), generator=g)) for a, b in ((2, 12), (2, 40), (1, 3)))
        hi, cands = lo + int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ctx = torch.randint(0, V, (1, n), generator=g)
        d = NgramDrafter(16, hi, lo, max_candidates=cands, lookup="device")
        d.prepare(8)
        d.start(ctx)
        want = torch.zeros(16)
        walk = d.candidates(ctx[0])
        want[walk] = NgramDrafter.PROPOSAL_LOGIT - torch.arange(len(walk), dtype=torch.float)
        # exact: the values are PROPOSAL_LOGIT - rank (small integers), placed by an integer ranking
        assert d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0].tolist() == want.tolist(), (ctx, lo, hi)


def test_ngram_lookups_draft_the_same_trees():
    """The device lookup and the host walk propose the same logits for every node of every tree kind, on a
    context with repeats at every n-gram length, and commits keep them in step."""
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, 12, (1, 60), generator=g)  # 9 distinct tokens: many matches, ties by recency
    dev, host = (NgramDrafter(16, 3, 1, lookup=k) for k in ("device", "host"))
    for d in (dev, host):
        d.prepare(32)
        d.start(ctx)
    for tree_cfg in (TREES["chain"], TREES["static"], TREES["dynamic"]):
        for step in range(3):
            trees = [build_tree(d, tree_cfg) for d in (dev, host)]
            assert trees[0].tokens.tolist() == trees[1].tokens.tolist()
            assert trees[0].parents.tolist() == trees[1].parents.tolist()
            front = torch.arange(-1, trees[0].num_nodes)[None]
            # exact on purpose: both write PROPOSAL_LOGIT - rank (small integers) by an integer ranking
            torch.testing.assert_close(dev.expand(trees[0], front), host.expand(trees[1], front), rtol=0, atol=0)
            new = torch.randint(3, 12, (1, 1 + step), generator=g)
            for d in (dev, host):
                d.commit(new)


@pytest.mark.parametrize("tree_name", ["chain", "static", "dynamic"])
def test_oracle_drafts_the_target_greedy_text_to_the_last_cycle(tree_name):
    """drafter=oracle replays the target's greedy continuation: the output is the target's greedy text, every
    draft is accepted, and a chain's every cycle yields depth + 1 tokens, the last one included (the replay
    runs a tree past max_new_tokens)."""
    target = small_target("llama")
    prompt = random_prompt(target, seed=11)
    want = hf_greedy(target, prompt, 19, eos=None)
    oracle = OracleDrafter(target.vocab_size)
    dec = SpeculativeDecoder(target, oracle, TREES[tree_name])
    oracle.replay_autoregressive(dec, prompt, 19)
    got, st = dec.generate(prompt, 19, eos_ids=[])
    assert got.tolist() == want.tolist()
    assert st.depth_accepted == st.depth_attempted and sum(st.depth_accepted) > 0
    if tree_name == "chain":
        depth = TREES["chain"].depth
        assert st.cycles == -(-(19 - 1) // (depth + 1))  # the prefill's token, then depth + 1 per cycle


def test_typical_acceptance_is_flagged_lossy():
    target = small_target("qwen2")
    prompt = random_prompt(target, 5)
    want = greedy_tokens(target, prompt, 12)
    for T, lossy in ((0.0, False), (1.0, True)):
        dec = SpeculativeDecoder(target, TargetDrafter(target), TREES["dynamic"], temperature=T,
                                 acceptance="typical")
        got, st = dec.generate(prompt, 12, eos_ids=[], generator=torch.Generator().manual_seed(0))
        assert st.lossy is lossy and st.as_dict()["acceptance"] == "typical"
        if T == 0:
            assert got.tolist() == want


def test_stats_and_autoregressive_function():
    target = small_target("gpt2")
    prompt = random_prompt(target, 11)
    base, bst = autoregressive_generate(target, prompt, 8, eos_ids=[])
    assert base.tolist() == greedy_tokens(target, prompt, 8) and bst.cycles == 7
    _, st = SpeculativeDecoder(target, TargetDrafter(target), TREES["chain"]).generate(prompt, 8, eos_ids=[])
    d = st.as_dict()
    assert d["tau"] == st.tau and set(d["ms_per_cycle"]) == {"draft", "verify", "other"}
    assert st.time_total >= st.time_prefill + st.time_draft + st.time_verify + st.time_other - 1e-6
    assert st.tokens_per_s > 0 and not st.lossy
    assert SpeculativeDecoder(target, TargetDrafter(target), TREES["chain"]).generate(prompt, 0)[0].numel() == 0


def test_errors(tiny_target_dir):
    from conf.schema import TargetConfig
    from drafters.target import load_target
    from tests.conftest import build_tiny_model

    target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    small = LMTreeDrafter(build_tiny_model("llama", 100), name="tiny-100")
    with pytest.raises(DraftsmithError, match=f"drafter tiny-100 has vocab 100 but target {target.name} has "
                                              f"{target.vocab_size}: build the drafter for this target"):
        SpeculativeDecoder(target, small, TREES["chain"])
    ok = TargetDrafter(target)
    with pytest.raises(DraftsmithError, match=r"temperature=-1.0 must be >= 0 \(0 = greedy\)"):
        SpeculativeDecoder(target, ok, TREES["chain"], temperature=-1.0)
    with pytest.raises(DraftsmithError, match="eval.tree.depth=0 must be >= 1"):
        SpeculativeDecoder(target, ok, TreeConfig(kind="chain", depth=0))
    with pytest.raises(DraftsmithError, match="eval.tree.total_tokens=0 must be >= 1"):
        SpeculativeDecoder(target, ok, TreeConfig(kind="dynamic", total_tokens=0))
    with pytest.raises(DraftsmithError, match=r"has \[0, 1\] but not its prefix"):
        SpeculativeDecoder(target, ok, TreeConfig(kind="static", paths=[[1], [0, 1]]))
    with pytest.raises(DraftsmithError, match="acceptance='medusa' is not a rule: use lossless, traversal or typical"):
        SpeculativeDecoder(target, ok, TREES["chain"], acceptance="medusa")
    with pytest.raises(DraftsmithError, match=r"top_p=0 must be in \(0, 1\]"):
        SpeculativeDecoder(target, ok, TREES["chain"], temperature=1.0, top_p=0)
    with pytest.raises(DraftsmithError, match=r"prompt_ids has shape \(2, 3\): give one non-empty prompt"):
        SpeculativeDecoder(target, ok, TREES["chain"]).generate(torch.ones(2, 3, dtype=torch.long), 4)
    flash = build_tiny_model("llama", 100)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(DraftsmithError, match="drafter fa uses attn_implementation='flash_attention_2', which "
                                              "cannot apply a tree attention mask: load it with attn_implementation=sdpa"):
        LMTreeDrafter(flash, name="fa")


def test_registry_builds_reference_drafters(cfg_for):
    from drafters.registry import drafter_class
    from drafters.target import load_target

    for name, cls in (("ngram", NgramDrafter), ("target", TargetDrafter), ("oracle", OracleDrafter)):
        cfg = cfg_for(f"drafter={name}")
        target = load_target(cfg.target, device="cpu")
        d = drafter_class(name).from_config(cfg.drafter, target)
        assert isinstance(d, cls) and d.vocab_size == target.vocab_size
