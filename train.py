"""draftsmith: train speculative-decoding drafters, prove them, export them.

    python train.py                                   # data_gen -> train -> eval -> export, demo target, offline
    python train.py stage=data_gen experiment=smoke   # one stage, tiny budgets
    python train.py stages=[train,eval] drafter=medusa run.name=m1
    deepspeed --num_gpus 8 --no_local_rank train.py stage=train deepspeed=zero2
    torchrun --nproc_per_node 8 train.py stage=train
    python train.py --help                            # groups and settings

Each stage is a plain `run(cfg) -> result` function (see STAGES below) that tests call without Hydra.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

import hydra
from omegaconf import OmegaConf

from conf.cli import override_error
from conf.errors import DraftsmithError, Interrupted
from conf.schema import STAGES, Config
from runtime.device import resolve_device

# stage name -> "module:function"; imported lazily so `--help` and one stage stay quick
STAGE_FUNCS = {
    "target_pretrain": "training.target_pretrain:run",
    "data_gen": "data_gen.stage:run",
    "drafter_pretrain": "training.drafter_pretrain:run",
    "train": "training.stage:run",
    "eval": "eval.stage:run",
    "export": "export.stage:run",
    "plan": "plan.stage:run",
}
assert tuple(STAGE_FUNCS) == STAGES


def stage_fn(name: str):
    if name not in STAGE_FUNCS:
        raise DraftsmithError(f"unknown stage {name!r}: choose from {', '.join(STAGE_FUNCS)}")
    module, fn = STAGE_FUNCS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_stages(cfg: Config) -> dict:
    """Run `cfg.stage` alone, or every stage of `cfg.stages` in order, in this process, holding the run
    directory's lock throughout (runtime/rundir.py). Every stage's `preflight(cfg)` (the checks that need no
    model: folders it would refuse to replace, bad settings) runs first, so a refusal costs no earlier stage."""
    from runtime.rundir import stage_session

    names = [cfg.stage] if cfg.stage else list(cfg.stages)
    fns = [stage_fn(n) for n in names]  # fail on a misspelt stage or device before any work starts
    resolve_device(cfg.run.device)
    with stage_session(cfg, ",".join(names)):
        for name in names:
            check = getattr(importlib.import_module(STAGE_FUNCS[name].split(":")[0]), "preflight", None)
            if check is not None:
                check(cfg)
        return {name: fn(cfg) for name, fn in zip(names, fns)}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg) -> None:
    try:
        cfg: Config = OmegaConf.to_object(dcfg)  # the schema checks its own ranges here (__post_init__)
        run_stages(cfg)
    except Interrupted as e:  # Ctrl-C where a stage knows how far it got (train: the step and checkpoint)
        _interrupted(str(e))
    except KeyboardInterrupt:
        _interrupted("interrupted: rerun the same command to resume (every stage resumes its committed work)")
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _interrupted(message: str) -> None:
    """Ctrl-C: one line (from rank 0: the terminal interrupts every rank) and the shell's status for SIGINT."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    sys.exit(130)


def _absorb_local_rank(argv: list[str]) -> list[str]:
    """DeepSpeed's launcher appends --local_rank=N unless given --no_local_rank; Hydra would reject it.
    Move it into the environment, where torch.distributed and our device choice read it."""
    out = []
    for i, a in enumerate(argv):
        m = re.fullmatch(r"--local[_-]rank=(\d+)", a)
        if m:
            os.environ.setdefault("LOCAL_RANK", m.group(1))
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
        elif i > 0 and argv[i - 1] in ("--local_rank", "--local-rank"):
            continue
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    sys.argv = _absorb_local_rank(sys.argv)
    bad = override_error(sys.argv[1:])  # a misspelt name or key: one line, not Hydra's report
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    main()
