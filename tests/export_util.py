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


def readme_code(folder: Path, marker: str, lang: str = "python", **values: str) -> str:
    """The first ```lang block after the line of the folder's README that contains `marker`, with the lines
    that set each of `values` (`TARGET = "..."` in Python, `TARGET=...` in bash) set to the given value: the
    commands exactly as a user runs them after filling in the two names."""
    text = (Path(folder) / "README.md").read_text()
    start = text.index(f"```{lang}\n", text.index(marker)) + len(lang) + 4
    code = text[start:text.index("```", start)]
    for name, value in values.items():
        setter = rf"^{name} = .*$" if lang == "python" else rf"^{name}=.*$"
        code, n = re.subn(setter, f"{name} = {value!r}" if lang == "python" else f"{name}={value}", code, flags=re.M)
        assert n == 1, f"{name} is not set once in the README's {lang} block after {marker!r}"
    return code
