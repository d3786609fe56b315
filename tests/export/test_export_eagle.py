"""EAGLE-1 / EAGLE-3 exports: SGLang and vLLM (speculators) layouts, exact round trips, tap rewriting,
and check_format catching broken folders.

    python -m pytest -q tests/export/test_export_eagle.py
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.errors import DraftsmithError
from conf.schema import TargetConfig
from conf.schema.drafter import Eagle1Config, Eagle3Config
from drafters.target import load_target
from export.formats import ExportContext, check_format, detect, load_exported_model, write_export
from export.formats.eagle import engine_layers, remap_fc
from tests.export_util import assert_portable_readme

LAYER = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
REF = "org/tiny-target"  # what the serving configs name as the target in these tests


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    """Tiny 4-layer Llama tapping 3 distinct layers (what engines capture)."""
    return load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[1, 2, 3]), device="cpu")


@pytest.fixture(scope="module")
def target_default_taps(tiny_target_dir):
    """The same model tapped as EAGLE-3's formula gives on 4 layers before de-duplication: [2, 2, 1]."""
    return load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[2, 2, 1]), device="cpu")


def counts(V: int) -> torch.Tensor:
    """Token counts whose top-100 are scattered over the vocabulary (non-trivial d2t offsets)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(V, generator=g)


def make(family: str, target, seed: int = 0, **kw):
    """An untrained drafter with non-zero weights everywhere (fresh norms are all ones, fc of fresh
    Medusa-style blocks zero...): noise on every parameter so a mis-mapped tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    if family == "eagle3":
        m = __import__("drafters.eagle3", fromlist=["x"]).Eagle3Drafter.from_target(
            Eagle3Config(draft_vocab_size=100, **kw), target, token_counts=counts(target.vocab_size))
    else:
        m = __import__("drafters.eagle1", fromlist=["x"]).Eagle1Drafter.from_target(Eagle1Config(**kw), target)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def export(model, target, fmt, folder, dtype=torch.bfloat16):
    write_export(model, target, fmt, folder, ExportContext(dtype=dtype, target_ref=REF))
    return folder


def draft_logits(model, target, ids):
    """Root draft logits after start() on a real prefix: what the decoder asks the drafter first."""
    from decoding.tree import DraftTree

    out = target(ids)
    feats = out.features if model.feature_source == "features" else out.last_hidden
    d = model.as_drafter(target)
    d.start(ids, feats[:, :-1])
    return d.expand(DraftTree.empty(1), torch.tensor([[-1]]))


