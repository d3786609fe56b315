"""The DeepSpeed engine: process group, the DeepSpeed config built from the run config, optimizer and
LR schedule, and the forward/backward/step/save/load calls the train stage makes. The ONLY module that
imports deepspeed (lazily, after the accelerator is chosen).

    python train.py stage=train deepspeed=zero2                          # one process
    deepspeed --num_gpus 8 --no_local_rank train.py stage=train deepspeed=zero2
    torchrun --nproc_per_node 8 train.py stage=train deepspeed=zero2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 train.py stage=train run.device=cpu   # CPU, gloo

One source of truth: `build_ds_config(cfg, world_size, device)` turns TrainConfig + DeepSpeedConfig into
DeepSpeed's dict; the train stage writes it to `<run>/train/ds_config.json` and passes the same dict to
deepspeed.initialize. The trainer takes batch sizes from cfg.train, never from that dict.

Optimizer and schedule are client objects (torch AdamW, torch LambdaLR) handed to DeepSpeed, so nothing
is JIT-compiled, and DeepSpeed saves and restores both inside its checkpoint.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from conf.errors import DraftsmithError
from conf.schema.training import PRECISIONS, SCHEDULES
from runtime.distributed import launcher_ranks
from runtime.files import write_json


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun or the deepspeed launcher; a plain `python`
    run is rank 0 of 1) and initialise the process group: nccl on GPU, gloo on CPU. Idempotent.
    `device` is run.device (runtime.device): a bare `cuda` becomes cuda:<LOCAL_RANK>, since
    torch.cuda.set_device and NCCL need an index."""
    from runtime.device import resolve_device

    rank, world, local = launcher_ranks()
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        os.environ.setdefault(key, str(value))  # DeepSpeed's init reads them
    if world == 1:  # launchers set these; a single process picks a free port so parallel runs don't clash
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in os.environ:
        raise DraftsmithError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: start multi-process runs with "
                              "torchrun or the deepspeed launcher")
    dev = resolve_device(device)
    if dev.type == "cpu":
        # DeepSpeed picks its accelerator at import; without this it would use CUDA when one is present.
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    ds = _deepspeed()
    if dev.type == "cpu":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel at its first init (~2 min on
        # 2 cores, needs a C++ toolchain); gloo does the same job. Its op table is an editable, cached
        # dict (see deepspeed/ops/__init__.py), so mark the op unavailable instead of building it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # oneCCL is DeepSpeed's CPU default only when its bindings are installed; name gloo explicitly.
    ds.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo", verbose=False)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def _deepspeed():
    import deepspeed

    # DeepSpeed logs every config key at INFO on every rank; keep warnings and errors only.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a small tensor over ranks (identity on one process)."""
    if env.world_size == 1:
        return values
    import torch.distributed as dist

    t = values.to(env.device if env.device.type == "cuda" else "cpu", torch.float64).clone()
    dist.all_reduce(t)
    return t.to(values.device)


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Config -> DeepSpeed dict
# --------------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` = bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there and DeepSpeed's CPU bf16 path
    needs oneCCL)."""
    if precision not in PRECISIONS:
        raise DraftsmithError(f"deepspeed.precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(cfg, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed dict for this run, from cfg.train and cfg.deepspeed only."""
    t, d = cfg.train, cfg.deepspeed
    t.check()  # the schemas' ranges (conf/schema/training.py), again for a config changed in code
    d.check()
    prec = resolve_precision(d.precision, device)
    if prec != "fp32" and device.type == "cpu":
        raise DraftsmithError(f"deepspeed.precision={prec} on CPU is not supported here: use "
                              "deepspeed.precision=fp32 (or auto) for CPU runs")
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage > 0:
        zero["overlap_comm"] = bool(d.overlap_comm and device.type == "cuda")
        if device.type == "cpu":
            # ZeRO's reduce-scatter over gloo gives wrong gradients here (DeepSpeed 0.19.8, 2 CPU ranks:
            # final loss 0.369 instead of the 1-process 0.173); all-reducing the buckets is exact.
            zero["reduce_scatter"] = False
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        # torch's AdamW as the client optimizer: no fused/CPU-Adam JIT builds.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # progress is ours (tqdm, wandb, tensorboard)
        "wall_clock_breakdown": False,
    }
    if prec == "fp16":
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16})
    return _merge(ds, dict(d.extra or {}))


