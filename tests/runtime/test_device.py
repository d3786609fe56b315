"""run.device parsing (runtime.device), shared by every stage: cpu, auto, cuda, cuda:N and one clear error
for anything else. GPU presence is passed in (`gpus=`), so the CUDA cases run on a CPU machine.

    python -m pytest -q tests/runtime/test_device.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conf.errors import DraftsmithError
from runtime.device import parse_device, resolve_device

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,want", [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                       ("cuda:0", ("cuda", 0)), ("CUDA:3", ("cuda", 3)), (" cpu ", ("cpu", None))])
def test_parse_accepts_the_four_forms(name, want):
    assert parse_device(name) == want


@pytest.mark.parametrize("name", ["cuda:x", "gpu", "gpu:0", "cuda:", "cuda:-1", "cuda:0:1", "", "mps", "cpu:0"])
def test_parse_rejects_with_one_line_naming_the_forms(name):
    with pytest.raises(DraftsmithError) as e:
        parse_device(name)
    msg = str(e.value)
    assert msg.startswith(f"run.device={name!r} is not a device") and msg.endswith("use auto, cpu, cuda or cuda:N")
    assert "\n" not in msg
    assert ("torch calls the GPU cuda" in msg) == name.startswith("gpu")


def test_bare_cuda_gets_this_ranks_index(monkeypatch):
    # the reported failure: torch.cuda.set_device(torch.device("cuda")) needs an index
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda", gpus=1) == torch.device("cuda", 0)
    assert resolve_device("auto", gpus=1) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun / deepspeed launcher, second process
    assert resolve_device("cuda", gpus=2) == torch.device("cuda", 1)
    assert resolve_device("auto", gpus=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", gpus=2) == torch.device("cuda", 0)  # an explicit index wins


def test_cpu_and_auto_without_gpu():
    assert resolve_device("cpu", gpus=4) == torch.device("cpu")
    assert resolve_device("auto", gpus=0) == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), gpus=0) == torch.device("cpu")  # a torch.device passes through


def test_cuda_without_gpu_and_missing_index_are_clear_errors():
    with pytest.raises(DraftsmithError, match=r"^run\.device=cuda but torch sees no CUDA GPU .*use run\.device=cpu"):
        resolve_device("cuda", gpus=0)
    with pytest.raises(DraftsmithError, match=r"^run\.device=cuda:2: GPU 2 does not exist, torch sees 2 "
                                              r"\(cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:2", gpus=2)


def test_setup_distributed_cuda_sets_an_indexed_device(monkeypatch):
    """The reported failure: `python train.py run.device=cuda` died in setup_distributed with torch's
    'Expected a torch.device with a specified index'. A GPU is simulated: set_device must get cuda:0 and
    the process group nccl."""
    from training import engine

    seen = {}

    class FakeDeepSpeed:
        @staticmethod
        def init_distributed(dist_backend, verbose):
            seen["backend"] = dist_backend

    def set_device(dev):
        if dev.index is None:  # what torch.cuda.set_device itself rejects
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        seen["device"] = dev

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(engine, "_deepspeed", lambda: FakeDeepSpeed)
    for name in ("cuda", "cuda:0", "auto"):
        env = engine.setup_distributed(name)
        assert env.device == torch.device("cuda", 0) and seen == {"device": env.device, "backend": "nccl"}
        seen.clear()
    with pytest.raises(DraftsmithError, match=r"run\.device='gpu' is not a device"):
        engine.setup_distributed("gpu")


def test_train_py_bad_device_is_one_error_line_before_any_stage(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "run.device=cuda:x", f"run.root={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: run.device='cuda:x' is not a device: use auto, cpu, cuda or cuda:N"]
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["hydra"]  # Hydra's log only: no stage started


@pytest.mark.parametrize("stage", ["target_pretrain", "data_gen", "train", "eval", "export"])
def test_every_stage_checks_the_device_before_it_starts(stage, tmp_path):
    """run_stages resolves run.device once, up front: on this CPU-only machine `cuda` is one clear error
    for every stage, never a torch traceback halfway through."""
    from conf.schema import load_config
    from train import run_stages

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    cfg = load_config([f"stage={stage}", "run.device=cuda", f"run.root={tmp_path}"])
    with pytest.raises(DraftsmithError, match=r"^run\.device=cuda but torch sees no CUDA GPU"):
        run_stages(cfg)
    assert not (tmp_path / "demo").exists()
