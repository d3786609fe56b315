"""`plan.*`: what `stage=plan` (and the train stage's preflight) assumes about the machine and the data.

    python train.py stage=plan target=llama3_70b drafter=eagle3 plan.gpus=8 plan.gpu=h100-80gb
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conf.errors import DraftsmithError


@dataclass
class PlanConfig:
    gpus: int = 1  # data-parallel ranks (GPUs, or CPU processes) the run will use
    gpu: str = "auto"  # a name from plan/hardware.py (h100-80gb, h200, a100-80gb, ...) or auto = this machine
    # share of each device's memory the plan lets a run fill (the rest: allocator fragmentation, NCCL buffers)
    headroom: float = 0.92
    global_batch: Optional[int] = None  # sequences per optimizer step to aim for; null = micro x accum x gpus
    mfu: Optional[float] = None  # training FLOP utilisation; null = a measured bench row for this GPU, else 0.25
    row_tokens: Optional[int] = None  # mean tokens per data row; null = data_gen's meta.json, else max_length/2
    rows: Optional[int] = None  # data rows; null = data_gen's meta.json, else data.max_conversations
    disk_gb: Optional[float] = None  # free disk to plan the offline cache against; null = the run root's free space

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.gpus < 1:
            raise DraftsmithError(f"plan.gpus={self.gpus} must be >= 1")
        if not 0 < self.headroom <= 1:
            raise DraftsmithError(f"plan.headroom={self.headroom} must be in (0, 1]")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise DraftsmithError(f"plan.mfu={self.mfu} must be in (0, 1], or null for a measured/assumed figure")
        for name in ("global_batch", "row_tokens", "rows"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DraftsmithError(f"plan.{name}={v} must be >= 1, or null")
