"""The export stage: run(cfg) against a prepared run directory, the CLI end to end, atomic replacement and
the error messages.

    python -m pytest -q tests/export/test_export_stage.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT, TargetConfig, run_dir
from export.formats import check_format
from export.formats.common import target_ref
from export.stage import run
from tests.export_util import assert_portable_readme

TAPS = "target.feature_layers=[1,2,3]"


@pytest.fixture
def trained(cfg_for, tiny_target_dir):
    """cfg_for-style factory whose run directory holds an (untrained) EAGLE-3 drafter at train/final."""
    from conf.schema.drafter import Eagle3Config
    from drafters.eagle3 import Eagle3Drafter
    from drafters.target import load_target

    target = load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[1, 2, 3]), device="cpu")
    torch.manual_seed(0)
    model = Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=64), target,
                                      token_counts=torch.rand(target.vocab_size))

    def make(*overrides):
        cfg = cfg_for("stage=export", TAPS, *overrides)
        model.save_pretrained(run_dir(cfg) / "train" / "final")
        return cfg
    return make


def test_run_writes_checks_and_replaces(trained):
    cfg = trained("export=sglang", "export.check_max_new_tokens=8")
    res = run(cfg)
    out = run_dir(cfg) / "export" / "sglang"
    assert res["out_dir"] == str(out) and res["family"] == "eagle3" and res["violations"] == []
    assert res["files"] == ["README.md", "config.json", "config.yaml", "model.safetensors"]
    assert res["tensors_checked"] == 15 and res["dtype"] == "bfloat16"
    assert "export:\n  format: sglang" in (out / "config.yaml").read_text()  # the resolved config, kept beside
    assert check_format(out, "sglang") == []
    assert "tau" in res["decode_check"] or "not installed" in res["decode_check"]["skipped"]
    (out / "stale.txt").write_text("from an earlier export")
    run(cfg)  # a rerun swaps in a fresh folder
    assert not (out / "stale.txt").exists() and check_format(out, "sglang") == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["sglang"]  # no temp folders left behind


def test_custom_out_dir_and_vllm(trained, tmp_path):
    out = tmp_path / "models" / "my-eagle3"
    cfg = trained("export=vllm", f"export.out_dir={out}", "export.dtype=float32", "export.speculative_tokens=3",
                  "export.check_prompts=0")
    res = run(cfg)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    # a local target has no name that resolves on every machine and from every directory (a relative path
    # resolves against the consumer's working directory, an absolute one on this machine only): a placeholder,
    # and README commands that pass the target explicitly
    name = Path(cfg.target.path).name
    assert cfg_json["speculators_config"]["verifier"]["name_or_path"] == f"<path of {name}>"
    readme = assert_portable_readme(out, cfg.target.path)
    assert f'TARGET="<path of {name}>"' in readme and "vllm serve \"$TARGET\" --dtype float32" in readme
    assert "vllm serve ." not in readme  # only a hub target's folder names a target vLLM can load
    assert res["decode_check"] == {"skipped": "export.check_prompts=0"}


def test_the_exported_config_yaml_names_no_path_of_this_machine(trained, tmp_path):
    """config.yaml beside the export is the run's resolved config, shared with the folder: run.root, the target
    and every other absolute path of this machine become a path relative to the project (when inside it) or a
    `<path of NAME>` placeholder."""
    from omegaconf import OmegaConf

    from tests.export_util import absolute_paths

    out = tmp_path / "models" / "e3"
    cfg = trained("export=sglang", f"export.out_dir={out}", "export.check_prompts=0", "run.name=r1")
    run(cfg)
    text = (out / "config.yaml").read_text()
    assert absolute_paths(text) == [] and str(tmp_path) not in text, absolute_paths(text)
    saved = OmegaConf.create(text)
    assert saved.run.root == "<path of runs>" and saved.run.name == "r1" and saved.export.out_dir == "<path of e3>"
    assert saved.target.path == f"<path of {Path(cfg.target.path).name}>"
    assert saved.target.feature_layers == [1, 2, 3] and saved.export.format == "sglang"  # the rest as it was


def test_target_ref_prefers_a_hub_id(tmp_path):
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    local = tmp_path / "models" / "my-target"
    local.mkdir(parents=True)
    out = tmp_path / "runs" / "r" / "export" / "vllm"
    assert target_ref("meta-llama/Llama-3.1-8B-Instruct", out) == "meta-llama/Llama-3.1-8B-Instruct"
    assert target_ref(str(snap), out) == "meta-llama/Llama-3.1-8B-Instruct"  # a cached snapshot of a hub model
    # a local folder: no reference resolves from every directory on every machine, so a placeholder
    assert target_ref(str(local), out) == "<path of my-target>"
    assert target_ref(str(local), Path("/elsewhere-on-this-machine/export")) == "<path of my-target>"


def test_interrupted_export_leaves_the_previous_one(trained, monkeypatch):
    cfg = trained("export=sglang", "export.check_prompts=0")
    run(cfg)
    out = run_dir(cfg) / "export" / "sglang"
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr("export.stage.write_export", boom)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg)
    assert (out / "model.safetensors").read_bytes() == before and check_format(out) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["sglang"]


def test_errors_name_the_problem_and_the_fix(trained, cfg_for, tmp_path):
    cfg = cfg_for("stage=export", "run.name=nothing-here")
    want = str(run_dir(cfg) / "train" / "final")
    with pytest.raises(DraftsmithError, match=f"no trained drafter at {want}: run stage=train first"):
        run(cfg)
    with pytest.raises(DraftsmithError, match="export.format=medusa takes medusa drafters, not eagle3: export it "
                                              "with export.format=sglang or vllm"):
        run(trained("export=medusa"))
    with pytest.raises(DraftsmithError, match="export.format='onnx' is not a format: choose from sglang, vllm, medusa, hf"):
        run(trained("export.format=onnx"))
    with pytest.raises(DraftsmithError, match="export.dtype='int8': use one of float32, bfloat16, float16"):
        run(trained("export.dtype=int8"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DraftsmithError, match=f"export.out_dir {blocker} is not writable .*: choose a writable"):
        run(trained(f"export.out_dir={blocker / 'sub'}"))
    foreign = tmp_path / "someones-model"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("precious")
    with pytest.raises(DraftsmithError, match=r"export.out_dir \S+someones-model holds files draftsmith did not write \(weights.bin\), so it will not "
                       "replace it: move them away, or choose another export.out_dir"):
        run(trained(f"export.out_dir={foreign}"))
    assert (foreign / "weights.bin").read_text() == "precious"
    hydra = trained()
    final = run_dir(hydra) / "train" / "final"
    (final / "drafter_config.json").write_text(json.dumps({"family": "hydra"}))
    with pytest.raises(DraftsmithError, match="takes eagle1, eagle3 drafters, not hydra: no serving engine loads it"):
        run(hydra)
    (final / "drafter_config.json").write_text(json.dumps({"family": "eagle1"}))
    with pytest.raises(DraftsmithError, match=r"export.format=vllm takes eagle3 drafters, not eagle1 \(.*\): export "
                                              "it with export.format=sglang"):
        run(cfg_for("stage=export", "export=vllm", f"run.name={hydra.run.name}"))


def test_checkpoint_feature_layers_win(trained, cfg_for):
    """A checkpoint that records its target's feature layers exports with them (the default taps of this
    4-layer target, [2, 2, 1], would name other layers); a conflicting override is an error."""
    cfg = trained("export=sglang", "export.check_prompts=0")
    meta_path = run_dir(cfg) / "train" / "final" / "drafter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["target"]["feature_layers"] = [1, 2, 3]
    meta_path.write_text(json.dumps(meta))
    plain = cfg_for("stage=export", "export=sglang", "export.check_prompts=0", "export.dtype=float32")
    run(plain)  # no feature_layers override
    out = run_dir(plain) / "export" / "sglang"
    assert json.loads((out / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    trained_fc = load_file(run_dir(cfg) / "train" / "final" / "model.safetensors")["fc.weight"]
    assert torch.equal(load_file(out / "model.safetensors")["fc.weight"], trained_fc)  # not remapped from [2, 2, 1]
    with pytest.raises(DraftsmithError, match=r"target.feature_layers=\[1, 2, 2\] but the drafter at .* was "
                                              r"trained on \[1, 2, 3\]: drop the override"):
        run(cfg_for("stage=export", "export=sglang", "target.feature_layers=[1,2,2]"))


def _cli(*args, cwd=PROJECT_ROOT):
    """train.py in a subprocess (its one-line `error:` / exit 2 handling is tested in test_config.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(trained):
    cfg = trained()
    args = ["stage=export", "export=sglang", f"target.path={cfg.target.path}", TAPS, f"run.root={cfg.run.root}",
            f"run.name={cfg.run.name}", "run.device=cpu", "export.dtype=float32", "export.check_max_new_tokens=8"]
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    out = run_dir(cfg) / "export" / "sglang"
    assert f"export: eagle3 -> sglang at {out}" in p.stdout
    assert check_format(out, "sglang") == []


def test_a_drafter_of_another_family_is_refused_before_anything_is_written(trained):
    """As stage=eval refuses it: `drafter=kangaroo` on a run whose train/final holds an EAGLE-3 drafter would
    otherwise export the EAGLE-3 drafter under a command that names another family."""
    cfg = trained("export=sglang", "drafter=kangaroo")
    final = run_dir(cfg) / "train" / "final"
    with pytest.raises(DraftsmithError, match=f"^{final} holds a 'eagle3' drafter, not 'kangaroo': set drafter=eagle3 "
                                              "or point drafter.checkpoint at a kangaroo folder$"):
        run(cfg)
    assert not (run_dir(cfg) / "export").exists()
