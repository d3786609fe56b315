"""Drafters defined by a function of the path (for exact tree-builder tests) and hand-computed worlds."""
from __future__ import annotations

import math

import torch

from drafters.base import Drafter


class PathDrafter(Drafter):
    """Logits = fn(b, path tokens from the root); records every frontier it was asked to expand."""

    def __init__(self, vocab_size, fn):
        self.vocab_size, self.fn, self.calls = vocab_size, fn, []

    def start(self, input_ids, features):
        pass

    def commit(self, new_ids, new_features):
        pass

    def expand(self, tree, frontier):
        anc = tree.ancestor_mask() if tree.num_nodes else None
        B, F = frontier.shape
        out = torch.empty(B, F, self.vocab_size)
        paths = []
        for b in range(B):
            row = []
            for f, node in enumerate(frontier[b].tolist()):
                path = tuple(tree.tokens[b][anc[b, node]].tolist()) if node >= 0 else ()
                out[b, f] = torch.as_tensor(self.fn(b, path), dtype=torch.float)
                row.append(path)
            paths.append(row)
        self.calls.append(paths)
        return out


def log_dist(V, spec, rest_tokens=None):
    """Log-probabilities with the given {token: prob}; the remaining mass spread evenly on the others."""
    others = [v for v in range(V) if v not in spec]
    rest = (1 - sum(spec.values())) / len(others)
    return [math.log(spec.get(v, rest)) for v in range(V)]


def shifted(V, offset=0):
    """Best token = last + 1 + offset, then last + 2 + offset, ... (strictly decreasing logits)."""
    def fn(b, path):
        last = (path[-1] if path else 0) + offset * b
        return [-float((v - last - 1) % V) for v in range(V)]
    return fn


def dynamic_world():
    """Hand-computed EAGLE-2 example over V = 12: tokens a..j = 1..10."""
    V = 12
    table = {(): {1: .6, 2: .3}, (1,): {3: .55, 4: .35}, (2,): {5: .8, 6: .1},
             (1, 3): {7: .9, 8: .05}, (2, 5): {9: .6, 10: .3}}

    def fn(b, path):
        return log_dist(V, table.get(path, {}))
    return V, fn
