"""Helpers shared by the export tests (not a test module)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

# an absolute POSIX path: a '/' that starts a token (after space, quote, backtick, bracket, '=' or line start)
# and is followed by at least one path component
_ABS = re.compile(r"""(?:^|[\s`'"(=\[])(/[A-Za-z0-9_.~-]+)""", re.M)


def absolute_paths(text: str) -> list[str]:
    return _ABS.findall(text)


def assert_portable_readme(folder: Path, *machine_paths) -> str:
    """The folder's README names no absolute path (in particular none of `machine_paths`, e.g. the folder
    itself and the target): it is shared and moved. Returns its text."""
    text = (Path(folder) / "README.md").read_text()
    assert absolute_paths(text) == [], absolute_paths(text)
    for p in (folder, *machine_paths):
        assert str(Path(p).resolve()) not in text and str(p) not in text
    return text


def noisy(model, seed=0):
    """Perturb every trainable parameter: fresh ResBlocks are all-zero, fresh heads and norms equal, which
    would hide a mis-mapped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
