"""Drafter families by name (the `name` in conf/drafter/<option>.yaml) -> "module:Class".

Trainable families implement drafters.base.TrainableDrafter; reference drafters (ngram, target)
only implement drafters.base.Drafter and need no training. Imported lazily so one family's
dependencies never slow down another's.
"""
from __future__ import annotations

import importlib

from conf.errors import DraftsmithError

TRAINABLE = {
    "eagle1": "drafters.eagle1:Eagle1Drafter",
    "eagle3": "drafters.eagle3:Eagle3Drafter",
    "medusa": "drafters.medusa:MedusaDrafter",
    "hydra": "drafters.hydra_heads:HydraDrafter",
    "small": "drafters.small_lm:SmallDrafter",
    "kangaroo": "drafters.kangaroo:KangarooDrafter",
    "pard": "drafters.pard:PardDrafter",
    "dflash": "drafters.dflash:DFlashDrafter",
}
REFERENCE = {
    "ngram": "drafters.reference:NgramDrafter",
    "target": "drafters.reference:TargetDrafter",
    "oracle": "drafters.reference:OracleDrafter",
}


def drafter_class(name: str):
    spec = TRAINABLE.get(name) or REFERENCE.get(name)
    if spec is None:
        raise DraftsmithError(f"unknown drafter {name!r}: choose from {', '.join([*TRAINABLE, *REFERENCE])}")
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)