def prompt(target):
    return torch.tensor([target.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
def test_sglang_eagle3_layout(target, tmp_path):
    model = make("eagle3", target)
    out = export(model, target, "sglang", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["draft_vocab_size"]) == (1, target.vocab_size, 100)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (32, 4, 2, 8)
    assert cfg["intermediate_size"] == 64 and cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None and cfg["torch_dtype"] == "bfloat16"
    # SGLang adds 1 to these ids: the hidden states entering layers 1, 2, 3
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2], "use_aux_hidden_state": True}
    t = load_file(out / "model.safetensors")
    assert set(t) == {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "midlayer.input_layernorm.weight",
                      "midlayer.hidden_norm.weight"} | {f"midlayer.{n}" for n in LAYER}
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert {v.dtype for k, v in t.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert torch.equal(t["d2t"], model.d2t) and torch.equal(t["t2d"], model.t2d) and t["d2t"].any()
    assert t["fc.weight"].shape == (32, 96) and t["midlayer.self_attn.q_proj.weight"].shape == (32, 64)
    assert check_format(out, "sglang") == [] and detect(out) == ("sglang", "eagle3")
    readme = assert_portable_readme(out)
    assert ('TARGET="org/tiny-target"  # the target (verifier): its path or hub id\n'
            "DRAFT=.  # this folder: its path when you run these from another directory\n"
            'python -m sglang.launch_server --model-path "$TARGET" --dtype bfloat16 \\\n'
            '    --speculative-algorithm EAGLE3 --speculative-draft-model-path "$DRAFT" \\\n'
            "    --speculative-num-steps 5 --speculative-eagle-topk 8 --speculative-num-draft-tokens 32") in readme
    assert "Target (verifier): `org/tiny-target`, a hub id (config files name it too). Weights in bfloat16" in readme


def test_vllm_eagle3_layout(target, tmp_path):
    model = make("eagle3", target)
    out = export(model, target, "vllm", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["speculators_config"] == {
        "algorithm": "eagle3", "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1,
                              "accept_tolerance": 0.0}],
        "verifier": {"name_or_path": REF, "architectures": ["LlamaForCausalLM"]}}
    # vLLM defaults a missing norm_before_residual to true, which is not this layer: it must be written
    assert cfg["norm_before_residual"] is False and cfg["norm_before_fc"] is False
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and cfg["draft_vocab_size"] == 100
    lc = cfg["transformer_layer_config"]
    assert (lc["num_hidden_layers"], lc["vocab_size"], lc["hidden_size"], lc["model_type"]) == (1, target.vocab_size, 32, "llama")
    t = load_file(out / "model.safetensors")
    assert set(t) == {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "layers.0.input_layernorm.weight",
                      "layers.0.hidden_norm.weight", "embed_tokens.weight"} | {f"layers.0.{n}" for n in LAYER}
    # self-sufficient: the target's embedding travels with the drafter (speculators drafts with it)
    assert torch.equal(t["embed_tokens.weight"], target.model.get_input_embeddings().weight.to(torch.bfloat16))
    assert check_format(out, "vllm") == [] and detect(out) == ("vllm", "eagle3")
    readme = assert_portable_readme(out)
    assert 'vllm serve "$DRAFT" --dtype bfloat16' in readme and (  # a hub target: config.json names it
        'vllm serve "$TARGET" --dtype bfloat16 --speculative-config "{\\"model\\": \\"$DRAFT\\", \\"method\\": '
        '\\"eagle3\\", \\"num_speculative_tokens\\": 5}"') in readme
    assert "model = SpeculatorModel.from_pretrained(DRAFT, config=config)" in readme


def test_eagle1_layouts(target, tmp_path):
    model = make("eagle1", target, num_layers=2)
    out = export(model, target, "sglang", tmp_path / "s")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"] and cfg["num_hidden_layers"] == 2
    t = load_file(out / "model.safetensors")
    # layer 0 reads the fc output directly (no input norm), as SGLang's LlamaForCausalLMEagle deletes it
    assert set(t) == ({"fc.weight", "fc.bias"} | {f"layers.0.{n}" for n in LAYER}
                      | {f"layers.1.{n}" for n in LAYER} | {"layers.1.input_layernorm.weight"})
    assert check_format(out, "sglang") == []
    assert "vLLM: not supported" in assert_portable_readme(out)
    # speculators 0.9.0 and vLLM load no EAGLE-1 speculators folder: refused, naming who serves EAGLE-1
    with pytest.raises(DraftsmithError, match=r"export.format=vllm takes eagle3 drafters, not eagle1 \(speculators "
                                              r"0.9.0 loads no EAGLE-1 checkpoint .*; SGLang serves EAGLE-1\): "
                                              r"export it with export.format=sglang$"):
        export(make("eagle1", target), target, "vllm", tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_full_draft_vocab_maps_are_identity_for_sglang_and_absent_for_vllm(target, tmp_path):
    """draft vocab = target vocab: SGLang's layout carries the identity maps (SpecForge's exporter lists d2t/t2d
    as required, and its loader leaves a missing d2t as whatever memory held); vLLM builds no
    draft_id_to_target_id and fails on a d2t, so its layout has none (export/formats/eagle.py cites the
    loaders). The importer reads both back to the same drafter."""
    torch.manual_seed(0)
    from drafters.eagle3 import Eagle3Drafter

    model = Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=None), target)
    V = target.vocab_size
    assert model.draft_vocab_size == V
    for fmt in ("sglang", "vllm"):
        out = export(model, target, fmt, tmp_path / fmt, dtype=torch.float32)
        t = load_file(out / "model.safetensors")
        assert t["lm_head.weight"].shape == (V, 32) and check_format(out) == []
        if fmt == "sglang":
            assert torch.equal(t["d2t"], torch.zeros(V, dtype=torch.long)) and torch.equal(t["t2d"], torch.ones(V, dtype=torch.bool))
        else:
            assert not {"d2t", "t2d"} & set(t)
        back = load_exported_model(out, target)
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
        if fmt == "sglang":  # a map that is not the identity is caught
            t["d2t"] = t["d2t"].clone()
            t["d2t"][3] = 1
            save_file(t, out / "model.safetensors")
            assert check_format(out) == ["model.safetensors: d2t + arange must list distinct increasing target ids "
                                         f"in [0, {V})"]
            del t["d2t"], t["t2d"]
            save_file(t, out / "model.safetensors")
            assert check_format(out) == ["model.safetensors: tensor d2t is missing", "model.safetensors: tensor t2d is missing"]
        else:
            t["d2t"] = model.d2t.clone()
            save_file(t, out / "model.safetensors")
            assert check_format(out) == ["model.safetensors: d2t/t2d with a full draft vocabulary: vLLM has no "
                                         "draft_id_to_target_id to load d2t into and fails: re-export without them"]


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,fmt", [("eagle3", "sglang"), ("eagle3", "vllm"), ("eagle1", "sglang")])
def test_round_trip_is_exact_in_float32(family, fmt, target, tmp_path):
    model = make(family, target)
    out = export(model, target, fmt, tmp_path, dtype=torch.float32)
    back = load_exported_model(out, target)
    assert type(back) is type(model) and back.dims == model.dims
    src, got = model.state_dict(), back.state_dict()
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    ids = prompt(target)
    assert torch.equal(draft_logits(back, target, ids), draft_logits(model, target, ids))


