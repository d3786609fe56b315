"""Objectives: what the train stage minimises, chosen by `objective=<name>` (conf/objective/<name>.yaml).

    python train.py stage=train objective=token          # the default: each family's own imitation loss
    python train.py stage=train drafter=eagle3 objective=hass
    python train.py stage=train drafter=eagle3 objective=griffin
    python train.py stage=train drafter=eagle3 objective=coral
    python train.py stage=train drafter=eagle3 objective=gto drafter.checkpoint=runs/demo/train/final

An objective is a function (drafter, signal) -> (loss, metrics). The train stage builds it once with
`build_objective(cfg, target)` and the engine calls it inside DeepSpeed's forward, so new objectives
plug in here as entries of OBJECTIVES without touching the engine:
    token      drafter.loss(signal)
    on_policy  training/on_policy.py: distillation on drafter / speculative rollouts (small drafters)
    adaspec    training/adaspec.py: distillation on the tokens a frozen reference drafter finds learnable
    hass       addons.py: top-K distillation + HASS context alignment in the unrolled steps (EAGLE families)
    griffin    addons.py: GRIFFIN's cumulative top-3 row mask + 0.5 x top-K distillation (EAGLE families)
    coral      addons.py: CORAL's cross-step alignment of the unrolled steps' hidden states (EAGLE families)
    gto        gto.py: token loss + 0.5 x the Group Tree Optimization surrogate on draft-tree rewards
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from conf.errors import DraftsmithError


def token_objective(drafter, signal):
    """Plain imitation of the target with the family's weighted `losses` (drafter.loss)."""
    return drafter.loss(signal)


# name -> "module:builder", builder(cfg, target) -> objective(drafter, signal) -> (loss, metrics); imported
# when chosen, so one objective's dependencies never slow down another's
OBJECTIVES: dict[str, str] = {
    "token": "training.objectives:_token",
    "on_policy": "training.on_policy:build_on_policy",
    "adaspec": "training.adaspec:build_adaspec",
    "hass": "training.objectives.addons:build_hass",
    "griffin": "training.objectives.addons:build_griffin",
    "gto": "training.objectives.gto:build_gto",
    "coral": "training.objectives.addons:build_coral",
}


def _token(cfg, target) -> Callable:
    return token_objective


def build_objective(cfg, target=None):
    """The objective function named by cfg.objective.name, built from the whole config."""
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise DraftsmithError(f"objective={name!r} is not implemented: choose from {', '.join(OBJECTIVES)}")
    module, builder = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), builder)(cfg, target)
