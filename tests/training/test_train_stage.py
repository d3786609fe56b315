"""The train stage's data side and entry points: data_gen output checks, the held-out slice and the
resumable stream, online == offline target signal, and `python train.py stage=train` end to end.

    python -m pytest -q tests/training/test_train_stage.py
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT
from drafters.registry import drafter_class
from tests import train_fixtures as fx
from tests.train_fixtures import HeadDrafter, child_env, final_weights, write_data_gen
from training.data import DataPlan, collate, load_data_gen
from training.signal import offline_signal, online_signal


# --------------------------------------------------------------------------------------------------
# The plan: held-out slice, stream, sharding
# --------------------------------------------------------------------------------------------------
def test_plan_heldout_slice_and_stream_are_deterministic():
    a = DataPlan(50, eval_rows=5, seed=3, micro=2, accum=2, world=1, rank=0)
    b = DataPlan(50, eval_rows=5, seed=3, micro=2, accum=2, world=1, rank=0)
    assert len(a.eval_idx) == 5 and a.n_train == 45
    assert not set(a.eval_idx) & set(a.train_idx) and sorted([*a.eval_idx, *a.train_idx]) == list(range(50))
    assert np.array_equal(a.stream(0, 200), b.stream(0, 200))
    assert not np.array_equal(a.eval_idx, DataPlan(50, 5, seed=4, micro=2, accum=2, world=1, rank=0).eval_idx)
    # every epoch is a permutation of the training rows, and epochs differ
    s = a.stream(0, 90)
    assert sorted(s[:45]) == sorted(a.train_idx) == sorted(s[45:]) and not np.array_equal(s[:45], s[45:])
    assert a.cursor(100) == (2, 10)
    assert np.array_equal(a.stream(43, 4), s[43:47])  # a step that crosses an epoch end
    assert a.total_steps(epochs=1.0, max_steps=None) == 12 and a.total_steps(epochs=2.0, max_steps=7) == 7


def test_global_batch_splits_the_same_for_ranks_and_accumulation():
    one = DataPlan(40, 4, seed=0, micro=2, accum=2, world=1, rank=0)
    r0 = DataPlan(40, 4, seed=0, micro=2, accum=1, world=2, rank=0)
    r1 = DataPlan(40, 4, seed=0, micro=2, accum=1, world=2, rank=1)
    for pos in (0, 4, 36):
        mb = one.micro_batches(pos)
        assert [x.tolist() for x in mb] == [r0.micro_batches(pos)[0].tolist(), r1.micro_batches(pos)[0].tolist()]
    capped = DataPlan(5, 8, 0, 1, 1, 1, 0)  # a smoke-sized dataset: at most half is held out, and said so
    assert (len(capped.eval_idx), capped.n_train) == (2, 3)
    assert capped.note == "held out 2 of 5 rows for evaluation (train.eval_rows=8 capped at half the data)"
    assert DataPlan(5, 2, 0, 1, 1, 1, 0).note is None


# --------------------------------------------------------------------------------------------------
# data_gen output
# --------------------------------------------------------------------------------------------------
def test_missing_data_gen_output_is_one_clear_error(tmp_path, llama_target):
    with pytest.raises(DraftsmithError, match=r"^no finished data_gen output in .*/data_gen: run `python train.py "
                                              r"stage=data_gen` with the same run.name first"):
        load_data_gen(tmp_path / "data_gen", llama_target, need_cache=False)


def test_data_from_another_target_is_refused(tmp_path, tiny_target_dir, llama_target):
    from conf.schema import TargetConfig
    from drafters.target import load_target
    from tests.conftest import build_tiny_model

    other_dir = tmp_path / "wide"
    build_tiny_model("llama", llama_target.vocab_size, hidden=48).save_pretrained(other_dir)
    llama_target.tokenizer.save_pretrained(other_dir)
    other = load_target(TargetConfig(path=str(other_dir)), device="cpu")
    write_data_gen(tmp_path, other, n_rows=4)
    with pytest.raises(DraftsmithError, match="was made with target .*rerun data_gen with this target"):
        load_data_gen(tmp_path / "data_gen", llama_target, need_cache=False)


def test_offline_mode_without_cache_names_the_fix(tmp_path, llama_target):
    write_data_gen(tmp_path, llama_target, n_rows=4)
    with pytest.raises(DraftsmithError, match="train.mode=offline needs data_gen's target cache, but .* has none.*"
                                              "rerun data_gen with data.cache_features=true"):
        load_data_gen(tmp_path / "data_gen", llama_target, need_cache=True)


def test_collate_right_pads_and_truncates(tmp_path, llama_target):
    write_data_gen(tmp_path, llama_target, n_rows=6)
    data = load_data_gen(tmp_path / "data_gen", llama_target, need_cache=False)
    rows = [0, 3]
    raw = data.dataset[rows]
    b = collate(data, rows, pad_id=7, max_length=12)
    lens = [min(len(x), 12) for x in raw["input_ids"]]
    assert b["input_ids"].shape == (2, max(lens))
    for i, n in enumerate(lens):
        assert b["input_ids"][i, :n].tolist() == raw["input_ids"][i][:n]
        assert b["loss_mask"][i, :n].tolist() == raw["loss_mask"][i][:n]
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (max(lens) - n)
        assert set(b["input_ids"][i, n:].tolist()) <= {7} and b["loss_mask"][i, n:].sum() == 0


# --------------------------------------------------------------------------------------------------
# Online == offline
# --------------------------------------------------------------------------------------------------
def test_online_and_offline_signal_agree_on_a_batch(tmp_path, llama_target):
    V = llama_target.vocab_size
    write_data_gen(tmp_path, llama_target, n_rows=6, cache="fp32", topk=V)  # full top-k: the whole distribution
    data = load_data_gen(tmp_path / "data_gen", llama_target, need_cache=True)
    batch = collate(data, [1, 4, 5], pad_id=0, max_length=64, with_cache=True)
    on, off = online_signal(llama_target, batch), offline_signal(llama_target, batch)
    real = batch["attention_mask"].bool()
    # the cache was written one row at a time, online runs the padded batch: equal up to float32 rounding
    assert torch.allclose(on.features[real], off.features[real], atol=1e-6, rtol=0)
    assert torch.allclose(on.last_hidden[real], off.last_hidden[real], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    drafter = HeadDrafter.from_target(None, llama_target)
    assert drafter.loss(on)[0].item() == pytest.approx(drafter.loss(off)[0].item(), abs=1e-7)
    # logits only from the cached top-k (no last_hidden): same distributions on every trained position
    topk_only = offline_signal(llama_target, {k: v for k, v in batch.items() if k not in ("features", "last_hidden")})
    pos = torch.zeros_like(real)
    pos[:, :-1] = batch["loss_mask"][:, 1:].bool()
    p_on = torch.log_softmax(on.logits[pos], -1)
    p_off = torch.log_softmax(topk_only.logits[pos], -1)
    assert torch.allclose(p_on, p_off, atol=1e-5)
    torch.manual_seed(0)
    tok = HeadDrafter.from_target(None, llama_target, use_target_states=False)
    assert tok.loss(on)[0].item() == pytest.approx(tok.loss(topk_only)[0].item(), abs=1e-6)


def test_offline_training_equals_online_training(trainer):
    on = trainer("train.mode=online", name="on", data={"cache": "fp32"})
    off = trainer("train.mode=offline", name="off", data={"cache": "fp32"})
    a, b = final_weights(on), final_weights(off)
    assert on["final_loss"] == pytest.approx(off["final_loss"], abs=1e-7)
    # the signals differ by float32 rounding (~1e-8); Adam's g/sqrt(v) magnifies that on coordinates whose
    # gradient is near 0, so compare at 1% of one step's size (lr 1e-3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_bf16_cache_from_data_gen_is_close_to_online(tmp_path, llama_target):
    """data_gen's own cache writer (bf16): the offline loss is within bf16 rounding of the online one."""
    from data_gen import cache

    write_data_gen(tmp_path, llama_target, n_rows=4, cache="data_gen", topk=8)
    data = load_data_gen(tmp_path / "data_gen", llama_target, need_cache=True)
    assert type(data.cache) is cache.CachedFeatures
    batch = collate(data, [0, 1, 2, 3], pad_id=0, max_length=64, with_cache=True)
    torch.manual_seed(0)
    drafter = HeadDrafter.from_target(None, llama_target)
    on = drafter.loss(online_signal(llama_target, batch))[0].item()
    off = drafter.loss(offline_signal(llama_target, batch))[0].item()
    assert off == pytest.approx(on, rel=2e-2)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
