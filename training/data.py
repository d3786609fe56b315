"""Training data: data_gen's output, the held-out slice, the resumable sample stream, batching.

    from training.data import load_data_gen, DataPlan, collate
    data = load_data_gen(run_dir / "data_gen", target, need_cache=False)
    plan = DataPlan(len(data.dataset), eval_rows=64, seed=0, micro=4, accum=2, world=1, rank=0)
    rows = plan.micro_batches(state.rows)          # this rank's row ids for the next optimizer step
    batch = collate(data, rows[0], pad_id, max_length=2048, with_cache=False)

The stream. Training rows (all rows minus the held-out slice) are visited epoch after epoch, each epoch in
its own permutation drawn from (run.seed, epoch). The stream is their concatenation, so the whole data
order is a pure function of the seed, and progress is one integer: rows consumed (epoch = rows // n,
position = rows % n). An optimizer step takes the next `micro * accum * world` rows; micro-step a of
rank r gets rows [(a * world + r) * micro, +micro) of them. The split of a global batch into micro-batches
is therefore the same for 1 process x accumulation 2 and 2 processes x accumulation 1.

data_gen's output (the data helper's layout, <run>/data_gen/): dataset/ (datasets.save_to_disk, columns
input_ids, loss_mask, ...), meta.json (target identity; written last), token_counts.npy, and the optional
cache (cache_index.npy + cache_files.json + safetensors files), read through data_gen.output / data_gen.cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conf.errors import DraftsmithError
from data_gen import output as dg
from data_gen.cache import CachedFeatures


@dataclass
class DataGenOutput:
    dir: Path
    dataset: object  # datasets.Dataset with input_ids, loss_mask
    meta: dict
    token_counts: torch.Tensor | None  # [V] assistant-token frequencies
    cache: object | None  # row-indexed cache reader (data_gen.cache.CachedFeatures), None when not needed


def require_data_gen(data_dir: Path | str) -> Path:
    """Fail fast (before loading any model) when data_gen has not finished in `data_dir`."""
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise DraftsmithError(f"no finished data_gen output in {data_dir}: run `python train.py stage=data_gen` "
                              "with the same run.name first (an interrupted data_gen resumes when rerun)")
    return data_dir


def load_data_gen(data_dir: Path | str, target, need_cache: bool) -> DataGenOutput:
    """Open data_gen's output, check it was made with this target, and open the cache when needed."""
    data_dir = require_data_gen(data_dir)
    meta = dg.check_same_target(data_dir, target)
    dataset = dg.load_dataset_dir(data_dir)
    for col in ("input_ids", "loss_mask"):
        if col not in dataset.column_names:
            raise DraftsmithError(f"data_gen dataset in {data_dir} has no {col!r} column: rerun data_gen")
    counts = None
    if (data_dir / "token_counts.npy").is_file():
        counts = torch.from_numpy(np.load(data_dir / "token_counts.npy"))
    cache = open_cache(data_dir, meta, target) if need_cache else None
    return DataGenOutput(dir=data_dir, dataset=dataset, meta=meta, token_counts=counts, cache=cache)


def open_cache(data_dir: Path, meta: dict, target):
    """The offline target cache, or a clear error naming what is missing and the fix."""
    cache_meta = meta.get("cache") or {}
    has_files = (data_dir / "cache_index.npy").is_file() and (data_dir / "cache_files.json").is_file()
    if not has_files or not (cache_meta.get("features") or cache_meta.get("topk")):
        raise DraftsmithError(
            f"train.mode=offline needs data_gen's target cache, but {data_dir} has none (no cache_index.npy / "
            "cache_files.json): rerun data_gen with data.cache_features=true (and data.cache_topk=<k> for "
            "logits) into a new run.name, or use train.mode=online")
    layers = cache_meta.get("feature_layers")
    if layers is not None and list(layers) != list(target.feature_layers):
        raise DraftsmithError(f"the cache in {data_dir} holds features of layers {layers} but target.feature_layers "
                              f"is {target.feature_layers}: set them equal or use train.mode=online")
    return CachedFeatures(data_dir)


