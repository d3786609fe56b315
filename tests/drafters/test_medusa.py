"""Medusa-1/2 heads: names, targets aligned to t+k+1, losses, gradients, LoRA joint training, decoding, saving.

    python -m pytest -q tests/drafters/test_medusa.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import TargetConfig
from conf.schema.drafter import MedusaConfig
from decoding.tree import DraftTree
from drafters.base import TargetSignal
from drafters.medusa import MedusaDecodeDrafter, MedusaDrafter
from drafters.target import load_target, target_identity
from tests.heads_util import (
    checkpointing_on,
    grads,
    greedy_signal,
    make_batch,
    signal_for,
    train,
)


# --- structure ----------------------------------------------------------------------------------------
def test_param_names_follow_medusa_format(llama):
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=3, num_layers=2), llama)
    H, V = llama.hidden_size, llama.vocab_size
    want = {}
    for k in range(3):
        for j in range(2):
            want[f"medusa_head.{k}.{j}.linear.weight"] = (H, H)
            want[f"medusa_head.{k}.{j}.linear.bias"] = (H,)
        want[f"medusa_head.{k}.2.weight"] = (V, H)
    assert {n: tuple(t.shape) for n, t in m.heads_state_dict().items()} == want
    lm_w = llama.model.get_output_embeddings().weight
    for k in range(3):  # final linears start as the target's LM head; ResBlocks as the identity
        assert torch.equal(m.medusa_head[k][2].weight, lm_w)
        assert m.medusa_head[k][2].weight.data_ptr() != lm_w.data_ptr()
        assert not m.medusa_head[k][0].linear.weight.any() and not m.medusa_head[k][0].linear.bias.any()
    x = torch.randn(5, H)
    torch.testing.assert_close(m.head_logits(x)[2], llama.lm_head(x))
    assert all(p.requires_grad for p in m.parameters())


def test_registry_and_yaml(cfg_for):
    from drafters.registry import drafter_class

    assert drafter_class("medusa") is MedusaDrafter
    assert cfg_for("drafter=medusa").drafter.joint is False
    c = cfg_for("drafter=medusa2").drafter
    assert c.joint is True and c.name == "medusa" and c.head_lr_scale == 4.0


# --- objective -------------------------------------------------------------------------------------------
def test_head_k_targets_token_t_plus_k_plus_1(llama):
    """A signal whose answer is known: h_t = e_{t mod 32}, x_s = s mod 32, head k maps e_j to token
    j+k+1 and the target's LM head maps e_j to j+1. Aligned heads are exact; off by one they are wrong."""
    K, H, T = 3, llama.hidden_size, 40
    assert H == 32
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=K, losses={"ce": 1.0, "soft_ce": 1.0}), llama)
    j = torch.arange(32)

    def shift_map(s):
        w = torch.zeros(llama.vocab_size, H)
        w[(j + s) % 32, j] = 30.0
        return w

    with torch.no_grad():
        for k in range(1, K + 1):
            m.medusa_head[k - 1][-1].weight.copy_(shift_map(k + 1))
    ids = (torch.arange(T) % 32)[None]
    hidden = torch.eye(32)[torch.arange(T) % 32][None]
    w0 = shift_map(1)
    sig = TargetSignal(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids),
                       last_hidden=hidden, lm_head=lambda h: h @ w0.T, vocab_size=llama.vocab_size)
    loss, metrics = m.loss(sig)
    assert loss.item() < 1e-6
    assert [metrics[f"acc/{k}"] for k in range(1, K + 1)] == [1.0, 1.0, 1.0]
    # the same heads one position late are wrong everywhere
    sig_late = TargetSignal(input_ids=torch.roll(ids, 1, dims=1), attention_mask=sig.attention_mask,
                            loss_mask=sig.loss_mask, last_hidden=hidden, lm_head=lambda h: h @ shift_map(0).T)
    loss, metrics = m.loss(sig_late)
    assert loss.item() > 50 and metrics["acc/1"] == 0.0


