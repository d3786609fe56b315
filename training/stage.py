"""The train stage: load the target and data_gen's output, build the drafter, train it under DeepSpeed,
checkpoint (exact resume), evaluate on a held-out slice, write the final drafter folder.

    python train.py stage=train experiment=smoke                    # seconds on CPU, after stage=data_gen
    python train.py stage=train drafter=medusa train.max_steps=500
    deepspeed --num_gpus 8 --no_local_rank train.py stage=train drafter=eagle3 deepspeed=zero2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 train.py stage=train run.device=cpu deepspeed=zero2

Rerunning the same command after a crash or a kill resumes from the newest valid checkpoint in
<run>/train/checkpoints/ and ends with the same weights an uninterrupted run would have.

Outputs (<run>/train/): config.yaml, ds_config.json (what DeepSpeed was given), checkpoints/step_*,
final/ (the drafter's save_pretrained folder), metrics.jsonl, curves.png, tensorboard/, wandb/.

Gradient accumulation is token-weighted: every micro-batch's mean loss is weighted by its share of the
loss tokens of the whole optimizer step (all micro-batches, all ranks), so the gradient is the mean over
every loss token of the global batch however it is split into micro-batches and processes
(batch 8 x accumulation 1 == batch 1 x accumulation 8 == 2 ranks x batch 4). This is exact when a
drafter's loss is a mean over loss_mask positions, which is what the families compute.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from conf.errors import DraftsmithError, Interrupted
from conf.schema import Config, final_drafter_dir, project_path, run_dir, save_config
from runtime.files import write_json
from runtime.rundir import check_replaceable, kill_hook, stage_session
from training.checkpoint import CheckpointManager, TrainState, seal
from training.data import DataPlan, collate, load_data_gen, require_data_gen
from training.engine import (
    Engine,
    all_reduce_sum,
    barrier,
    build_ds_config,
    setup_distributed,
    write_ds_config,
)
from training.objectives import build_objective
from training.signal import make_signal
from training.tracking import Tracker, tau_sim

FINAL_FIX = "use another run.name"


@dataclasses.dataclass(frozen=True)
class Phase:
    """What one run of the training loop reads and where it writes. The train stage's phase reads data_gen's
    rows into <run>/train; FastDraft's drafter_pretrain (training/drafter_pretrain.py) reads packed plain
    text into <run>/drafter_pretrain. The loop itself (DeepSpeed, token-weighted accumulation, checkpoints
    and exact resume, the sealed final folder) is the same for both."""

    name: str  # the stage: names its folder in messages (`<name>/final`)
    out: Path  # checkpoints/, config.yaml, ds_config.json, metrics.jsonl, final/
    load_data: Callable  # target -> training.data.DataGenOutput (rows of input_ids and loss_mask)
    run_target: bool = True  # False: no frozen target forward per batch (a loss on the data tokens alone)

    @property
    def final(self) -> Path:
        return self.out / "final"


def run(cfg: Config) -> dict:
    """`stage=train`: see the module docstring."""
    return train(cfg)


def build_drafter(cfg: Config, target, token_counts):
    """The family named by cfg.drafter.name, built from the loaded target (drafters.registry)."""
    from drafters.registry import TRAINABLE, drafter_class

    name = cfg.drafter.name
    if name not in TRAINABLE:
        raise DraftsmithError(f"drafter={name} has nothing to train: run stage=eval with it directly, or train one "
                              f"of {', '.join(TRAINABLE)}")
    try:
        cls = drafter_class(name)
    except ModuleNotFoundError as e:
        raise DraftsmithError(f"drafter family {name!r} is not installed in this checkout ({e.name} is missing): "
                              f"pick another drafter=") from None
    drafter = cls.from_target(cfg.drafter, target, token_counts=token_counts)
    if hasattr(drafter, "set_attention"):  # the EAGLE families: train.attention, resolved for the target's device
        drafter.set_attention(cfg.train.attention, target.device)
    # fine-tuning (objective=gto): start from a trained drafter folder's weights, unless train.init_from names one
    if cfg.drafter.checkpoint and not cfg.train.init_from:
        init_from_checkpoint(drafter, cls, cfg.drafter.checkpoint, target)
    return drafter


def init_from_checkpoint(drafter, cls, path: str, target, setting: str = "drafter.checkpoint") -> None:
    """Load a saved drafter folder's weights (buffers included) into `drafter`, built from the current
    config, so the config's training settings (losses, unrolled steps) apply to the trained weights."""
    trained = cls.from_pretrained(project_path(path), target)
    try:
        drafter.load_state_dict(trained.state_dict(), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise DraftsmithError(f"{setting}={path} does not fit drafter={drafter.family} as configured "
                              f"({detail}): set the drafter options (e.g. draft_vocab_size) the checkpoint was "
                              "trained with") from None


def init_from_phase(drafter, path: str, target) -> None:
    """train.init_from: start from another phase's (or run's) final drafter folder."""
    if not Path(project_path(path)).is_dir():
        raise DraftsmithError(f"train.init_from={path} is not a drafter folder: run the phase that writes it first "
                              "(experiment=fastdraft: stage=drafter_pretrain), or point it at a train/final folder")
    init_from_checkpoint(drafter, type(drafter), path, target, "train.init_from")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checks(cfg: Config) -> None:
    """Checks that need no model, run before anything is written."""
    cfg.train.check()
    check_draft_vocab(cfg)
    check_replaceable(final_drafter_dir(cfg), "train/final", FINAL_FIX)


def check_draft_vocab(cfg: Config) -> None:
    """drafter.draft_vocab is a draft-time trim (drafters/vocab_trim.py: eval and export); training always trains
    the full head. A command whose stages use it later keeps it; a train-only one would silently ignore it."""
    stages = [cfg.stage] if cfg.stage else list(cfg.stages)
    k = getattr(cfg.drafter, "draft_vocab", None)
    if k is not None and not {"eval", "export"} & set(stages):
        raise DraftsmithError(f"drafter.draft_vocab={k} trims the draft LM head when the drafter decodes (stage=eval, "
                              "stage=export); training always trains the full head, and this command runs no eval or "
                              "export: drop drafter.draft_vocab here and set it on the eval or export command")


def preflight(cfg: Config) -> None:
    """train.py runs this for every listed stage before the first starts: the checks above, then the memory
    plan (plan/stage.py) for this machine and world size, printed; a run the plan says cannot fit is refused
    with one line naming the smallest change that fits (train.force=true starts it anyway)."""
    checks(cfg)
    if target_made_in_this_run(cfg):  # no config.json to plan from yet: train() plans once target_pretrain ran
        print(f"plan: deferred until the train stage starts ({cfg.target.path} is made by target_pretrain first)")
    else:
        check_memory_plan(cfg)


def target_made_in_this_run(cfg: Config) -> bool:
    """Whether this command's chain makes its own target before training (experiment=gpu_demo): target_pretrain
    is listed and writes the folder target.path names."""
    from training.target_pretrain import pretrain_out_dir

    names = [cfg.stage] if cfg.stage else list(cfg.stages)
    return "target_pretrain" in names and \
        Path(project_path(cfg.target.path)).resolve() == pretrain_out_dir(cfg).resolve()


def check_memory_plan(cfg: Config) -> dict:
    from plan.stage import build_plan, refusal, render
    from runtime.distributed import launcher_ranks

    rank, world, _ = launcher_ranks()
    planned = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, gpus=world, gpu="auto"))
    p = build_plan(planned, sample=False)
    reason = refusal(p)
    if rank == 0:
        print(render(p), flush=True)
        if reason and cfg.train.force:
            print(f"warning: {reason.split(': set ')[0]}; starting anyway (train.force=true)", flush=True)
    if reason and not cfg.train.force:
        raise DraftsmithError(reason)
    return p


