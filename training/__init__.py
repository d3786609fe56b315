"""Losses (pure functions), objectives, the DeepSpeed engine, checkpoints, logging, the demo-target recipe."""
