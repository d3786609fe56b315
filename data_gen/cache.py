"""Offline target cache (data.cache_features / data.cache_topk): what the frozen target says about each row.

    from data_gen.cache import CachedFeatures
    cache = CachedFeatures("runs/demo/data_gen")
    item = cache[17]        # row 17 of load_dataset_dir(...), same order
    item["features"]        # [T, n_taps*H] bf16: tapped hidden states at EVERY position (EAGLE reads them all)
    item["last_hidden"]     # [T, H] bf16: final normed hidden state; lm_head(last_hidden) = exact target logits
    item["topk_positions"]  # [n] long: positions t whose next token t+1 is an assistant token
    item["topk_values"]     # [n, k] bf16 raw logits of the target's top-k next tokens there
    item["topk_indices"]    # [n, k] int32 token ids

Storage: one safetensors file per forward batch inside each committed shard
(`shards/<shard>/cache-<b>.safetensors`), rows concatenated along the token axis with offset tables, so a
row is read lazily by slicing (safetensors memory-maps the file) and memory while writing stays at one
batch. `cache_index.npy` maps each final dataset row to (file number, row in file); `cache_files.json`
lists the files, relative to the data directory so it can be moved.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conf.errors import DraftsmithError


def topk_positions(loss_mask: list[int]) -> list[int]:
    """Positions whose next token is trained on: the ones whose target distribution losses read."""
    return [t for t in range(len(loss_mask) - 1) if loss_mask[t + 1]]


@torch.no_grad()
def compute_cache(target, rows: list[tuple[list[int], list[int]]], topk: int, with_features: bool) -> list[dict]:
    """One right-padded target forward over `rows` [(input_ids, loss_mask)]; per-row CPU tensors."""
    T = max(len(ids) for ids, _ in rows)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (x, _) in enumerate(rows):
        ids[b, :len(x)] = torch.tensor(x)
        att[b, :len(x)] = 1
    out = target(ids.to(target.device), attention_mask=att.to(target.device), logits=False)
    items = []
    for b, (x, mask) in enumerate(rows):
        n = len(x)
        item = {}
        if with_features:
            item["features"] = out.features[b, :n].to(torch.bfloat16).cpu()
            item["last_hidden"] = out.last_hidden[b, :n].to(torch.bfloat16).cpu()
        if topk > 0:
            pos = torch.tensor(topk_positions(mask), dtype=torch.long)
            # logits only where a loss reads them: [n_pos, V] instead of [T, V] keeps 128k vocabularies cheap
            logits = target.lm_head(out.last_hidden[b, pos.to(target.device)]).float()
            k = min(topk, logits.shape[-1])
            v, i = logits.topk(k, dim=-1)
            item["topk_positions"] = pos.to(torch.int32)
            item["topk_values"] = v.to(torch.bfloat16).cpu()
            item["topk_indices"] = i.to(torch.int32).cpu()
        items.append(item)
    return items


def write_cache_file(path: Path, items: list[dict], lengths: list[int]) -> int:
    """Concatenate rows into one safetensors file with offset tables; returns its size in bytes."""
    from safetensors.torch import save_file

    tensors = {"tok_offsets": torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int64)}
    if "features" in items[0]:
        tensors["features"] = torch.cat([it["features"] for it in items])
        tensors["last_hidden"] = torch.cat([it["last_hidden"] for it in items])
    if "topk_values" in items[0]:
        tensors["topk_offsets"] = torch.tensor(np.cumsum([0, *[len(it["topk_positions"]) for it in items]]),
                                               dtype=torch.int64)
        for key in ("topk_positions", "topk_values", "topk_indices"):
            tensors[key] = torch.cat([it[key] for it in items])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


class CachedFeatures:
    """Row-indexed reader of a data_gen cache; rows follow load_dataset_dir's order."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        index, files = self.dir / "cache_index.npy", self.dir / "cache_files.json"
        if not index.exists() or not files.exists():
            raise DraftsmithError(f"{self.dir} has no target cache: rerun data_gen with data.cache_features=true "
                                  "and/or data.cache_topk=<k> (into a new run.name)")
        self.index = np.load(index)
        self.files = json.loads(files.read_text())
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, f: int):
        from safetensors import safe_open

        if f not in self._open:  # opened lazily per process, so DataLoader workers each get their own map
            self._open[f] = safe_open(str(self.dir / self.files[f]), framework="pt")
        return self._open[f]

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
        f, j = (int(v) for v in self.index[row])
        h = self._file(f)
        keys = set(h.keys())
        out = {}
        a, b = h.get_slice("tok_offsets")[j:j + 2].tolist()
        if "features" in keys:
            out["features"] = h.get_slice("features")[a:b]
            out["last_hidden"] = h.get_slice("last_hidden")[a:b]
        if "topk_values" in keys:
            a, b = h.get_slice("topk_offsets")[j:j + 2].tolist()
            out["topk_positions"] = h.get_slice("topk_positions")[a:b].long()
            out["topk_values"] = h.get_slice("topk_values")[a:b]
            out["topk_indices"] = h.get_slice("topk_indices")[a:b]
        return out


def dense_topk(item: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] values/indices aligned with input positions (TargetSignal.topk_*). Positions without a
    cache entry get all mass on token 0 (distinct indices 0..k-1, logits 0, -inf, ...): a valid
    distribution, so masked-out losses stay finite."""
    v, i, pos = item["topk_values"], item["topk_indices"], item["topk_positions"]
    k = v.shape[-1]
    values = torch.full((length, k), float("-inf"), dtype=torch.float32)
    values[:, 0] = 0.0
    indices = torch.arange(k, dtype=torch.int64).expand(length, k).clone()
    values[pos] = v.float()
    indices[pos] = i.long()
    return values, indices
