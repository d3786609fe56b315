"""Atomic file writes: a kill leaves the old file or the new one, never half of one.

Every JSON file the project writes goes through `write_json`; folders are assembled under a temporary
name and swapped in whole (runtime.rundir.swap_in, training.checkpoint.seal).
"""
from __future__ import annotations

import json
import os
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
