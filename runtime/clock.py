"""Phase boundaries without host syncs: perf_counter on the CPU, CUDA events on a GPU (read once, after the
caller's own synchronize). The speculative decoder times its draft / verify / other phases with it, the
training-step profile (bench/train_phases.py) its phases.

    from runtime.clock import DeviceClock
    clock = DeviceClock(device)
    a = clock.mark(); ...; b = clock.mark()
    torch.cuda.synchronize()   # on a GPU, once, before reading
    seconds = clock.span(a, b)
"""
from __future__ import annotations

import time

import torch


class DeviceClock:
    """Marks on `device`'s clock: a synchronising clock would add a host sync per phase to a hot loop."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def span(self, a, b) -> float:
        """Seconds between two marks (on CUDA only after a synchronize)."""
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def wall(self) -> float:
        """Host seconds now, after the device finished what was queued."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
