"""export.format=dflash: z-lab's layout, as vLLM's and SGLang's DFlash loaders read it (replayed from their
source, cited by file), reloaded into our decoder drafting the same tokens, and through the export stage.

    python -m pytest -q tests/export/test_export_dflash.py
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.errors import DraftsmithError
from conf.schema import TargetConfig, run_dir
from conf.schema.drafter import DFlashConfig
from drafters.dflash import DFlashDrafter
from drafters.target import load_target
from export.formats import ExportContext, check_format, detect, load_exported_model, write_export
from tests.export_util import noisy

_STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
            (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
_LAYER = ["input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
          "self_attn.k_norm.weight", "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]


def _stack(name: str):
    for param, shard_name, shard in _STACKED:
        if shard_name in name:
            return name.replace(shard_name, param), shard
    return name, None


def model_params(num_layers: int, prefix: str) -> set[str]:
    """DFlash draft parameters in both engines (vLLM qwen3_dflash.py DFlashQwen3Model, prefix "model.";
    SGLang srt/models/dflash.py DFlashDraftModel, no prefix): fused qkv / gate_up, q/k norms, fc, hidden_norm,
    norm; no embedding and no LM head (both use the target's)."""
    return {f"{prefix}{n}" for n in ("fc.weight", "hidden_norm.weight", "norm.weight",
                                     *(f"layers.{i}.{p}" for i in range(num_layers) for p in _LAYER))}


def vllm_dflash_load(names, params):
    """vllm model_executor/models/qwen3_dflash.py (vllm-project/vllm 036a00d), DFlashQwen3ForCausalLM.load_weights:
    t2d skipped, d2t -> draft_id_to_target_id, every other name but lm_head gets "model."; then
    DFlashQwen3Model.hf_to_vllm_mapper (midlayer. -> layers.0., q/k/v and gate/up stacked); AutoWeightsLoader
    raises on a name with no parameter."""
    placed = {}
    for name in names:
        if "t2d" in name:
            continue
        new = name.replace("d2t", "draft_id_to_target_id") if "d2t" in name else (
            name if "lm_head" in name else f"model.{name}")
        new, shard = _stack(new.replace("midlayer.", "layers.0."))
        if new not in params:
            raise ValueError(f"There is no module or parameter named {new!r}")
        placed[name] = (new, shard)
    return placed


def sglang_dflash_load(names, params):
    """sglang srt/models/dflash.py (sgl-project/sglang 003b23d), DFlashDraftModel.load_weights: q/k/v and gate/up
    stacked, then the name itself or with/without "model."; a name that matches nothing is skipped silently."""
    placed = {}
    for name in names:
        new, shard = _stack(name)
        for cand in (new, new.removeprefix("model."), f"model.{new}"):
            if cand in params:
                placed[name] = (cand, shard)
                break
        else:
            placed[name] = None
    return placed


def covered(placed) -> dict:
    cover: dict = {}
    for dest in placed.values():
        if dest is not None:
            cover.setdefault(dest[0], set()).add(dest[1])
    return cover


def engine_capture_layers(cfg: dict) -> list[int]:
    """Which hidden states the engines hand the drafter, in our numbering (the state entering layer i):
    vLLM v1/worker/gpu/spec_decode/eagle/eagle3_utils.py get_eagle3_aux_layers_from_config reads
    eagle_aux_hidden_state_layer_ids ("before layer i"), else dflash_config.target_layer_ids + 1; SGLang's
    dflash_utils.build_target_layer_ids notes its capture adds one to target_layer_ids as well."""
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    return list(aux) if aux else [i + 1 for i in cfg["dflash_config"]["target_layer_ids"]]


@pytest.fixture
def target(tiny_target_dir):
    return load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[1, 2, 3]), device="cpu")


def model_for(target, **kw) -> DFlashDrafter:
    torch.manual_seed(0)
    return noisy(DFlashDrafter.from_target(DFlashConfig(block_size=4, **kw), target)).eval()


