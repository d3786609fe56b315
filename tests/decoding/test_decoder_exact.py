"""The decoder's fast path and exact mode on the CPU: the static KV cache compacted in place equals a fresh
forward, buffers reused across sequences give the same tokens as a fresh decoder, a bf16 target in exact mode
(float32 verification and baseline) reproduces the float32 greedy output and the target drafting for itself
reaches tau = depth + 1; CUDA graphs (GPU only) change no token.

    python -m pytest -q tests/decoding/test_decoder_exact.py
"""
from __future__ import annotations

import pytest
import torch

from conf.schema.eval import TreeConfig
from decoding.decoder import SpeculativeDecoder, autoregressive_generate, float32_target
from decoding.kvcache import StaticRunner, model_forward
from drafters.reference import NgramDrafter, TargetDrafter
from tests.decoder_util import TREES, hf_greedy, make_drafter, random_prompt, small_target


def _runner(model):
    def step(ids, mask, pos, cache):
        return model_forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return StaticRunner({"step": step}, model.config, model.device, model.dtype)


def _cache_entries(run):
    n = run.length
    return [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in run.cache.layers]


def test_static_cache_compaction_equals_a_fresh_forward():
    """Prompt, then a 4-token 'tree' block (root + three siblings) of which rows 0 and 2 are kept (not a
    prefix: moved in place), then a causal read: every committed entry and the next logits equal one plain
    causal forward over the same sequence."""
    model = small_target("llama").model
    run = _runner(model)
    prompt = torch.tensor([[5, 17, 9, 33, 2]])
    run.reset(prompt.shape[1] + 12)
    cap = run.capacity
    run(prompt, torch.arange(5)[None], torch.ones(5, 5, dtype=torch.bool).tril(), "step")
    run.keep(list(range(5)))
    block = torch.tensor([[40, 41, 42, 43]])  # root 40, then 41/42/43 all children of the root
    vis = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    run(block, torch.tensor([[0, 1, 1, 1]]), vis, "step")
    run.keep([0, 2], torch.tensor([0, 2]))  # root and node 42
    tail = torch.tensor([[50, 51]])
    out = run(tail, torch.arange(2)[None], torch.ones(2, 2, dtype=torch.bool).tril(), "step")
    run.keep([0, 1])
    assert run.capacity == cap and run.length == 9  # no re-allocation
    seq = torch.tensor([[5, 17, 9, 33, 2, 40, 42, 50, 51]])
    from transformers import DynamicCache

    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(seq, cache=fresh, use_cache=True).logits
    for (k, v), layer in zip(_cache_entries(run), fresh.layers):
        torch.testing.assert_close(k, layer.keys, atol=1e-5, rtol=0)  # same values, different kernels
        torch.testing.assert_close(v, layer.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], want[0, -2:], atol=1e-5, rtol=0)
    run.grow(run.capacity + 1)  # keeps every written entry
    assert run.capacity > cap
    for (k, v), (k2, v2) in zip(_cache_entries(run), [(layer.keys, layer.values) for layer in fresh.layers]):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tree_name, kind", [("dynamic", "sometimes"), ("static", "ngram")])
def test_reused_decoder_equals_fresh_decoders(tree_name, kind):
    """One decoder over prompts of different lengths (its cache and buffers reset, reused or resized) gives
    exactly the tokens and stats of a fresh decoder per prompt (same code path, so bit-equal)."""
    target = small_target("llama")
    reused = SpeculativeDecoder(target, make_drafter(kind, target, seed=2), TREES[tree_name])
    for seed, n in ((1, 14), (2, 6), (3, 20)):
        prompt = random_prompt(target, seed, n=n)
        got, st = reused.generate(prompt, 16, eos_ids=[])
        ref, rst = SpeculativeDecoder(target, make_drafter(kind, target, seed=2), TREES[tree_name]).generate(
            prompt, 16, eos_ids=[])
        if kind == "ngram":  # the noisy drafter's generator has moved on in `reused`; n-grams are stateless
            assert st.depth_accepted == rst.depth_accepted and st.cycles == rst.cycles
        assert got.tolist() == ref.tolist() == hf_greedy(target, prompt, 16, eos=None).tolist()
        ar, _ = reused.generate_autoregressive(prompt, 16, eos_ids=[])
        assert ar.tolist() == got.tolist()


