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

Layout of the cache: [committed entries (`length`) | `pending` entries written since the last keep | stale].
A call writes its Q tokens after the pending ones; every row sees all committed entries plus the columns
marked in `visible` [Q, pending + Q] (a causal prefix, a tree's ancestors, ...); stale columns are masked.
Masks are additive 4D tensors over the whole capacity (what transformers passes through unchanged), kept per
query length and updated incrementally: only the columns around the committed boundary change per call.

Nothing here synchronises with the device: offsets are host integers the caller already knows.
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


def _static_cache(config, capacity: int):
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
    """Input buffers for one query length Q and forward: ids, positions and the additive mask over the whole
    capacity (and the CUDA graph reading them)."""

    def __init__(self, Q: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.ids = torch.zeros(1, Q, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, Q, dtype=torch.long, device=device)
        self.mask = torch.full((1, 1, Q, capacity), float("-inf"), dtype=dtype, device=device)
        self.zero_upto = 0  # columns [0, zero_upto) are visible to every row
        self.block_end = 0  # columns past this are all masked
        self.graph = None  # (torch.cuda.CUDAGraph, its output) once captured
        self.calls = 0


class StaticRunner:
    """One model over one preallocated StaticCache (batch 1). `fns` names its forwards, each
    `fn(ids, mask, pos, cache)` returning a tensor or a tuple of tensors (e.g. "verify" with every row's
    logits, "ar" with the last row's). With `graphs=True` (CUDA only) each forward at each query length is
    captured once into a CUDA graph (after `warm` eager calls) and replayed from then on."""

    def __init__(self, fns: dict[str, Callable], config, device: torch.device, dtype: torch.dtype,
                 graphs: bool = False, warm: int = 2):
        self.fns, self.config, self.device, self.dtype = fns, config, torch.device(device), dtype
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.warm = warm
        self.capacity = 0
        self.cache = None
        self.buffers: dict[tuple[int, str], _Buffers] = {}
        self.length = 0  # committed entries
        self.pending = 0  # entries written after them since the last keep

    # --- lifetime ------------------------------------------------------------------------------------
    def reset(self, capacity: int) -> None:
        """Start a new sequence with room for `capacity` entries. With graphs the cache only grows (in coarse
        steps: a new cache means new buffers and re-captured graphs); without, it is sized to the sequence,
        since attention reads every allocated column and a CPU pays for each one."""
        want = round_capacity(capacity, 256 if self.graphs else 32)
        if self.cache is None or want > self.capacity or (not self.graphs and want != self.capacity):
            self.capacity = max(want, self.capacity) if self.graphs else want
            self.cache = _static_cache(self.config, self.capacity)
            self.buffers = {}
        self.length = self.pending = 0
        self._set_offset(0)
        for b in self.buffers.values():
            b.mask[..., :max(b.zero_upto, b.block_end)].fill_(float("-inf"))
            b.zero_upto = b.block_end = 0

    def room(self) -> int:
        return self.capacity - self.length - self.pending

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` entries keeping every written one (a rare re-allocation: buffers and
        graphs are rebuilt)."""
        if capacity <= self.capacity:
            return
        old, used = self.cache, self.length + self.pending
        self.capacity = round_capacity(capacity)
        self.cache = _static_cache(self.config, self.capacity)
        for new, layer in zip(self.cache.layers, old.layers):
            if getattr(layer, "is_initialized", False):
                new.lazy_initialization(layer.keys[:, :, :0], layer.values[:, :, :0])
                new.keys[:, :, :used] = layer.keys[:, :, :used]
                new.values[:, :, :used] = layer.values[:, :, :used]
        self.buffers = {}
        self._set_offset(self.length)

    def _set_offset(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)

    # --- one forward -----------------------------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, rel_pos: torch.Tensor, visible: torch.Tensor, fn: str,
                 graph: bool = True):
        """Run forward `fn` on ids [1, Q] at positions length + rel_pos [1, Q]; row i also sees the columns
        after the committed ones marked in visible [Q, pending + Q]. Writes Q entries, commits none.
        graph=False: a one-off shape (a prompt): temporary buffers, never captured."""
        Q = ids.shape[1]
        start, W = self.length, self.pending + Q
        if start + W > self.capacity:
            raise RuntimeError(f"StaticRunner: {start + W} entries exceed the capacity {self.capacity}")
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        block = torch.where(visible.to(self.device), zero, float("-inf"))
        if not graph:
            b = _Buffers(Q, self.capacity, self.dtype, self.device)
            b.mask[..., :start] = 0
        else:
            b = self.buffers.get((Q, fn))
            if b is None:
                b = self.buffers[(Q, fn)] = _Buffers(Q, self.capacity, self.dtype, self.device)
            # only the columns around the committed boundary change between calls
            if b.zero_upto < start:
                b.mask[..., b.zero_upto:start].zero_()
            elif b.zero_upto > start:  # cannot happen within one sequence (reset clears), kept for safety
                b.mask[..., start:b.zero_upto].fill_(float("-inf"))
            b.zero_upto = start
            if b.block_end > start + W:
                b.mask[..., start + W:b.block_end].fill_(float("-inf"))
            b.block_end = start + W
        b.mask[0, 0, :, start:start + W] = block
        b.ids.copy_(ids)
        torch.add(rel_pos, start, out=b.pos)
        self._set_offset(start + self.pending)
        out = self._forward(b, fn, graph)
        self.pending += Q
        return out

    def _forward(self, b: _Buffers, name: str, graph: bool):
        fn = self.fns[name]
        if not (self.graphs and graph):
            return fn(b.ids, b.mask, b.pos, self.cache)
        if b.graph is not None:
            b.graph[0].replay()
            return b.graph[1]
        b.calls += 1
        if b.calls <= self.warm:  # eager warm-up calls (also what cuBLAS / allocator need before capture)
            return fn(b.ids, b.mask, b.pos, self.cache)
        offset = self.length + self.pending
        g = torch.cuda.CUDAGraph()
        # a private memory pool per graph: graphs here replay in any order, and a shared pool is only safe
        # when they replay in capture order
        with torch.cuda.graph(g):  # recorded only: the cache is not written here
            out = fn(b.ids, b.mask, b.pos, self.cache)
        self._set_offset(offset)
        b.graph = (g, out)
        g.replay()
        return out

    # --- commit ----------------------------------------------------------------------------------------
    def keep(self, rows: list[int], index: torch.Tensor | None = None) -> None:
        """Commit the pending entries at `rows` (host ints, in order) and drop the other pending ones.
        `index` may give the same rows as a device tensor (no host-to-device copy then)."""
        n, start = len(rows), self.length
        if rows != list(range(n)):  # a prefix stays where it is
            idx = index if index is not None else torch.tensor(rows, device=self.device)
            idx = idx.to(self.device) + start
            for layer in self.cache.layers:
                # index_select gathers into a new tensor first, so the in-place write cannot read itself
                layer.keys[:, :, start:start + n] = layer.keys.index_select(2, idx)
                layer.values[:, :, start:start + n] = layer.values.index_select(2, idx)
        self.length += n
        self.pending = 0
        self._set_offset(self.length)

    def discard(self) -> None:
        """Drop every pending entry."""
        self.keep([])