def _cli(tmp_path, tiny_target_dir, *overrides):
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "stage=train", "experiment=smoke",
                           f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}",
                           "run.device=cpu", *overrides], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=300)


def test_cli_without_data_gen_output_is_one_line(tmp_path, tiny_target_dir):
    r = _cli(tmp_path, tiny_target_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: no finished data_gen output in {tmp_path / 'runs' / 'smoke' / 'data_gen'}: run `python train.py "
        "stage=data_gen` with the same run.name first (an interrupted data_gen resumes when rerun)")


_SHIM = """import runpy, sys
import drafters.registry as registry
registry.TRAINABLE["eagle3"] = "tests.train_fixtures:HeadDrafter"  # the test drafter under drafter=eagle3
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_cli_under_the_deepspeed_launcher_trains(tmp_path, tiny_target_dir, llama_target):
    """train.py's real entry (Hydra, stage dispatch, registry lookup, --local_rank absorbed) started by
    DeepSpeed's launcher; the registry is pointed at the test drafter by a 4-line shim."""
    shim = tmp_path / "entry.py"
    shim.write_text(_SHIM.format(train=str(PROJECT_ROOT / "train.py")))
    write_data_gen(tmp_path / "runs" / "smoke", llama_target, n_rows=12)
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(fx.free_port()), str(shim), "stage=train",
           "experiment=smoke", f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}",
           "run.device=cpu", "deepspeed=zero1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "train"
    assert (out / "final" / "model.safetensors").exists() and (out / "checkpoints" / "step_00000002").is_dir()
    assert [(x["step"], x["kind"]) for x in fx.read_metrics(out / "metrics.jsonl")] == [
        (1, "train"), (2, "train"), (2, "eval")]
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1