def test_loss_falls_on_every_shape(tiny_target):
    torch.manual_seed(0)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=2), tiny_target)
    sig = signal_for(tiny_target)
    losses = train(m, lambda: sig, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 1.0, losses


def test_golden_first_loss(llama):
    m = MedusaDrafter.from_target(MedusaConfig(), llama)  # deterministic init: LM-head copies, zero ResBlocks
    loss, metrics = m.loss(signal_for(llama))
    assert loss.item() == pytest.approx(GOLDEN_MEDUSA1, abs=1e-4)
    assert metrics["loss/ce"] == pytest.approx(GOLDEN_MEDUSA1, abs=1e-4)
    assert set(metrics) == {"loss/ce", "acc/1", "acc/2", "acc/3", "acc/4"}


GOLDEN_MEDUSA1 = 23.090740


def test_every_head_parameter_gets_a_gradient(llama):
    m = MedusaDrafter.from_target(MedusaConfig(num_layers=2), llama)
    m.loss(signal_for(llama))[0].backward()
    g = grads(m)
    assert set(g) == {n for n, p in m.named_parameters()}
    assert all(v.abs().sum() > 0 for v in g.values()), [n for n, v in g.items() if not v.any()]
    assert m.param_groups(1e-3)[0]["lr"] == 1e-3


def test_distribution_losses_and_unknown_loss(llama):
    sig = signal_for(llama)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=2, losses={"forward_kl": 1.0, "tvd": 0.5}), llama)
    loss, metrics = m.loss(sig)
    assert loss.item() == pytest.approx(metrics["loss/forward_kl"] + metrics["loss/tvd"], abs=1e-5)
    bad = MedusaDrafter.from_target(MedusaConfig(num_heads=1, losses={"kl": 1.0}), llama)
    with pytest.raises(DraftsmithError, match="unknown loss 'kl' in drafter.losses: use ce or one of"):
        bad.loss(sig)


def test_offline_batch_without_last_hidden_is_a_clear_error(llama):
    ids, attn, mask = make_batch(llama.vocab_size)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=1), llama)
    with pytest.raises(DraftsmithError, match="medusa trains on the target's last hidden state"):
        m.loss(TargetSignal(input_ids=ids, attention_mask=attn, loss_mask=mask))


# --- Medusa-2 --------------------------------------------------------------------------------------------
def medusa2(target, **kw):
    torch.manual_seed(0)
    m = MedusaDrafter.from_target(MedusaConfig(joint=True, num_heads=2, lora_r=4, **kw), target)
    return m.train()


def test_medusa2_self_distillation_is_zero_at_init_then_learns(llama):
    m = medusa2(llama)
    sig = signal_for(llama)
    loss, metrics = m.loss(sig)
    assert metrics["loss/lm"] == 0.0  # LoRA B starts at zero: adapter-on == adapter-off
    base = loss.item()
    losses = train(m, lambda: sig, steps=6, lr=1e-2)
    assert losses[0] == pytest.approx(base, abs=1e-6) and losses[-1] < losses[0] - 0.1, losses
    assert m.loss(sig)[1]["loss/lm"] > 0  # the adapter moved the model; KL keeps it near the original


def test_medusa2_lr_groups_and_lora_gradients(llama):
    m = medusa2(llama)
    heads_g, lora_g = m.param_groups(1.0)[::-1]
    assert lora_g["lr"] == 1.0 and heads_g["lr"] == 4.0
    lora_names = {n for n, p in m.named_parameters() if p.requires_grad and "lora_" in n}
    assert len(lora_names) == len(lora_g["params"]) > 0
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n and "medusa_head" not in n)
    opt = torch.optim.SGD(m.param_groups(1e-2))
    sig = signal_for(llama)
    m.loss(sig)[0].backward()
    g = grads(m)
    assert all(g[n].any() for n in g if "lora_A" not in n)  # heads and every LoRA B
    assert not any(g[n].any() for n in g if "lora_A" in n)  # B = 0 at init blocks A's gradient ...
    opt.step()
    opt.zero_grad()
    m.loss(sig)[0].backward()
    assert all(p.grad.any() for n, p in m.named_parameters() if "lora_A" in n)  # ... for one step only