def test_bfloat16_export_is_the_cast_weights(target, tmp_path):
    model = make("eagle3", target)
    back = load_exported_model(export(model, target, "sglang", tmp_path), target)
    assert back.fc.weight.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert torch.equal(back.state_dict()[k], want), k


def test_rope_scaling_survives_the_round_trip(tiny_tokenizer, tmp_path):
    """A Llama-3.1-style target (theta 500000, llama3 scaling): SGLang/vLLM read rope_theta + rope_scaling,
    transformers v5 rope_parameters; all three are written and the reloaded drafter computes the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, rope_parameters=rope)).save_pretrained(tmp_path / "t")
    tiny_tokenizer.save_pretrained(tmp_path / "t")
    tgt = load_target(TargetConfig(path=str(tmp_path / "t"), feature_layers=[1, 2, 3]), device="cpu")
    model = make("eagle3", tgt)
    assert model.dims.rope_parameters["rope_type"] == "llama3"
    for fmt in ("sglang", "vllm"):
        out = export(model, tgt, fmt, tmp_path / fmt, dtype=torch.float32)
        cfg = json.loads((out / "config.json").read_text())
        lc = cfg if fmt == "sglang" else cfg["transformer_layer_config"]
        assert lc["rope_theta"] == 500000.0 and lc["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
        back = load_exported_model(out, tgt)
        assert back.dims == model.dims
        ids = torch.arange(3, 40)[None]  # past original_max_position_embeddings: scaling matters
        assert torch.equal(draft_logits(back, tgt, ids), draft_logits(model, tgt, ids))


# --------------------------------------------------------------------------------------------------
# Feature taps
# --------------------------------------------------------------------------------------------------
def test_engine_layers():
    assert engine_layers([2, 2, 1], 4) == [1, 2, 3]  # the 4-layer default: distinct, increasing, padded
    assert engine_layers([2, 3, 3], 6) == [1, 2, 3]  # the 6-layer demo default
    assert engine_layers([2, 16, 29], 32) == [2, 16, 29]  # Llama-3.1-8B: unchanged
    with pytest.raises(DraftsmithError, match=r"entering layers 1\.\.3 only"):
        engine_layers([0, 1, 2], 4)
    with pytest.raises(DraftsmithError, match=r"\[4\]"):
        engine_layers([1, 2, 4], 4)
    with pytest.raises(DraftsmithError, match="read exactly 3"):
        engine_layers([1, 2, 3, 4], 6)


def test_remap_fc_is_exact_and_refuses_what_it_cannot_carry():
    H = 2
    w = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)  # blocks b0 | b1 | b2 for taps [2, 2, 1]
    out = remap_fc(w, H, [2, 2, 1], [1, 2, 3])
    assert torch.equal(out[:, 0:2], w[:, 4:6]) and torch.equal(out[:, 2:4], w[:, 0:2] + w[:, 2:4])
    assert not out[:, 4:6].any()  # layer 3 is a zero block
    back = remap_fc(out, H, [1, 2, 3], [2, 2, 1])  # only the first slot of a repeated layer gets its block
    assert torch.equal(back[:, 0:2], w[:, 0:2] + w[:, 2:4]) and not back[:, 2:4].any()
    with pytest.raises(DraftsmithError, match="target layer 1, which target.feature_layers"):
        remap_fc(out, H, [1, 2, 3], [2, 3, 3])


def test_repeated_default_taps_export_to_the_same_function(target_default_taps, tmp_path):
    tgt = target_default_taps
    assert tgt.feature_layers == [2, 2, 1]
    model = make("eagle3", tgt)
    out = export(model, tgt, "sglang", tmp_path, dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    fc = load_file(out / "model.safetensors")["fc.weight"]
    w = model.fc.weight.detach()
    assert torch.equal(fc[:, :32], w[:, 64:]) and torch.equal(fc[:, 32:64], w[:, :32] + w[:, 32:64])
    assert not fc[:, 64:].any()
    back = load_exported_model(out, tgt)
    ids = prompt(tgt)
    torch.testing.assert_close(draft_logits(back, tgt, ids), draft_logits(model, tgt, ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Broken folders
# --------------------------------------------------------------------------------------------------
def _edit(folder, cfg_edit=None, tensor_edit=None):
    if cfg_edit:
        cfg = json.loads((folder / "config.json").read_text())
        cfg_edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        t = load_file(folder / "model.safetensors")
        tensor_edit(t)
        save_file(t, folder / "model.safetensors")


def test_check_format_lists_every_sglang_violation(target, tmp_path):
    out = export(make("eagle3", target), target, "sglang", tmp_path)

    def cfg_edit(c):
        del c["draft_vocab_size"]
        c["tie_word_embeddings"] = True
        c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 1, 2]

    def tensor_edit(t):
        t["embed_tokens.weight"] = torch.zeros(target.vocab_size, 32, dtype=torch.bfloat16)
        t["midlayer.mlp.upproj.weight"] = t.pop("midlayer.mlp.up_proj.weight")
        t["d2t"] = t["d2t"].int()
        t["norm.weight"] = torch.ones(31, dtype=torch.bfloat16)
    _edit(out, cfg_edit, tensor_edit)
    assert check_format(out, "sglang") == [
        "config.json: tie_word_embeddings is True, expected False",
        "config.json: draft_vocab_size is None, expected an integer >= 1",
        "config.json eagle_config: eagle_aux_hidden_state_layer_ids is [1, 1, 2], expected 3 increasing layer ids",
        "model.safetensors: tensor midlayer.mlp.up_proj.weight is missing",
        "model.safetensors: unexpected tensor embed_tokens.weight (the consumer does not load it)",
        "model.safetensors: unexpected tensor midlayer.mlp.upproj.weight (the consumer does not load it)",
        "model.safetensors: norm.weight has shape [31], expected [32]",
    ]
    with pytest.raises(DraftsmithError, match="not a valid sglang export"):
        load_exported_model(out, target)


def test_check_format_catches_vllm_and_dtype_problems(target, tmp_path):
    out = export(make("eagle3", target), target, "vllm", tmp_path)

    def cfg_edit(c):
        del c["norm_before_residual"]
        c["speculators_config"]["verifier"] = {}
        c["transformer_layer_config"]["num_hidden_layers"] = 2

    def tensor_edit(t):
        t["d2t"] = t["d2t"].int()
        t["t2d"] = t["t2d"].long()
        t["norm.weight"] = t["norm.weight"].float()
    _edit(out, cfg_edit, tensor_edit)
    assert check_format(out) == [
        "config.json speculators_config: verifier.name_or_path is missing (vLLM loads the target from it)",
        "config.json transformer_layer_config: num_hidden_layers is 2, expected 1",
        "config.json: norm_before_residual is missing, expected False",
        "model.safetensors: weights mix dtypes ['torch.bfloat16', 'torch.float32']: export them in one dtype",
        "model.safetensors: d2t is torch.int32, expected torch.int64 offsets (target id = draft id + d2t)",
        "model.safetensors: t2d is torch.int64, expected torch.bool",
    ]
    assert check_format(out, "sglang") == ["config.json: declares a vllm folder, not sglang"]


def test_check_format_on_missing_files(tmp_path):
    assert check_format(tmp_path, "sglang") == ["config.json: missing"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    bad = check_format(tmp_path, "sglang")
    assert "README.md: missing" in bad and "model.safetensors: missing" in bad


def test_reload_on_the_wrong_target_is_a_clear_error(target, tiny_target_dir, tmp_path):
    out = export(make("eagle1", target), target, "sglang", tmp_path)
    other = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    other.hidden_size = 48  # a target of another width
    with pytest.raises(DraftsmithError, match="hidden_size 32, but .* has 48: load the target it was exported for"):
        load_exported_model(out, other)


def test_reload_refuses_an_embedding_that_is_not_the_targets(target, tmp_path):
    out = export(make("eagle3", target), target, "vllm", tmp_path)
    t = load_file(out / "model.safetensors")
    t["embed_tokens.weight"][3, 0] += 1
    save_file(t, out / "model.safetensors")
    with pytest.raises(DraftsmithError, match="embed_tokens.weight is not .*'s input embedding: load the target"):
        load_exported_model(out, target)


# --------------------------------------------------------------------------------------------------
# Decoding with the built-in speculative decoder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,fmt", [("eagle3", "sglang"), ("eagle3", "vllm"), ("eagle1", "sglang")])
def test_exported_drafter_decodes_losslessly(family, fmt, target, tmp_path):
    from conf.schema.eval import TreeConfig
    from export.formats import load_exported
    from export.stage import decode_check

    out = export(make(family, target), target, fmt, tmp_path)
    res = decode_check(target, load_exported(out, target), TreeConfig(kind="dynamic", depth=3, top_k=4,
                                                                      total_tokens=12), prompts=2, max_new_tokens=24)
    assert res["prompts"] == 2 and res["tau"] >= 1.0


def test_verify_export_accepts_a_remapped_bfloat16_export(target_default_taps, tmp_path):
    """The stage's reload check predicts the reloaded fc exactly, also through tap rewriting + a bf16 cast."""
    from conf.schema.eval import TreeConfig
    from export.stage import verify_export

    tgt = target_default_taps
    model = make("eagle3", tgt)
    out = export(model, tgt, "vllm", tmp_path)
    res = verify_export(model, tgt, out, "vllm", torch.bfloat16, TreeConfig(depth=3, top_k=4, total_tokens=12),
                        prompts=1, max_new_tokens=8)
    assert res["tensors_checked"] == 16 and res["violations"] == []  # 15 drafter weights + embed_tokens
    t = load_file(out / "model.safetensors")
    t["norm.weight"] = t["norm.weight"] + 1  # a tensor that no longer matches the trained one
    save_file(t, out / "model.safetensors")
    with pytest.raises(DraftsmithError, match="reloading .* changed 1 weights \\(first: norm.weight\\)"):
        verify_export(model, tgt, out, "vllm", torch.bfloat16, TreeConfig(), prompts=0, max_new_tokens=8)
