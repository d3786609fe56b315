"""Checkpoints: atomic writes, exact resume after SIGKILL, corrupt / incompatible checkpoints, NaN stops.

    python -m pytest -q tests/training/test_checkpoint.py
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conf.errors import DraftsmithError
from tests.train_fixtures import ROOT, base_overrides, child_env, final_weights, read_result, write_data_gen
from training.checkpoint import MARKER, check_compatible, rng_state, seal, set_rng_state, validate
from training.tracking import read_metrics


def _ckpts(tmp_path, name="t") -> list[str]:
    return sorted(p.name for p in (tmp_path / "runs" / name / "train" / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------
# Units: sealing, validation, RNG, compatibility
# --------------------------------------------------------------------------------------------------
def test_seal_writes_marker_last_and_validate_catches_damage(tmp_path):
    tmp = tmp_path / ".tmp-step_00000001"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"x" * 100)
    (tmp / "sub" / "b.bin").write_bytes(b"y" * 7)
    assert validate(tmp) == f"no {MARKER} marker (an interrupted or foreign write)"  # a killed write
    final = seal(tmp, tmp_path / "step_00000001")
    assert not tmp.exists() and validate(final) is None
    assert json.loads((final / MARKER).read_text()) == {"files": {"a.bin": 100, "sub/b.bin": 7}}
    with open(final / "a.bin", "r+b") as f:
        f.truncate(40)
    assert validate(final) == "file a.bin has 40 bytes, 100 were written (truncated or altered)"
    (final / "a.bin").write_bytes(b"x" * 100)
    (final / "sub" / "b.bin").unlink()
    assert validate(final) == "missing file sub/b.bin"
    # sealing over an existing folder replaces it whole
    tmp.mkdir()
    (tmp / "c.bin").write_bytes(b"z")
    seal(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "c.bin"] and validate(final) is None


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_compatibility_errors_name_checkpoint_and_fix():
    saved = {"family": "eagle3", "param_shapes": {"fc.weight": [8, 16]}, "train_rows": 20, "world_size": 2,
             "zero_stage": 2}
    want = dict(saved)
    check_compatible(Path("ck"), saved, want)
    with pytest.raises(DraftsmithError, match=r"^checkpoint ck holds a 'eagle3' drafter but this run trains 'medusa': "
                                              r"use another run.name, or delete the train/checkpoints folder"):
        check_compatible(Path("ck"), saved, {**want, "family": "medusa"})
    with pytest.raises(DraftsmithError, match=r"parameter fc.weight: checkpoint \[8, 16\], run \[8, 32\]"):
        check_compatible(Path("ck"), saved, {**want, "param_shapes": {"fc.weight": [8, 32]}})
    with pytest.raises(DraftsmithError, match="trained on 20 data rows but the data now has 30"):
        check_compatible(Path("ck"), saved, {**want, "train_rows": 30})
    with pytest.raises(DraftsmithError, match="written by 2 ranks under ZeRO-2.*resume with 2 processes"):
        check_compatible(Path("ck"), saved, {**want, "world_size": 4})


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------
def test_keeps_the_newest_checkpoints(trainer, tmp_path):
    r = trainer("train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=2")
    assert _ckpts(tmp_path) == ["step_00000003", "step_00000004"]
    assert r["checkpoint"].endswith("step_00000004")
    state = json.loads((Path(r["checkpoint"]) / "trainer_state.json").read_text())
    # experiment=smoke: micro batch 2, accumulation 1 -> 2 rows per step
    assert state["state"] == {"step": 4, "rows": 8, "loss_tokens": r["loss_tokens"], "input_tokens": r["input_tokens"]}
    assert state["cursor"] == [0, 8] and state["family"] == "testhead"
    module = torch.load(Path(r["checkpoint"]) / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "drafter.head1.weight" in module and "drafter.frozen_scale" not in module  # frozen: rebuilt, not saved


def test_resume_after_finishing_continues_to_new_max_steps(trainer):
    ref = trainer("train.max_steps=5", name="ref")
    trainer("train.max_steps=3", name="r")
    r = trainer("train.max_steps=5", name="r")  # rerun with a larger budget: continues from step 3
    assert r["resumed_from"].endswith("step_00000003") and r["steps_this_run"] == 2
    # constant LR, so the schedule length does not matter: bit-identical to the straight 5-step run
    a, b = final_weights(ref), final_weights(r)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DraftsmithError, match=r"step_00000005 is at step 5, beyond this run's 4 steps: raise "
                                              r"train.max_steps \(or train.epochs\), or use another run.name"):
        trainer("train.max_steps=4", name="r")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trainer, tmp_path):
    with pytest.raises(DraftsmithError) as e:
        trainer("train.max_steps=5", "train.save_every=2", factory="nan_at_3")
    ck = tmp_path / "runs" / "t" / "train" / "checkpoints" / "step_00000002"
    assert str(e.value) == (f"loss is nan at step 3: training stopped before the update; the last good checkpoint "
                            f"is {ck}; lower train.lr, raise train.warmup_steps or check the data")
    assert _ckpts(tmp_path) == ["step_00000002"] and validate(ck) is None
    assert not (tmp_path / "runs" / "t" / "train" / "final").exists()
    r = trainer("train.max_steps=4", "train.save_every=2")  # the run can go on from the good checkpoint
    assert r["resumed_from"] == str(ck) and r["steps_this_run"] == 2 and np.isfinite(r["final_loss"])


@pytest.mark.parametrize("damage", ["truncate", "no_marker"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(trainer, tmp_path, capsys, damage):
    trainer("train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3")
    ck = tmp_path / "runs" / "t" / "train" / "checkpoints"
    newest = ck / "step_00000004"
    model = newest / "deepspeed" / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        size = model.stat().st_size
        with open(model, "r+b") as f:
            f.truncate(size // 2)
        reason = f"file deepspeed/mp_rank_00_model_states.pt has {size // 2} bytes, {size} were written"
    else:
        (newest / MARKER).unlink()
        reason = f"no {MARKER} marker"
    (ck / ".tmp-step_00000006").mkdir()  # a write killed before its rename
    capsys.readouterr()
    r = trainer("train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3")
    out = capsys.readouterr().out
    assert f"removed the incomplete checkpoint write {ck / '.tmp-step_00000006'}" in out
    assert f"warning: skipping checkpoint {newest}: {reason}" in out
    assert r["resumed_from"] == str(ck / "step_00000002") and r["steps_this_run"] == 4
    assert validate(newest) is None  # step 4 was trained again and written whole


def test_checkpoint_that_validates_but_cannot_load_is_one_clear_error(trainer, tmp_path):
    trainer("train.max_steps=2", "train.save_every=2")
    ck = tmp_path / "runs" / "t" / "train" / "checkpoints" / "step_00000002"
    model = ck / "deepspeed" / "mp_rank_00_model_states.pt"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: passes validation, unreadable content
    with pytest.raises(DraftsmithError, match=rf"^checkpoint {re.escape(str(ck))} could not be loaded \(.*\): "
                                              r"delete that folder to resume from the previous checkpoint$"):
        trainer("train.max_steps=4")


@pytest.mark.parametrize("factory,message", [
    ("other", "holds a 'testhead' drafter but this run trains 'otherhead'"),
    ("wider", r"does not fit this testhead drafter \(parameter head1.weight: checkpoint \[(\d+), 32\], run "
              r"\[(\d+), 32\]; a different target or drafter setting\)"),
])
def test_incompatible_checkpoint_is_one_clear_error(trainer, tmp_path, llama_target, factory, message):
    trainer("train.max_steps=2")
    with pytest.raises(DraftsmithError, match=message) as e:
        trainer("train.max_steps=4", factory=factory)
    assert str(e.value).startswith(f"checkpoint {tmp_path / 'runs' / 't' / 'train' / 'checkpoints' / 'step_00000002'} ")
    assert "\n" not in str(e.value)
    if factory == "wider":
        assert int(e.value.args[0].split("run [")[1].split(",")[0]) == llama_target.vocab_size + 3


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(trainer, tmp_path, tiny_target_dir, llama_target):
    """SIGKILL a training subprocess after its step-4 checkpoint, rerun the same command: it resumes and
    ends with exactly the weights of an uninterrupted run (noisy inputs: the RNG is restored too; the
    8 steps cross an epoch boundary and an evaluation)."""
    args = ["train.max_steps=8", "train.save_every=2", "train.eval_every=3", "train.log_every=1",
            "train.micro_batch_size=2", "train.grad_accum=2", "train.schedule=cosine", "train.warmup_steps=2"]
    ref = trainer(*args, factory="noisy", name="ref")
    write_data_gen(tmp_path / "runs" / "k", llama_target)
    cmd = [sys.executable, "-m", "tests.train_fixtures", "noisy",
           *base_overrides(tiny_target_dir("llama"), tmp_path / "runs", "k"), *args]
    ck = tmp_path / "runs" / "k" / "train" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**child_env(), "DRAFTSMITH_TEST_SLEEP": "0.25"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (ck / "step_00000004" / MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no step-4 checkpoint in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "k" / "train" / "final").exists()  # killed mid-run, not after it
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_result(done.stdout)
    resumed = int(result["resumed_from"][-8:])
    assert resumed >= 4 and result["steps_this_run"] == 8 - resumed and result["steps"] == 8
    assert f"resumed from {result['resumed_from']} (step {resumed}/8" in done.stdout
    a, b = final_weights(ref), final_weights(result)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [x["step"] for x in read_metrics(Path(result["metrics"])) if x["kind"] == "train"]
    assert steps == list(range(1, 9))  # every step logged exactly once across the kill
    assert result["final_loss"] == ref["final_loss"]