# --------------------------------------------------------------------------------------------------
# The plan: held-out slice and the deterministic, resumable stream
# --------------------------------------------------------------------------------------------------
class DataPlan:
    """Which rows each rank reads at each optimizer step, as a pure function of (seed, rows consumed)."""

    def __init__(self, n_rows: int, eval_rows: int, seed: int, micro: int, accum: int, world: int, rank: int):
        if n_rows < 1:
            raise DraftsmithError("data_gen's dataset has no rows: rerun data_gen with more data (data.max_conversations)")
        # Never hold out more than half the rows (tiny smoke datasets); `note` reports the cap.
        self.eval_rows = min(max(0, eval_rows), n_rows // 2)
        self.note = (f"held out {self.eval_rows} of {n_rows} rows for evaluation (train.eval_rows={eval_rows} "
                     "capped at half the data)") if self.eval_rows < eval_rows else None
        eval_rows = self.eval_rows
        perm = np.random.default_rng([seed, 0x5EED]).permutation(n_rows)
        self.eval_idx = np.sort(perm[:eval_rows])  # the held-out slice: fixed by the seed, never trained on
        self.train_idx = np.sort(perm[eval_rows:])
        self.seed, self.micro, self.accum, self.world, self.rank = seed, micro, accum, world, rank
        self._orders: dict[int, np.ndarray] = {}

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        """Optimizer steps: max_steps when set, else enough global batches to read `epochs` epochs (their
        ranges: TrainConfig.check)."""
        if max_steps is not None:
            return int(max_steps)
        return max(1, int(np.ceil(epochs * self.n_train / self.global_batch)))

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.train_idx[np.random.default_rng([self.seed, epoch]).permutation(self.n_train)]}
        return self._orders[epoch]

    def cursor(self, rows: int) -> tuple[int, int]:
        """(epoch, position in that epoch's permutation) after `rows` rows of the stream."""
        return divmod(rows, self.n_train)

    def stream(self, start: int, count: int) -> np.ndarray:
        """Dataset row ids of stream positions [start, start + count), crossing epoch ends."""
        out = []
        while count > 0:
            epoch, pos = self.cursor(start)
            take = min(count, self.n_train - pos)
            out.append(self.epoch_order(epoch)[pos:pos + take])
            start, count = start + take, count - take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def micro_batches(self, rows_consumed: int) -> list[np.ndarray]:
        """This rank's `accum` micro-batches for the optimizer step starting at stream position rows_consumed."""
        ids = self.stream(rows_consumed, self.global_batch)
        return [ids[(a * self.world + self.rank) * self.micro:][:self.micro] for a in range(self.accum)]

    def eval_batches(self) -> list[np.ndarray]:
        """The held-out slice in micro-batches (every rank evaluates all of it: same calls on every rank,
        which ZeRO-3's parameter gathering needs)."""
        return [self.eval_idx[i:i + self.micro] for i in range(0, len(self.eval_idx), self.micro)]


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------
def collate(data: DataGenOutput, rows, pad_id: int, max_length: int, with_cache: bool = False,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids / attention_mask / loss_mask (T = longest row, at most max_length),
    plus the cached features / last_hidden [B, T, *] and top-k [B, T, k] when with_cache."""
    rows = [int(r) for r in rows]
    got = data.dataset[rows]
    ids = [list(x)[:max_length] for x in got["input_ids"]]
    masks = [list(x)[:max_length] for x in got["loss_mask"]]
    B, T = len(rows), max(len(x) for x in ids)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "loss_mask": torch.zeros((B, T), dtype=torch.long)}
    for b, (x, m) in enumerate(zip(ids, masks)):
        out["input_ids"][b, :len(x)] = torch.tensor(x)
        out["attention_mask"][b, :len(x)] = 1
        out["loss_mask"][b, :len(m)] = torch.tensor(m)
    if with_cache:
        out.update(_collate_cache(data.cache, rows, [len(x) for x in ids], T, dtype))
    return out


def _collate_cache(cache, rows: list[int], lengths: list[int], T: int, dtype: torch.dtype) -> dict:
    items = [cache[r] for r in rows]
    out = {}
    for key in ("features", "last_hidden"):
        if key in items[0]:
            dim = items[0][key].shape[-1]
            t = torch.zeros((len(rows), T, dim), dtype=dtype)
            for b, (it, n) in enumerate(zip(items, lengths)):
                t[b, :n] = it[key][:n].to(dtype)
            out[key] = t
    if "topk_values" in items[0]:
        k = items[0]["topk_values"].shape[-1]
        # positions without an entry (prompt, padding): logit 0 on token 0, -inf elsewhere: a valid
        # distribution that the loss mask removes anyway (same convention as data_gen.cache.dense_topk)
        values = torch.full((len(rows), T, k), float("-inf"))
        values[..., 0] = 0.0
        indices = torch.zeros((len(rows), T, k), dtype=torch.long)
        for b, (it, n) in enumerate(zip(items, lengths)):
            pos = it["topk_positions"].long()
            keep = pos < n
            values[b, pos[keep]] = it["topk_values"][keep].float()
            indices[b, pos[keep]] = it["topk_indices"][keep].long()
        out["topk_values"], out["topk_indices"] = values, indices
    return out
