"""Independent small drafter: target-shaped fresh configs, checkpoint init with vocabulary checks, LoRA,
distillation losses by name, gradients, and a saved folder that works as transformers' assistant_model.

    python -m pytest -q tests/drafters/test_small.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import SmallConfig
from drafters.losses import DISTRIBUTION_LOSSES
from drafters.small_lm import SmallDrafter, fresh_config
from tests.heads_util import checkpointing_on, grads, signal_for, train


def fresh(target, **kw) -> SmallDrafter:
    torch.manual_seed(0)
    return SmallDrafter.from_target(SmallConfig(**kw), target)


def test_fresh_config_is_shaped_like_the_target(tiny_target):
    m = fresh(tiny_target)
    c, t = m.model.config, tiny_target.config
    assert type(m.model) is type(tiny_target.model)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (16, 2, 2)  # head size 8 kept
    assert c.vocab_size == t.vocab_size and m.model.get_input_embeddings().weight.shape == (320, 16)
    if hasattr(t, "num_key_value_heads"):
        assert c.num_key_value_heads == 1  # the target's 2:1 query:KV ratio
        assert c.intermediate_size == t.intermediate_size // 2
    wide = fresh_config(t, num_layers=1, hidden_size=24)
    assert (wide.hidden_size, wide.num_attention_heads, wide.num_hidden_layers) == (24, 3, 1)
    with pytest.raises(DraftsmithError, match="drafter.hidden_size=20 .* a multiple of 8"):
        fresh_config(t, num_layers=2, hidden_size=20)
    odd = t.__class__.from_dict({**t.to_dict(), "hidden_size": 24, "num_attention_heads": 3,
                                 "num_key_value_heads": 3, "n_embd": 24, "n_head": 3})
    half = fresh_config(odd, num_layers=2, hidden_size=None)  # 3 heads of 8 (the demo target's 3 x 64 alike)
    assert (half.hidden_size, half.num_attention_heads) == (16, 2)  # half the heads, rounded up


def test_registry_and_yaml(cfg_for):
    from drafters.registry import drafter_class

    assert drafter_class("small") is SmallDrafter
    c = cfg_for("drafter=small").drafter
    assert (c.init, c.losses, c.lora_r) == ("fresh", {"forward_kl": 1.0}, 0)


def test_loss_falls_on_every_shape(tiny_target):
    m = fresh(tiny_target).eval()  # eval: GPT-2's dropout off, so the trajectory is deterministic
    sig = signal_for(tiny_target)
    losses = train(m, lambda: sig, steps=6, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_golden_first_loss(llama):
    m = fresh(llama)
    loss, metrics = m.loss(signal_for(llama))
    assert loss.item() == pytest.approx(GOLDEN_SMALL, abs=1e-6)
    assert set(metrics) == {"loss/forward_kl", "acc/1"}


GOLDEN_SMALL = 0.00981012


@pytest.mark.parametrize("name", [*DISTRIBUTION_LOSSES, "ce"])
def test_every_loss_by_name(llama, name):
    m = fresh(llama, losses={name: 2.0})
    loss, metrics = m.loss(signal_for(llama))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(metrics[f"loss/{name}"], rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in m.parameters())


def test_unknown_loss(llama):
    with pytest.raises(DraftsmithError, match="unknown loss 'kl' in drafter.losses"):
        fresh(llama, losses={"kl": 1.0}).loss(signal_for(llama))


def test_gradient_checkpointing_gives_the_same_gradients(llama):
    sig = signal_for(llama)
    runs = []
    for on in (False, True):
        m = fresh(llama).train()
        m.set_gradient_checkpointing(on)
        assert checkpointing_on(m.model) == on
        m.loss(sig)[0].backward()
        runs.append(grads(m))
    assert runs[0].keys() == {n for n, _ in m.named_parameters()}
    assert all(v.any() for v in runs[0].values())
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], atol=1e-6, rtol=1e-5)


# --- checkpoint init -----------------------------------------------------------------------------------
@pytest.fixture
def small_ckpt(tmp_path, tiny_tokenizer):
    """A 2-layer 16-wide llama with the target's tokenizer, saved like a hub checkpoint."""
    from tests.conftest import build_tiny_model

    path = tmp_path / "small-ckpt"
    build_tiny_model("llama", len(tiny_tokenizer), seed=3, num_layers=2, hidden=16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_init_from_checkpoint_with_lora(llama, small_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = SmallDrafter.from_target(SmallConfig(init=small_ckpt, lora_r=4, lora_alpha=8), llama)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = AutoModelForCausalLM.from_pretrained(small_ckpt)
    sig = signal_for(llama)
    with torch.no_grad():  # LoRA B = 0: the checkpoint's own function at init
        torch.testing.assert_close(m.model(sig.input_ids).logits, ref(sig.input_ids).logits)
    losses = train(m, lambda: sig, steps=5, lr=3e-2)
    assert losses[-1] < losses[0], losses
    m.save_pretrained(tmp_path / "s")  # LoRA merged into a plain HF folder
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(sig.input_ids).logits, m.model(sig.input_ids).logits, atol=1e-5, rtol=0)
    assert hasattr(m.model, "peft_config")  # saving did not unwrap the model being trained


def test_mismatched_vocab_is_a_clear_error(llama, tmp_path):
    from tests.conftest import _CORPUS, build_tiny_model
    from training.tokenizer import train_tokenizer

    build_tiny_model("llama", 100, num_layers=1, hidden=16).save_pretrained(tmp_path / "v100")
    with pytest.raises(DraftsmithError, match="has a vocabulary of 100 tokens but target .* tokenizer has 320: "
                                              "pick a drafter that shares the target's tokenizer"):
        SmallDrafter.from_target(SmallConfig(init=str(tmp_path / "v100")), llama)
    other = train_tokenizer([c[::-1] for c in _CORPUS] * 20, vocab_size=320)  # same size, other tokens
    build_tiny_model("llama", len(other), num_layers=1, hidden=16).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DraftsmithError, match="uses a different tokenizer from target"):
        SmallDrafter.from_target(SmallConfig(init=str(tmp_path / "other")), llama)


