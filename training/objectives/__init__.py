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

from collections.abc import Callable

from conf.errors import DraftsmithError


def token_objective(drafter, signal):
    """Plain imitation of the target with the family's weighted `losses` (drafter.loss)."""
    return drafter.loss(signal)


def _on_policy(cfg, target):
    from training.on_policy import build_on_policy

    return build_on_policy(cfg, target)


def _adaspec(cfg, target):
    from training.adaspec import build_adaspec

    return build_adaspec(cfg, target)


def _hass(cfg, target):
    from training.objectives.addons import build_hass

    return build_hass(cfg, target)


def _griffin(cfg, target):
    from training.objectives.addons import build_griffin

    return build_griffin(cfg, target)


def _coral(cfg, target):
    from training.objectives.addons import build_coral

    return build_coral(cfg, target)


def _gto(cfg, target):
    from training.objectives.gto import build_gto

    return build_gto(cfg, target)


# name -> builder(cfg, target) -> objective(drafter, signal) -> (loss, metrics)
OBJECTIVES: dict[str, Callable] = {
    "token": lambda cfg, target: token_objective,
    "on_policy": _on_policy,
    "adaspec": _adaspec,
    "hass": _hass,
    "griffin": _griffin,
    "gto": _gto,
    "coral": _coral,
}


def build_objective(cfg, target=None):
    """The objective function named by cfg.objective.name, built from the whole config."""
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise DraftsmithError(f"objective={name!r} is not implemented: choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](cfg, target)