def write_ds_config(ds: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, ds, sort_keys=True)
    return path


# --------------------------------------------------------------------------------------------------
# Optimizer and LR schedule
# --------------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based, the step about to be taken):
    linear warmup (step+1)/warmup, then constant, linear or cosine decay towards min_lr_ratio."""
    if schedule not in SCHEDULES:
        raise DraftsmithError(f"train.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return decay_factor(schedule, (step - warmup_steps) / max(1, total_steps - warmup_steps), min_lr_ratio)


def decay_factor(schedule: str, progress: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr after warmup at `progress` (0 -> 1 over the decay; beyond 1 it stays at
    the floor): 1 (constant), or a linear or cosine decay from 1 to min_lr_ratio. The train stage's
    progress counts optimizer steps, target_pretrain's its token budget."""
    progress = min(1.0, progress)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_fn(total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    """LambdaLR's function. A plain function on purpose: LambdaLR checkpoints the state of callable
    objects but not of functions, so a resumed run follows *this* config's schedule length (a larger
    train.max_steps stretches the decay) while the step count and base lr come from the checkpoint."""
    lr_factor(max(warmup_steps, 0), total_steps, warmup_steps, schedule, min_lr_ratio)  # bad names fail now

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, schedule, min_lr_ratio)

    return factor


def build_optimizer(module: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """torch AdamW over the drafter's parameter groups (families may give parts their own lr)."""
    groups = module.param_groups(train_cfg.lr)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise DraftsmithError(f"drafter {type(module).__name__} has no trainable parameters")
    train_cfg.check()  # betas among the schema's checks (conf/schema/training.py), again for code changes
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                            weight_decay=train_cfg.weight_decay)
    return opt


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class ObjectiveModule(nn.Module):
    """What DeepSpeed wraps: the drafter plus the objective that turns (drafter, signal) into
    (loss, metrics). Going through module.forward lets ZeRO-3's hooks gather parameters."""

    def __init__(self, drafter: nn.Module, objective):
        super().__init__()
        self.drafter = drafter
        self.objective = objective

    def forward(self, signal):
        return self.objective(self.drafter, signal)


class Engine:
    """DeepSpeed around the drafter: forward(signal) -> (loss, metrics), backward, step, save, load."""

    def __init__(self, drafter: nn.Module, objective, cfg, ds_config: dict, total_steps: int, env: DistEnv):
        ds = _deepspeed()
        self.env = env
        self.drafter = drafter
        t = cfg.train
        opt = build_optimizer(drafter, t)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, schedule_fn(total_steps, t.warmup_steps, t.schedule, t.min_lr_ratio))
        self.module = ObjectiveModule(drafter, objective).to(env.device)
        self.engine, self.optimizer, _, self.scheduler = ds.initialize(
            model=self.module, optimizer=opt, lr_scheduler=sched, config=copy.deepcopy(ds_config),
            dist_init_required=False)
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])

    # --- training step -----------------------------------------------------------------------------
    def forward(self, signal):
        return self.engine(signal)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed divides by gradient_accumulation_steps and averages over ranks."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer + schedule step at the accumulation boundary (a no-op inside it); clips first."""
        self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # --- checkpoints ----------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (module, optimizer incl. ZeRO partitions, scheduler, step) under
        `<directory>/deepspeed/`. Every rank must call it."""
        # Frozen parameters (a target piece a family wraps, e.g. Medusa-2's base under LoRA) are reloaded
        # from target.path; keeping them out keeps checkpoints drafter-sized.
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        # not strict: frozen parameters are not in the checkpoint (names and shapes of all parameters were
        # compared with the checkpoint's record before this call)
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise DraftsmithError(f"checkpoint {directory} could not be loaded by DeepSpeed (missing model "
                                  "states): delete it to resume from the previous one")

    def full_state_context(self):
        """A context in which the drafter's parameters are whole on every rank (ZeRO-3 partitions them)."""
        import contextlib

        if self.zero_stage == 3:
            return _deepspeed().zero.GatheredParameters(list(self.drafter.parameters()), modifier_rank=None)
        return contextlib.nullcontext()
