"""Checkpoints with exact resume, written atomically.

    <run>/train/checkpoints/step_00000010/
        deepspeed/...            DeepSpeed's checkpoint: drafter weights, optimizer (ZeRO partitions per
                                 rank), LR scheduler, global step
        rng_rank<r>.pt           python / numpy / torch CPU / CUDA generator states of rank r
        trainer_state.json       step, data cursor (rows consumed -> epoch + position in the seeded
                                 permutation), token counts, and what the checkpoint is compatible with
        COMPLETE.json            the marker, written last: the size of every other file

A checkpoint is assembled in `.tmp-step_<n>/`, every file is fsync'd, the marker is written and fsync'd,
and only then is the folder renamed to `step_<n>/` (rename is atomic on POSIX). A write killed at any
point leaves a `.tmp-*` folder, which is never read and is removed by the next run.

Policy on resume (documented, tested): a `step_*` folder without a valid marker, or whose files do not
have the sizes the marker records (a truncated file), is SKIPPED with a warning naming it, and the next
older valid checkpoint is used. A checkpoint that validates but was written for a different drafter
(family or parameter shapes), different data or an incompatible ZeRO layout raises a one-line
DraftsmithError naming it and the fix.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from conf.errors import DraftsmithError
from runtime.rundir import MANIFEST, foreign_files, normalise_modes, swap_in

MARKER = MANIFEST
STATE = "trainer_state.json"
_NAME = re.compile(r"step_(\d{8})")


@dataclass
class TrainState:
    """Progress that exact resume needs besides DeepSpeed's own state."""

    step: int = 0  # optimizer steps taken
    rows: int = 0  # rows consumed from the data stream (epoch = rows // n_train, position = rows % n_train)
    loss_tokens: int = 0  # assistant tokens trained on
    input_tokens: int = 0  # all (non-padding) tokens read


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Atomic folders
# --------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path, final: Path, what: str = "checkpoint", fix: str = "use another run.name") -> Path:
    """fsync every file under `tmp`, write the marker (sizes of all files) last, then rename tmp -> final,
    replacing an existing `final` only when it is ours (runtime.rundir.swap_in; `what` and `fix` word the
    refusal)."""
    normalise_modes(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
    for p in files:
        _fsync_file(p)
    manifest = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
    marker = tmp / MARKER
    with open(marker, "w") as f:
        json.dump({"files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    swap_in(tmp, final, what, fix)
    _fsync_dir(final.parent)
    return final


def validate(path: Path) -> str | None:
    """None when `path` is a complete checkpoint folder, else the reason it is not."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (an interrupted or foreign write)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    for rel, size in files.items():
        p = Path(path) / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes, {size} were written (truncated or altered)"
    return None


# --------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Save, find, validate, load and prune `step_*` checkpoints under `root`. Every rank calls save and
    load (DeepSpeed writes per-rank optimizer partitions); rank 0 seals. Assumes `root` is on a file
    system all ranks share (the usual setup; DeepSpeed's own checkpoints assume the same)."""

    def __init__(self, root: Path | str, keep: int, env, log=print):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.env = env
        self.log = log
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # a write killed before its rename
                shutil.rmtree(stale, ignore_errors=True)
                self.log(f"removed the incomplete checkpoint write {stale}")
        self._barrier()

    def _barrier(self):
        from training.engine import barrier

        barrier(self.env)

    def checkpoints(self) -> list[Path]:
        """`step_*` folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)),
                      key=lambda p: int(_NAME.fullmatch(p.name).group(1)))

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that validates; invalid newer ones are skipped with a warning."""
        for path in reversed(self.checkpoints()):
            reason = validate(path)
            if reason is None:
                return path
            if self.env.is_main:
                self.log(f"warning: skipping checkpoint {path}: {reason}; using an older one")
        return None

    def save(self, step: int, engine, state: TrainState, meta: dict) -> Path:
        """Write checkpoint `step_<step>` atomically and keep the newest `keep`."""
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        self._barrier()
        if self.env.is_main:
            (tmp / STATE).write_text(json.dumps({"state": asdict(state), **meta}, indent=1, sort_keys=True))
            if foreign_files(final):  # a damaged (skipped) step_<n> of the same step: kept, out of the way
                aside = final.with_name(f"damaged-{name}-{int(time.time())}")
                os.rename(final, aside)
                self.log(f"warning: moved {final} aside to {aside} (not deleted): it did not validate")
            seal(tmp, final)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        valid = [p for p in self.checkpoints() if validate(p) is None]
        for old in valid[:-self.keep]:
            if foreign_files(old):  # never delete what someone else put there
                self.log(f"warning: keeping old checkpoint {old}: it holds files draftsmith did not write")
                continue
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engine, expect: dict) -> TrainState:
        """Restore engine, RNG and progress from `path` after checking it fits this run (`expect`)."""
        try:
            saved = json.loads((path / STATE).read_text())
        except (OSError, ValueError) as e:
            raise DraftsmithError(f"checkpoint {path} has an unreadable {STATE} ({e}): delete that folder to "
                                  "resume from the previous checkpoint") from None
        check_compatible(path, saved, expect)
        try:
            engine.load(path)
            rng_file = path / f"rng_rank{self.env.rank}.pt"
            rng = torch.load(rng_file if rng_file.exists() else path / "rng_rank0.pt", weights_only=False)
        except DraftsmithError:
            raise
        except Exception as e:  # torch/pickle/DeepSpeed errors on a damaged file: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DraftsmithError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first}): delete "
                                  "that folder to resume from the previous checkpoint") from None
        set_rng_state(rng)
        return TrainState(**saved["state"])


def check_compatible(path: Path, saved: dict, expect: dict) -> None:
    """Clear errors for a checkpoint this run cannot continue (other drafter, data or ZeRO layout)."""
    fix = "use another run.name, or delete the train/checkpoints folder to start over"
    if saved.get("family") != expect["family"]:
        raise DraftsmithError(f"checkpoint {path} holds a {saved.get('family')!r} drafter but this run trains "
                              f"{expect['family']!r}: {fix}")
    shapes, want = saved.get("param_shapes", {}), expect["param_shapes"]
    if shapes != want:
        diff = sorted(set(shapes) ^ set(want)) or [k for k in want if shapes.get(k) != want[k]]
        k = diff[0]
        raise DraftsmithError(
            f"checkpoint {path} does not fit this {expect['family']} drafter (parameter {k}: checkpoint "
            f"{shapes.get(k)}, run {want.get(k)}; a different target or drafter setting): {fix}")
    if saved.get("train_rows") != expect["train_rows"]:
        raise DraftsmithError(f"checkpoint {path} was trained on {saved.get('train_rows')} data rows but the "
                              f"data now has {expect['train_rows']} (data_gen output changed): {fix}")
    if expect.get("data_fingerprint") is not None and saved.get("data_fingerprint") != expect["data_fingerprint"]:
        raise DraftsmithError(f"checkpoint {path} was trained on other data rows (fingerprint "
                              f"{saved.get('data_fingerprint')}, now {expect['data_fingerprint']}: the corpus or its "
                              f"packing changed): {fix}")
    if expect["zero_stage"] > 0 and (saved.get("world_size"), saved.get("zero_stage")) != (
            expect["world_size"], expect["zero_stage"]):
        raise DraftsmithError(
            f"checkpoint {path} was written by {saved.get('world_size')} ranks under ZeRO-{saved.get('zero_stage')}"
            f"; its optimizer partitions need the same layout: resume with {saved.get('world_size')} processes "
            f"and deepspeed.zero_stage={saved.get('zero_stage')}")
