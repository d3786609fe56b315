"""What the project may do to a run directory (runtime/rundir.py): one process at a time (a killed holder
never blocks the rerun), no folder replaced unless ours, nothing written before a rerun is validated, file
modes, threads, and one `error:` line for each refusal.

    python -m pytest -q tests/runtime/test_rundir.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conf.errors import DraftsmithError
from tests import train_fixtures as fx
from tests.train_fixtures import ROOT, child_env

HOLD = """
import sys, time
from runtime.rundir import run_lock
with run_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(600)
"""
# (runtime.rundir is imported inside the tests that call it directly, so the scenario tests run, and fail for
# what they check, on a checkout without it)


def _holder(run: str) -> subprocess.Popen:
    """A process that takes the run directory's lock the way a stage does, then sleeps."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, run], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    from runtime.rundir import run_lock

    run = tmp_path / "runs" / "r"
    p = _holder(str(run))
    try:
        with pytest.raises(DraftsmithError, match=rf"^run directory {run} is in use by stage train \(pid {p.pid} on "
                                                  r"\S+, started [0-9T:-]+\): wait for it to finish, or use another"):
            with run_lock(run, "data_gen"):
                pass
        # the CLI: one line, exit 2, before Hydra's config is used for anything else
        cli = subprocess.run([sys.executable, "train.py", "stage=eval", "drafter=ngram", f"run.root={run.parent}",
                              "run.name=r", "experiment=smoke"], cwd=ROOT, env=child_env(), capture_output=True,
                             text=True, timeout=300)
        assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
            f"error: run directory {run} is in use by stage train (pid {p.pid} on {os.uname().nodename}, "
            f"started {json.loads((run / '.lock').read_text())['started']}): wait for it to finish, or use another "
            "run.name"], cli.stderr
    finally:
        p.send_signal(signal.SIGKILL)  # what a crash or kill -9 leaves: the lock file, with the dead pid in it
        p.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == p.pid
    with run_lock(run, "train"):  # the kernel dropped the dead holder's flock: the resuming rerun goes ahead
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        with run_lock(run, "eval"):  # the same process again (train.py's stage list, then each stage)
            pass


def test_concurrent_training_is_refused_while_the_first_one_runs(trainer, tmp_path, monkeypatch):
    """The scenario in one process: while a train run holds the directory, a second train of the same
    run stops with one error and writes nothing (no config.yaml, no checkpoint)."""
    run = tmp_path / "runs" / "t"
    trainer("train.max_steps=1")  # data_gen output + a first finished run
    before = {p: p.stat().st_mtime_ns for p in (run / "train").rglob("*") if p.is_file()}
    p = _holder(str(run))
    try:
        with pytest.raises(DraftsmithError, match=rf"run directory {run} is in use by stage train \(pid {p.pid}"):
            trainer("train.max_steps=2")
    finally:
        p.kill()
        p.wait()
    assert {p: p.stat().st_mtime_ns for p in (run / "train").rglob("*") if p.is_file()} == before


def test_foreign_files_and_the_projects_marks(tmp_path):
    from runtime.rundir import check_replaceable, foreign_files

    d = tmp_path / "d"
    assert foreign_files(d) == []  # missing
    d.mkdir()
    assert foreign_files(d) == []  # empty
    (d / "user.txt").write_text("mine")
    assert foreign_files(d) == ["user.txt"]
    (d / "COMPLETE.json").write_text(json.dumps({"files": {"model.safetensors": 1}}))
    (d / "model.safetensors").write_text("x")
    assert foreign_files(d) == ["user.txt"]  # a manifest covers only what it lists
    (d / "user.txt").unlink()
    assert foreign_files(d) == []
    e = tmp_path / "e"
    e.mkdir()
    (e / "README.md").write_text("# draftsmith export: SGLang\n")
    (e / "config.json").write_text("{}")
    assert foreign_files(e) == []
    with pytest.raises(DraftsmithError, match=r"^x .*/d holds files draftsmith did not write \(a, b, c and 1 more\), "
                                              r"so it will not replace it: move them away, or do y$"):
        (d / "COMPLETE.json").unlink()
        for n in "abc":
            (d / n).write_text("")
        check_replaceable(d, "x", "do y")


