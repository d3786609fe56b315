"""Count, on any device, what one decode cycle would make a GPU pay for: host syncs, and the ops that run
eagerly (each a kernel launch or an allocation) outside the regions the decoder replays as CUDA graphs.

    python bench/bench_cycle.py                                   # the table, every family x tree x rule
    python -m pytest -q tests/decoding/test_cycle_counts.py

    from decoding.counting import CycleCounter
    with CycleCounter() as c:
        tokens, st = decoder.generate(ids, 32)
    c.per_cycle(st.cycles)   # {"syncs": .., "eager": .., "captured": .., "sync_ops": {...}}

Only ops inside the decoder's per-cycle loop count (decoding.regions.decode_loop): the prefill and the
drafter's start are one-offs. What counts as a sync (it would stall the host until the GPU caught up):
  - reading a device value on the host: item / int() / bool() (aten._local_scalar_dense), tolist, numpy,
    cpu();
  - ops whose output shape depends on values: nonzero, masked_select, unique, boolean-mask indexing,
    repeat_interleave without output_size;
  - building a device tensor from host data (torch.tensor / as_tensor): a copy from pageable memory, which
    waits for the stream.
What counts as an op: every aten op the dispatcher runs, except views (no kernel, no allocation). Ops
under a decoding.regions.captured region count as captured; the rest as eager.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from decoding import regions

_aten = torch.ops.aten
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
            _aten.repeat_interleave.Tensor, _aten.nonzero_static.default}
# Tensor methods and torch functions that move data between host and device (caught before dispatch:
# on a CPU they dispatch nothing, on a GPU each is a copy that waits for the device)
HOST_TRANSFERS = {"tolist", "numpy", "cpu"}
HOST_DATA = {"tensor", "as_tensor"}


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx or ())


class _Functions(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if regions.in_loop():
            if name in HOST_TRANSFERS:
                self.owner._sync(name)
            elif name in HOST_DATA and isinstance(args[0] if args else None, (list, tuple, int, float)):
                self.owner._sync(f"torch.{name}(host data)")
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if regions.in_loop():
            o = self.owner
            if func in SYNC_OPS or (func is _aten.index.Tensor and _bool_index(args)):
                o._sync(str(func.overloadpacket.__name__))
            if not func.is_view:
                key = "captured" if regions.in_region() else "eager"
                o.ops[key] += 1
                if key == "eager":
                    o.eager_ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class CycleCounter:
    """A context manager counting syncs and eager / captured ops of the decode loops run inside it."""

    def __init__(self):
        self.ops: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self.eager_ops: Counter = Counter()
        self._modes = (_Functions(self), _Dispatch(self))

    def _sync(self, name: str) -> None:
        # counted inside regions too: there a sync would break the capture
        self.sync_ops[name] += 1

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False

    def per_cycle(self, cycles: int) -> dict:
        c = max(int(cycles), 1)
        return {"syncs": self.syncs / c, "eager": self.ops["eager"] / c, "captured": self.ops["captured"] / c,
                "sync_ops": {k: v / c for k, v in self.sync_ops.most_common()},
                "eager_ops": {k: v / c for k, v in self.eager_ops.most_common(12)}}
