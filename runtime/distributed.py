"""Which process this is, as the launcher says (torchrun, DeepSpeed's launcher; a plain `python` run is
rank 0 of 1), and the plain gloo group data_gen shards its work with. The train stage's process group is
DeepSpeed's own (training/engine.py: setup_distributed), started from the same launcher ranks."""
from __future__ import annotations

import os
from datetime import timedelta


def launcher_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment, defaulting to rank 0 of 1."""
    return (int(os.environ.get("RANK", 0) or 0), int(os.environ.get("WORLD_SIZE", 1) or 1),
            int(os.environ.get("LOCAL_RANK", 0) or 0))


def is_main_rank() -> bool:
    return launcher_ranks()[0] == 0


class GlooGroup:
    """Barriers and small reductions over the launcher's ranks on CPU; a gloo group only when there is
    more than one rank (a group another stage started is reused, through a gloo subgroup if it is not gloo)."""

    def __init__(self):
        self.rank, self.world, _ = launcher_ranks()
        self.created, self.group = False, None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # long timeout: ranks legitimately wait for each other for as long as data_gen takes
                dist.init_process_group("gloo", timeout=timedelta(hours=48))
                self.created = True
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def sum_max(self, values: list[float], maxed: float) -> tuple[list[float], float]:
        """(element-wise sum of `values`, max of `maxed`) over ranks."""
        if self.world == 1:
            return values, maxed
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        m = torch.tensor([maxed], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist(), float(m)

    def close(self) -> None:
        if self.created:  # leave no group behind for a later stage (DeepSpeed wants its own)
            import torch.distributed as dist

            dist.destroy_process_group()
