"""Kangaroo (drafters/kangaroo.py): the target's own first layers + a trained adapter; the target stays frozen;
decoding equals the training forward; greedy and sampled decoding stay lossless with the second early exit on;
the early exit shortens chains exactly where the drafter's confidence drops; training resumes exactly.

    python -m pytest -q tests/drafters/test_kangaroo.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import KangarooConfig
from conf.schema.eval import TreeConfig
from decoding.decoder import SpeculativeDecoder
from decoding.tree import DraftTree, build_tree
from decoding.verify import SamplingRule
from drafters.kangaroo import KangarooDrafter
from drafters.target import Target
from tests.eagle_util import online_batch
from tests.heads_util import train

ADAPTER = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.o_proj.weight"]


def kangaroo(target, seed=0, **kw) -> KangarooDrafter:
    torch.manual_seed(seed)
    return KangarooDrafter.from_target(KangarooConfig(**kw), target)


def trained(target, steps=25, seed=0, **kw) -> KangarooDrafter:
    """An adapter fitted to one batch (enough to make its drafts confident and mostly right)."""
    m = kangaroo(target, seed, **kw)
    sig = online_batch(target)
    train(m, lambda: sig, steps, lr=1e-3)
    return m.eval()


def test_structure_shares_the_target_and_starts_at_the_plain_early_exit(peaked_llama):
    m = kangaroo(peaked_llama, exit_layer=2)
    assert sorted(m.state_dict()) == sorted([f"adapter.layer.{n}" for n in ADAPTER] + ["adapter.norm.weight"])
    view, base = m.view(), peaked_llama.model.base_model
    # the shallow layers, embedding and LM head are the target's own modules: nothing copied
    assert [view.base_model.layers[i] is base.layers[i] for i in range(3)] == [True, True, False]
    assert view.base_model.embed_tokens is base.embed_tokens and view.lm_head is peaked_llama.model.lm_head
    assert view.config.num_hidden_layers == 3 and peaked_llama.config.num_hidden_layers == 4
    assert list(base.layers) == list(peaked_llama.model.base_model.layers) and len(base.layers) == 4
    ids = online_batch(peaked_llama).input_ids
    with torch.no_grad():
        early = peaked_llama.lm_head(peaked_llama.final_norm(peaked_llama.model(ids, output_hidden_states=True)
                                                             .hidden_states[2]))
        torch.testing.assert_close(m.logits(m.hidden(ids)), early, atol=1e-5, rtol=0)  # zero o_proj: identity


def test_loss_matches_a_hand_computation(peaked_llama):
    """Row t predicts token t+1: soft CE against the target's p at t, hard CE against its argmax, 1 - cos
    against its last hidden state, counted where token t+1 is an assistant token."""
    m = kangaroo(peaked_llama, losses={"soft_ce": 1.0, "ce": 0.5, "cosine": 2.0})
    with torch.no_grad():  # a non-trivial adapter
        m.adapter.layer.self_attn.o_proj.weight.normal_(0, 0.3)
    sig = online_batch(peaked_llama)
    _, met = m.loss(sig)
    h = m.hidden(sig.input_ids, sig.attention_mask)
    logq = torch.log_softmax(m.logits(h), -1)
    soft, hard, cos, hits = [], [], [], []
    for b in range(sig.input_ids.shape[0]):
        for t in range(sig.input_ids.shape[1] - 1):
            if not (sig.loss_mask[b, t + 1] and sig.attention_mask[b, t + 1]):
                continue
            p = torch.softmax(sig.logits[b, t], -1)
            soft.append(-(p * logq[b, t]).sum().item())
            hard.append(-logq[b, t, p.argmax()].item())
            cos.append(1 - torch.nn.functional.cosine_similarity(h[b, t], sig.last_hidden[b, t], dim=0).item())
            hits.append(float(logq[b, t].argmax() == p.argmax()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert met["loss/soft_ce"] == pytest.approx(mean(soft), abs=1e-4)
    assert met["loss/ce"] == pytest.approx(0.5 * mean(hard), abs=1e-4)
    assert met["loss/cosine"] == pytest.approx(2.0 * mean(cos), abs=1e-5)
    assert met["acc/1"] == pytest.approx(mean(hits))


def test_training_moves_only_the_adapter(peaked_llama):
    """The target is frozen: after optimizer steps on the drafter's parameters no target tensor changed and
    none has a gradient, while the loss fell and every adapter tensor moved."""
    before = {k: v.clone() for k, v in peaked_llama.model.state_dict().items()}
    m = kangaroo(peaked_llama)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    sig = online_batch(peaked_llama)
    first = m.loss(sig)[0].item()
    m = trained(peaked_llama, steps=10)
    assert m.loss(sig)[0].item() < 0.7 * first
    assert all(p.grad is None and not p.requires_grad for p in peaked_llama.model.parameters())
    after = peaked_llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(start[k], v) for k, v in m.state_dict().items())


def _root_logits(d):
    return d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0]


def test_decoding_equals_the_training_forward(peaked_llama):
    """Root and tree-node logits of the decoding drafter (own static cache, tree mask) == the training forward
    over the same tokens; commit re-reads accepted tokens and the bonus."""
    m = trained(peaked_llama, steps=3)
    ids = torch.randint(3, peaked_llama.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m.logits(m.hidden(ids))[0]  # row t: the draft distribution for token t+1
    d = m.as_drafter()
    d.start(ids[:, :4], None)
    torch.testing.assert_close(_root_logits(d), full[3], atol=1e-5, rtol=0)
    chain = DraftTree.empty(1)
    for i in range(2):  # a chain of the next two tokens, one depth per call as the tree builders do
        chain = chain.extend(ids[:, 4 + i:5 + i], torch.tensor([[i - 1]]), torch.zeros(1, 1))
        torch.testing.assert_close(d.expand(chain, torch.tensor([[i]]))[0, 0], full[4 + i], atol=1e-5, rtol=0)
    d.commit(ids[:, 4:8], None)  # 3 accepted + the bonus
    torch.testing.assert_close(_root_logits(d), full[7], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_target_greedy_with_early_exit(tiny_target_dir, arch):
    from conf.schema import TargetConfig
    from drafters.target import load_target

    target = load_target(TargetConfig(path=tiny_target_dir(arch)), device="cpu")
    m = trained(target, steps=15, threshold=0.5)
    prompt = torch.randint(3, target.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    for tree in (TreeConfig(kind="chain", depth=5), TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8)):
        dec = SpeculativeDecoder(target, m.as_drafter(target), tree)
        got, st = dec.generate(prompt, 40, eos_ids=[])
        want, _ = dec.generate_autoregressive(prompt, 40, eos_ids=[])
        assert got.tolist() == want.tolist() and st.new_tokens == 40
        assert st.tau > 1.2, (arch, tree.kind, st.as_dict())  # the drafts are really accepted


def offered(tree) -> int:
    """Nodes a cycle offered the verifier: all of a host-cut chain, the live ones of a device-cut one."""
    return int(tree.alive.sum()) if tree.alive is not None else tree.num_nodes


def test_early_exit_ends_a_chain_after_its_first_unsure_draft(peaked_llama):
    """A chain with threshold t is the threshold-0 chain cut after the first draft whose top-1 probability is
    below t, and the decoder then drafts fewer tokens per cycle."""
    m = trained(peaked_llama, steps=3)
    ids = torch.randint(3, peaked_llama.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    d = m.as_drafter()
    d.start(ids, None)
    d.stop_below = None
    full = build_tree(d, TreeConfig(kind="chain", depth=6))
    conf = []
    for i in range(6):  # the confidence each draft was chosen with
        part = DraftTree(tokens=full.tokens[:, :i], parents=full.parents[:, :i], depths=full.depths[:, :i],
                         logq=full.logq[:, :i])
        conf.append(float(d.expand(part, torch.tensor([[i - 1]])).softmax(-1).max()))
    assert min(conf[:5]) < max(conf[:5]), conf  # not all alike: the cut points below differ
    for t in sorted(set(conf[:5])) + [0.999]:
        d.stop_below = t
        cut = build_tree(d, TreeConfig(kind="chain", depth=6))
        want = next((i + 1 for i, c in enumerate(conf) if c < t), 6)
        assert cut.num_nodes == want and torch.equal(cut.tokens, full.tokens[:, :want]), (t, conf)
        # the fixed-shape cycle's cut: the whole chain, the nodes after the cut marked dead
        dead = build_tree(d, TreeConfig(kind="chain", depth=6), cut_on_device=True)
        assert torch.equal(dead.tokens, full.tokens) and dead.alive[0].tolist() == [i < want for i in range(6)]
    prompt = ids[0]
    drafted = {}
    for t in (0.0, 0.9):
        m.cfg.threshold = t
        dec = SpeculativeDecoder(peaked_llama, m.as_drafter(), TreeConfig(kind="chain", depth=6))
        nodes = []
        out, _ = dec.generate(prompt, 30, eos_ids=[], on_cycle=lambda tree, acc, nodes=nodes: nodes.append(offered(tree)))
        drafted[t] = (sum(nodes) / len(nodes), out.tolist())
    assert drafted[0.0][0] == 6 and drafted[0.9][0] < 5, drafted
    assert drafted[0.0][1] == drafted[0.9][1]  # greedy output is the target's either way


def _v5_target():
    """A 2-layer Llama over 5 tokens (test_decoder_sampling's setup, one layer deeper so it can be cut)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(14.0)
    return Target(model, None, name="tiny-v5")


def test_sampling_with_early_exit_is_lossless():
    """At T = 1 with sampled chains cut by the early exit, the 2nd and 3rd generated tokens follow the target's
    own distribution (chi-square against the exact pair probabilities, as tests/decoding/test_decoder_sampling.py)."""
    from tests.sampling_util import PROMPT, exact_pairs, pvalue, sample_pairs

    target = _v5_target()
    m = kangaroo(target, exit_layer=1, threshold=0.36)  # about half its drafts are less sure
    with torch.no_grad():  # a drafter that differs from the target and is sometimes unsure
        m.adapter.layer.self_attn.o_proj.weight.normal_(0, 1.0)
    rule = SamplingRule(temperature=1.0)
    dec = SpeculativeDecoder(target, m.as_drafter(target), TreeConfig(kind="chain", depth=3), 1.0)
    sizes = []

    def generate(g):
        return dec.generate(PROMPT, 3, eos_ids=[], generator=g,
                            on_cycle=lambda tree, acc: sizes.append(offered(tree)))[0].tolist()
    counts = sample_pairs(generate, 200)
    assert pvalue(counts, exact_pairs(target, rule)) > 1e-3
    assert 0 < sum(s < 3 for s in sizes) < len(sizes), sizes  # the early exit fired, and not always


def test_save_load_round_trip(peaked_llama, tmp_path):
    m = trained(peaked_llama, steps=2, exit_layer=1, threshold=0.3)
    m.save_pretrained(tmp_path)
    r = KangarooDrafter.from_pretrained(tmp_path, peaked_llama).eval()
    assert (r.cfg.exit_layer, r.cfg.threshold) == (1, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), m.state_dict().values()))
    sig = online_batch(peaked_llama)
    assert r.loss(sig)[0].item() == m.loss(sig)[0].item()