def train(cfg: Config, drafter_factory=None, target=None) -> dict:
    """Train and return a summary dict. `drafter_factory(cfg, target, token_counts)` replaces the
    registry lookup (tests use it for a tiny drafter); `target` skips loading one."""
    checks(cfg)
    if target_made_in_this_run(cfg):
        check_memory_plan(cfg)  # the preflight deferred it: the target's folder exists now
    with stage_session(cfg, "train"):
        data_dir = require_data_gen(run_dir(cfg) / "data_gen")
        phase = Phase("train", final_drafter_dir(cfg).parent,
                      lambda tgt: load_data_gen(data_dir, tgt, need_cache=cfg.train.mode == "offline"))
        return train_phase(cfg, phase, drafter_factory, target)


def train_phase(cfg: Config, phase: Phase, drafter_factory=None, target=None) -> dict:
    """The training loop of one phase (see Phase); the caller holds the stage session and ran its checks."""
    from drafters.target import load_target

    t = cfg.train
    env = setup_distributed(cfg.run.device)
    out = phase.out
    seed_all(cfg.run.seed)
    target = target if target is not None else load_target(cfg.target, device=env.device)
    data = phase.load_data(target)
    plan = DataPlan(len(data.dataset), t.eval_rows, cfg.run.seed, t.micro_batch_size, t.grad_accum,
                    env.world_size, env.rank)
    total = plan.total_steps(t.epochs, t.max_steps)
    if plan.note and env.is_main:
        print(plan.note)

    seed_all(cfg.run.seed)  # the drafter's initial weights depend on the seed only
    drafter = (drafter_factory or build_drafter)(cfg, target, data.token_counts)
    if t.init_from:  # a previous phase's drafter (experiment=fastdraft: <run>/drafter_pretrain/final)
        init_from_phase(drafter, t.init_from, target)
    drafter.set_gradient_checkpointing(t.gradient_checkpointing)
    if hasattr(drafter, "check_train_mode"):
        drafter.check_train_mode(t.mode)  # Medusa-2 trains the target itself: online only
    # Families whose loss runs the target (Medusa-2), or needs none of it (PARD on data tokens), and phases that
    # train on plain text (the FastDraft pre-training) get a signal without the frozen forward.
    signal_args = {"run_target": phase.run_target and not getattr(drafter, "runs_target", False)
                   and getattr(drafter, "needs_target", True)}
    ds_cfg = build_ds_config(cfg, env.world_size, env.device)
    meta = {"family": drafter.family or type(drafter).__name__, "drafter_class": type(drafter).__qualname__,
            "param_shapes": {n: list(p.shape) for n, p in drafter.named_parameters()},
            "train_rows": plan.n_train, "world_size": env.world_size,
            "zero_stage": cfg.deepspeed.zero_stage, "seed": cfg.run.seed, "global_batch": plan.global_batch,
            "data_fingerprint": data.meta.get("fingerprint")}
    objective = build_objective(cfg, target)
    eng = Engine(drafter, objective, cfg, ds_cfg, total, env)
    # An objective that trains on its own rollouts (on_policy) swaps data micro-batches for sequences the
    # drafter generates: `prepare(engine, batches, step)` runs between optimizer steps (latest weights),
    # before the loss-token counts, so token weighting covers the generated positions.
    prepare = getattr(objective, "prepare", None)
    seed_all(cfg.run.seed + env.rank)  # training-time randomness (feature noise, dropout) differs per rank

    log = print if env.is_main else (lambda *_: None)
    ckpts = CheckpointManager(out / "checkpoints", t.keep_checkpoints, env, log=log)
    state, resumed = TrainState(), ckpts.latest_valid()
    if resumed is not None:
        state = ckpts.load(resumed, eng, expect=meta)
        if state.step > total:
            raise DraftsmithError(f"checkpoint {resumed} is at step {state.step}, beyond this run's {total} steps: "
                                  "raise train.max_steps (or train.epochs), or use another run.name")
        epoch, pos = plan.cursor(state.rows)
        log(f"resumed from {resumed} (step {state.step}/{total}, epoch {epoch}, position {pos})")
    last_ckpt = resumed
    if env.is_main:  # only now: a rerun refused above (other target, data or drafter) leaves them as they were
        save_config(cfg, out)
        write_ds_config(ds_cfg, out / "ds_config.json")

    tracker = Tracker(cfg, out, env.is_main, total, state.step)
    pad_id = target.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (target.tokenizer.eos_token_id or 0)
    batch_args = dict(pad_id=pad_id, max_length=t.max_length, with_cache=t.mode == "offline", dtype=target.dtype)
    start_step, start_tokens, t0 = state.step, state.input_tokens, time.perf_counter()
    last, evals = {}, {}
    # seconds in training steps, in held-out evaluation and in checkpoint writes: tokens/s of the steps
    # alone is the figure that compares runs; the wall-clock one also pays for eval and checkpoint cadence
    spent = {"step": 0.0, "eval": 0.0, "checkpoint": 0.0}
    eng.train(True)
    try:
        while state.step < total:
            t_step = time.perf_counter()
            batches = [collate(data, rows, **batch_args) for rows in plan.micro_batches(state.rows)]
            if prepare is not None:
                batches = prepare(eng, batches, state.step)
            lr = eng.lr
            metrics, n_loss, n_input, finite = train_step(eng, target, batches, t.mode, env, plan,
                                                           **signal_args)
            if not finite:
                where = f"{last_ckpt}" if last_ckpt else "none (no checkpoint was written yet)"
                raise DraftsmithError(
                    f"loss is {metrics['loss']} at step {state.step + 1}: training stopped before the update; the "
                    f"last good checkpoint is {where}; lower train.lr, raise train.warmup_steps or check the data")
            state = dataclasses.replace(state, step=state.step + 1, rows=state.rows + plan.global_batch,
                                        loss_tokens=state.loss_tokens + n_loss, input_tokens=state.input_tokens + n_input)
            last = metrics
            step_s = time.perf_counter() - t_step
            spent["step"] += step_s
            tracker.step(state.step, metrics["loss"], n_input, step_s)
            if state.step % max(1, t.log_every) == 0 or state.step == total:
                tracker.log(state.step, {**metrics, "lr": lr, "epoch": state.rows / plan.n_train,
                                         **throughput(state.input_tokens - start_tokens, spent, t0)})
            if len(plan.eval_idx) and ((t.eval_every > 0 and state.step % t.eval_every == 0) or state.step == total):
                t_eval = time.perf_counter()
                evals = evaluate(eng, target, data, plan, t.mode, batch_args, **signal_args)
                spent["eval"] += time.perf_counter() - t_eval
                tracker.log(state.step, evals, kind="eval")
            if (t.save_every > 0 and state.step % t.save_every == 0) or state.step == total:
                t_save = time.perf_counter()
                last_ckpt = ckpts.save(state.step, eng, state, {**meta, "cursor": plan.cursor(state.rows)})
                kill_hook("checkpoint_saved")  # tests: DRAFTSMITH_TEST_KILL_AT=checkpoint_saved:<n> (a SIGKILL)
                spent["checkpoint"] += time.perf_counter() - t_save
        if resumed is not None and start_step == total and len(plan.eval_idx):
            evals = evaluate(eng, target, data, plan, t.mode, batch_args, **signal_args)  # nothing left to train: report anyway
        final = write_final(eng, drafter, phase.final, env, cfg, f"{phase.name}/final")
    except KeyboardInterrupt:  # Ctrl-C: say where it stopped and that the rerun resumes, not a traceback
        where = f"from {last_ckpt}" if last_ckpt else "from the start: no checkpoint was written yet"
        raise Interrupted(f"interrupted at step {state.step} of {total}: rerun the same command to resume "
                          f"({where})") from None
    finally:
        plot = tracker.close()
    epoch, pos = plan.cursor(state.rows)
    return {"steps": state.step, "total_steps": total, "steps_this_run": state.step - start_step,
            "resumed_from": str(resumed) if resumed else None, "loss_tokens": state.loss_tokens,
            "input_tokens": state.input_tokens, **throughput(state.input_tokens - start_tokens, spent, t0),
            "final_loss": last.get("loss"), "train_metrics": last, "eval": evals,
            "cursor": {"epoch": epoch, "position": pos}, "final_dir": str(final),
            "checkpoint": str(last_ckpt) if last_ckpt else None, "ds_config": str(out / "ds_config.json"),
            "metrics": str(out / "metrics.jsonl"), "plot": str(plot) if plot else None, "train_dir": str(out)}