def test_medusa2_gradient_checkpointing_gives_the_same_gradients(llama, tiny_target_dir):
    sig = signal_for(llama)
    m = medusa2(llama, self_distill=False)
    m.loss(sig)[0].backward()
    plain = grads(m)
    other = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    m2 = medusa2(other, self_distill=False)
    m2.set_gradient_checkpointing(True)
    assert checkpointing_on(other.model)
    m2.loss(sig)[0].backward()
    checkpointed = grads(m2)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_medusa2_is_online_only(llama):
    m = medusa2(llama)
    assert m.runs_target
    m.check_train_mode("online")
    with pytest.raises(DraftsmithError, match="Medusa-2 .* set train.mode=online"):
        m.check_train_mode("offline")
    MedusaDrafter.from_target(MedusaConfig(), llama).check_train_mode("offline")  # Medusa-1 can


def test_medusa2_save_load_merges_the_adapter(llama, tiny_target_dir, tmp_path):
    m = medusa2(llama)
    sig = signal_for(llama)
    train(m, lambda: sig, steps=2, lr=1e-2)
    m.eval()
    ids = sig.input_ids[:1]
    with torch.no_grad():
        want = llama(ids).logits  # the adapted target (LoRA wraps target.model in place)
    m.save_pretrained(tmp_path / "m2")
    assert (tmp_path / "m2" / "adapter" / "adapter_model.safetensors").exists()
    fresh = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    loaded = MedusaDrafter.from_pretrained(tmp_path / "m2", fresh)
    assert loaded.base is None and not any("lora" in n for n, _ in fresh.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want, atol=1e-5, rtol=0)
    for k, v in m.heads_state_dict().items():
        assert torch.equal(loaded.heads_state_dict()[k], v)


# --- decoding, saving --------------------------------------------------------------------------------------
def test_decode_matches_training_heads(llama):
    torch.manual_seed(0)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=3), llama)
    sig = signal_for(llama)
    train(m, lambda: sig, steps=2, lr=1e-2)  # move off the all-heads-equal init
    d = m.as_drafter(llama)
    assert isinstance(d, MedusaDecodeDrafter) and d.uses_features and d.feature_source == "last_hidden"
    n = 9
    ids = sig.input_ids[:1]
    d.start(ids[:, : n + 1], sig.last_hidden[:1, :n])
    with torch.no_grad():
        want = [h[0, n - 1] for h in m.head_logits(sig.last_hidden[:1])]
    root = d.expand(DraftTree.empty(1), torch.tensor([[-1]]))
    assert root.shape == (1, 1, llama.vocab_size)
    torch.testing.assert_close(root[0, 0], want[0])
    # nodes at depth 1 and 2: heads 2 and 3, whatever their tokens
    tree = DraftTree(tokens=torch.tensor([[7, 8, 9]]), parents=torch.tensor([[-1, -1, 0]]),
                     depths=torch.tensor([[1, 1, 2]]), logq=torch.zeros(1, 3))
    out = d.expand(tree, torch.tensor([[0, 1, 2, -1]]))
    for f, k in enumerate([1, 1, 2, 0]):
        torch.testing.assert_close(out[0, f], want[k])
    with pytest.raises(DraftsmithError, match="medusa has 3 heads, so it drafts at most 3 tokens deep"):
        d.expand(DraftTree(tokens=torch.tensor([[1, 2, 3]]), parents=torch.tensor([[-1, 0, 1]]),
                           depths=torch.tensor([[1, 2, 3]]), logq=torch.zeros(1, 3)), torch.tensor([[2]]))
    d.commit(ids[:, n + 1: n + 3], sig.last_hidden[:1, n: n + 2])  # one accepted + bonus
    with torch.no_grad():
        want2 = m.head_logits(sig.last_hidden[:1])[0][0, n + 1]
    torch.testing.assert_close(d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0], want2)


