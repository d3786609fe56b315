"""Preallocated KV caches for decoding: one transformers StaticCache per model, compacted in place after every
verification, fed from per-query-length preallocated input buffers, optionally replayed as CUDA graphs.

    from decoding.kvcache import StaticRunner
    step = lambda ids, mask, pos, cache: model_forward(model, cache, input_ids=ids, attention_mask=mask,
                                                       position_ids=pos).logits
    run = StaticRunner({"step": step}, model.config, device, dtype)
    run.reset(capacity=prompt_len + 200)
    logits = run(ids, rel_pos, visible, "step")   # writes Q entries after the committed ones (with graphs, the
                                                   # output is overwritten by the next replay: use it first)
    run.keep([0, 2, 3])                            # commit three of them (rows of that call), in place

    run.keep_fixed(rows, count)                    # the same from device tensors: rows [K] padded, count [] real

Layout of the cache: [committed entries (`length`) | `pending` entries written since the last keep | stale].
A call writes its Q tokens after the pending ones; every row sees all committed entries plus the columns
marked in `visible` [Q, pending + Q] (a causal prefix, a tree's ancestors, ...); stale columns are masked.

The committed length lives on the device (`length_t`): positions, the additive 4D mask over the whole
capacity (what transformers passes through unchanged) and the cache's write offset are computed from it by
tensor ops, so a call is a fixed-shape program for a given (query length, pending count) whatever the
sequence's length, and can sit inside a CUDA graph (the speculative decoder captures a whole verification
with its compaction that way; `keep_fixed` moves accepted entries by device indices). The host keeps
`length` as a mirror for capacity checks: exact after `keep`, brought up to date with `advance` after a
`keep_fixed` once the host has learnt the count. Nothing here synchronises with the device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from conf.errors import DraftsmithError


def model_forward(model, cache, **kw):
    """`model(**kw)` reading and extending `cache` (transformers' `cache=`, which replaced `past_key_values`)."""
    return model(**kw, use_cache=True, cache=cache)


def round_capacity(n: int, step: int = 256) -> int:
    """Cache capacities grow in steps, so a slightly longer prompt does not re-allocate (and re-capture)."""
    return -(-n // step) * step


def static_cache(config, capacity: int):
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=capacity)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise DraftsmithError(
                "sliding-window KV caches cannot keep arbitrary tree positions: load the model with "
                "use_sliding_window=False (or a non-sliding attention implementation)")
        if not hasattr(layer, "cumulative_length"):
            raise DraftsmithError("this transformers version's StaticCache has no per-layer write offset "
                                  "(cumulative_length): the decoder needs transformers >= 5 (pip install -U transformers)")
    return cache


class _Buffers:
    """Input buffers for one query length Q and forward: ids, relative positions and the visibility block
    (and the CUDA graph reading them)."""

    def __init__(self, Q: int, W: int, device: torch.device):
        self.ids = torch.zeros(1, Q, dtype=torch.long, device=device)
        self.rel = torch.zeros(1, Q, dtype=torch.long, device=device)
        self.vis = torch.zeros(Q, W, dtype=torch.bool, device=device)
        self.graph = None  # (torch.cuda.CUDAGraph, its output) once captured
        self.calls = 0


class StaticRunner:
    """One model over one preallocated StaticCache (batch 1). `fns` names its forwards, each
    `fn(ids, mask, pos, cache)` returning a tensor or a tuple of tensors (e.g. "verify" with every row's
    logits, "ar" with the last row's). With `graphs=True` (CUDA only) each forward at each query length is
    captured once into a CUDA graph (after `warm` eager calls) and replayed from then on; a call made with
    graph=False runs eagerly (inside a caller's own graph region, or a one-off shape)."""

    def __init__(self, fns: dict[str, Callable], config, device: torch.device, dtype: torch.dtype,
                 graphs: bool = False, warm: int = 2):
        self.fns, self.config, self.device, self.dtype = fns, config, torch.device(device), dtype
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.warm = warm
        self.capacity = 0
        self.cache = None
        self.buffers: dict[tuple[int, int, str], _Buffers] = {}
        self.length_t = torch.zeros((), dtype=torch.long, device=self.device)  # committed entries (device)
        self.length = 0  # the host's mirror of length_t
        self.pending = 0  # entries written after them since the last keep
        self.version = 0  # bumped whenever the cache is re-allocated (graphs reading it are stale then)

    # --- lifetime ------------------------------------------------------------------------------------
    def reset(self, capacity: int) -> None:
        """Start a new sequence with room for `capacity` entries. With graphs the cache only grows (in coarse
        steps: a new cache means new buffers and re-captured graphs); without, it is sized to the sequence,
        since attention reads every allocated column and a CPU pays for each one."""
        want = round_capacity(capacity, 256 if self.graphs else 32)
        if self.cache is None or want > self.capacity or (not self.graphs and want != self.capacity):
            self.capacity = max(want, self.capacity) if self.graphs else want
            self._allocate()
        self.length = self.pending = 0
        self.length_t.zero_()

    def _allocate(self) -> None:
        self.cache = static_cache(self.config, self.capacity)
        self.columns = torch.arange(self.capacity, device=self.device)
        self.buffers = {}
        self.version += 1

    def room(self) -> int:
        return self.capacity - self.length - self.pending

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` entries keeping every written one (a rare re-allocation: buffers and
        graphs are rebuilt)."""
        if capacity <= self.capacity:
            return
        old, used = self.cache, self.length + self.pending
        self.capacity = round_capacity(capacity)
        self._allocate()
        for new, layer in zip(self.cache.layers, old.layers):
            if getattr(layer, "is_initialized", False):
                new.lazy_initialization(layer.keys[:, :, :0], layer.values[:, :, :0])
                new.keys[:, :, :used] = layer.keys[:, :, :used]
                new.values[:, :, :used] = layer.values[:, :, :used]

    # --- one forward -----------------------------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, rel_pos: torch.Tensor, visible: torch.Tensor, fn: str,
                 graph: bool = True):
        """Run forward `fn` on ids [1, Q] at positions length + rel_pos [1, Q]; row i also sees the columns
        after the committed ones marked in visible [Q, pending + Q]. Writes Q entries, commits none.
        graph=False: run eagerly (a one-off shape such as a prompt, or inside the caller's graph region)."""
        Q = ids.shape[1]
        W = self.pending + Q
        if self.length + W > self.capacity:
            raise RuntimeError(f"StaticRunner: {self.length + W} entries exceed the capacity {self.capacity}")
        key = (Q, self.pending, fn)
        b = self.buffers.get(key) if graph else None
        if b is None:
            b = _Buffers(Q, W, self.device)
            if graph:
                self.buffers[key] = b
        b.ids.copy_(ids)
        b.rel.copy_(rel_pos)
        b.vis.copy_(visible)
        out = self._forward(b, fn, graph)
        self.pending += Q
        return out

    def _program(self, b: _Buffers, name: str):
        """The forward as a fixed-shape program of the buffers and length_t (what a graph captures)."""
        start, W, pending = self.length_t, b.vis.shape[1], self.pending
        rel = self.columns - start  # [C]: column c holds block entry rel[c] when 0 <= rel < W
        inside = (rel >= 0) & (rel < W)
        seen = b.vis.index_select(1, rel.clamp(0, W - 1))  # [Q, C]
        see = (rel < 0) | (inside & seen)
        mask = torch.where(see, 0.0, float("-inf")).to(self.dtype)[None, None]
        pos = b.rel + start
        for layer in self.cache.layers:  # the new entries go after the pending ones
            layer.cumulative_length.copy_(start + pending)
        return self.fns[name](b.ids, mask, pos, self.cache)

    def _forward(self, b: _Buffers, name: str, graph: bool):
        from decoding.regions import captured, in_region

        if in_region():  # part of a caller's graph region: its capture records this forward too
            return self._program(b, name)
        if not (self.graphs and graph):
            if graph:  # the program a GPU replays as a graph
                with captured(name):
                    return self._program(b, name)
            return self._program(b, name)
        if b.graph is not None:
            b.graph[0].replay()
            return b.graph[1]
        b.calls += 1
        if b.calls <= self.warm:  # eager warm-up calls (also what cuBLAS / allocator need before capture)
            return self._program(b, name)
        g = torch.cuda.CUDAGraph()
        # a private memory pool per graph: graphs here replay in any order, and a shared pool is only safe
        # when they replay in capture order
        with torch.cuda.graph(g):  # recorded only: nothing is written until the replay below
            out = self._program(b, name)
        b.graph = (g, out)
        g.replay()
        return out

    # --- commit ----------------------------------------------------------------------------------------
    def keep(self, rows: list[int], index: torch.Tensor | None = None) -> None:
        """Commit the pending entries at `rows` (host ints, in order) and drop the other pending ones.
        `index` may give the same rows as a device tensor (no host-to-device copy then)."""
        n = len(rows)
        if rows != list(range(n)):  # a prefix stays where it is
            idx = index if index is not None else torch.tensor(rows, device=self.device)
            self._move(idx.to(self.device))
        self.length_t += n
        self.length += n
        self.pending = 0

    def keep_fixed(self, rows: torch.Tensor | None, count: torch.Tensor) -> None:
        """Commit the pending entries at rows[:count] (device tensors: rows [K], in order, padded with any
        valid row, or None for the first `count`; count [] long) and drop the others: fixed shapes, no host
        sync. The host's mirror of the length follows with `advance(count)` once it knows the count."""
        if rows is not None:
            self._move(rows)
        self.length_t += count
        self.pending = 0

    def advance(self, n: int) -> None:
        """Bring the host's mirror up to date after keep_fixed committed `n` entries."""
        self.length += n

    def _move(self, idx: torch.Tensor) -> None:
        dst = self.length_t + torch.arange(idx.shape[0], device=self.device)
        src = self.length_t + idx
        for layer in self.cache.layers:
            # index_select gathers into a new tensor first, so the in-place write cannot read itself
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))

    def discard(self) -> None:
        """Drop every pending entry."""
        self.pending = 0