def test_replace_folder_swaps_whole_folders(tmp_path):
    """The one atomic folder swap (runtime/files.py): a new folder is renamed in, an old one is replaced
    whole (nothing of it survives, no aside copy is left), and an aside copy a killed swap left is cleared."""
    from runtime.files import replace_folder

    def folder(name, **files):
        d = tmp_path / name
        d.mkdir()
        for k, v in files.items():
            (d / k).write_text(v)
        return d

    final = tmp_path / "final"
    assert replace_folder(folder("t1", a="1"), final) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "a").read_text() == "1"
    replace_folder(folder("t2", b="2"), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    (tmp_path / ".old-final").mkdir()  # left by a swap killed before its cleanup: removed by the next one
    replace_folder(folder("t3", c="3"), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "c").read_text() == "3"


def test_users_file_in_train_final_stops_the_stages_before_any_runs(cfg_for, tmp_path):
    """`mkdir -p runs/u/train/final && echo mine > .../user.txt; python train.py stages=[data_gen,train]`:
    refused before data_gen spends its minutes, and user.txt survives."""
    from train import run_stages

    final = tmp_path / "runs" / "u" / "train" / "final"
    final.mkdir(parents=True)
    (final / "user.txt").write_text("mine")
    with pytest.raises(DraftsmithError, match=r"^train/final \S+/u/train/final holds files draftsmith did not write "
                                              r"\(user.txt\), so it will not replace it: move them away, or use "
                                              "another run.name$"):
        run_stages(cfg_for("stages=[data_gen,train]", "run.name=u"))
    assert (final / "user.txt").read_text() == "mine" and not (tmp_path / "runs" / "u" / "data_gen").exists()


def test_refused_rerun_leaves_the_saved_config_alone(trainer, tmp_path, llama_target):
    """A rerun with another target stops on data_gen's fingerprint; train/config.yaml and ds_config.json
    still describe the run that trained."""
    from conf.schema import load_config
    from tests.conftest import build_tiny_model
    from tests.train_fixtures import base_overrides
    from training.stage import train

    trainer("train.max_steps=1")
    out = tmp_path / "runs" / "t" / "train"
    saved = {n: (out / n).read_text() for n in ("config.yaml", "ds_config.json")}
    other = tmp_path / "wide"
    build_tiny_model("llama", llama_target.vocab_size, hidden=48).save_pretrained(other)
    llama_target.tokenizer.save_pretrained(other)
    cfg = load_config(base_overrides(str(other), tmp_path / "runs", "t") + ["train.max_steps=2"])
    with pytest.raises(DraftsmithError, match="was made with target"):
        train(cfg, drafter_factory=fx.FACTORIES["hidden"])
    assert {n: (out / n).read_text() for n in saved} == saved


def test_final_weights_are_0644_and_throughput_excludes_eval_and_checkpoints(trainer, tmp_path, monkeypatch):
    """safetensors writes through a private 0600 temp file; the sealed folder gets the mode a plain open()
    gives. Training throughput is logged for the steps alone: a slow checkpoint does not lower it."""
    from training.checkpoint import CheckpointManager

    save = CheckpointManager.save

    def slow_save(self, *a, **k):
        time.sleep(1.0)
        return save(self, *a, **k)

    monkeypatch.setattr(CheckpointManager, "save", slow_save)
    r = trainer("train.max_steps=3", "train.save_every=1", "train.log_every=1")
    final = tmp_path / "runs" / "t" / "train" / "final"
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in final.iterdir()}
    assert set(modes) >= {"model.safetensors", "COMPLETE.json"} and set(modes.values()) == {oct(0o666 & ~umask)}
    assert r["checkpoint_seconds"] >= 3.0 and r["step_seconds"] < r["checkpoint_seconds"]
    # step_seconds is rounded to the millisecond: on a fast machine 3 tiny steps take ~40 ms, so the ratio can
    # be off by up to 0.5 ms / (the true step time), not a fixed 1 %
    assert r["step_tokens_per_s"] == pytest.approx(r["input_tokens"] / r["step_seconds"],
                                                   rel=0.0005 / max(r["step_seconds"] - 0.0005, 1e-3) + 1e-6)
    assert r["tokens_per_s"] < r["input_tokens"] / 3.0 < r["step_tokens_per_s"]
    logged = [json.loads(ln) for ln in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["step_tokens_per_s"] > rec["tokens_per_s"] for rec in logged if rec["kind"] == "train")


def test_threads_come_from_run_threads_and_are_restored():
    from runtime.rundir import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:
        assert n == min(before, 8)
    with pytest.raises(DraftsmithError, match=r"run.threads=0: give a positive number of CPU threads"):
        with torch_threads(0):
            pass


def test_read_only_run_directory_is_one_line(tmp_path):
    """Hydra makes its output folder inside the run directory before any stage runs; a run directory that
    cannot be written stops there with one line (root ignores chmod, so /sys stands in for it there)."""
    if os.geteuid() == 0:
        root = "/sys/draftsmith-test"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        root = str(ro)
    cli = subprocess.run([sys.executable, "train.py", "stage=eval", "drafter=ngram", f"run.root={root}",
                          "run.name=x", "experiment=smoke"], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 2 and len(lines) == 1, cli.stderr
    assert lines[0].startswith(f"error: run directory {root}/x is not writable (") and lines[0].endswith(
        "): fix its permissions, or choose another run.root / run.name")


def test_eval_runs_and_reports_with_run_threads(cfg_for, capsys):
    """Eval's tok/s depend on its CPU threads: it takes them from run.threads, prints them and records them
    in the report, and gives the process its own count back afterwards."""
    from eval.stage import run

    before = torch.get_num_threads()
    res = run(cfg_for("stage=eval", "drafter=ngram", "eval.num_prompts=1", "eval.max_new_tokens=4", "eval.warmup=0",
                      "run.threads=3", "run.name=th"))
    out = capsys.readouterr().out
    assert "eval: 3 torch CPU threads (run.threads)" in out and "3 CPU threads (run.threads)" in out.split("machine:")[1]
    assert res["report"]["machine"]["torch_threads"] == 3 and torch.get_num_threads() == before
