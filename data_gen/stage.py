"""The data_gen stage: prompts -> chat-templated token rows with assistant loss masks (+ regeneration,
target cache, token counts), resumable and sharded across ranks.

    python train.py stage=data_gen experiment=smoke                       # seconds, the demo target
    python train.py stage=data_gen data=jsonl data.path=chats.jsonl data.regenerate=true
    python train.py stage=data_gen data.cache_features=true data.cache_topk=10
    torchrun --nproc_per_node 8 train.py stage=data_gen target=llama3_8b experiment=full

Sharding: with RANK / WORLD_SIZE set (torchrun, DeepSpeed's launcher), rank r takes the conversations
whose index (in source order) is r modulo the world size; rank 0 assembles the union in source order, so
the rows equal a one-process run. torch.distributed (gloo) is used only for barriers and a sum of
throughput counters.

Resume: work is committed in shards of data.shard_rows conversations. A shard is written into a hidden
temp folder and renamed into place (atomic), so a kill at any moment loses at most unfinished shards;
rerunning the same command skips every conversation that a committed shard already holds (whatever
the world size was) and redoes the rest. A rerun with settings that change rows (target, source,
max_length, ...) is refused. Test hook: DRAFTSMITH_TEST_KILL_AT=<point>:<n> SIGKILLs the process the
n-th time it reaches <point> (shard_written, shard_committed, assembled).
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conf.errors import DraftsmithError
from conf.schema import Config, run_dir, save_config
from data_gen.output import read_meta, token_counts
from data_gen.render import NOT_PREFIX_STABLE
from data_gen.shard import ShardWriter
from data_gen.sources import SourceReport, iter_source
from drafters.target import target_identity
from runtime.distributed import GlooGroup
from runtime.files import replace_folder, save_npy, write_json
from runtime.rundir import kill_hook, stage_session

# DataConfig fields that change the rows; anything else (batch_size, shard_rows) only changes speed
ROW_FIELDS = ("source", "path", "hf_config", "split", "max_conversations", "max_length", "regenerate",
              "gen_max_new_tokens", "gen_temperature", "gen_top_p", "gen_seed", "cache_features", "cache_topk")


@dataclass
class DataGenResult:
    data_dir: str
    rows: int
    tokens: int
    assistant_tokens: int
    accounting: dict = field(default_factory=dict)
    tokens_per_s: float | None = None  # rendered (+ cached) tokens per second in this invocation
    cache_bytes_per_token: float | None = None


def _validate(data) -> None:
    data.check()  # the schema's own choices and ranges (conf/schema/data.py)


def _prepare(out: Path, settings: dict, cfg: Config) -> None:
    """Rank 0, before any work: refuse a resume with other settings, clear temp leftovers of a kill."""
    import json

    shards = out / "shards"
    saved = out / "settings.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != json.loads(json.dumps(settings, default=str)):
            diff = _diff(old, settings)
            raise DraftsmithError(f"data_gen output in {out} was made with other settings ({diff}): rerun with the "
                                  "same settings to resume, or use another run.name (or delete that folder)")
    elif shards.exists() and any(shards.glob("shard-*")):
        raise DraftsmithError(f"{out} has shards but no settings.json: delete {out} to start over")
    shards.mkdir(parents=True, exist_ok=True)
    for p in [*shards.glob(".tmp-*"), *out.glob(".dataset.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
    write_json(saved, settings, sort_keys=True)
    save_config(cfg, out)


def _diff(old: dict, new: dict) -> str:
    import json

    new = json.loads(json.dumps(new, default=str))
    out = []
    for group in ("target", "data"):
        for k in sorted(set(old.get(group, {})) | set(new.get(group, {}))):
            a, b = old.get(group, {}).get(k), new.get(group, {}).get(k)
            if a != b:
                out.append(f"{'target' if group == 'target' else 'data'}.{k}: {a!r} -> {b!r}")
    return "; ".join(out[:3]) or "unknown difference"


def _committed(out: Path) -> list[Path]:
    return sorted(p for p in (out / "shards").glob("shard-*") if p.is_dir())


def _done_indices(out: Path) -> set[int]:
    import json

    done: set[int] = set()
    for s in _committed(out):
        done.update(json.loads((s / "accounting.json").read_text())["indices"])
    return done


def run(cfg: Config) -> DataGenResult:
    """Render (and optionally regenerate and cache) the prompt source into <run_dir>/data_gen/."""
    out = run_dir(cfg) / "data_gen"
    _validate(cfg.data)
    import datasets

    with stage_session(cfg, "data_gen"):
        dist = GlooGroup()
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar (ours) instead of one per shard save
        try:
            return _run(cfg, out, dist)
        finally:
            dist.close()
            if bars:
                datasets.enable_progress_bars()


def _run(cfg: Config, out: Path, dist: GlooGroup) -> DataGenResult:
    from tqdm.auto import tqdm

    from drafters.target import load_target

    data = cfg.data
    target = load_target(cfg.target, device=cfg.run.device)
    template = target.chat_template  # a clear error for a target without one, before any work
    # the dtype changes cached features and generated answers, though not which target it is
    settings = {"target": {**target_identity(target), "dtype": str(target.dtype).removeprefix("torch.")},
                "data": {f: getattr(data, f) for f in ROW_FIELDS}}
    if dist.rank == 0:
        _prepare(out, settings, cfg)
    dist.barrier()
    if (out / "meta.json").exists():  # finished before: nothing to redo
        if dist.rank == 0:
            print(f"data_gen: already complete in {out}")
        return _result(out, None, None)

    report = SourceReport()
    done = _done_indices(out)
    mine, total = [], 0
    for i, conv in enumerate(iter_source(data, report)):
        total += 1
        if i % dist.world == dist.rank and i not in done:
            mine.append((i, conv))
    writer = ShardWriter(target, template, data, out)
    bar = tqdm(total=len(mine), unit="conv", desc=f"data_gen rank {dist.rank}", disable=dist.rank != 0,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    for s in range(0, len(mine), data.shard_rows):
        writer.write(mine[s:s + data.shard_rows], bar, t0)
        kill_hook("shard_committed")
        unstable = writer.skipped.get(NOT_PREFIX_STABLE, 0)
        if writer.rendered == 0 and unstable >= min(32, len(mine)):
            raise DraftsmithError(
                f"the chat template of {target.name} is not prefix-stable (rendering more messages rewrites earlier "
                "text), so assistant turns cannot be located: give a prefix-stable template with target.chat_template")
    bar.close()
    elapsed = time.perf_counter() - t0
    (tokens, gen_tokens, rows), elapsed = dist.sum_max(
        [writer.tokens, writer.generated_tokens, writer.rendered], elapsed)
    this_run = {"rows": int(rows), "tokens": int(tokens), "seconds": round(elapsed, 3),
                "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 and tokens else None,
                "generated_tokens": int(gen_tokens),
                "generated_tokens_per_s": round(gen_tokens / elapsed, 1) if elapsed > 0 and gen_tokens else None,
                "world_size": dist.world}
    dist.barrier()  # every rank's shards are committed
    if dist.rank == 0:
        _assemble(out, total, report, settings, this_run)
    dist.barrier()
    return _result(out, this_run, report)


def _result(out: Path, this_run: dict | None, report: SourceReport | None) -> DataGenResult:
    import json

    meta = read_meta(out)
    acc = json.loads((out / "accounting.json").read_text())
    run_ = this_run or {}
    return DataGenResult(data_dir=str(out), rows=meta["rows"], tokens=meta["tokens"],
                         assistant_tokens=meta["assistant_tokens"], accounting=acc,
                         tokens_per_s=run_.get("tokens_per_s"),
                         cache_bytes_per_token=(meta.get("cache") or {}).get("bytes_per_token"))


def _assemble(out: Path, total: int, report: SourceReport, settings: dict, this_run: dict) -> None:
    """Rank 0: union of all shards in source order -> dataset/, cache index, token counts, accounting, meta."""
    import json

    import datasets
    import pyarrow.compute as pc

    shards = _committed(out)
    seen: Counter = Counter()
    skipped: Counter = Counter(report.skipped)
    cache_files: list[str] = []
    cache_of: dict[int, tuple[int, int]] = {}
    parts, cache_bytes, truncated = [], 0, 0
    for s in shards:
        acc = json.loads((s / "accounting.json").read_text())
        seen.update(acc["indices"])
        skipped.update(acc["skipped"].values())
        truncated += acc["truncated"]
        if acc["written"]:
            parts.append(datasets.load_from_disk(str(s / "rows")))
        for name in acc.get("cache_files", []):
            cache_files.append(f"shards/{s.name}/{name}")
            cache_bytes += (s / name).stat().st_size
        for idx, (name, j) in acc.get("cache", {}).items():
            cache_of[int(idx)] = (cache_files.index(f"shards/{s.name}/{name}"), j)
    missing = [i for i in range(total) if seen[i] != 1]
    if missing or len(seen) != total:
        raise DraftsmithError(f"data_gen shards in {out} do not cover conversations 0..{total - 1} exactly once "
                              f"(first problem at {(missing or sorted(set(seen) - set(range(total))))[0]}): "
                              "delete the folder and rerun")
    written = sum(len(p) for p in parts)
    if written == 0:
        raise DraftsmithError(f"no usable conversation in data.source={settings['data']['source']} "
                              f"({report.summary()}; after rendering: {dict(skipped - Counter(report.skipped))}): "
                              "check data.path and the data format")
    ds = datasets.concatenate_datasets(parts)
    ds = ds.select(np.argsort(ds.data.column("conv_index").to_numpy(), kind="stable")).flatten_indices()
    final, tmp = out / "dataset", out / f".dataset.tmp-{os.getpid()}"
    ds.save_to_disk(str(tmp))
    replace_folder(tmp, final)  # a dataset from a run killed after its rename, before meta.json, is replaced
    ds = datasets.load_from_disk(str(final))
    vocab = settings["target"]["vocab_size"]
    counts = token_counts(ds, vocab)
    save_npy(out / "token_counts.npy", counts)
    tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
    cache = None
    if cache_files:
        index = np.array([cache_of[int(i)] for i in ds.data.column("conv_index").to_numpy()],
                         dtype=np.int64).reshape(-1, 2)
        save_npy(out / "cache_index.npy", index)
        write_json(out / "cache_files.json", cache_files, sort_keys=True)
        cache = {"files": len(cache_files), "bytes": cache_bytes, "bytes_per_token": round(cache_bytes / tokens, 1),
                 "features": settings["data"]["cache_features"], "topk": settings["data"]["cache_topk"],
                 "dtype": "bfloat16", "feature_layers": settings["target"]["feature_layers"]}
    accounting = {"read": report.read, "written": written, "skipped": dict(sorted(skipped.items())),
                  "heldout_excluded": report.heldout, "source_cut_at_byte": report.truncated_at,
                  "truncated_rows": truncated, "notes": report.notes, "this_run": this_run}
    assert accounting["read"] == written + sum(skipped.values()), accounting
    write_json(out / "accounting.json", accounting, sort_keys=True)
    kill_hook("assembled")
    meta = {"target": settings["target"], "data": settings["data"], "rows": written, "tokens": tokens,
            "assistant_tokens": int(counts.sum()), "cache": cache, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(out / "meta.json", meta, sort_keys=True)
    _print_summary(out, accounting, meta)



def _print_summary(out: Path, acc: dict, meta: dict) -> None:
    skipped = ", ".join(f"{n} {r}" for r, n in acc["skipped"].items()) or "none"
    line = (f"data_gen: read {acc['read']} = written {acc['written']} + skipped {sum(acc['skipped'].values())} "
            f"({skipped}); {acc['truncated_rows']} truncated to max_length; {meta['tokens']} tokens, "
            f"{meta['assistant_tokens']} assistant")
    run_ = acc.get("this_run") or {}
    if run_.get("tokens_per_s"):
        line += f"; {run_['tokens_per_s']} tokens/s"
    if run_.get("generated_tokens_per_s"):
        line += f" ({run_['generated_tokens_per_s']} generated tokens/s)"
    if meta["cache"]:
        line += f"; cache {meta['cache']['bytes_per_token']} bytes/token"
    if acc["source_cut_at_byte"] is not None:
        line += f"; source file cut off at byte {acc['source_cut_at_byte']} (incomplete last record ignored)"
    print(f"{line} -> {out}")
