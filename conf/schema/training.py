"""`train` settings and the `deepspeed=` group. The DeepSpeed JSON is *built* from these (one source
of truth, training/engine.py) and written into the run directory; nothing reads a hand-kept ds_config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from conf.errors import DraftsmithError

MODES = ("online", "offline")  # where the target signal comes from: the step itself, or data_gen's cache
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# EAGLE's unrolled training attention. auto = flex on CUDA (a BlockMask skips masked tiles, grouped key/value
# heads are read in place instead of repeated), sdpa elsewhere: FlexAttention has no CPU backward (torch 2.13
# included) and its eager CPU forward is a reference loop. drafters.layers.resolve_attention decides.
ATTENTIONS = ("auto", "flex", "sdpa")


@dataclass
class TrainConfig:
    mode: str = "online"  # online: frozen target runs inside the step; offline: read data_gen's cache
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 4  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step; global batch = micro * accum * world size
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 0.5  # max global gradient norm; 0 = off
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    schedule: str = "cosine"  # constant | linear | cosine (decay to min_lr_ratio * lr after warmup)
    min_lr_ratio: float = 0.1
    max_length: int = 2048  # rows longer than this are truncated (right side) when batched
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto | flex | sdpa: EAGLE's training attention backend (ATTENTIONS above says why)
    log_every: int = 10
    eval_every: int = 100  # held-out evaluation (per-depth accuracy, simulated tau); 0 = off (end only)
    eval_rows: int = 64  # rows of the held-out slice (taken out of data_gen's rows before training)
    save_every: int = 200  # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2
    wandb_project: Optional[str] = None  # None = offline logging into the run directory
    wandb_mode: str = "offline"  # offline | online | disabled (used when wandb_project is set)
    tensorboard: bool = True
    # A saved drafter folder (same family and shape) whose weights training starts from instead of the
    # drafter's own initialisation, e.g. experiment=fastdraft's <run>/drafter_pretrain/final. None = none.
    init_from: Optional[str] = None
    # The preflight refuses a run whose memory plan (plan/) says it cannot fit the device; true = start it anyway
    force: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The choices a user can misspell, each a one-line error (at construction; the train stage's
        preflight runs it again for a config changed in code)."""
        if self.mode not in MODES:
            raise DraftsmithError(f"train.mode={self.mode!r}: use online (target runs in the step) or offline "
                                  "(data_gen's cache)")
        if self.attention not in ATTENTIONS:
            raise DraftsmithError(f"train.attention={self.attention!r}: use one of {', '.join(ATTENTIONS)} (auto = flex "
                                  "on CUDA, sdpa elsewhere)")
        if self.schedule not in SCHEDULES:
            raise DraftsmithError(f"train.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise DraftsmithError(f"train.max_steps={self.max_steps} must be >= 1 (or null to use train.epochs)")
        if self.max_steps is None and self.epochs <= 0:  # epochs count only without max_steps
            raise DraftsmithError(f"train.epochs={self.epochs} must be > 0")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise DraftsmithError(f"train.micro_batch_size={self.micro_batch_size} and train.grad_accum="
                                  f"{self.grad_accum} must both be >= 1")
        if len(self.betas) != 2:
            raise DraftsmithError(f"train.betas={list(self.betas)} must be two numbers, e.g. [0.9,0.95]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 | fp16 | fp32
    offload_optimizer: bool = False
    overlap_comm: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed dict

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Precision and ZeRO stage, one-line errors (at construction; the engine runs it again)."""
        if self.precision not in PRECISIONS:
            raise DraftsmithError(f"deepspeed.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise DraftsmithError(f"deepspeed.zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise DraftsmithError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage>=1")
