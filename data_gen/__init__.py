"""Prompt sources, chat templating and loss masks, regeneration by the target, caches, vocab statistics."""