def throughput(tokens: int, spent: dict, t0: float) -> dict:
    """Input tokens per second of the training steps alone (step_tokens_per_s) and of the wall clock since
    t0 (tokens_per_s, which includes eval and checkpoint time), and the seconds spent in each."""
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall if wall > 0 else None,
            "step_tokens_per_s": tokens / spent["step"] if spent["step"] > 0 else None,
            **{f"{k}_seconds": round(v, 3) for k, v in spent.items()}}


def train_step(eng: Engine, target, batches, mode, env, plan, run_target: bool = True
                ) -> tuple[dict, int, int, bool]:
    """One optimizer step over this rank's micro-batches; returns the global metrics (token-weighted
    means), loss tokens, input tokens, and whether every rank's loss was finite. The update is NOT
    applied when one was not (every rank still runs the same collectives, so none hangs)."""
    counts = torch.tensor([sum(int(b["loss_mask"].sum()) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64)
    n_loss, n_input = (int(v) for v in all_reduce_sum(counts, env).tolist())
    scale = plan.accum * plan.world  # DeepSpeed divides by accum and averages over ranks; undo both
    sums: dict[str, float] = defaultdict(float)
    bad = 0.0
    for i, batch in enumerate(batches):
        signal = make_signal(mode, target, batch, run_target)
        loss, metrics = eng.forward(signal)
        w = float(batch["loss_mask"].sum()) / max(n_loss, 1)
        bad += float(not torch.isfinite(loss.detach()).item())
        sums["loss"] += float(loss.detach()) * w
        for k, v in metrics.items():
            sums[k] += float(v) * w
        eng.backward(loss * (w * scale))
        if i < len(batches) - 1:
            eng.step()  # inside the accumulation window: DeepSpeed only counts the micro-step
    keys = sorted(sums)  # every rank's drafter reports the same metric names
    reduced = all_reduce_sum(torch.tensor([bad] + [sums[k] for k in keys], dtype=torch.float64), env).tolist()
    out = dict(zip(keys, reduced[1:]))
    if reduced[0] > 0:
        return out, n_loss, n_input, False  # the caller stops before the optimizer step
    eng.step()  # the boundary: clip, AdamW, LR schedule
    return out, n_loss, n_input, True


@torch.no_grad()
def evaluate(eng: Engine, target, data, plan: DataPlan, mode: str, batch_args: dict,
             run_target: bool = True) -> dict:
    """Held-out loss and per-depth accuracy (token-weighted over the slice) and tau_sim from them."""
    eng.train(False)
    sums: dict[str, float] = defaultdict(float)
    n_total = 0
    for rows in plan.eval_batches():
        batch = collate(data, rows, **batch_args)
        n = int(batch["loss_mask"].sum())
        loss, metrics = eng.forward(make_signal(mode, target, batch, run_target))
        sums["loss"] += float(loss) * n
        for k, v in metrics.items():
            sums[k] += float(v) * n
        n_total += n
    eng.train(True)
    out = {k: v / max(n_total, 1) for k, v in sums.items()}
    accs = {k: v for k, v in out.items() if k.startswith("acc/")}
    if accs:
        out["tau_sim"] = tau_sim(accs)
    out["rows"], out["loss_tokens"] = len(plan.eval_idx), n_total
    return out


def write_final(eng: Engine, drafter, final: Path, env, cfg: Config, what: str = "train/final") -> Path:
    """The trained drafter as a folder: the family's save_pretrained (from_pretrained reloads it), else
    model.safetensors + drafter_config.json. Written atomically like a checkpoint."""
    tmp = final.with_name(f".tmp-{final.name}")
    with eng.full_state_context():
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if hasattr(drafter, "save_pretrained"):
                drafter.save_pretrained(tmp)
            else:
                from safetensors.torch import save_model

                save_model(drafter, str(tmp / "model.safetensors"))
                write_json(tmp / "drafter_config.json",
                           {"family": drafter.family, "config": dataclasses.asdict(cfg.drafter)}, indent=1)
            seal(tmp, final, what, FINAL_FIX)
    barrier(env)
    return final
