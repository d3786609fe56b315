"""Graph regions: the parts of a decode cycle that run as one fixed-shape device program, replayed as a CUDA
graph on a GPU and run eagerly elsewhere, and the marks that let decoding/counting.py count what runs
outside them.

    from decoding.regions import GraphRegion
    draft = GraphRegion("draft", graphs=device.type == "cuda")
    out = draft(fn)        # fn() -> tensors; on CUDA: `warm` eager calls, then captured once and replayed

A region's function must be a fixed-shape program: no host syncs, no shapes that depend on device values,
inputs read from (and state written to) tensors that stay the same objects from call to call. Python code
inside it runs only while capturing: host-side effects it has (a counter, an attribute rebound to a new
tensor) happen once, so a region's caller keeps host bookkeeping outside it. `host_effects` lists
(object, attribute) integer counters the function bumps; the region re-applies their change on every
replay (the drafters' `forwards` counts).

Nothing here synchronises with the device.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

# What the counting harness reads: the names of the regions being run (innermost last), and whether the
# decoder is inside its per-cycle loop.
ACTIVE: list[str] = []
LOOP: list[bool] = []


@contextmanager
def captured(name: str):
    """Mark the ops run inside as belonging to graph region `name` (what the decoder captures on CUDA)."""
    ACTIVE.append(name)
    try:
        yield
    finally:
        ACTIVE.pop()


@contextmanager
def decode_loop():
    """Mark the decoder's per-cycle loop (the prefill and the drafter's start stay outside)."""
    LOOP.append(True)
    try:
        yield
    finally:
        LOOP.pop()


def in_region() -> bool:
    return bool(ACTIVE)


def in_loop() -> bool:
    return bool(LOOP)


class GraphRegion:
    """One fixed-shape program: eager (and marked) off CUDA or with graphs off; on CUDA captured into a CUDA
    graph after `warm` eager calls, then replayed. `key` separates programs of different shapes."""

    def __init__(self, name: str, graphs: bool = False, warm: int = 2, generators=()):
        self.name, self.graphs, self.warm = name, bool(graphs), warm
        self.generators = [g for g in generators if g is not None]
        self.programs: dict = {}  # key -> [calls, graph, outputs, effects]
        self.replays = 0

    def reset(self) -> None:
        """Forget every captured program (the buffers they read were re-allocated)."""
        self.programs = {}

    def __call__(self, fn: Callable, key=None, host_effects: tuple = ()):
        entry = self.programs.setdefault(key, [0, None, None, None])
        if entry[1] is not None:  # replay: kernels only, then the host effects the capture had
            entry[1].replay()
            self.replays += 1
            for (obj, attr), delta in zip(host_effects, entry[3]):
                setattr(obj, attr, getattr(obj, attr) + delta)
            return entry[2]
        entry[0] += 1
        if not self.graphs or entry[0] <= self.warm:
            with captured(self.name):
                return fn()
        before = [getattr(obj, attr) for obj, attr in host_effects]
        g = torch.cuda.CUDAGraph()
        for gen in self.generators:  # a user generator's offsets advance on every replay, not once
            g.register_generator_state(gen)
        with captured(self.name), torch.cuda.graph(g):
            out = fn()
        entry[1], entry[2] = g, out
        entry[3] = [getattr(obj, attr) - b for (obj, attr), b in zip(host_effects, before)]
        # capture only records: run the program once for real (its host effects already happened)
        g.replay()
        return out
