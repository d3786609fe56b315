"""Drafter checkpoint folders, shared by every family: model.safetensors + drafter_config.json.

drafter_config.json = {family, config (the drafter's conf dataclass), dims (derived sizes), target
(drafters.target.target_identity of the target it was trained for), family extras}. Loading checks the
family and the target before any weight is read, so a wrong folder fails with one line naming it and the fix.

Every family gets save_pretrained / from_pretrained from the `FolderCheckpoint` mixin and fills in its
hooks: what it records (dims, extras, weights), the files it writes beside (Medusa-2's LoRA adapter, the
small LM's plain Hugging Face folder), how it rebuilds an untrained module of the saved shapes, and what
it finishes after the weights loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters.layers import DrafterDims
from drafters.target import target_identity
from runtime.files import write_json

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "model.safetensors"


def check_target(saved: dict, target, folder, uses_taps: bool = False) -> None:
    """Refuse another target: one of another shape, then (by the fingerprint of tokenizer and config,
    drafters.target.target_identity) one of the same shape; and, for drafters reading the tapped features,
    other taps. A folder recorded without a fingerprint is checked on its sizes."""
    now = target_identity(target)
    for key in ("vocab_size", "hidden_size", "fingerprint"):
        if key in saved and saved[key] != now[key]:
            raise DraftsmithError(
                f"drafter {folder} was trained for target {saved['path']} ({key} {saved[key]}), but the "
                f"loaded target {now['path']} has {key} {now[key]}: load the matching target")
    taps = saved.get("feature_layers")
    if uses_taps and taps is not None and taps != now["feature_layers"]:
        raise DraftsmithError(
            f"drafter {folder} was trained on target features of layers {taps}, but the loaded target taps "
            f"{now['feature_layers']}: set target.feature_layers=[{','.join(map(str, taps))}]")


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """drafter_config.json of a drafter folder, with a clear error when it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise DraftsmithError(f"{directory} is not a drafter checkpoint (no {CONFIG_NAME}): give a folder "
                              "written by the train stage (save_pretrained)")
    return json.loads(path.read_text())


def save_folder(folder: str | os.PathLike, family: str, cfg, dims: dict, target_fp: dict,
                tensors: dict[str, torch.Tensor] | None, extra: dict | None = None) -> Path:
    """Write model.safetensors (unless tensors is None: families that save another format) and
    drafter_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        # one metadata key: safetensors keeps them in a Rust HashMap whose order changes from one process to
        # the next, so a second key would make the same tensors a different file (the family is in
        # drafter_config.json, its one home); "pt" is what transformers' loaders require
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                  str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"family": family, "config": dataclasses.asdict(cfg), "dims": dims, "target": target_fp, **(extra or {})}
    write_json(folder / CONFIG_NAME, meta)
    return folder


def check_family(meta: dict, family: str, folder) -> None:
    """The folder (its drafter_config.json read as `meta`) must hold a `family` drafter: the one check that
    eval (through read_folder) and export both make before loading anything."""
    if meta.get("family") != family:
        raise DraftsmithError(f"{folder} holds a {meta.get('family')!r} drafter, not {family!r}: "
                              f"set drafter={meta.get('family')} or point drafter.checkpoint at a {family} folder")


def read_folder(folder: str | os.PathLike, family: str, target, tensors: bool = True, uses_taps: bool = False,
                device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a folder written by save_folder, checking its family and target first."""
    from safetensors.torch import load_file

    meta = read_checkpoint_config(folder)
    check_family(meta, family, folder)
    check_target(meta["target"], target, folder, uses_taps)
    if not tensors:
        return meta, {}
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.exists():
        raise DraftsmithError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the save was interrupted")
    return meta, load_file(str(weights), device=str(device))


def saved_config(schema, meta: dict, folder):
    """The drafter config recorded in drafter_config.json, as its dataclass."""
    try:
        return schema(**meta["config"])
    except TypeError as e:
        raise DraftsmithError(f"{folder}/{CONFIG_NAME}: its config does not fit this version ({e})") from None


