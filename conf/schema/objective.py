"""`objective=` group: what the train stage optimises beyond each drafter's own token losses."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class ObjectiveConfig:
    name: str = MISSING


@dataclass
class TokenObjectiveConfig(ObjectiveConfig):
    """Plain imitation of the target's tokens/distributions with the drafter's `losses`."""

    name: str = "token"


OBJECTIVE_SCHEMAS = {"token": TokenObjectiveConfig}