DRAFTER_OPTIONS = ["eagle1", "eagle3", "medusa", "medusa2", "hydra", "hydra_pp", "small"]


@pytest.mark.parametrize("option", DRAFTER_OPTIONS)
def test_every_drafter_option_trains_and_reloads(tmp_path, tiny_target_dir, option):
    """The real registry path of `stage=train drafter=<option>`: trains 3 steps, writes a final folder that the
    family's from_pretrained reloads into a drafter giving the same loss."""
    from conf.schema import TargetConfig, load_config
    from drafters.target import load_target
    from training.stage import train

    target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")  # fresh: Medusa-2 wraps it
    root = tmp_path / "runs"
    write_data_gen(root / "t", target, n_rows=12)
    cfg = load_config(fx.base_overrides(tiny_target_dir("llama"), root, "t") + [f"drafter={option}"])
    res = train(cfg, target=target)
    assert res["steps"] == 3 and math.isfinite(res["final_loss"])
    assert any(k.startswith("acc/") for k in res["train_metrics"])
    fresh = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    reloaded = drafter_class(cfg.drafter.name).from_pretrained(res["final_dir"], fresh)
    assert sorted(reloaded.state_dict()) and reloaded.family == cfg.drafter.name


@pytest.mark.slow
def test_cli_trains_eagle3_end_to_end(tmp_path, tiny_target_dir, llama_target):
    """`python train.py stage=train experiment=smoke drafter=eagle3` on a data_gen output, in a subprocess."""
    write_data_gen(tmp_path / "runs" / "smoke", llama_target, n_rows=12)
    r = _cli(tmp_path, tiny_target_dir, "drafter=eagle3")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "train"
    assert (out / "final").is_dir() and (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "ds_config.json").exists() and (out / "metrics.jsonl").exists()


def test_ctrl_c_in_training_is_one_line_naming_the_step(tmp_path, tiny_target_dir, llama_target):
    """Ctrl-C (SIGINT, sent by the test hook right after the step-1 checkpoint) ends `python train.py
    stage=train` with one line saying where it stopped and what to do, no traceback, exit status 130."""
    write_data_gen(tmp_path / "runs" / "smoke", llama_target, n_rows=12)
    env = {**child_env(), "DRAFTSMITH_TEST_KILL_AT": "checkpoint_saved:1", "DRAFTSMITH_TEST_KILL_SIGNAL": "SIGINT"}
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "stage=train", "experiment=smoke",
                        f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}", "run.device=cpu",
                        "drafter=medusa", "train.save_every=1"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    # the last line (the progress bar writes to stderr before it), and no traceback anywhere
    assert r.stderr.strip().splitlines()[-1] == ("interrupted at step 1 of 2: rerun the same command to resume (from "
                                                 f"{tmp_path / 'runs' / 'smoke' / 'train' / 'checkpoints' / 'step_00000001'})")
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    out = tmp_path / "runs" / "smoke" / "train"
    assert (out / "checkpoints" / "step_00000001").is_dir() and not (out / "final").exists()


def test_a_draft_vocabulary_on_a_train_only_command_is_refused(tmp_path, trainer):
    """drafter.draft_vocab trims the head at draft time (eval, export); training always trains the full head.
    On a command that runs train alone nothing would use it, so it is refused, not silently ignored; a chain
    that goes on to eval or export keeps it for them."""
    from conf.schema import load_config
    from training.stage import preflight

    cfg = load_config(["stage=train", "drafter.draft_vocab=512", f"run.root={tmp_path}"])
    with pytest.raises(DraftsmithError) as e:
        trainer("stage=train", "drafter.draft_vocab=512")
    assert str(e.value) == ("drafter.draft_vocab=512 trims the draft LM head when the drafter decodes (stage=eval, "
                            "stage=export); training always trains the full head, and this command runs no eval or "
                            "export: drop drafter.draft_vocab here and set it on the eval or export command")
    assert not (tmp_path / "runs" / "t" / "train").exists()
    preflight(load_config(["stages=[train,eval]", "drafter.draft_vocab=512", f"run.root={tmp_path}"]))  # kept for eval
    assert cfg.drafter.draft_vocab == 512
