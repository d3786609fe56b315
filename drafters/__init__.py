"""Models: the frozen target wrapper, one file per drafter family, draft trees, export formats."""
