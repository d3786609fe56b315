"""PARD parallel drafter: the mask token, the conditional drop-token plan, what mask positions see in
training and in the decoder's KV cache, training through the stage (target frozen or unused, exact resume),
lossless decoding at T=0 and T=1, one-line errors, and the hf export loaded by transformers.

    python -m pytest -q tests/drafters/test_pard.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import PardConfig
from conf.schema.eval import TreeConfig
from decoding.decoder import SpeculativeDecoder
from decoding.tree import build_tree
from drafters.pard import PardDrafter, PardTreeDrafter, cod_plan, pack
from tests.heads_util import signal_for, train
from tests.train_fixtures import base_overrides, final_weights, write_data_gen


def fresh(target, **kw) -> PardDrafter:
    torch.manual_seed(0)
    return PardDrafter.from_target(PardConfig(**kw), target)


def masked(ids: torch.Tensor, t: int, j: int, mask_id: int) -> torch.Tensor:
    """[x_0..x_t, m x j]: what a depth-(j+1) prediction from anchor t reads."""
    return torch.cat([ids[:t + 1], torch.full((j,), mask_id, dtype=ids.dtype)])[None]


# --- config, mask token ----------------------------------------------------------------------------------
def test_registry_and_yaml(cfg_for):
    from drafters.registry import drafter_class

    assert drafter_class("pard") is PardDrafter
    c = cfg_for("drafter=pard").drafter
    assert (c.k, c.mask_token_id, c.retain, c.retain_min, c.losses) == (5, None, 0.7, 0.2, {"forward_kl": 1.0})
    assert c.num_layers == 2 and c.hidden_size is None  # the `small` drafter's size


@pytest.mark.parametrize("override,message", [
    ("drafter.k=0", "drafter.k=0 must be >= 1 (tokens drafted per forward)"),
    ("drafter.mask_token_id=-1", "drafter.mask_token_id=-1 must be >= 0, or null to add a mask row to the drafter's "
                                 "embeddings"),
    ("drafter.retain=0", "drafter.retain=0.0 must be in (0, 1] (1 = keep every mask position in training)"),
    ("drafter.retain_min=1.5", "drafter.retain_min=1.5 must be in (0, 1] (1 = keep every mask position in training)"),
])
def test_bad_settings_are_one_line_errors(cfg_for, override, message):
    with pytest.raises(DraftsmithError) as e:
        cfg_for("drafter=pard", override)
    assert str(e.value) == message


def test_mask_token_is_a_new_row_or_a_checked_id(llama_target):
    m = fresh(llama_target)
    rows = llama_target.model.get_input_embeddings().weight.shape[0]
    assert m.mask_id == rows == 320 and m.model.get_input_embeddings().weight.shape[0] == rows + 1
    assert m.model.config.pard_token == 320 and m.model.config.pard_k == 5
    own = fresh(llama_target, mask_token_id=7)  # an existing id: no new row
    assert own.mask_id == 7 and own.model.get_input_embeddings().weight.shape[0] == rows
    with pytest.raises(DraftsmithError, match=r"^drafter.mask_token_id=400 is outside the drafter's 320 embedding "
                                              r"rows: use an unused id below 320, or null to add a mask row$"):
        fresh(llama_target, mask_token_id=400)
    eos = llama_target.eos_token_ids[0]
    with pytest.raises(DraftsmithError, match=rf"^drafter.mask_token_id={eos} is one of the target's bos/eos/pad"):
        fresh(llama_target, mask_token_id=eos)


# --- conditional drop-token ----------------------------------------------------------------------------
def test_cod_plan_is_nested_and_keeps_rho_j_of_the_anchors():
    B, T, k = 64, 200, 5
    am = torch.ones(B, T, dtype=torch.long)
    lm = torch.ones(B, T, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(B, T, generator=g)
    keep = cod_plan(am, lm, k, 0.7, 0.3, u)
    rho = [0.7, 0.49, 0.343, 0.3]  # max(0.7^j, 0.3): the floor binds at j = 4
    for j in range(1, k):
        t_ok = T - j - 1  # anchors whose target x_{t+j+1} is in the row
        assert torch.equal(keep[:, :t_ok, j - 1], u[:, :t_ok] < rho[j - 1])  # exactly the planned draws
        assert not keep[:, t_ok:, j - 1].any()
        if j > 1:
            assert not (keep[..., j - 1] & ~keep[..., j - 2]).any()  # a kept mask has all its predecessors
    # the shares themselves: 12,800 anchors, so the binomial standard error is <= 0.0045; 0.02 is > 4 of them
    share = keep[:, :T - k].float().mean((0, 1))
    assert torch.allclose(share, torch.tensor(rho), atol=0.02), share


def test_cod_plan_skips_padding_and_chains_outside_the_loss():
    am = torch.tensor([[1] * 8 + [0] * 4])
    lm = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]])  # only x_4, x_5 are trained on
    keep = cod_plan(am, lm, 3, 1.0, 1.0, torch.zeros(1, 12))  # retain 1: every mask that is worth computing
    # M(t, 1) targets x_{t+2}, M(t, 2) targets x_{t+3}; a chain stays while a deeper target is in the loss
    assert keep[0, :, 0].nonzero().flatten().tolist() == [1, 2, 3]
    assert keep[0, :, 1].nonzero().flatten().tolist() == [1, 2]
    assert not keep[0, 6:].any()  # past the row's end and padding


# --- what mask positions see ----------------------------------------------------------------------------
def test_training_mask_entries_see_the_context_and_earlier_masks_only(llama_target):
    """Every packed prediction equals the plain forward of [x_0..x_t, m x j] (its last row): the packed row
    attends to nothing else, at the right positions. Tolerance: one padded multi-row attention vs a short
    causal forward sum in different orders (float32)."""
    m = fresh(llama_target, k=4, retain=0.8, retain_min=0.5).eval()
    sig = signal_for(llama_target)
    keep = cod_plan(sig.attention_mask, sig.loss_mask, 4, 0.8, 0.5)
    ids, pos, vis, anchor, depth = pack(sig.input_ids, sig.attention_mask, keep, m.mask_id)
    T = sig.input_ids.shape[1]
    assert ids.shape[1] == T + anchor.shape[1] and int(depth.max()) == 3
    with torch.no_grad():
        packed = m.model(input_ids=ids, attention_mask=vis, position_ids=pos).logits
        checked = 0
        for b, e in (anchor >= 0).nonzero().tolist():
            t, j = int(anchor[b, e]), int(depth[b, e])
            ref = m.model(masked(sig.input_ids[b], t, j, m.mask_id)).logits[0, -1]
            torch.testing.assert_close(packed[b, T + e], ref, atol=1e-5, rtol=1e-5)
            checked += 1
        n = int(sig.attention_mask[0].sum())
        torch.testing.assert_close(packed[0, :n], m.model(sig.input_ids[:1, :n]).logits[0], atol=1e-5, rtol=1e-5)
    assert checked == int(keep.sum()) > 10


def test_decoder_cache_keeps_committed_tokens_never_masks(llama_target):
    """After each draft forward the drafter's cache holds exactly a plain reading of the committed tokens, and
    the k distributions are those of [committed, m x j]."""
    m = fresh(llama_target, k=3).eval()
    d = m.as_drafter(llama_target)
    ids = signal_for(llama_target).input_ids[0, :7]
    more = torch.tensor([11, 12, 13])
    d.prepare(32)
    d.start(ids[None], None)
    chain = TreeConfig(kind="chain", depth=3)
    for committed in (ids, torch.cat([ids, more])):
        tree = build_tree(d, chain)
        assert tree.num_nodes == 3 and d.run.length == len(committed) and d.run.pending == 0
        with torch.no_grad():
            out = m.model(committed[None], use_cache=True)
            for ours, ref in zip(d.run.cache.layers, out.past_key_values.layers):
                torch.testing.assert_close(ours.keys[:, :, :len(committed)], ref.keys, atol=1e-5, rtol=1e-5)
            want = m.model(masked(committed, len(committed) - 1, 2, m.mask_id)).logits[0, -3:]
        torch.testing.assert_close(d.depth_logits[0], want[:, :llama_target.vocab_size], atol=1e-5, rtol=1e-5)
        d.commit(more[None], None)
    assert d.forwards == 2  # one forward per tree, whatever its depth


def test_eval_cuts_a_deeper_tree_to_k(llama_target, cfg_for, capsys):
    from eval.stage import fit_tree

    cfg = cfg_for("drafter=pard", "eval.tree.depth=5")
    fit_tree(cfg, fresh(llama_target, k=2).as_drafter(llama_target))
    assert cfg.eval.tree.depth == 2
    assert "eval: drafter pard drafts 2 tokens per forward, so it drafts at most 2 tokens deep: eval.tree.depth 5 -> 2" \
        in capsys.readouterr().out


def test_too_deep_a_tree_is_a_one_line_error(llama_target):
    d = fresh(llama_target, k=2).as_drafter(llama_target)
    d.prepare(16)
    d.start(signal_for(llama_target).input_ids[:1, :5], None)
    with pytest.raises(DraftsmithError, match=r"^pard drafts 2 tokens per forward, so at most 2 deep: set the eval "
                                              r"tree depth to <= 2 or train with a larger drafter.k$"):
        build_tree(d, TreeConfig(kind="chain", depth=3))
    assert d.max_depth == 2  # what eval's fit_depth cuts a deeper chain or dynamic tree to


# --- training -------------------------------------------------------------------------------------------
def test_loss_falls_and_trains_the_mask_row(llama_target):
    m = fresh(llama_target, k=3).eval()
    sig = signal_for(llama_target)
    loss, metrics = m.loss(sig)
    assert set(metrics) == {"loss/forward_kl", "acc/1", "acc/2", "acc/3", "pard/positions_per_token"}
    loss.backward()
    assert m.model.get_input_embeddings().weight.grad[m.mask_id].abs().sum() > 0
    m.zero_grad()
    losses = train(m, lambda: sig, steps=8, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_lora_trains_the_mask_row_too(llama_target, tiny_target_dir):
    torch.manual_seed(0)
    m = PardDrafter.from_target(PardConfig(init=tiny_target_dir("llama"), lora_r=4, k=3), llama_target)
    params = dict(m.named_parameters())
    tokens = [n for n, p in params.items() if p.requires_grad and "trainable_tokens" in n]
    assert tokens and any(p.requires_grad and "lora_" in n for n, p in params.items())
    frozen = {n: p.clone() for n, p in params.items() if not p.requires_grad}
    start = {n: params[n].clone() for n in tokens}
    train(m, lambda: signal_for(llama_target), steps=2, lr=1e-2)
    assert all(not torch.equal(params[n], start[n]) for n in tokens)  # the mask row moved
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the checkpoint's own weights did not


def _train(tmp_path, tiny_target_dir, target, name, *overrides):
    from conf.schema import load_config
    from training.stage import train as train_stage

    root = tmp_path / "runs"
    if not (root / name / "data_gen" / "meta.json").exists():
        write_data_gen(root / name, target, n_rows=12)
    cfg = load_config(base_overrides(tiny_target_dir("llama"), root, name) + ["drafter=pard", "drafter.k=3",
                                                                               *overrides])
    return train_stage(cfg, target=target)


def test_target_stays_frozen_and_ce_alone_never_runs_it(tmp_path, tiny_target_dir, llama_target, monkeypatch):
    before = {n: p.clone() for n, p in llama_target.model.named_parameters()}
    res = _train(tmp_path, tiny_target_dir, llama_target, "kl")
    assert res["steps"] == 3 and all(not p.requires_grad for p in llama_target.model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in llama_target.model.named_parameters())

    def no_target(*a, **kw):
        raise AssertionError("the target ran")

    monkeypatch.setattr(type(llama_target), "__call__", no_target)
    res = _train(tmp_path, tiny_target_dir, llama_target, "ce", "drafter.losses.forward_kl=0", "+drafter.losses.ce=1.0")
    assert res["steps"] == 3 and res["train_metrics"]["loss/ce"] > 0
    with pytest.raises(AssertionError, match="the target ran"):  # the default loss does need it
        _train(tmp_path, tiny_target_dir, llama_target, "kl2")


def test_resume_is_exact(tmp_path, tiny_target_dir, llama_target):
    """4 steps in one go == 2 steps, then the same command to 4 (the COD draws come from the checkpointed
    generator state, so the resumed run drops the same mask positions)."""
    args = ["train.save_every=2", "train.eval_every=0"]
    ref = _train(tmp_path, tiny_target_dir, llama_target, "ref", *args, "train.max_steps=4")
    _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=2")
    second = _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=4")
    assert second["resumed_from"].endswith("step_00000002") and second["steps_this_run"] == 2
    a, b = final_weights(ref), final_weights(second)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert second["train_metrics"] == ref["train_metrics"]
    loaded = PardDrafter.from_pretrained(ref["final_dir"], llama_target)  # the train folder reloads as PARD
    assert loaded.mask_id == 320 and loaded.cfg.k == 3


# --- decoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tree", [TreeConfig(kind="chain", depth=4),
                                  TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
                                  TreeConfig(kind="dynamic", depth=4, top_k=3, total_tokens=10)])
def test_greedy_equals_autoregressive_with_one_forward_per_cycle(tiny_target, tree):
    m = fresh(tiny_target, k=4).eval()
    train(m, lambda: signal_for(tiny_target), steps=4, lr=1e-2)  # not a random drafter: drafts get accepted
    d = m.as_drafter(tiny_target)
    dec = SpeculativeDecoder(tiny_target, d, tree)
    ids = torch.randint(0, tiny_target.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    got, st = dec.generate(ids, 30, eos_ids=[])
    want, _ = dec.generate_autoregressive(ids, 30, eos_ids=[])
    assert got.tolist() == want.tolist()
    assert st.drafter_forwards == st.cycles and st.as_dict()["drafter_forwards_per_cycle"] == 1.0


def test_one_drafter_serves_every_target_with_its_tokenizer(llama_target, tiny_target_dir):
    """Target-independent: the same PARD drafter decodes exactly for the tiny Qwen2 (same tokenizer)."""
    from conf.schema import TargetConfig
    from drafters.target import load_target

    d = fresh(llama_target, k=3).eval().as_drafter(llama_target)
    ids = signal_for(llama_target).input_ids[:1, :6]
    for target in (llama_target, load_target(TargetConfig(path=tiny_target_dir("qwen2")), device="cpu")):
        dec = SpeculativeDecoder(target, d, TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8))
        assert dec.generate(ids, 16, eos_ids=[])[0].tolist() == dec.generate_autoregressive(ids, 16, eos_ids=[])[0].tolist()


@pytest.mark.parametrize("case", ["chain", "specinfer"])
def test_sampling_is_lossless(case):
    """T = 1: the 2nd and 3rd tokens follow the target's own distribution (test_decoder_sampling's
    chi-square on a 5-token Llama), drafting with a 2-token PARD chain or a sampled static tree."""
    from decoding.verify import SamplingRule
    from drafters.target import Target
    from tests.sampling_util import PROMPT, V, exact_pairs, pvalue, sample_pairs, tiny_llama

    target = Target(tiny_llama(0, 14.0), None, name="tiny-v5")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=V + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        draft.lm_head.weight.mul_(8.0)  # peaked drafts, so acceptance and rejection both happen
    d = PardTreeDrafter(draft, mask_id=V, k=2, vocab_size=V)
    rule = SamplingRule(temperature=1.0, top_k=4)
    tree = (TreeConfig(kind="chain", depth=2) if case == "chain"
            else TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0]]))
    dec = SpeculativeDecoder(target, d, tree, rule.temperature, rule.top_p, rule.top_k, sample=True)
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), 200)
    assert pvalue(counts, exact_pairs(target, rule)) > 1e-3


# --- export ---------------------------------------------------------------------------------------------
def test_hf_export_loads_in_transformers_with_its_mask_token(llama_target, tmp_path):
    from transformers import AutoModelForCausalLM

    from export.formats import ExportContext, check_format, detect, load_exported, write_export
    from tests.export_util import noisy

    m = fresh(llama_target, k=3)
    noisy(m.model)
    out = write_export(m, llama_target, "hf", tmp_path / "hf", ExportContext(dtype=torch.float32, target_ref="t"))
    assert check_format(out, "hf") == [] and detect(out) == ("hf", "pard")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf.config.pard_token, hf.config.pard_k, hf.config.vocab_size) == (320, 3, 321)
    ids = masked(signal_for(llama_target).input_ids[0], 5, 2, 320)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m.model(ids).logits)  # same weights, same float32 path
    d = load_exported(out, llama_target)
    assert isinstance(d, PardTreeDrafter) and (d.mask_id, d.k) == (320, 3)
    readme = (out / "README.md").read_text()
    assert "`pard_token` = 320" in readme and "assistant_tokenizer=tok" in readme
    prompt = signal_for(llama_target).input_ids[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    tok = llama_target.tokenizer  # the added mask row makes transformers ask for both tokenizers
    assisted = llama_target.model.generate(prompt, assistant_model=hf, tokenizer=tok, assistant_tokenizer=tok, **kw)
    assert torch.equal(assisted, llama_target.model.generate(prompt, **kw))
    (out / "config.json").write_text((out / "config.json").read_text().replace('"pard_token": 320', '"pard_token": 999'))
    assert check_format(out, "hf") == ["config.json: pard_token is 999, expected a token id below vocab_size 321"]


def test_eval_gives_no_assistant_peer_for_an_added_mask_row(llama_target, tmp_path):
    """transformers refuses an assistant whose vocabulary differs without both tokenizers: eval skips the
    generate(assistant_model=...) peer then, instead of failing after decoding."""
    from eval.stage import hf_assistant_model

    assert hf_assistant_model(fresh(llama_target), tmp_path, llama_target) is None
    own = fresh(llama_target, mask_token_id=7)  # an existing id: same vocabulary, a plain assistant
    assert hf_assistant_model(own, tmp_path, llama_target) is own.model