def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], folder) -> None:
    """load_state_dict(strict) with a one-line error naming the first missing or unexpected tensor."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected {unexpected[0]}"
        raise DraftsmithError(
            f"{folder}/{WEIGHTS_NAME} {what}: it does not match its {CONFIG_NAME}; re-save the checkpoint")


class FolderCheckpoint:
    """Mixin for TrainableDrafter families: `save_pretrained(dir)` / `from_pretrained(dir, target)`.

    Families define `family`, `self.cfg` (their conf.schema.drafter dataclass), `checkpoint_dims()` (the
    sizes recorded as "dims") and the classmethod `from_meta(cfg, target, dims, meta, folder)` that rebuilds
    an untrained module of the saved shapes; the weights then load strictly. The other hooks have defaults:
    `checkpoint_meta()` (extra JSON), `checkpoint_tensors()` (model.safetensors), `checkpoint_target()` (the
    target identity recorded), `write_files(folder)` (files beside, written before drafter_config.json, which
    marks a complete folder), `read_dims(dims)` and `loaded(target, meta, folder, **options)`."""

    family: str = ""
    weights_file: bool = True  # False: the family's own files hold the weights (the small LM's HF folder)
    _target_fp: dict  # the target identity the drafter was built or loaded with (see checkpoint_target)

    def checkpoint_dims(self) -> dict:
        raise NotImplementedError

    def checkpoint_meta(self) -> dict:
        return {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        return self.state_dict() if self.weights_file else None

    def checkpoint_target(self) -> dict:
        """target_identity recorded in the folder: by default the one the drafter was built or loaded with."""
        return self._target_fp

    def write_files(self, folder: Path) -> None:
        """Files of the family's own beside model.safetensors (none by default)."""

    @classmethod
    def read_dims(cls, dims: dict):
        """The recorded "dims" in the form from_meta takes (as recorded by default)."""
        return dims

    @classmethod
    def from_meta(cls, cfg, target, dims, meta: dict, folder=None):
        raise NotImplementedError

    def loaded(self, target, meta: dict, folder, **options):
        """Finish a module whose weights have loaded (an adapter, the serving dtype); returns the drafter."""
        return self

    def save_pretrained(self, directory: str | Path, target=None) -> Path:
        """Write the family's files, model.safetensors and drafter_config.json into `directory` (created)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.write_files(folder)
        fp = target_identity(target) if target is not None else self.checkpoint_target()
        return save_folder(folder, self.family, self.cfg, self.checkpoint_dims(), fp, self.checkpoint_tensors(),
                           extra=self.checkpoint_meta())

    @classmethod
    def from_pretrained(cls, directory: str | Path, target, **options):
        """Rebuild from a folder written by save_pretrained, checking it was trained for this target;
        `options` go to the family's `loaded` (Medusa-2: trainable=True keeps its adapter unmerged)."""
        from conf.schema.drafter import DRAFTER_SCHEMAS

        meta, state = read_folder(directory, cls.family, target, tensors=cls.weights_file,
                                  uses_taps=getattr(cls, "feature_source", None) == "features", device=target.device)
        cfg = saved_config(DRAFTER_SCHEMAS[cls.family], meta, directory)
        model = cls.from_meta(cfg, target, cls.read_dims(meta["dims"]), meta, directory)
        if cls.weights_file:
            load_tensors(model, state, directory)
        model._target_fp = meta["target"]
        return model.loaded(target, meta, directory, **options)


class HeldTargetCheckpoint(FolderCheckpoint):
    """FolderCheckpoint for the families that hold their target (`self.target`) and are shaped by a
    DrafterDims (`self.dims`): EAGLE-1/3 and Kangaroo. The target identity is read from the held target at
    save time, and the recorded dims are the DrafterDims."""

    def checkpoint_dims(self) -> dict:
        return self.dims.to_dict()

    @classmethod
    def read_dims(cls, dims: dict) -> DrafterDims:
        return DrafterDims(**dims)

    def checkpoint_target(self) -> dict:
        return target_identity(self.target)

    @classmethod
    def from_meta(cls, cfg, target, dims, meta, folder=None):
        return cls(cfg, dims, target).to(target.device)
