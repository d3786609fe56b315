"""FastDraft (experiment=fastdraft): the drafter_pretrain phase (next-token CE on packed ShareGPT text) writes
the folder the align phase (data_gen with regeneration, then train) starts from; the phase resumes exactly
after a SIGKILL; wrong settings stop with one line. Tiny Llama target, tiny budgets, CPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conf.errors import DraftsmithError
from tests.train_fixtures import ROOT, child_env, final_weights, read_metrics

# tiny budgets for both phases (8 train-split conversations packed into 32-token blocks; 8 regenerated ones)
TINY = ["drafter_pretrain.max_conversations=8", "drafter_pretrain.seq_len=32", "drafter_pretrain.max_steps=4",
        "drafter_pretrain.warmup_steps=0", "train.micro_batch_size=2", "train.eval_rows=4", "train.eval_every=0",
        "train.log_every=1", "train.save_every=2", "train.tensorboard=false", "train.max_steps=2",
        "data.max_conversations=8", "data.max_length=512", "data.gen_max_new_tokens=8", "data.batch_size=4",
        "eval.num_prompts=2", "eval.max_new_tokens=8", "run.threads=1"]


def overrides(tiny_target_dir, root, *extra: str) -> list[str]:
    return [f"target.path={tiny_target_dir('llama')}", f"run.root={root}", "run.device=cpu", "experiment=fastdraft",
            *TINY, *extra]


def fastdraft_cfg(tiny_target_dir, root, *extra: str):
    from conf.schema import load_config

    return load_config(overrides(tiny_target_dir, root, *extra))


def test_experiment_runs_pretrain_regenerate_align_eval_in_order(tmp_path):
    """The pipeline as composed: the pretrain phase first, then regenerated data, alignment from the pretrain
    phase's final folder, eval; the small drafter distilled with its own loss in the align phase."""
    from conf.schema import load_config
    from training.drafter_pretrain import phase_dir

    cfg = load_config([f"run.root={tmp_path}", "experiment=fastdraft"])
    assert cfg.stages == ["drafter_pretrain", "data_gen", "train", "eval"]
    assert cfg.drafter.name == "small" and cfg.drafter.init == "fresh" and cfg.drafter.losses == {"forward_kl": 1.0}
    assert cfg.data.regenerate is True
    assert cfg.train.init_from == str(phase_dir(cfg) / "final") == f"{tmp_path}/fastdraft/drafter_pretrain/final"


@pytest.mark.slow
def test_align_phase_starts_from_the_pretrained_weights(tmp_path, tiny_target_dir):
    """Every stage of experiment=fastdraft in one process. With the align phase's lr at 0 its final weights
    are its starting weights, so train/final equals drafter_pretrain/final exactly when (and only when) it
    started from there; the pretrain phase's own steps did move the fresh drafter."""
    from train import run_stages

    cfg = fastdraft_cfg(tiny_target_dir, tmp_path, "train.lr=0.0")
    out = run_stages(cfg)
    assert list(out) == ["drafter_pretrain", "data_gen", "train", "eval"]
    pre, align = out["drafter_pretrain"], out["train"]
    assert pre["steps"] == 4 and align["steps"] == 2
    run = tmp_path / "fastdraft"
    assert pre["final_dir"] == str(run / "drafter_pretrain" / "final")
    a, b = final_weights(pre), final_weights(align)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the pretrain phase trained with CE on the packed blocks, without the target, from a fresh drafter
    saved = (run / "drafter_pretrain" / "config.yaml").read_text()
    assert "ce: 1.0" in saved and "forward_kl" not in saved
    corpus = json.loads((run / "drafter_pretrain" / "corpus.json").read_text())
    assert corpus["conversations"] == 8 and corpus["seq_len"] == 32 and corpus["blocks"] >= 8
    assert pre["loss_tokens"] == 4 * 2 * 31  # steps x rows x (every token but the first of each block)
    # the align phase read regenerated data and its drafter's own loss (forward KL to the target)
    meta = json.loads((run / "data_gen" / "meta.json").read_text())
    assert meta["data"]["regenerate"] is True
    assert "loss/forward_kl" in align["train_metrics"]
    assert out["eval"]["report"]["results"][0]["tau"] >= 1.0


