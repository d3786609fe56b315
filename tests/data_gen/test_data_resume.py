"""data_gen as a user runs it, in subprocesses: SIGKILL at several points then resume, a 2-rank torchrun
run, and `python train.py stage=data_gen ...` end to end with its one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_gen.cache import CachedFeatures
from data_gen.output import load_dataset_dir
from data_gen.stage import run
from tests.data_util import CONVS, write_jsonl

ROOT = Path(__file__).resolve().parents[2]




def train_py(args: list[str], kill_at: str | None = None, launcher: list[str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("DRAFTSMITH_TEST_KILL_AT", None)
    if kill_at:
        env["DRAFTSMITH_TEST_KILL_AT"] = kill_at
    cmd = [*(launcher or [sys.executable]), "train.py", "stage=data_gen", "run.device=cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def setup(tmp_path, tiny_target_dir):
    """Twelve conversations (two unusable) and the overrides every run here shares."""
    chats = write_jsonl(tmp_path / "chats.jsonl", CONVS * 2)
    args = [f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}", "experiment=smoke",
            "data=jsonl", f"data.path={chats}", "data.max_length=96", "data.max_conversations=null",
            "data.shard_rows=2", "data.batch_size=2", "data.cache_features=true", "data.cache_topk=3"]
    return tmp_path, args


def assert_same(a_dir, b_dir, exact_cache=True):
    a, b = load_dataset_dir(a_dir), load_dataset_dir(b_dir)
    assert a.to_dict() == b.to_dict()
    assert a["conv_index"] == sorted(set(a["conv_index"]))  # every row once, in source order
    ca, cb = CachedFeatures(a_dir), CachedFeatures(b_dir)
    for r in range(len(a)):
        for key, va in ca[r].items():
            if exact_cache:
                assert torch.equal(va, cb[r][key]), (r, key)
            else:  # other batch compositions: float noise of at most one bf16 rounding step
                torch.testing.assert_close(va.float(), cb[r][key].float(), rtol=8e-3, atol=1e-3)


def test_sigkill_anywhere_then_resume(setup, cfg_for):
    tmp_path, args = setup
    ref = run(cfg_for(*args[2:], "run.name=ref"))  # uninterrupted, in this process
    out = tmp_path / "runs" / "k" / "data_gen"
    # 1) killed while the 3rd shard sits in its temp folder (written, not yet renamed)
    p = train_py([*args, "run.name=k"], kill_at="shard_written:3")
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((out / "shards").glob("shard-*"))) == 2 and len(list((out / "shards").glob(".tmp-*"))) == 1
    # 2) resumed, killed again after assembling the dataset but before meta.json marks it finished
    p = train_py([*args, "run.name=k"], kill_at="assembled:1")
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "dataset").exists() and not (out / "meta.json").exists()
    assert not list((out / "shards").glob(".tmp-*"))
    # 3) resumed to the end
    p = train_py([*args, "run.name=k"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data_gen: read 12 = written 10 + skipped 2 (2 no assistant turn)" in p.stdout
    assert_same(ref.data_dir, out)
    assert len(list((out / "shards").glob("shard-*"))) == 5  # 10 usable conversations, 2 per shard


def test_two_ranks_equal_one(setup, cfg_for):
    tmp_path, args = setup
    ref = run(cfg_for(*args[2:], "run.name=one"))
    p = train_py([*args, "run.name=two"], launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "runs" / "two" / "data_gen"
    assert '"world_size": 2' in (out / "accounting.json").read_text()
    assert_same(ref.data_dir, out, exact_cache=False)


def test_train_py_end_to_end_and_one_line_errors(tmp_path, tiny_target_dir):
    base = [f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path}", "experiment=smoke"]
    p = train_py(base)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data_gen: read 8 = written" in p.stdout  # experiment=smoke: 8 bundled ShareGPT conversations
    assert len(load_dataset_dir(tmp_path / "smoke" / "data_gen")) > 0
    p = train_py([*base, "run.name=bad", "data.source=nope"])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("error: data.source='nope' is not a prompt source: "
                                                 "use one of sharegpt, jsonl, hf")
