"""Medusa-1/2 and small-drafter exports: the Medusa heads file + config, Medusa-2's merged base, the HF
folder as transformers' assistant_model, round trips, violations and the stage on these families.

    python -m pytest -q tests/export/test_export_heads.py
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.errors import DraftsmithError
from conf.schema import TargetConfig, run_dir
from conf.schema.drafter import MedusaConfig, SmallConfig
from drafters.medusa import MedusaDrafter
from drafters.small_lm import SmallDrafter
from drafters.target import load_target
from export.formats import ExportContext, check_format, detect, load_exported_model, write_export
from export.formats.medusa import base_path, head_names
from tests.export_util import assert_portable_readme, noisy

REF = "org/tiny-target"


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")


def medusa(target, **kw):
    torch.manual_seed(0)
    return noisy(MedusaDrafter.from_target(MedusaConfig(**kw), target))


def export(model, target, fmt, folder, dtype=torch.bfloat16):
    write_export(model, target, fmt, folder, ExportContext(dtype=dtype, target_ref=REF))
    return folder


# --------------------------------------------------------------------------------------------------
# Medusa
# --------------------------------------------------------------------------------------------------
def test_medusa_layout(target, tmp_path):
    out = export(medusa(target, num_heads=3, num_layers=2), target, "medusa", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "medusa_lm_head.pt",
                                                     "medusa_lm_head.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["base_model_name_or_path"]) == (3, 2, REF)
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"  # one dtype (the target's float32 is not repeated)
    # the base model's own config fields, as Medusa / TGI configs carry them
    assert (cfg["model_type"], cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == ("llama", 32, 320, 4)
    t = load_file(out / "medusa_lm_head.safetensors")
    assert set(t) == head_names(3, 2) and "2.1.linear.bias" in t and "0.2.weight" in t
    assert t["1.0.linear.weight"].shape == (32, 32) and t["1.2.weight"].shape == (320, 32)
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    pt = torch.load(out / "medusa_lm_head.pt", weights_only=True)  # what FasterDecoding/Medusa's loader reads
    assert set(pt) == set(t) and all(torch.equal(pt[k], t[k]) and pt[k].dtype == t[k].dtype for k in t)
    assert check_format(out, "medusa") == [] and detect(out) == ("medusa", "medusa") and base_path(out) is None
    readme = assert_portable_readme(out)
    assert 'text-generation-launcher --model-id "$DRAFT" --dtype bfloat16' in readme
    # the path that runs under transformers 5 (tests/export/test_export_consumers.py runs it)
    assert "model = MedusaModel(base, medusa_num_heads=3, medusa_num_layers=2, base_model_name_or_path=TARGET)" in readme
    assert "KeyError: 'type'" in readme and "MedusaModel.from_pretrained(" not in readme.replace(
        "`MedusaModel.from_pretrained` builds", "")
    assert "keeps only the last block's weights" in readme  # 2 ResBlocks per head


def test_medusa_round_trip_is_exact_in_float32(target, tmp_path):
    m = medusa(target, num_heads=4)
    back = load_exported_model(export(m, target, "medusa", tmp_path, dtype=torch.float32), target)
    assert all(torch.equal(back.heads_state_dict()[k], v) for k, v in m.heads_state_dict().items())
    h = torch.randn(2, 5, 32)
    assert all(torch.equal(a, b) for a, b in zip(back.head_logits(h), m.head_logits(h)))


def test_medusa_violations(target, tmp_path):
    out = export(medusa(target, num_heads=2), target, "medusa", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["medusa_num_layers"]
    cfg["base_model_name_or_path"] = "/nowhere/base"
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    assert check_format(out) == [
        "config.json: medusa_num_layers is None, expected an integer >= 0",
        "config.json: base_model_name_or_path /nowhere/base is an absolute path: use the target's hub id or a path "
        "relative to this folder (it breaks on any other machine)",
        "config.json: dtype/torch_dtype are ['bfloat16', 'float32'], expected one dtype (the heads')"]
    cfg.update(medusa_num_layers=1, base_model_name_or_path=REF, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg))
    t = load_file(out / "medusa_lm_head.safetensors")
    t["medusa_head.0.1.weight"] = t.pop("0.1.weight")  # a prefix the loaders do not strip
    save_file(t, out / "medusa_lm_head.safetensors")
    assert check_format(out) == ["medusa_lm_head.safetensors: tensor 0.1.weight is missing",
                                 "medusa_lm_head.safetensors: unexpected tensor medusa_head.0.1.weight "
                                 "(the consumer does not load it)",
                                 "medusa_lm_head.pt: does not hold the same tensors as medusa_lm_head.safetensors"]


def test_medusa2_exports_its_merged_base(tiny_target_dir, tmp_path):
    """Medusa-2 heads were trained on the LoRA-adapted target: base/ holds that model, merged."""
    path = tiny_target_dir("llama")
    train_target = load_target(TargetConfig(path=path), device="cpu")
    torch.manual_seed(0)
    m = MedusaDrafter.from_target(MedusaConfig(num_heads=2, joint=True), train_target)
    noisy(m)  # LoRA B starts at zero: move it so the adapter changes the model
    m.save_pretrained(tmp_path / "ckpt")
    target = load_target(TargetConfig(path=path), device="cpu")
    loaded = MedusaDrafter.from_pretrained(tmp_path / "ckpt", target)  # merges the adapter into target.model
    out = export(loaded, target, "medusa", tmp_path / "out", dtype=torch.float32)
    assert base_path(out) == out / "base"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base"  # relative: the folder can move (README: serve from inside it)
    assert check_format(out) == [] and "Medusa-2: `base/`" in assert_portable_readme(out, path)
    base = load_target(TargetConfig(path=str(base_path(out))), device="cpu")
    original = load_target(TargetConfig(path=path), device="cpu")
    ids = torch.tensor([target.tokenizer("Hello! How can I help you today?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(base(ids).logits, target(ids).logits)
        assert not torch.allclose(base(ids).logits, original(ids).logits, atol=1e-4)  # the adapter mattered
    assert base.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    back = load_exported_model(out, base)
    assert all(torch.equal(back.heads_state_dict()[k], v) for k, v in loaded.heads_state_dict().items())
    # the stage's reload check covers base/ too, and notices a base that is not the merged target
    from export.stage import check_base_weights

    assert check_base_weights(out, target, torch.float32) == len(target.model.state_dict())
    with pytest.raises(DraftsmithError, match=r"base: tensor model\.layers\.\d+\.\S+ is not the merged target.s: re-export"):
        check_base_weights(out, original, torch.float32)


# --------------------------------------------------------------------------------------------------
# Small drafter -> HF folder
# --------------------------------------------------------------------------------------------------
def small(target):
    torch.manual_seed(0)
    return SmallDrafter.from_target(SmallConfig(num_layers=1), target).eval()


def test_hf_folder_is_a_plain_causal_lm_and_an_exact_assistant(target, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = small(target)
    out = export(m, target, "hf", tmp_path, dtype=torch.float32)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "drafter_config.json" not in names and check_format(out, "hf") == [] and detect(out) == ("hf", "small")
    readme = assert_portable_readme(out)
    assert '--speculative-algorithm STANDALONE --speculative-draft-model-path "$DRAFT"' in readme
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == target.tokenizer.get_vocab()
    ids = torch.tensor([target.tokenizer("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, m.model(ids).logits)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain = target.model.generate(ids, **kw)
    assisted = target.model.generate(ids, assistant_model=draft, **kw)
    assert torch.equal(assisted, plain)
    back = load_exported_model(out, target)
    assert isinstance(back, SmallDrafter) and all(
        torch.equal(back.model.state_dict()[k], v) for k, v in m.model.state_dict().items())


def test_hf_bfloat16_and_violations(target, tmp_path):
    out = export(small(target), target, "hf", tmp_path)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    (out / "tokenizer.json").unlink()
    (out / "tokenizer_config.json").unlink()
    t = load_file(out / "model.safetensors")
    t["model.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    assert check_format(out) == [
        "tokenizer: none of tokenizer.json, tokenizer_config.json (assisted generation needs the target's tokenizer)",
        "model.safetensors: unexpected tensor model.extra.weight (the consumer does not load it)"]


# --------------------------------------------------------------------------------------------------
# The stage on these families, and decoding
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,fmt", [("medusa", "medusa"), ("small", "hf")])
def test_stage_exports_head_families(family, fmt, cfg_for, target):
    from export.stage import run

    cfg = cfg_for("stage=export", f"export={fmt}", f"drafter={family}", "export.check_max_new_tokens=8")
    (medusa(target, num_heads=3) if family == "medusa" else small(target)).save_pretrained(
        run_dir(cfg) / "train" / "final")
    res = run(cfg)
    assert res["family"] == family and check_format(res["out_dir"], fmt) == []
    assert "tau" in res["decode_check"] or "not installed" in res["decode_check"]["skipped"]
    with pytest.raises(DraftsmithError, match=f"export.format=sglang takes eagle1, eagle3 drafters, not {family}: "
                                              f"export it with export.format={fmt}"):
        run(cfg_for("stage=export", "export=sglang"))


def test_exported_heads_decode_losslessly(target, tmp_path):
    from conf.schema.eval import TreeConfig
    from export.formats import load_exported
    from export.stage import decode_check

    tree = TreeConfig(kind="dynamic", depth=3, top_k=4, total_tokens=12)
    for m, fmt in ((medusa(target, num_heads=3), "medusa"), (small(target), "hf")):
        out = export(m, target, fmt, tmp_path / fmt)
        res = decode_check(target, load_exported(out, target), tree, prompts=2, max_new_tokens=24)
        assert res["prompts"] == 2 and res["tau"] >= 1.0
