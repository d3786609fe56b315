"""The target wrapper: loading, taps, logits equal to plain transformers, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import TargetConfig
from drafters.target import default_feature_layers, load_target


def test_default_taps_follow_eagle3():
    assert default_feature_layers(32) == [2, 16, 29]
    assert default_feature_layers(4) == [1, 2, 3]  # collisions pushed deeper on shallow targets
    assert default_feature_layers(6) == [2, 3, 4]


def test_logits_equal_plain_transformers(tiny_target):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_target.name).eval()
    ids = torch.randint(0, tiny_target.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    out = tiny_target(ids)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)
    H = tiny_target.hidden_size
    assert out.features.shape == (2, 11, 3 * H) and out.last_hidden.shape == (2, 11, H)
    torch.testing.assert_close(tiny_target.lm_head(out.last_hidden), out.logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in tiny_target.parameters())


def test_taps_are_hidden_states_entering_layers(tiny_target_dir):
    t = load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[0, 1]), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    out = t(ids)
    H = t.hidden_size
    torch.testing.assert_close(out.features[..., :H], t.embed(ids))  # entering layer 0 = embeddings
    hs = t.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.features[..., H:], hs[1])


def test_missing_path():
    with pytest.raises(DraftsmithError, match="target.path './no/such/model' does not exist"):
        load_target(TargetConfig(path="./no/such/model"), device="cpu")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(DraftsmithError, match="is a bert model .* not a causal LM"):
        load_target(TargetConfig(path=str(tmp_path)), device="cpu")


def test_tokenizer_larger_than_embedding(tmp_path, tiny_tokenizer):
    from tests.conftest import build_tiny_model

    build_tiny_model("llama", vocab_size=100).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(DraftsmithError, match=f"tokenizer has {len(tiny_tokenizer)} tokens but the model's "
                                              "embedding has only 100 rows"):
        load_target(TargetConfig(path=str(tmp_path)), device="cpu")


def test_no_chat_template(tmp_path, tiny_tokenizer, tiny_target_dir):
    import shutil

    shutil.copytree(tiny_target_dir("llama"), tmp_path / "m")
    cfg_path = tmp_path / "m" / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tc))
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    t = load_target(TargetConfig(path=str(tmp_path / "m")), device="cpu")
    with pytest.raises(DraftsmithError, match="has no chat template: set target.chat_template"):
        _ = t.chat_template
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    t2 = load_target(TargetConfig(path=str(tmp_path / "m"), chat_template=str(tpl)), device="cpu")
    assert t2.chat_template == tpl.read_text()


def test_eos_ids_include_end_of_turn(tiny_target):
    assert tiny_target.tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny_target.eos_token_ids


def test_cached_forwards_use_transformers_cache_argument(tiny_target):
    """transformers 5.24 deprecates `past_key_values` (removed in 5.40) for `cache`: a cached target forward
    and the decoder's prefill + steps raise no deprecation (pyproject's filterwarnings makes one an error
    suite-wide; here it is explicit), and the cache the forward returns is the one it was given."""
    import warnings

    from transformers import DynamicCache

    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder
    from drafters.reference import TargetDrafter

    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = DynamicCache(config=tiny_target.config)
        out = tiny_target(ids, cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 4
        dec = SpeculativeDecoder(tiny_target, TargetDrafter(tiny_target),
                                 TreeConfig(kind="chain", depth=2))
        tokens, st = dec.generate(ids, 6)
        base, _ = dec.generate_autoregressive(ids, 6)
    assert tokens.tolist() == base.tolist() and st.cycles > 0


def test_folder_without_tokenizer_files_is_one_clear_error(tmp_path, tiny_target_dir):
    """transformers' own message would advise installing sentencepiece or tiktoken; the folder simply has no
    tokenizer."""
    import shutil

    src = tiny_target_dir("llama")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    with pytest.raises(DraftsmithError, match=rf"^target.path '{tmp_path}' has no tokenizer files \(none of "
                                              r"tokenizer.json, .*\): copy the tokenizer of the model it was saved "
                                              "from into that folder$"):
        load_target(TargetConfig(path=str(tmp_path)), device="cpu")


@pytest.mark.parametrize("drafter", ["target", "small", "ngram"])
def test_sliding_window_target_is_refused_alike_for_every_drafter(tmp_path, tiny_tokenizer, drafter):
    """Mistral with sliding_window=32: its KV cache drops old entries, so no draft tree can be kept in it.
    Every drafter gets the same one-line refusal before decoding (the small and target drafters used to
    crash with `size of tensor a (39) must match ... (40)`)."""
    from transformers import MistralConfig, MistralForCausalLM

    from conf.schema.drafter import NgramConfig, SmallConfig
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder
    from drafters.reference import NgramDrafter, TargetDrafter
    from drafters.small_lm import SmallDrafter

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     sliding_window=32, max_position_embeddings=256)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    target = load_target(TargetConfig(path=str(tmp_path)), device="cpu")
    msg = r"uses sliding-window attention \(sliding_window=32\), whose KV cache cannot keep arbitrary draft-tree"
    with pytest.raises(DraftsmithError, match=msg):
        if drafter == "target":
            d = TargetDrafter(target)
        elif drafter == "small":
            d = SmallDrafter.from_target(SmallConfig(num_layers=1), target).as_drafter(target)
        else:
            d = NgramDrafter.from_config(NgramConfig(), target)
        SpeculativeDecoder(target, d, TreeConfig(kind="chain", depth=3)).generate(list(range(3, 43)), 8)
