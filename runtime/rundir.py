"""What the project may do to files: one lock per run directory, which folders it may replace, how a
folder is swapped in atomically, and the mode of the files it writes.

    with stage_session(cfg, "train"):         # every stage: the run directory's lock + torch threads
        ...
    check_replaceable(final, "train/final", "use another run.name")   # before any work
    swap_in(tmp, final)                       # tmp -> final, replacing an earlier one of ours

Lock: `<run dir>/.lock`, held with flock(2) by global rank 0 for as long as a stage runs. The kernel drops a
flock when its holder exits however it exits (SIGKILL included), so a lock left behind by a killed run
never blocks the rerun that resumes it; the file only says who held it last (pid, host, stage, start).
Taking it again in the same process (train.py's stage list, then each stage) is a no-op.

Ownership: a folder is the project's to replace when it is empty, or carries one of its marks: a
COMPLETE.json manifest (checkpoints, train/final) whose file list covers every file in the folder, a
README.md opening with "# draftsmith" (export folders, which carry no manifest because their consumers
read them as they are), or a metrics.json of one of its stages (target_pretrain folders). Anything else
is refused with one line naming a file.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from conf.errors import DraftsmithError
from runtime.distributed import is_main_rank
from runtime.files import replace_folder

_hook_counts: Counter = Counter()


def kill_hook(point: str) -> None:
    """DRAFTSMITH_TEST_KILL_AT=<point>:<n> SIGKILLs this process the n-th time it reaches <point>: the crash
    tests of interrupted work (data_gen's shards, the train stage's checkpoints) stop it at a known place.
    DRAFTSMITH_TEST_KILL_SIGNAL=SIGINT sends Ctrl-C's signal instead (the interrupt tests)."""
    name, _, n = os.environ.get("DRAFTSMITH_TEST_KILL_AT", "").rpartition(":")
    if name == point:
        _hook_counts[point] += 1
        if _hook_counts[point] == int(n):
            os.kill(os.getpid(), getattr(signal, os.environ.get("DRAFTSMITH_TEST_KILL_SIGNAL", "SIGKILL")))


LOCK_NAME = ".lock"
MANIFEST = "COMPLETE.json"  # written last into a sealed folder: {"files": {relative path: size}}
README_MARK = "# draftsmith"  # first line of the README of every export folder
METRICS = "metrics.json"  # {"stage": <stage>, ...} of a target_pretrain folder

MAX_DEFAULT_THREADS = 8
_held: dict[str, list] = {}  # real path of a lock file -> [fd, depth], locks this process holds


# --------------------------------------------------------------------------------------------------
# The run-directory lock
# --------------------------------------------------------------------------------------------------
def writable_dir(folder: Path, what: str = "run directory",
                 fix: str = "fix its permissions, or choose another run.root / run.name") -> Path:
    """Create `folder` (and parents) and prove a file can be written there (up front, not after the work),
    or stop with one line saying it cannot, and `fix`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DraftsmithError(f"{what} {folder} is not writable ({e.strerror or e}): {fix}") from None
    return folder


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"stage {info.get('stage', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {info.get('started', '?')})")


@contextmanager
def run_lock(folder: Path | str, stage: str):
    """Hold the exclusive lock of run directory `folder` (see the module docstring). Other ranks of a
    multi-process run share rank 0's lock and take none."""
    import fcntl

    folder = Path(folder)
    if not is_main_rank():
        yield
        return
    writable_dir(folder)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DraftsmithError(f"run directory {folder} is not writable ({e.strerror or e}): fix its permissions, "
                              "or choose another run.root / run.name") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise DraftsmithError(f"run directory {folder} is in use by {_holder(path)}: wait for it to finish, or "
                              "use another run.name") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the flock; the file stays (deleting it would race with a waiting process)


def default_threads() -> int:
    """run.threads=null: torch's own default (the physical cores, or OMP_NUM_THREADS, which torchrun sets to 1
    per rank), at most 8: past that the small matmuls of drafters and CPU targets stop scaling and the extra
    OpenMP threads only spin-wait, flooding a shared machine."""
    import torch

    return max(1, min(torch.get_num_threads(), MAX_DEFAULT_THREADS))


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch CPU threads (None: default_threads()), restoring the previous count."""
    import torch

    before = torch.get_num_threads()
    if n is not None and n < 1:
        raise DraftsmithError(f"run.threads={n}: give a positive number of CPU threads, or null for the default")
    torch.set_num_threads(n or default_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def stage_session(cfg, stage: str, threads: int | None = None):
    """What every stage runs inside: the lock of its run directory and run.threads (or `threads`)."""
    from conf.schema import run_dir

    with torch_threads(threads or cfg.run.threads), run_lock(run_dir(cfg), stage):
        yield


# --------------------------------------------------------------------------------------------------
# Which folders the project may replace
# --------------------------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def foreign_files(folder: Path | str) -> list[str]:
    """Files under `folder` the project did not write ([] when it is missing, empty or wholly ours)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return []
    if not folder.is_dir() or folder.is_symlink():
        return [folder.name]
    files = _files(folder)
    if not files:
        return []
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = set(json.loads(manifest.read_text())["files"]) | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
        return [f for f in files if f not in listed]
    readme = folder / "README.md"
    if readme.is_file() and readme.read_text(errors="replace").startswith(README_MARK):
        return []
    metrics = folder / METRICS
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("stage") == "target_pretrain":
                return []
        except (OSError, ValueError, AttributeError):
            pass
    return files


def check_replaceable(folder: Path | str, what: str, fix: str) -> None:
    """One line when `folder` exists and holds files the project did not write (see foreign_files)."""
    bad = foreign_files(folder)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DraftsmithError(f"{what} {folder} holds files draftsmith did not write ({', '.join(bad[:3])}{more}), "
                              f"so it will not replace it: move them away, or {fix}")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalise_modes(folder: Path | str) -> None:
    """Give every file under `folder` the mode a plain open() gives (0644 under the usual umask). Some
    writers create private 0600 files: safetensors' save_file writes through a tempfile.NamedTempFile and
    renames it into place."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) != mode:
            os.chmod(p, mode)


def swap_in(tmp: Path, final: Path, what: str, fix: str) -> Path:
    """Rename the finished folder `tmp` to `final`. An existing `final` must be ours (check_replaceable);
    it is moved aside first and removed after, so a crash never leaves half a folder."""
    check_replaceable(final, what, fix)
    return replace_folder(tmp, final)


# --------------------------------------------------------------------------------------------------
# Hydra
# --------------------------------------------------------------------------------------------------
try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    Callback = object


class RunDirCheck(Callback):
    """conf/config.yaml registers this: before Hydra creates its output folder inside the run directory, a
    run directory that cannot be written stops with one `error:` line (Hydra would print a PermissionError
    traceback)."""

    def on_run_start(self, config, **kwargs) -> None:
        import sys

        try:
            writable_dir(Path(str(config.run.root)) / str(config.run.name))
        except DraftsmithError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes Hydra's exception report untouched