@pytest.mark.slow
def test_pretrain_phase_resumes_bit_identically_after_sigkill(tmp_path, tiny_target_dir):
    """SIGKILL `python train.py stage=drafter_pretrain` right after its step-2 checkpoint, rerun the command:
    it resumes from step 2 and ends with the weights of an uninterrupted run, every step logged once."""
    from training.drafter_pretrain import run as pretrain

    ref = pretrain(fastdraft_cfg(tiny_target_dir, tmp_path, "run.name=ref"))
    cmd = [sys.executable, "train.py", "stage=drafter_pretrain", *overrides(tiny_target_dir, tmp_path, "run.name=k")]
    killed = subprocess.run(cmd, cwd=ROOT, env={**child_env(), "DRAFTSMITH_TEST_KILL_AT": "checkpoint_saved:1"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "k" / "drafter_pretrain"
    assert (out / "checkpoints" / "step_00000002").is_dir() and not (out / "final").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} (step 2/4" in done.stdout
    a, b = final_weights(ref), final_weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert [x["step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "train"] == [1, 2, 3, 4]


def test_wrong_drafter_is_one_line_before_anything_is_written(tmp_path, tiny_target_dir):
    cmd = [sys.executable, "train.py", *overrides(tiny_target_dir, tmp_path, "drafter=eagle3")]
    res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: stage drafter_pretrain (FastDraft) pre-trains the small drafter, not "
                                  "drafter=eagle3: use drafter=small (experiment=fastdraft sets it; drop the drafter= "
                                  "override)")
    assert not (tmp_path / "fastdraft" / "drafter_pretrain").exists()
    assert not (tmp_path / "fastdraft" / "data_gen").exists()


def test_lora_and_foreign_final_folder_are_refused(tmp_path, tiny_target_dir):
    from training.drafter_pretrain import preflight

    with pytest.raises(DraftsmithError, match=r"^drafter.lora_r=8: FastDraft pre-trains every weight .* set "
                                              r"drafter.lora_r=0$"):
        preflight(fastdraft_cfg(tiny_target_dir, tmp_path, "drafter.lora_r=8"))
    final = tmp_path / "fastdraft" / "drafter_pretrain" / "final"
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("mine")
    with pytest.raises(DraftsmithError, match=r"drafter_pretrain/final .* holds files draftsmith did not write "
                                              r"\(notes.txt\)"):
        preflight(fastdraft_cfg(tiny_target_dir, tmp_path))
    assert (final / "notes.txt").read_text() == "mine"


def test_align_without_the_pretrain_folder_names_the_stage_to_run(trainer, tmp_path):
    missing = tmp_path / "nowhere" / "final"
    with pytest.raises(DraftsmithError, match=re.escape(
            f"train.init_from={missing} is not a drafter folder: run the phase that writes it first "
            "(experiment=fastdraft: stage=drafter_pretrain)")):
        trainer(f"train.init_from={missing}")


@pytest.mark.parametrize("override, message", [
    ("drafter_pretrain.seq_len=1", "drafter_pretrain.seq_len=1: a block needs >= 2 tokens"),
    ("drafter_pretrain.max_steps=0", "drafter_pretrain.max_steps=0: use >= 1 optimizer step"),
    ("drafter_pretrain.max_conversations=0", "drafter_pretrain.max_conversations=0: use >= 1"),
    ("drafter_pretrain.lr=0", "drafter_pretrain.lr=0.0 / warmup_steps=10: lr must be > 0"),
])
def test_bad_phase_settings_are_one_line(override, message):
    from conf.schema import load_config

    with pytest.raises(DraftsmithError, match=re.escape(message)) as e:
        load_config(["experiment=fastdraft", override])
    assert "\n" not in str(e.value)


def test_checkpoint_of_other_blocks_is_refused(tmp_path):
    from training.checkpoint import check_compatible

    saved = {"family": "small", "param_shapes": {}, "train_rows": 5, "data_fingerprint": "aaaa"}
    with pytest.raises(DraftsmithError, match=r"trained on other data rows \(fingerprint aaaa, now bbbb"):
        check_compatible(tmp_path, saved, {**saved, "zero_stage": 0, "data_fingerprint": "bbbb"})
    check_compatible(tmp_path, saved, {**saved, "zero_stage": 0, "data_fingerprint": None})  # data_gen rows: no check
