"""`run.device` -> torch.device, the one parser every stage uses (data_gen, train, eval, export,
target_pretrain and the bench scripts), so `cpu`, `auto`, `cuda` and `cuda:N` mean the same everywhere.

    from runtime.device import resolve_device
    resolve_device("auto")     # cuda:<LOCAL_RANK> when a GPU is present, else cpu
    resolve_device("cuda")     # cuda:<LOCAL_RANK> (torch.cuda.set_device and NCCL need an index)
    resolve_device("cuda:1")   # that GPU

Here, not in drafters/ or training/, because both import it (imports point down the layers); torch is
imported lazily so that composing a config stays free of it.
"""
from __future__ import annotations

import os
import re

from conf.errors import DraftsmithError

FORMS = "auto, cpu, cuda or cuda:N"


def parse_device(name: str) -> tuple[str, int | None]:
    """('auto' | 'cpu' | 'cuda', index or None) of a device string; a clear error for anything else."""
    text = str(name).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    m = re.fullmatch(r"cuda:(\d+)", text)
    if m:
        return "cuda", int(m.group(1))
    hint = " (torch calls the GPU cuda)" if text in ("gpu", "nvidia") or text.startswith("gpu:") else ""
    raise DraftsmithError(f"run.device={name!r} is not a device{hint}: use {FORMS}")


def resolve_device(name: str = "auto", gpus: int | None = None):
    """The torch.device for `name`, always with an index on CUDA. `gpus` = visible GPUs (default: what
    torch sees; tests pass it). A bare `cuda` (and `auto` on a GPU machine) is this process's GPU,
    cuda:<LOCAL_RANK>, which is what torchrun and the deepspeed launcher expect."""
    import torch

    if not isinstance(name, str):  # already a torch.device
        name = str(name)
    kind, index = parse_device(name)
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        kind = "cuda" if gpus else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not gpus:
        raise DraftsmithError(f"run.device={name} but torch sees no CUDA GPU (torch {torch.__version__}): "
                              "use run.device=cpu, or install a CUDA build of torch on a GPU machine")
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", 0) or 0)
    if index >= gpus:
        raise DraftsmithError(f"run.device={name}: GPU {index} does not exist, torch sees {gpus} "
                              f"(cuda:0..cuda:{gpus - 1}); pick one of those, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)
