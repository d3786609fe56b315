"""Atomic file writes: a kill leaves the old file or the new one, never half of one.

Every JSON file the project writes goes through `write_json`; folders are assembled under a temporary
name and swapped in whole by `replace_folder` (runtime.rundir.swap_in adds the ownership check, training's
checkpoints and data_gen's shards and dataset go through it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _tmp_of(path: Path, suffix: str = "") -> Path:
    """A sibling that no reader looks at, unique per process: `.<name>.tmp-<pid><suffix>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` into a sibling temporary file, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = _tmp_of(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """`obj` as JSON (values JSON does not know written as str) plus a final newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def save_npy(path: str | os.PathLike, array) -> None:
    """numpy.save, atomically (the temporary name keeps the .npy suffix, or numpy would add one)."""
    import numpy as np

    path = Path(path)
    tmp = _tmp_of(path, ".npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder `tmp` to `final`. An existing `final` is moved aside first and removed
    after, so a kill leaves the old folder or the new one (or the old one aside), never half of one.
    Callers check first that an existing `final` is theirs to replace (runtime.rundir.check_replaceable)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final