def test_save_load_round_trip(llama, tmp_path):
    import json

    torch.manual_seed(0)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=2, num_layers=2), llama)
    sig = signal_for(llama)
    train(m, lambda: sig, steps=2, lr=1e-2)
    m.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "drafter_config.json").read_text())
    assert meta["family"] == "medusa" and meta["config"]["num_layers"] == 2
    fingerprint = meta["target"].pop("fingerprint")
    assert meta["target"] == {"path": llama.name, "vocab_size": 320, "hidden_size": 32, "num_layers": 4,
                              "feature_layers": llama.feature_layers}
    assert fingerprint == target_identity(llama)["fingerprint"] and len(fingerprint) == 16
    meta["target"]["fingerprint"] = fingerprint
    assert meta["dims"] == {"hidden_size": 32, "vocab_size": 320, "num_heads": 2, "num_layers": 2}
    loaded = MedusaDrafter.from_pretrained(tmp_path / "m", llama)
    assert loaded.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    assert loaded.loss(sig)[0].item() == m.loss(sig)[0].item()
    meta["config"]["num_layers"] = 1  # a config that does not match the weights
    (tmp_path / "m" / "drafter_config.json").write_text(json.dumps(meta))
    with pytest.raises(DraftsmithError, match="model.safetensors lacks medusa_head.0.1.weight: "
                                              "it does not match its drafter_config.json"):
        MedusaDrafter.from_pretrained(tmp_path / "m", llama)


def test_load_for_a_different_target_is_a_clear_error(llama, tmp_path, tiny_tokenizer):
    from drafters.target import Target
    from tests.conftest import build_tiny_model

    MedusaDrafter.from_target(MedusaConfig(num_heads=1), llama).save_pretrained(tmp_path / "m")
    narrow = Target(build_tiny_model("llama", len(tiny_tokenizer), hidden=16), tiny_tokenizer, name="narrow")
    with pytest.raises(DraftsmithError, match="trained for target .* \\(hidden_size 32\\), but the loaded target narrow has "
                                              "hidden_size 16: load the matching target"):
        MedusaDrafter.from_pretrained(tmp_path / "m", narrow)
    with pytest.raises(DraftsmithError, match="holds a 'medusa' drafter, not 'hydra': set drafter=medusa"):
        from drafters.hydra_heads import HydraDrafter

        HydraDrafter.from_pretrained(tmp_path / "m", llama)


def test_a_same_shape_target_of_another_config_is_refused(llama, tmp_path, tiny_target_dir):
    """Same vocabulary, width and depth but another model config (as Llama-3-8B vs Llama-3.1-8B): the
    fingerprint data_gen records (drafters.target.target_identity) tells them apart; another set of
    weights with the same tokenizer and config is the same target to it, and loads."""
    MedusaDrafter.from_target(MedusaConfig(num_heads=1), llama).save_pretrained(tmp_path / "m")
    saved = target_identity(llama)["fingerprint"]
    other = load_target(TargetConfig(path=tiny_target_dir("llama", seed=1)), device="cpu")
    assert MedusaDrafter.from_pretrained(tmp_path / "m", other).family == "medusa"
    other.config.max_position_embeddings = 1024
    now = target_identity(other)["fingerprint"]
    assert now != saved
    with pytest.raises(DraftsmithError, match=f"trained for target .* \\(fingerprint {saved}\\), but the loaded "
                                              f"target .* has fingerprint {now}: load the matching target"):
        MedusaDrafter.from_pretrained(tmp_path / "m", other)


def test_speculative_decoding_accepts_and_is_lossless(tiny_target_dir):
    """End to end through decoding/decoder.py, which hands over the target output feature_source names
    (last_hidden, not the taps). Heads trained on the target's greedy continuations get most drafts
    accepted (tau 3.2 of at most 4 when written)."""
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder

    target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    prompts, sig = greedy_signal(target)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=3), target)
    train(m, lambda: sig, steps=40, lr=1e-2)
    for tree in (TreeConfig(kind="chain", depth=3), TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8)):
        dec = SpeculativeDecoder(target, m.as_drafter(target), tree)
        got, st = dec.generate(prompts[0], 30, eos_ids=[])
        want, _ = dec.generate_autoregressive(prompts[0], 30, eos_ids=[])
        assert got.tolist() == want.tolist()
        assert st.tau > 2.5, st.as_dict()
