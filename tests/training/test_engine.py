"""The DeepSpeed engine for real on CPU (gloo, DS_ACCELERATOR=cpu): the config it is given, the LR schedule,
and training invariants that must hold exactly (batch x accumulation, ZeRO stages, processes).

    python -m pytest -q tests/training/test_engine.py
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import load_config
from tests.train_fixtures import ROOT, base_overrides, child_env, final_weights, read_result, write_data_gen
from training.engine import build_ds_config, lr_factor
from training.tracking import read_metrics, tau_sim


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ds_config_is_built_from_the_run_config():
    cfg = load_config(["deepspeed=zero2", "train.micro_batch_size=3", "train.grad_accum=5", "train.grad_clip=0.7",
                       "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000"])
    ds = build_ds_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.7
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_scatter": False,
                                       "reduce_bucket_size": 1000}  # extra merged last, deeply
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # auto -> fp32 on CPU
    gpu = build_ds_config(load_config(["deepspeed=zero3"]), world_size=8, device=torch.device("cuda", 0))
    assert gpu["bf16"] == {"enabled": True} and gpu["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(DraftsmithError, match="deepspeed.precision=bf16 on CPU"):
        build_ds_config(load_config(["deepspeed.precision=bf16"]), 1, torch.device("cpu"))
    with pytest.raises(DraftsmithError, match="deepspeed.zero_stage=4"):
        build_ds_config(load_config(["deepspeed.zero_stage=4"]), 1, torch.device("cpu"))


def test_lr_schedule_hand_values():
    # warmup 2 steps, then cosine over the remaining 8 down to 0.1
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert [lr_factor(s, 5, 0, "linear", 0.0) for s in range(5)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(99, 5, 0, "constant", 0.1) == 1.0
    with pytest.raises(DraftsmithError, match="train.schedule='step'"):
        lr_factor(0, 5, 0, "step", 0.1)


def test_lr_schedule_is_what_each_step_used(trainer):
    r = trainer("train.max_steps=4", "train.log_every=1", "train.schedule=linear", "train.warmup_steps=2",
                "train.min_lr_ratio=0.0", "train.lr=0.002")
    lrs = [x["lr"] for x in read_metrics(r["metrics"]) if x["kind"] == "train"]
    assert lrs == pytest.approx([0.001, 0.002, 0.002, 0.001])  # warmup 1/2, 2/2, then linear over 2 steps


def test_tau_sim_is_the_chain_product():
    assert tau_sim({"acc/1": 0.8, "acc/2": 0.5, "acc/3": 0.5}) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    assert tau_sim({"acc/2": 0.0, "acc/1": 1.0}) == 1.0 + 1.0  # ordered by depth, not by key order
    assert tau_sim({}) == 1.0


def test_train_run_writes_its_artifacts(trainer, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default: wandb offline into the run directory
    r = trainer("deepspeed=zero1", "train.micro_batch_size=2", "train.grad_accum=3", "train.grad_clip=0.25",
                "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.tensorboard=true",
                "train.gradient_checkpointing=true")
    out = tmp_path / "runs" / "t" / "train"
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"], ds["zero_optimization"]["stage"]) == (2, 3, 6, 0.25, 1)
    assert r["steps"] == 4 and r["cursor"] == {"epoch": 1, "position": 4}  # 24 rows - 4 held out = 20; 4 x 6 = 24
    recs = read_metrics(out / "metrics.jsonl")
    assert [(x["step"], x["kind"]) for x in recs] == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
    train_rec, eval_rec = recs[2], recs[3]
    assert {"loss", "loss/depth1", "loss/depth2", "acc/1", "acc/2", "lr", "tokens_per_s"} <= set(train_rec)
    assert train_rec["loss"] == pytest.approx(train_rec["loss/depth1"] + 0.5 * train_rec["loss/depth2"], rel=1e-6)
    assert eval_rec["tau_sim"] == pytest.approx(1 + eval_rec["acc/1"] + eval_rec["acc/1"] * eval_rec["acc/2"])
    assert r["eval"]["rows"] == 4 and r["eval"]["tau_sim"] == eval_rec["tau_sim"]
    assert (out / "curves.png").stat().st_size > 10_000 and r["plot"] == str(out / "curves.png")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").exists() and (out / "final" / "model.safetensors").exists()
    assert r["final_loss"] == train_rec["loss"] and r["tokens_per_s"] > 0
    assert json.loads((out / "final" / "drafter_config.json").read_text())["gradient_checkpointing"] is True
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_batch1_accum8_equals_batch8_accum1(trainer):
    a = trainer("train.micro_batch_size=1", "train.grad_accum=8", name="a")
    b = trainer("train.micro_batch_size=8", "train.grad_accum=1", name="b")
    assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    assert _max_diff(wa, wb) < 1e-6
    # and training moved the weights (the comparison is not between two untouched inits)
    c = trainer("train.micro_batch_size=8", "train.max_steps=1", name="c")
    assert _max_diff(wb, final_weights(c)) > 1e-3


def test_zero0_equals_zero2_on_one_process(trainer):
    a = trainer("deepspeed=zero0", "train.micro_batch_size=2", "train.grad_accum=2", name="z0")
    b = trainer("deepspeed=zero2", "train.micro_batch_size=2", "train.grad_accum=2", name="z2")
    assert _max_diff(final_weights(a), final_weights(b)) < 1e-6


def test_zero3_trains_and_saves_whole_weights(trainer):
    a = trainer("deepspeed=zero0", name="z0")
    b = trainer("deepspeed=zero3", name="z3")
    wa, wb = final_weights(a), final_weights(b)
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}  # gathered, not shards
    assert _max_diff(wa, wb) < 1e-5


@pytest.mark.slow
def test_two_processes_zero2_match_one_process(trainer, tmp_path, tiny_target_dir, llama_target):
    """torchrun, 2 CPU ranks over gloo, ZeRO-2, micro 2 x accum 1 x 2 ranks == 1 rank x micro 2 x accum 2."""
    one = trainer("deepspeed=zero2", "train.micro_batch_size=2", "train.grad_accum=2", name="one")
    write_data_gen(tmp_path / "runs" / "two", llama_target)
    overrides = base_overrides(tiny_target_dir("llama"), tmp_path / "runs", "two") + [
        "deepspeed=zero2", "train.micro_batch_size=2", "train.grad_accum=1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "tests.train_fixtures", "hidden", *overrides], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = read_result(r.stdout)
    ds = json.loads((tmp_path / "runs" / "two" / "train" / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert result["steps"] == 3 and result["final_loss"] == pytest.approx(one["final_loss"], abs=1e-6)
    assert _max_diff(final_weights(one), final_weights(result)) < 1e-6
