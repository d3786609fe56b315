"""Objectives, the DeepSpeed engine, checkpoints, logging, the demo-target recipe (the losses the
families train with are pure functions in drafters/losses.py)."""
