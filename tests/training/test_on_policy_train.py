"""On-policy distillation inside the train stage: rollouts come from the drafter's current weights, the loss
is the divergence on exactly the generated slots, a crashed or killed run resumes to the same weights, Draft-OPD
rows, ZeRO-3, and the command line.

    python -m pytest -q tests/training/test_on_policy_train.py
    python -m tests.training.test_on_policy_train <override>...      # one run in a subprocess (the SIGKILL test's child)
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conf.errors import DraftsmithError
from tests import train_fixtures as fx
from tests.on_policy_util import naive_sample, small
from tests.train_fixtures import (
    ROOT,
    base_overrides,
    child_env,
    final_weights,
    read_metrics,
    read_result,
    run_train,
    write_data_gen,
)
from training.checkpoint import MARKER
from training.on_policy import OnPolicyObjective, divergence_fn, divergence_loss, pack, prompt_of, replay_rows
from training.signal import online_signal

ON_POLICY = ["drafter=small", "objective=on_policy", "objective.max_new_tokens=10", "train.log_every=1",
             "train.eval_every=0"]


@pytest.fixture
def run(tmp_path, tiny_target_dir, llama_target):
    """run(*overrides, name="t") -> train()'s result for drafter=small objective=on_policy on the tiny Llama."""

    def go(*overrides: str, name: str = "t"):
        from conf.schema import load_config
        from training.stage import train

        root = tmp_path / "runs"
        if not (root / name / "data_gen" / "meta.json").exists():
            write_data_gen(root / name, llama_target, n_rows=16)
        cfg = load_config(base_overrides(tiny_target_dir("llama"), root, name) + ON_POLICY + list(overrides))
        return train(cfg, target=llama_target)

    return go


@pytest.fixture
def spy(monkeypatch):
    """Records every prepare call: (step, the drafter's weights then, records, data batches, returned batches)."""
    seen = []
    orig = OnPolicyObjective.prepare

    def prepare(self, eng, batches, step):
        weights = {k: v.detach().clone() for k, v in eng.drafter.model.state_dict().items()}
        out = orig(self, eng, batches, step)
        seen.append({"step": step, "weights": weights, "records": copy.deepcopy(self.records), "data": batches,
                     "out": out})
        return out

    monkeypatch.setattr(OnPolicyObjective, "prepare", prepare)
    return seen


def drafter_with(target, weights):
    d = small(target)
    d.model.load_state_dict(weights)
    return d.eval()


