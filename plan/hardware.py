"""Devices the planner knows (memory, dense bf16 peak, memory bandwidth) and the measured rows it prefers
to assumptions. Datasheet figures; memory as nvidia-smi reports it (MiB)."""
from __future__ import annotations

from dataclasses import dataclass

from conf.errors import DraftsmithError

MiB, GiB = 2**20, 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes
    peak_flops: float | None  # dense bf16 FLOP/s (CPU: an effective rate, see CPU_EFFECTIVE_FLOPS)
    bandwidth: float | None  # bytes/s
    kind: str = "cuda"


DEVICES = {
    "h100-80gb": Device("NVIDIA H100 80GB SXM", 81559 * MiB, 989e12, 3.35e12),
    "h100-pcie": Device("NVIDIA H100 80GB PCIe", 81559 * MiB, 756e12, 2.0e12),
    "h200": Device("NVIDIA H200 141GB", 143771 * MiB, 989e12, 4.8e12),
    "a100-80gb": Device("NVIDIA A100 80GB", 81920 * MiB, 312e12, 2.0e12),
    "a100-40gb": Device("NVIDIA A100 40GB", 40960 * MiB, 312e12, 1.555e12),
    "l40s": Device("NVIDIA L40S 48GB", 46068 * MiB, 362e12, 0.864e12),
    "rtx4090": Device("NVIDIA RTX 4090 24GB", 24564 * MiB, 165e12, 1.008e12),
    "l4": Device("NVIDIA L4 24GB", 23034 * MiB, 121e12, 0.3e12),
}

# Training FLOP utilisation measured by bench/bench_train_mfu.py (EAGLE-3 online, its formula of useful FLOPs):
# H200, random-weight 8B shape, vocab 128256, batch 4 x 1024, 7 TTT steps, bf16: 7,036 tokens/s, MFU 22.3 %
# (2026-12-04). Used for every GPU of the same generation; other GPUs get ASSUMED_MFU.
MEASURED_MFU = {"h200": (0.223, "measured: bench_train_mfu on an H200, 8B shape, 2026-12-04"),
                "h100-80gb": (0.223, "the H200 bench row (same compute, 2026-12-04)")}
ASSUMED_MFU = 0.25
# Effective CPU FLOP rate: the demo run's EAGLE-3 training on the 2-core development EPYC (README, 2026-12-03:
# ~1,590 tokens/s) times the planner's FLOPs per token for that run (plan.estimate.train_flops_per_token).
CPU_EFFECTIVE_FLOPS = 1590 * 6.92e7  # 6.92e7 = eagle3_train_flops per token of the demo run (seq 512)
GEN_BANDWIDTH_UTIL = 0.5  # decoding reaches about half the datasheet bandwidth (ours: 3.13 / 7.38 ms at 8B = 0.42)
PREFILL_MFU = 0.4  # data_gen's feature forward: a no-grad prefill


def device_for(name: str, run_device: str = "auto") -> Device:
    """A named device, or `auto`: this machine's first GPU, else its RAM as a CPU device."""
    if name != "auto":
        if name not in DEVICES:
            raise DraftsmithError(f"plan.gpu={name!r} is not known: use auto or one of {', '.join(DEVICES)}")
        return DEVICES[name]
    import torch

    if run_device != "cpu" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        known = next((d for d in DEVICES.values() if d.name.split()[1] in p.name), None)
        return Device(p.name, int(p.total_memory), known and known.peak_flops, known and known.bandwidth)
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(f"CPU ({os.cpu_count()} cores, RAM)", ram, CPU_EFFECTIVE_FLOPS, None, kind="cpu")


def train_mfu(gpu: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "plan.mfu"
    if gpu in MEASURED_MFU:
        return MEASURED_MFU[gpu]
    return ASSUMED_MFU, f"assumed {ASSUMED_MFU:.0%} (no bench row for this device)"