def export(model, target, out):
    write_export(model, target, "dflash", out, ExportContext(dtype=torch.float32, target_ref="org/t"))
    assert check_format(out, "dflash") == [] and detect(out) == ("dflash", "dflash")
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_both_engines_place_every_tensor_and_read_our_taps(target, tmp_path, layers):
    m = model_for(target, num_layers=layers, target_layer_ids=[1, 3])
    out = export(m, target, tmp_path / "d")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["num_hidden_layers"] == layers
    assert cfg["dflash_config"] == {"mask_token_id": 0, "target_layer_ids": [0, 2], "block_size": 4,
                                    "num_target_layers": 4, "mask_token": "<|endoftext|>"}
    assert engine_capture_layers(cfg) == [1, 3] == m.target_layer_ids
    assert engine_capture_layers({**cfg, "eagle_aux_hidden_state_layer_ids": None}) == [1, 3]
    names = load_file(out / "model.safetensors")
    assert names["fc.weight"].shape == (32, 2 * 32)  # SGLang's loader checks it against the target layer count
    for load, prefix in ((vllm_dflash_load, "model."), (sglang_dflash_load, "")):
        params = model_params(layers, prefix)
        placed = load(names, params)
        cover = covered(placed)
        assert None not in placed.values() and set(cover) == params
        assert all(cover[p] == {"q", "k", "v"} for p in params if "qkv_proj" in p)
        assert all(cover[p] == {0, 1} for p in params if "gate_up_proj" in p)
    # what the replay catches: SGLang drops a misnamed tensor without a word, vLLM raises; check_format reports it
    names["layers.0.mlp.upproj.weight"] = names.pop("layers.0.mlp.up_proj.weight")
    save_file(names, out / "model.safetensors")
    assert sglang_dflash_load(names, model_params(layers, ""))["layers.0.mlp.upproj.weight"] is None
    with pytest.raises(ValueError, match="no module or parameter named 'model.layers.0.mlp.upproj.weight'"):
        vllm_dflash_load(names, model_params(layers, "model."))
    assert "model.safetensors: unexpected tensor layers.0.mlp.upproj.weight (the consumer does not load it)" in \
        check_format(out)


def test_reload_drafts_the_same_tokens_as_our_decoder(target, tmp_path):
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder

    m = model_for(target, num_layers=2)
    out = export(m, target, tmp_path / "d")
    back = load_exported_model(out, target)
    assert back.cfg.block_size == 4 and back.mask_id == m.mask_id and back.target_layer_ids == [1, 2, 3]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())
    ids = torch.randint(3, target.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = target(ids).features
    drafts = []
    for model in (m, back):
        d = model.as_drafter(target)
        d.start(ids, feats[:, :-1])
        d._draft()
        drafts.append(d.depth_logits)
    assert torch.equal(drafts[0], drafts[1])  # same weights, same code path: bit-identical
    dec = SpeculativeDecoder(target, back.as_drafter(target), TreeConfig(kind="chain", depth=3))
    assert dec.generate(ids, 12, eos_ids=[])[0].tolist() == dec.generate_autoregressive(ids, 12, eos_ids=[])[0].tolist()


def test_refusals_are_one_line(target, tiny_target_dir, tmp_path):
    with pytest.raises(DraftsmithError) as e:
        write_export(model_for(target, fusion="layerwise"), target, "dflash", tmp_path / "a", ExportContext())
    assert str(e.value).startswith("drafter.fusion=layerwise has no field in z-lab's DFlash layout")
    low = load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[0, 1, 2]), device="cpu")
    with pytest.raises(DraftsmithError) as e:
        write_export(model_for(low), low, "dflash", tmp_path / "b", ExportContext())
    assert str(e.value) == ("the drafter reads target tap(s) [0], but vLLM and SGLang capture the output of target "
                            "layers 0..2 only (taps 1..3): retrain with drafter.target_layer_ids / "
                            "target.feature_layers inside that range")
    with pytest.raises(DraftsmithError, match="export.format=dflash takes dflash drafters, not eagle3"):
        from export.formats import check_family
        check_family("dflash", "eagle3")


def test_export_stage_writes_reloads_and_decodes(cfg_for, target):
    from export.stage import run

    cfg = cfg_for("stage=export", "export=dflash", "drafter=dflash", "drafter.block_size=4",
                  "target.feature_layers=[1,2,3]", "eval.tree.depth=5", "export.check_max_new_tokens=8")
    model_for(target).save_pretrained(run_dir(cfg) / "train" / "final")
    res = run(cfg)
    assert res["family"] == "dflash" and res["violations"] == [] and res["dtype"] == "bfloat16"
    assert res["files"] == ["README.md", "config.json", "config.yaml", "model.safetensors"]
    assert res["decode_check"]["prompts"] == 2  # the depth-5 chain cut to the block's 3 drafts
    readme = (run_dir(cfg) / "export" / "dflash" / "README.md").read_text()
    assert '"method": "dflash", "num_speculative_tokens": 3' in readme and "DFLASH" in readme
