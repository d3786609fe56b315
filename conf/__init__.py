"""Typed configuration: one dataclass per Hydra group, assembled in `conf.schema`.

This package is a leaf: it imports nothing from the rest of draftsmith, so every stage can read its
settings from here without import cycles. YAML options for each group live beside it (conf/<group>/).
"""