def test_bad_init_settings(llama, tmp_path):
    with pytest.raises(DraftsmithError, match="drafter.init=fresh is random: set drafter.lora_r=0"):
        SmallDrafter.from_target(SmallConfig(lora_r=4), llama)
    with pytest.raises(DraftsmithError, match="could not load drafter.init"):
        SmallDrafter.from_target(SmallConfig(init=str(tmp_path / "missing")), llama)


def test_padded_vocabulary_is_compared_over_shared_ids(llama, tmp_path, tiny_tokenizer):
    """A drafter padded to more embedding rows than the target (e.g. to a multiple of 64) still works."""
    from tests.conftest import build_tiny_model

    build_tiny_model("llama", 384, num_layers=1, hidden=16).save_pretrained(tmp_path / "pad")
    tiny_tokenizer.save_pretrained(tmp_path / "pad")
    m = SmallDrafter.from_target(SmallConfig(init=str(tmp_path / "pad")), llama)
    losses = train(m, lambda: signal_for(llama), steps=3, lr=1e-2)
    assert losses[-1] < losses[0]


# --- saving ---------------------------------------------------------------------------------------------
def test_saved_folder_round_trip_and_assistant_model(llama, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = fresh(llama).eval()
    sig = signal_for(llama)
    train(m, lambda: sig, steps=3, lr=1e-2)
    m.save_pretrained(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "drafter_config.json").read_text())
    assert meta["family"] == "small" and meta["dims"]["hidden_size"] == 16 and meta["target"]["vocab_size"] == 320
    loaded = SmallDrafter.from_pretrained(tmp_path / "s", llama)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    assert loaded.loss(sig)[0].item() == m.loss(sig)[0].item()
    # the same folder is a plain HF causal LM with the target's tokenizer: transformers' assistant_model
    assistant = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert AutoTokenizer.from_pretrained(tmp_path / "s").get_vocab() == llama.tokenizer.get_vocab()
    prompt = sig.input_ids[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = llama.model.generate(prompt, **kw)
    assisted = llama.model.generate(prompt, assistant_model=assistant, **kw)
    assert torch.equal(assisted, plain)


def test_speculative_decoding_with_the_lm_tree_drafter(tiny_target_dir, llama):
    """A drafter initialised from the target's own checkpoint agrees with it everywhere: at T=0 every
    draft is accepted (tau = depth + 1) and the output is the target's greedy output."""
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder
    from drafters.lm_drafter import LMTreeDrafter

    m = SmallDrafter.from_target(SmallConfig(init=tiny_target_dir("llama")), llama)
    d = m.as_drafter(llama)
    assert isinstance(d, LMTreeDrafter) and d.vocab_size == llama.vocab_size and not d.uses_features
    dec = SpeculativeDecoder(llama, d, TreeConfig(kind="chain", depth=3))
    prompt = signal_for(llama).input_ids[0, :5]
    got, st = dec.generate(prompt, 1 + 4 * 4, eos_ids=[])
    want, _ = dec.generate_autoregressive(prompt, 1 + 4 * 4, eos_ids=[])
    assert got.tolist() == want.tolist() and st.cycles == 4 and st.tau == 4.0
    fresh_d = fresh(llama).as_drafter(llama)  # a random drafter: still lossless, rarely accepted
    got, st = SpeculativeDecoder(llama, fresh_d, TreeConfig(kind="dynamic", depth=3, top_k=3,
                                                            total_tokens=8)).generate(prompt, 12, eos_ids=[])
    assert got.tolist() == want[:12].tolist()
