"""stage=plan: recommendations (fits only at ZeRO-3, needs offload, cannot fit), plan.json, and the train
stage's refusal line with train.force."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT, load_config
from plan.hardware import DEVICES
from plan.shapes import TargetShape, read_target_config
from plan.stage import build_plan, run, train_memory

SMALL = ["plan.rows=1000", "plan.row_tokens=512", "train.max_length=512", "data.max_length=512", "train.micro_batch_size=1"]


def test_a_run_that_fits_only_at_zero3(tmp_path):
    """Medusa's four 128k-vocabulary heads (2.2B parameters) on Llama-3.1-8B, 8 x L40S, with the memory
    budget set between the ZeRO-2 and ZeRO-3 peaks: the plan finds micro batch 0 for ZeRO 0-2 and the change."""
    over = [*SMALL, "target=llama3_8b", "drafter=medusa", "plan.gpus=8", "plan.gpu=l40s", f"run.root={tmp_path}"]
    cfg = load_config(over)
    shape = TargetShape.from_config(read_target_config("meta-llama/Llama-3.1-8B-Instruct")[0])
    dev = DEVICES["l40s"]
    z2, z3 = (train_memory(cfg, shape, dev, 8, 1, 512, z, False, False)["peak"] for z in (2, 3))
    assert z3 < z2
    headroom = (z2 + z3) / 2 / dev.memory
    p = build_plan(load_config([*over, f"plan.headroom={headroom}"]), sample=False)
    r = p["recommendations"]
    assert [r["micro_batch_by_zero"][f"zero{z}"] for z in range(4)][:3] == [0, 0, 0]
    assert r["micro_batch_by_zero"]["zero3"] >= 1
    assert not r["fits"] and r["change"]["fits_with"] == "deepspeed=zero3 train.micro_batch_size=1 train.grad_accum=1"


def test_a_run_that_needs_offload(tmp_path):
    """Medusa on Llama-3.1-8B on 2 x L40S, 1024 tokens, gradient checkpointing: no ZeRO stage fits its
    optimizer states; offloading them does."""
    p = build_plan(load_config(["plan.rows=1000", "plan.row_tokens=1024", "train.max_length=1024",
                                "data.max_length=1024", "train.micro_batch_size=1", "train.gradient_checkpointing=true",
                                "target=llama3_8b", "drafter=medusa", "plan.gpus=2", "plan.gpu=l40s",
                                f"run.root={tmp_path}"]), sample=False)
    r = p["recommendations"]
    assert all(r["micro_batch_by_zero"][f"zero{z}"] == 0 for z in range(4))
    assert r["micro_batch_by_zero"]["zero1+offload"] >= 1
    assert r["change"]["fits_with"].startswith("deepspeed=zero1 deepspeed.offload_optimizer=true")
    assert p["stages"]["train"]["host_offload"] == 0  # as configured (no offload): nothing in host RAM yet


def test_a_run_that_cannot_fit_says_why(tmp_path):
    """Llama-3.1-70B's EAGLE-3 on 8 x H100 80GB: the frozen target alone (131.9 GiB in bf16) exceeds a device,
    and no setting changes that; plan.json says so."""
    cfg = load_config(["target=llama3_70b", "drafter=eagle3", "plan.gpus=8", "plan.gpu=h100-80gb",
                       "experiment=full", "plan.rows=100000", "plan.row_tokens=1024", f"run.root={tmp_path}"])
    p = run(cfg)
    saved = json.loads((tmp_path / "demo" / "plan.json").read_text())
    assert saved["recommendations"] == json.loads(json.dumps(p["recommendations"]))
    r = saved["recommendations"]
    assert not r["fits"] and r["change"]["fits_with"] is None
    assert "131.9 GiB per device" in r["change"]["why"]
    assert all(v == 0 for v in r["micro_batch_by_zero"].values())
    assert saved["stages"]["train"]["memory"]["target weights"] == saved["target"]["params"] * 2


def test_train_preflight_refuses_with_one_line_and_force_starts_anyway(tmp_path, capsys):
    """On this CPU an 8B target in fp32 cannot fit: the train stage's preflight raises the one-line refusal;
    train.force=true prints a warning and lets the stage start."""
    from training.stage import preflight

    over = ["stage=train", "target=llama3_8b", "run.device=cpu", "plan.headroom=0.05", f"run.root={tmp_path}"]
    with pytest.raises(DraftsmithError) as e:
        preflight(load_config(over))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the plan says train does not fit") and "train.force=true" in msg
    preflight(load_config([*over, "train.force=true"]))
    assert "starting anyway (train.force=true)" in capsys.readouterr().out


def test_the_entry_point_prints_the_error_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "stage=train", "target=llama3_70b", "run.device=cpu",
                        f"run.root={tmp_path}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the plan says train does not fit")


def test_demo_plan_fits_and_uses_data_gen_counts(tmp_path):
    """With data_gen's meta.json in the run directory the plan reads its rows and tokens."""
    d = tmp_path / "demo" / "data_gen"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"rows": 515, "tokens": 245278, "assistant_tokens": 191550}))
    p = build_plan(load_config([f"run.root={tmp_path}", "run.device=cpu", "data.cache_features=true",
                                "data.cache_topk=10"]))
    assert p["data"]["tokens"] == 245278 and p["stages"]["train"]["fits"]
    # the demo's measured cache: 389,056,240 bytes in 75 files (bench/bench_plan.py)
    assert abs(p["stages"]["data_gen"]["disk"]["feature cache"] / 389_056_240 - 1) < 0.001