def test_eval_takes_the_threshold_from_its_command(cfg_for, llama_target, tmp_path):
    """The early exit is a decoding choice: eval's drafter.threshold applies to a folder trained with another."""
    from eval.stage import build_drafter

    kangaroo(llama_target, threshold=0.3).save_pretrained(tmp_path / "k")
    for t, want in ((0.0, None), (0.8, 0.8)):
        cfg = cfg_for("drafter=kangaroo", f"drafter.checkpoint={tmp_path / 'k'}", f"drafter.threshold={t}")
        assert build_drafter(cfg, llama_target)[0].stop_below == want


def test_registry_yaml_and_one_line_errors(cfg_for, peaked_llama, tiny_target_dir):
    from conf.schema import TargetConfig
    from drafters.registry import drafter_class
    from drafters.target import load_target

    assert drafter_class("kangaroo") is KangarooDrafter
    c = cfg_for("drafter=kangaroo").drafter
    assert (c.name, c.exit_layer, c.threshold, c.losses) == ("kangaroo", 2, 0.6, {"soft_ce": 1.0})
    with pytest.raises(DraftsmithError, match=r"^drafter.exit_layer=0 must be >= 1 "):
        cfg_for("drafter=kangaroo", "drafter.exit_layer=0")
    with pytest.raises(DraftsmithError, match=r"^drafter.threshold=1.0 must be in \[0, 1\) "):
        cfg_for("drafter=kangaroo", "drafter.threshold=1.0")
    with pytest.raises(DraftsmithError, match=r"^drafter.exit_layer=4 but target \S+ has 4 layers: use 1..3 "):
        kangaroo(peaked_llama, exit_layer=4)
    with pytest.raises(DraftsmithError, match=r"^drafter.losses=\{'smooth_l1': 1.0\} for kangaroo: use one or more"):
        kangaroo(peaked_llama, losses={"smooth_l1": 1.0})
    gpt2 = load_target(TargetConfig(path=tiny_target_dir("gpt2")), device="cpu")
    with pytest.raises(DraftsmithError, match="^drafter=kangaroo shares the target's decoder layers, but GPT2LMHeadModel"):
        kangaroo(gpt2, exit_layer=1)
    from export.formats import check_family

    with pytest.raises(DraftsmithError, match="^export.format=sglang takes eagle1, eagle3 drafters, not kangaroo: "
                                              "no serving engine loads it"):
        check_family("sglang", "kangaroo")
    sig = online_batch(peaked_llama)
    sig._logits, sig.last_hidden = sig.logits, None  # the target's distribution without its hidden states
    with pytest.raises(DraftsmithError, match="kangaroo's cosine loss trains on the target's last hidden state"):
        kangaroo(peaked_llama, losses={"cosine": 1.0}).loss(sig)


