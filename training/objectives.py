"""Objectives: what the train stage minimises, chosen by `objective=<name>`.

An objective is a function (drafter, signal) -> (loss, metrics). The train stage builds it once with
`build_objective(cfg, target)` and the engine calls it inside DeepSpeed's forward. `token` (the default)
is each drafter family's own imitation loss; tree-reward (GTO) and on-policy objectives plug in here as
further entries of OBJECTIVES without touching the engine.
"""
from __future__ import annotations

from collections.abc import Callable

from conf.errors import DraftsmithError
from training import adaspec, on_policy


def token_objective(drafter, signal):
    """Plain imitation of the target with the family's weighted `losses` (drafter.loss)."""
    return drafter.loss(signal)


# name -> builder(cfg, target) -> objective(drafter, signal) -> (loss, metrics)
OBJECTIVES: dict[str, Callable] = {
    "token": lambda cfg, target: token_objective,
    "on_policy": on_policy.build_on_policy,
    "adaspec": adaspec.build_adaspec,
}


def build_objective(cfg, target=None):
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise DraftsmithError(f"objective={name!r} is not implemented: choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](cfg, target)