def bf16_target(arch="llama"):
    t = small_target(arch, seed=4)
    t.model.to(torch.bfloat16)
    return t


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_mode_bf16_target_drafting_for_itself(arch):
    """bf16 target, eval.exact: output = the float32 baseline token for token, and the target drafting for
    itself (with the float32 copy it verifies with) accepts every draft: tau = depth + 1 exactly."""
    target = bf16_target(arch)
    twin = float32_target(target)
    assert twin is float32_target(target) and twin.dtype == torch.float32 and target.dtype == torch.bfloat16
    depth = 3
    dec = SpeculativeDecoder(target, TargetDrafter(twin), TreeConfig(kind="chain", depth=depth), exact=True)
    for seed in range(3):
        prompt = random_prompt(target, 10 + seed)
        n = 1 + 4 * (depth + 1)
        got, st = dec.generate(prompt, n, eos_ids=[])
        base, bst = dec.generate_autoregressive(prompt, n, eos_ids=[])
        assert got.tolist() == base.tolist() == hf_greedy(twin, prompt, n, eos=None).tolist()
        assert st.tau == depth + 1 and st.cycles == 4 and bst.tau == 1.0
        assert autoregressive_generate(target, prompt, n, eos_ids=[], exact=True)[0].tolist() == base.tolist()


def test_exact_mode_passes_features_in_the_drafters_dtype():
    """Exact mode verifies in float32; a feature-reading drafter still gets the target's own dtype."""
    target = bf16_target()
    seen = []

    class FeatureNgram(NgramDrafter):
        uses_features, feature_source = True, "last_hidden"

        def start(self, input_ids, features=None):
            seen.append(features.dtype)
            super().start(input_ids)

        def commit(self, new_ids, new_features=None):
            seen.append(new_features.dtype)
            assert new_features.shape[1] == new_ids.shape[1]
            super().commit(new_ids)

    dec = SpeculativeDecoder(target, FeatureNgram(target.vocab_size), TreeConfig(kind="chain", depth=2), exact=True)
    dec.generate(random_prompt(target, 1), 10, eos_ids=[])
    assert len(seen) > 2 and set(seen) == {torch.bfloat16}


def test_non_exact_bf16_verifies_in_bf16():
    """Without exact mode the target verifies and decodes in its own dtype (what serving runs)."""
    target = bf16_target()
    dec = SpeculativeDecoder(target, TargetDrafter(target), TreeConfig(kind="chain", depth=2))
    assert dec.verifier is target and dec.runner.dtype == torch.bfloat16
    got, st = dec.generate(random_prompt(target, 5), 12, eos_ids=[])
    assert len(got) == 12 and st.cycles >= 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tree_name", ["chain", "dynamic"])
def test_cuda_graphs_change_no_token(tree_name):
    """On a GPU: graphs on and off, the same tokens (greedy, float32) as HF greedy; a bf16 target in exact mode
    drafting for itself reaches depth + 1."""
    target = small_target("llama")
    target.model.cuda()
    prompt = random_prompt(target, 3).cuda()
    outs = []
    for graphs in (False, True):
        dec = SpeculativeDecoder(target, make_drafter("sometimes", target, seed=1), TREES[tree_name],
                                 cuda_graphs=graphs)
        for _ in range(4):  # past the eager warm-up calls: later cycles replay captured graphs
            got, _ = dec.generate(prompt, 24, eos_ids=[])
        outs.append(got.tolist())
        outs.append(dec.generate_autoregressive(prompt, 24, eos_ids=[])[0].tolist())
    assert outs[0] == outs[1] == outs[2] == outs[3] == hf_greedy(target, prompt, 24, eos=None).tolist()
    bf = bf16_target()
    bf.model.cuda()
    dec = SpeculativeDecoder(bf, TargetDrafter(float32_target(bf)), TreeConfig(kind="chain", depth=4), exact=True)
    for _ in range(3):
        got, st = dec.generate(prompt, 1 + 5 * 5, eos_ids=[])
    assert st.tau == 5 and got.tolist() == dec.generate_autoregressive(prompt, 26, eos_ids=[])[0].tolist()


@pytest.mark.gpu
@cuda
def test_one_host_sync_per_cycle():
    """On a GPU, with torch's sync debug mode: the speculative loop (target drafting for itself, chain) and the
    autoregressive loop synchronise at most once per cycle / token, plus a constant for prefill and the end."""
    import warnings

    target = small_target("llama")
    target.model.cuda()
    prompt = random_prompt(target, 3).cuda()
    dec = SpeculativeDecoder(target, TargetDrafter(target), TreeConfig(kind="chain", depth=3))
    for _ in range(3):
        dec.generate(prompt, 40, eos_ids=[])
        dec.generate_autoregressive(prompt, 40, eos_ids=[])
    for fn in (dec.generate, dec.generate_autoregressive):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _, st = fn(prompt, 40, eos_ids=[])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        assert syncs <= st.cycles + 6, (fn.__name__, syncs, st.cycles)