def test_rollouts_come_from_the_current_drafter(run, spy, llama_target, tmp_path):
    res = run("train.max_steps=4", "train.lr=0.05", "objective.temperature=1.0")
    assert [s["step"] for s in spy] == [0, 1, 2, 3] and res["steps"] == 4
    eos = llama_target.eos_token_ids
    for s in spy:
        (data,), (out,) = s["data"], s["out"]
        assert len(s["records"]) == data["input_ids"].shape[0] == out["input_ids"].shape[0] == 2
        model = drafter_with(llama_target, s["weights"]).model
        for b, rec in enumerate(s["records"]):
            # the prompt is the data row's non-assistant prefix; the rest is the drafter's own sample
            assert rec.prompt == prompt_of(data["input_ids"][b], data["loss_mask"][b], data["attention_mask"][b])
            assert rec.tokens == naive_sample(model, rec.prompt, 10, 1.0, rec.seed, eos)
            n, m = len(rec.prompt), len(rec.tokens)
            assert out["input_ids"][b, :n + m].tolist() == rec.prompt + rec.tokens
            assert out["loss_mask"][b].tolist() == [0] * n + [1] * m + [0] * (out["loss_mask"].shape[1] - n - m)
            assert out["attention_mask"][b].sum() == n + m
    # the data changes as the drafter trains: step 3's prompts and seeds under the initial weights give other text
    first = drafter_with(llama_target, spy[0]["weights"]).model
    last = spy[-1]["records"]
    assert any(r.tokens != naive_sample(first, r.prompt, 10, 1.0, r.seed, eos) for r in last)
    assert not all(torch.equal(spy[0]["weights"][k], spy[-1]["weights"][k]) for k in spy[0]["weights"])
    # the logged loss of step 1 is the forward KL on exactly the generated slots of that rollout batch
    batch = spy[0]["out"][0]
    want, _ = divergence_loss(first, online_signal(llama_target, batch), divergence_fn("forward_kl"), "forward_kl")
    logged = [x for x in read_metrics(Path(res["metrics"])) if x["kind"] == "train"]
    assert logged[0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert logged[0]["onpolicy/share"] == 1.0
    assert logged[-1]["loss"] == pytest.approx(res["final_loss"])


def test_fraction_mixes_rollouts_and_data_rows(run, spy):
    from training.on_policy import on_policy_draw

    res = run("train.max_steps=4", "train.grad_accum=2", "objective.fraction=0.5", "objective.divergence=tvd")
    flags = []
    for s in spy:
        for a, (data, out) in enumerate(zip(s["data"], s["out"])):
            flags.append(out is not data)  # not rolled out: data_gen's rows, trained on their assistant tokens
            assert {r.micro for r in s["records"] if r.micro == a} == ({a} if flags[-1] else set())
    assert flags == [on_policy_draw(0, step, a) < 0.5 for step in range(4) for a in range(2)]
    assert any(flags) and not all(flags)  # the seeded lambda = 0.5 draws pick both kinds here
    assert res["train_metrics"]["loss/tvd"] > 0
    assert 0.0 <= res["train_metrics"]["onpolicy/share"] <= 1.0


def test_a_crashed_run_resumes_to_the_same_weights(run, spy, monkeypatch, tmp_path, capsys):
    """A run that dies in step 6 (after its step-4 checkpoint) and is rerun ends where an uninterrupted run
    ends: same rollouts (seeded by step), same weights, every step logged once."""
    args = ["train.max_steps=7", "train.save_every=2", "train.grad_accum=2", "objective.fraction=0.5",
            "train.eval_every=3", "train.eval_rows=2", "train.schedule=cosine", "train.warmup_steps=2"]
    ref = run(*args, name="ref")
    ref_rollouts = {(s["step"], r.micro, r.row): r.tokens for s in spy for r in s["records"]}
    spy.clear()
    orig = OnPolicyObjective.prepare

    def dies_at_step_5(self, eng, batches, step):
        if step == 5:
            raise RuntimeError("killed")
        return orig(self, eng, batches, step)

    monkeypatch.setattr(OnPolicyObjective, "prepare", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        run(*args, name="k")
    monkeypatch.setattr(OnPolicyObjective, "prepare", orig)
    ck = tmp_path / "runs" / "k" / "train" / "checkpoints"
    assert (ck / "step_00000004" / MARKER).exists() and not (tmp_path / "runs" / "k" / "train" / "final").exists()
    rerun = run(*args, name="k")
    assert rerun["resumed_from"].endswith("step_00000004") and rerun["steps_this_run"] == 3
    a, b = final_weights(ref), final_weights(rerun)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rerun["final_loss"] == ref["final_loss"]
    steps = [x["step"] for x in read_metrics(Path(rerun["metrics"])) if x["kind"] == "train"]
    assert steps == list(range(1, 8))
    # the crashed run and the rerun (steps 4-6, after the resume) drew exactly the reference's rollouts
    again = {(s["step"], r.micro, r.row): r.tokens for s in spy for r in s["records"]}
    assert {k[0] for k in again} == {3, 4, 5, 6} and all(again[k] == ref_rollouts[k] for k in again)


def test_speculative_rollouts_train_on_committed_text_and_replayed_rejections(run, spy, llama_target):
    res = run("train.max_steps=2", "objective.rollout=speculative", "objective.temperature=0",
              "objective.draft_depth=3", "objective.max_replays=2", "objective.max_new_tokens=12")
    assert res["steps"] == 2
    for s in spy:
        rows = []
        for rec in s["records"]:
            assert rec.cycles and all(len(c.drafts) == 3 for c in rec.cycles)
            rows.append((rec.prompt + rec.tokens, [0] * len(rec.prompt) + [1] * len(rec.tokens)))
            rows.extend(replay_rows(rec.prompt, rec.tokens, rec.cycles, 2, rec.seed ^ 1))
        (out,) = s["out"]
        want = pack(rows, 0, 2048)
        assert out["input_ids"].shape[0] == len(rows) > len(s["records"])  # the random drafter is rejected: replays
        assert torch.equal(out["loss_mask"], want["loss_mask"]) and torch.equal(out["attention_mask"], want["attention_mask"])
        real = out["attention_mask"].bool()
        assert torch.equal(out["input_ids"][real], want["input_ids"][real])
    # greedy target-assisted text is the target's greedy text, whatever the drafter proposes
    from decoding.decoder import autoregressive_generate

    rec = spy[0]["records"][0]
    text, _ = autoregressive_generate(llama_target, torch.tensor([rec.prompt]), 12)
    assert rec.tokens == text.tolist()


@pytest.mark.slow
def test_zero3_rolls_out_the_same_as_zero0(run, spy):
    """Under ZeRO-3 every rank generates with a plain copy of the gathered weights: same rollouts, same training."""
    a = run("train.max_steps=2", name="z0")
    ra = [r.tokens for s in spy for r in s["records"]]
    spy.clear()
    b = run("train.max_steps=2", "deepspeed=zero3", name="z3")
    assert [r.tokens for s in spy for r in s["records"]] == ra
    wa, wb = final_weights(a), final_weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)


def test_unknown_objective_lists_the_new_ones(cfg_for, llama_target):
    from training.objectives import OBJECTIVES, build_objective

    assert {"on_policy", "adaspec"} <= set(OBJECTIVES)
    cfg = cfg_for("drafter=small", "objective=on_policy")
    cfg.objective.name = "nope"
    with pytest.raises(DraftsmithError, match="objective='nope' is not implemented: choose from token, .*on_policy"):
        build_objective(cfg, llama_target)


# --------------------------------------------------------------------------------------------------
# Subprocess runs: SIGKILL mid-run, and the real command line
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, tiny_target_dir, llama_target):
    args = ON_POLICY + ["train.max_steps=6", "train.save_every=2", "train.grad_accum=2", "objective.fraction=0.5"]
    cmds = {}
    for name in ("ref", "k"):
        write_data_gen(tmp_path / "runs" / name, llama_target, n_rows=16)
        cmds[name] = [sys.executable, "-m", "tests.training.test_on_policy_train",
                      *base_overrides(tiny_target_dir("llama"), tmp_path / "runs", name), *args]
    ref = subprocess.run(cmds["ref"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ck = tmp_path / "runs" / "k" / "train" / "checkpoints"
    proc = subprocess.Popen(cmds["k"], cwd=ROOT, env={**child_env(), "DRAFTSMITH_TEST_SLEEP": "0.3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (ck / "step_00000002" / MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no step-2 checkpoint in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "k" / "train" / "final").exists()
    done = subprocess.run(cmds["k"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_result(done.stdout)
    assert result["resumed_from"] and result["steps"] == 6 and result["steps_this_run"] < 6
    want = read_result(ref.stdout)
    a, b = final_weights(want), final_weights(result)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["drafter", "speculative"])
def test_cli_trains_on_policy(tmp_path, tiny_target_dir, llama_target, rollout):
    """`python train.py stage=train drafter=small objective=on_policy` with the YAML's defaults."""
    write_data_gen(tmp_path / "runs" / "smoke", llama_target, n_rows=12)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=train", "experiment=smoke", "drafter=small",
                        "objective=on_policy", f"objective.rollout={rollout}", "objective.max_new_tokens=8",
                        f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}", "run.device=cpu"],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "train"
    assert (out / "final" / "config.json").exists() and (out / "final" / "drafter_config.json").exists()
    logged = [x for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in logged] == [1, 2] and all(x["onpolicy/share"] == 1.0 for x in logged)


@pytest.mark.slow
def test_two_ranks_under_zero3_match_zero2(tmp_path, tiny_target_dir, llama_target):
    """Two processes (gloo): each rank rolls out its own rows (speculative: different numbers of decoding cycles);
    ZeRO-3 gathers the weights once per rolled-out micro-batch on every rank, so nothing hangs, and it trains
    as ZeRO-2 does."""
    results = {}
    for zero in ("zero2", "zero3"):
        write_data_gen(tmp_path / "runs" / zero, llama_target, n_rows=16)
        cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(fx.free_port()), "-m",
               "tests.training.test_on_policy_train", *base_overrides(tiny_target_dir("llama"), tmp_path / "runs", zero),
               *ON_POLICY, "train.max_steps=2", "objective.rollout=speculative", f"deepspeed={zero}"]
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=480)
        assert r.returncode == 0, r.stderr[-3000:]
        results[zero] = read_result(r.stdout)
        assert results[zero]["steps"] == 2 and results[zero]["train_metrics"]["onpolicy/share"] == 1.0
    a, b = final_weights(results["zero2"]), final_weights(results["zero3"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def child_main(argv: list[str]) -> None:
    """`python -m tests.training.test_on_policy_train <overrides>`: one run on the registry's small drafter; slows each
    rollout by DRAFTSMITH_TEST_SLEEP seconds (so a test can kill it mid-run); prints the result as JSON."""
    pause = float(os.environ.get("DRAFTSMITH_TEST_SLEEP", "0"))
    if pause:
        orig = OnPolicyObjective.prepare

        def slow(self, eng, batches, step):
            time.sleep(pause)
            return orig(self, eng, batches, step)

        OnPolicyObjective.prepare = slow
    run_train(argv)


if __name__ == "__main__":
    child_main(sys.argv[1:])
