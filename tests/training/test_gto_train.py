"""objective=gto (and hass/griffin) through the real train stage: GTO starts from drafter.checkpoint, logs its
terms, resumes exactly after a checkpoint and after a SIGKILL of `python train.py`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import (
    ROOT,
    base_overrides,
    child_env,
    final_weights,
    read_metrics,
    write_data_gen,
)
from training.checkpoint import MARKER

GTO = ["drafter=eagle3", "drafter.ttt_steps=2", "objective=gto", "objective.group_size=4", "objective.groups=2",
       "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8"]


def _train(tmp_path, tiny_target_dir, target, name, *overrides):
    from conf.schema import load_config
    from training.stage import train

    root = tmp_path / "runs"
    if not (root / name / "data_gen" / "meta.json").exists():
        write_data_gen(root / name, target, n_rows=12)
    return train(load_config(base_overrides(tiny_target_dir("llama"), root, name) + list(overrides)), target=target)


@pytest.fixture
def base_ckpt(tmp_path, tiny_target_dir, llama_target):
    """A token-trained EAGLE-3 folder (3 steps): the converged drafter GTO fine-tunes."""
    return _train(tmp_path, tiny_target_dir, llama_target, "base", "drafter=eagle3", "drafter.ttt_steps=2")["final_dir"]


def test_gto_starts_from_the_checkpoint_and_logs_its_terms(tmp_path, tiny_target_dir, llama_target, base_ckpt):
    """lr = 0: the final weights are the checkpoint's (the drafter was initialised from it, and the run is M0
    vs M0 throughout: R = 0, loss/gto = 0); every train and eval record carries the GTO metrics."""
    res = _train(tmp_path, tiny_target_dir, llama_target, "g", *GTO, f"drafter.checkpoint={base_ckpt}",
                 "train.lr=0", "train.eval_every=2")
    a, b = final_weights(res), final_weights(base_ckpt)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(Path(res["metrics"]))
    train_rows = [r for r in records if r["kind"] == "train"]
    assert len(train_rows) == 3 and any(r["kind"] == "eval" for r in records)
    for r in records:
        m = r.get("metrics", r)
        assert m["gto/trees"] > 0 and m["gto/reward"] == pytest.approx(m["gto/reward_ref"]) and m["loss/gto"] == 0
        assert m["gto/ratio"] == pytest.approx(1.0)


def test_gto_moves_the_drafter_and_resumes_exactly(tmp_path, tiny_target_dir, llama_target, base_ckpt):
    """4 steps in one go == 2 steps, then the same command with max_steps=4 resuming from the step-2 checkpoint
    (the GTO positions and trees are deterministic, M0 is reloaded from drafter.checkpoint)."""
    args = [*GTO, f"drafter.checkpoint={base_ckpt}", "train.save_every=2", "train.eval_every=0"]
    ref = _train(tmp_path, tiny_target_dir, llama_target, "ref", *args, "train.max_steps=4")
    assert ref["train_metrics"]["gto/reward"] != ref["train_metrics"]["gto/reward_ref"]  # M has left M0
    first = _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=2")
    assert first["steps"] == 2 and first["resumed_from"] is None
    second = _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=4")
    assert second["resumed_from"].endswith("step_00000002") and second["steps_this_run"] == 2
    a, b = final_weights(ref), final_weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second["train_metrics"] == ref["train_metrics"]


@pytest.mark.parametrize("objective", ["hass", "griffin"])
def test_addon_objectives_train_through_the_stage(tmp_path, tiny_target_dir, llama_target, objective):
    res = _train(tmp_path, tiny_target_dir, llama_target, objective, "drafter=eagle3", "drafter.ttt_steps=2",
                 f"objective={objective}")
    assert res["steps"] == 3 and res["train_metrics"]["loss/topk_distill"] > 0
    assert ("keep/2" in res["train_metrics"]) == (objective == "griffin")


@pytest.mark.slow
def test_sigkill_mid_gto_then_rerun_is_bit_identical(tmp_path, tiny_target_dir, llama_target, base_ckpt):
    """`python train.py stage=train ... objective=gto` killed after its step-2 checkpoint, then rerun: it resumes
    and ends with the weights and last metrics of an uninterrupted run."""
    args = [*GTO, f"drafter.checkpoint={base_ckpt}", "train.max_steps=6", "train.save_every=2", "train.eval_every=0",
            "train.log_every=1"]
    ref = _train(tmp_path, tiny_target_dir, llama_target, "ref", *args)
    root = tmp_path / "runs"
    write_data_gen(root / "k", llama_target, n_rows=12)
    cmd = [sys.executable, str(ROOT / "train.py"), "stage=train",
           *base_overrides(tiny_target_dir("llama"), root, "k"), *args]
    ck = root / "k" / "train" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (ck / "step_00000002" / MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no step-2 checkpoint in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "k" / "train" / "final").exists()  # killed mid-run
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resumed from \S+step_0000000[24] \(step [24]/6", done.stdout), done.stdout[-2000:]
    a, b = final_weights(ref), final_weights(root / "k" / "train" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed GTO weights differ from the uninterrupted run"
    last = [r for r in read_metrics(root / "k" / "train" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in last] == list(range(1, 7))
    ref_last = json.loads(json.dumps(ref["train_metrics"]))
    assert {k: last[-1].get("metrics", last[-1]).get(k) for k in ref_last if k.startswith("gto/")} == {
        k: v for k, v in ref_last.items() if k.startswith("gto/")}


def test_gto_under_zero3_equals_zero0(tmp_path, tiny_target_dir, llama_target, base_ckpt):
    """ZeRO-3 partitions the drafter's parameters: trees, rewards and the surrogate still see whole weights
    (module hooks gather them), so 3 GTO steps end where ZeRO-0 ends."""
    args = [*GTO, f"drafter.checkpoint={base_ckpt}", "train.eval_every=0", "train.lr=0.01"]
    a = _train(tmp_path, tiny_target_dir, llama_target, "z0", *args, "deepspeed=zero0")
    b = _train(tmp_path, tiny_target_dir, llama_target, "z3", *args, "deepspeed=zero3")
    wa, wb = final_weights(a), final_weights(b)
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) < 1e-5
    assert b["train_metrics"]["gto/reward"] == pytest.approx(a["train_metrics"]["gto/reward"], abs=1e-5)
    w0 = final_weights(base_ckpt)
    assert max(float((wa[k].float() - w0[k].float()).abs().max()) for k in wa) > 1e-3  # trained: not a comparison of two inits
