"""Drafter checkpoint folders through the one mechanism (drafters/folder.py's FolderCheckpoint) for the
head and small-LM families: what a save writes, that it loads back exactly, and that folders written
before those families moved onto the mixin (by direct save_folder calls) still load.

    python -m pytest -q tests/drafters/test_drafter_folders.py
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conf.schema.drafter import HydraConfig, MedusaConfig, SmallConfig
from drafters.folder import CONFIG_NAME, WEIGHTS_NAME, save_folder
from drafters.hydra_heads import HydraDrafter
from drafters.medusa import MedusaDrafter
from drafters.small_lm import SmallDrafter
from drafters.target import target_identity


def _noisy(model):
    """Random weights, so a load that kept the initial (LM-head copy) weights would be caught."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _same(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def _meta(folder) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def _medusa(target):
    return _noisy(MedusaDrafter.from_target(MedusaConfig(num_heads=2, num_layers=1), target))


def _hydra(target):
    return _noisy(HydraDrafter.from_target(HydraConfig(num_heads=2, mlp_layers=2, prefix_layer=True), target))


def _small(target):
    torch.manual_seed(0)
    return SmallDrafter.from_target(SmallConfig(num_layers=1), target)


def _old_medusa(m, folder):
    """What MedusaDrafter.save_pretrained wrote before it used the mixin (Medusa-1: no adapter)."""
    dims = {"hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_heads": m.cfg.num_heads,
            "num_layers": m.cfg.num_layers}
    save_folder(folder, "medusa", m.cfg, dims, m._target_fp, m.heads_state_dict())


def _old_hydra(m, folder):
    dims = {"hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_heads": m.cfg.num_heads,
            "prefix_layer": m.prefix_layer.self_attn.config.to_diff_dict()}
    save_folder(folder, "hydra", m.cfg, dims, m._target_fp, m.state_dict())


def _old_small(m, folder):
    model = m.plain_model()
    model.save_pretrained(folder)
    m._tokenizer.obj.save_pretrained(folder)
    c = model.config
    dims = {"vocab_size": int(model.get_input_embeddings().weight.shape[0]), "model_type": c.model_type,
            "hidden_size": int(c.hidden_size), "num_layers": int(c.num_hidden_layers)}
    save_folder(folder, "small", m.cfg, dims, m._target_fp, None)


FAMILIES = {"medusa": (MedusaDrafter, _medusa, _old_medusa), "hydra": (HydraDrafter, _hydra, _old_hydra),
            "small": (SmallDrafter, _small, _old_small)}


@pytest.fixture(params=list(FAMILIES))
def saved(request, llama_target, tmp_path):
    """(family, class, drafter, folder saved now, folder saved the former way) for each family."""
    family = request.param
    cls, build, old_save = FAMILIES[family]
    m = build(llama_target)
    m.save_pretrained(tmp_path / "new")
    old_save(m, tmp_path / "old")
    return family, cls, m, tmp_path / "new", tmp_path / "old"


def test_save_writes_the_format_the_direct_calls_wrote(saved, llama_target):
    family, _, _, new, old = saved
    names = sorted(p.name for p in new.iterdir())
    assert names == sorted(p.name for p in old.iterdir()) and CONFIG_NAME in names and WEIGHTS_NAME in names
    for n in names:  # safetensors may lay the same tensors out in another order: compared by name
        if n.endswith(".safetensors"):
            a, b = load_file(new / n), load_file(old / n)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
        else:
            assert (new / n).read_bytes() == (old / n).read_bytes(), n
    assert _meta(new)["family"] == family and _meta(new)["target"] == target_identity(llama_target)
    if family == "small":  # also a plain HF folder
        assert "config.json" in names


def test_new_and_old_folders_load_back_exactly(saved, llama_target, tmp_path):
    _, cls, m, new, old = saved
    for folder in (new, old):
        back = cls.from_pretrained(folder, llama_target)
        assert type(back) is cls and back.cfg == m.cfg
        assert back._target_fp == _meta(folder)["target"]
        _same(back, m)
        # saving the loaded drafter again writes the same record (the identity it was loaded with)
        back.save_pretrained(tmp_path / f"again-{folder.name}")
        assert _meta(tmp_path / f"again-{folder.name}") == _meta(folder)


def test_a_folder_without_fingerprint_still_loads(llama_target, tmp_path):
    """Folders written before the target fingerprint existed record only path and sizes."""
    m = _medusa(llama_target)
    fp = {k: v for k, v in target_identity(llama_target).items() if k != "fingerprint"}
    m._target_fp = fp
    m.save_pretrained(tmp_path / "m")
    back = MedusaDrafter.from_pretrained(tmp_path / "m", llama_target)
    _same(back, m)
    assert back._target_fp == fp


def test_a_folder_is_byte_identical_from_one_process_to_the_next(tmp_path):
    """The README promises a bit-identical final after a kill: same tensors must make the same file, byte for
    byte, in any process. safetensors keeps its header metadata in a Rust HashMap whose order is drawn afresh
    per map, so two metadata keys come out in either order; four saves in each of two processes, all one
    sha256 (with two keys, 8 equal orders by chance has probability 2^-7)."""
    import hashlib
    import subprocess
    import sys

    from conf.schema import PROJECT_ROOT

    script = ("import sys, torch\nfrom drafters.folder import save_folder\nfrom conf.schema.drafter import "
              "MedusaConfig\nt = {'a.weight': torch.arange(12.).reshape(3, 4), 'b.bias': torch.ones(5)}\n"
              "for i in range(4):\n    save_folder(f'{sys.argv[1]}/{i}', 'medusa', MedusaConfig(), {'h': 4}, "
              "{'path': 'x'}, t)\n")
    for run in ("p", "q"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], check=True, cwd=PROJECT_ROOT)
    digests = {hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest() for d in tmp_path.glob("*/*")}
    assert len(list(tmp_path.glob("*/*"))) == 8 and len(digests) == 1, digests
