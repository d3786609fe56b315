"""Models: the frozen target wrapper, the losses (pure functions), one file per drafter family (plus what
EAGLE-1/3 share in eagle_base.py and what every family shares in common.py), checkpoint folders."""