def test_train_stage_resumes_exactly(tmp_path, tiny_target_dir, llama_target):
    """4 steps in one go == 2 steps, then the same command with max_steps=4 resuming from the step-2 checkpoint;
    the target's weights are the same after both."""
    from conf.schema import load_config
    from tests.train_fixtures import base_overrides, final_weights, write_data_gen
    from training.stage import train

    before = {k: v.clone() for k, v in llama_target.model.state_dict().items()}

    def run(name, steps):
        root = tmp_path / "runs"
        if not (root / name / "data_gen" / "meta.json").exists():
            write_data_gen(root / name, llama_target, n_rows=12)
        over = base_overrides(tiny_target_dir("llama"), root, name) + [
            "drafter=kangaroo", "train.save_every=2", "train.eval_every=0", f"train.max_steps={steps}"]
        return train(load_config(over), target=llama_target)

    ref = run("ref", 4)
    first = run("res", 2)
    assert first["steps"] == 2 and first["resumed_from"] is None
    halfway = final_weights(first)  # read now: the resumed run replaces that folder
    second = run("res", 4)
    assert second["resumed_from"].endswith("step_00000002") and second["steps_this_run"] == 2
    a, b = final_weights(ref), final_weights(second)
    assert sorted(a) == sorted(f"adapter.layer.{n}" for n in ADAPTER) + ["adapter.norm.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], halfway[k]) for k in a)  # steps 3-4 changed something
    assert second["train_metrics"] == ref["train_metrics"]
    after = llama_target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_target_trains_an_fp32_adapter_and_decodes_with_a_bf16_copy(tiny_target_dir):
    """As on a GPU (a bf16 target, the adapter trained in fp32 or cast by DeepSpeed): the loss runs across the
    dtype boundary with gradients in the adapter only, and decoding uses a bf16 copy, greedy-exact."""
    from conf.schema import TargetConfig
    from drafters.target import load_target

    target = load_target(TargetConfig(path=tiny_target_dir("llama"), dtype="bfloat16"), device="cpu")
    m = kangaroo(target)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    loss, _ = m.loss(online_batch(target))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())
    d = m.as_drafter()
    assert d.model.base_model.norm.weight.dtype == torch.bfloat16 and m.adapter.norm.weight.dtype == torch.float32
    prompt = torch.randint(3, target.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    dec = SpeculativeDecoder(target, d, TreeConfig(kind="chain", depth=4))
    assert dec.generate(prompt, 20, eos_ids=[])[0].tolist() == dec.generate_autoregressive(prompt, 20, eos_ids=[])[0].tolist()
