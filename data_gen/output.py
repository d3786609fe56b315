"""What data_gen leaves on disk, and the small API the train stage reads it with.

    from data_gen.output import load_dataset_dir, load_token_counts, check_same_target, read_meta
    check_same_target("runs/demo/data_gen", target)   # DraftsmithError if made with another target
    ds = load_dataset_dir("runs/demo/data_gen")        # datasets.Dataset: input_ids, loss_mask, provenance
    counts = load_token_counts("runs/demo/data_gen")   # [V] int64 counts of assistant (loss-mask) tokens
    drafter = draft_vocab_view(cfg, trained, target)    # drafter.draft_vocab applied (eval, export)

Layout of <run_dir>/data_gen/:
    dataset/            the final Arrow dataset (datasets.save_to_disk), rows in source order
    meta.json           target identity, settings, sizes, cache bytes/token (written last: its presence = complete)
    accounting.json     read = written + skipped (by reason), truncation, tokens/s
    token_counts.npy    [V] int64 assistant-token frequencies (reduced draft vocabularies); with
                        data.regenerate=true they count the target's own answers (drafter.draft_vocab_source)
    cache_index.npy, cache_files.json   the optional target cache (data_gen/cache.py reads it)
    shards/             committed work units (the resume state; cache files live here)
    settings.json       what the rows depend on (a resume with other settings is refused)
    config.yaml         the resolved config
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conf.errors import DraftsmithError
from drafters.target import target_identity


def data_dir_of(path: str | Path) -> Path:
    """Accept the data_gen folder itself or the run directory above it."""
    p = Path(path)
    return p / "data_gen" if not (p / "meta.json").exists() and (p / "data_gen").is_dir() else p


def read_meta(data_dir: str | Path) -> dict:
    d = data_dir_of(data_dir)
    meta = d / "meta.json"
    if not meta.exists():
        raise DraftsmithError(f"no finished data_gen output in {d}: run `python train.py stage=data_gen` with the "
                              "same run.name first (an interrupted run resumes when rerun)")
    return json.loads(meta.read_text())


def check_same_target(data_dir: str | Path, target) -> dict:
    """Refuse to train on data made by another target (token ids and features would be meaningless)."""
    meta = read_meta(data_dir)
    made, now = meta.get("target", {}), target_identity(target)
    # the fingerprint decides; a meta.json written without one (older or hand-made) is checked on sizes
    keys = ("fingerprint", "vocab_size") if "fingerprint" in made else ("vocab_size", "hidden_size", "num_layers")
    for key in keys:
        if key in made and made[key] != now[key]:
            raise DraftsmithError(
                f"data_gen output in {data_dir_of(data_dir)} was made with target {made.get('path')} ({key} "
                f"{made[key]}), not {now['path']} ({key} {now[key]}): rerun data_gen with this target "
                "(another run.name), or set target.path back")
    cache = meta.get("cache") or {}
    taps = made.get("feature_layers", cache.get("feature_layers"))
    if cache.get("features") and taps is not None and list(taps) != now["feature_layers"]:
        raise DraftsmithError(
            f"data_gen cached features in {data_dir_of(data_dir)} were tapped at layers {list(taps)}, "
            f"but target.feature_layers gives {now['feature_layers']}: set target.feature_layers="
            f"[{','.join(map(str, taps))}] or rerun data_gen")
    return meta


def load_dataset_dir(data_dir: str | Path):
    """The data_gen rows as a datasets.Dataset (memory-mapped Arrow)."""
    import datasets

    read_meta(data_dir)
    return datasets.load_from_disk(str(data_dir_of(data_dir) / "dataset"))


def load_token_counts(data_dir: str | Path) -> torch.Tensor:
    """[V] int64 counts of each token among assistant (loss-mask) tokens."""
    read_meta(data_dir)
    return torch.from_numpy(np.load(data_dir_of(data_dir) / "token_counts.npy"))


def token_counts(dataset, vocab_size: int) -> np.ndarray:
    """Count loss-mask tokens straight from the Arrow columns (flattened, no Python loop over rows)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for batch in table.to_batches():  # record batches keep the two columns aligned
        ids = batch.column("input_ids").flatten().to_numpy(zero_copy_only=False)
        mask = batch.column("loss_mask").flatten().to_numpy(zero_copy_only=False)
        counts += np.bincount(ids[mask.astype(bool)], minlength=vocab_size)[:vocab_size]
    return counts


def draft_vocab_counts(data_dir: str | Path, source: str, target) -> torch.Tensor:
    """The token counts `drafter.draft_vocab` keeps the most frequent of: data_gen's assistant-token counts in
    `data_dir` (source `data`: FR-Spec's training-data frequencies), or the same counts of a data_gen run with
    data.regenerate=true, whose assistant tokens are all the target's own answers (source `generated`:
    VocabTrim). One-line errors when that output is missing, of another target, or not regenerated."""
    d = data_dir_of(data_dir)
    fix = "run stage=data_gen first, or set drafter.draft_vocab_counts=<a data_gen folder> (or draft_vocab=null)"
    if not (d / "meta.json").is_file() or not (d / "token_counts.npy").is_file():
        raise DraftsmithError(f"drafter.draft_vocab needs data_gen's token counts, but {d} has no finished "
                              f"data_gen output with token_counts.npy: {fix}")
    meta = check_same_target(d, target)
    if source == "generated" and not (meta.get("data") or {}).get("regenerate"):
        raise DraftsmithError(
            f"drafter.draft_vocab_source=generated counts the target's own answers, but data_gen in {d} kept the "
            "dataset's answers (data.regenerate=false): point drafter.draft_vocab_counts at a data_gen run with "
            "data.regenerate=true, or use drafter.draft_vocab_source=data")
    return load_token_counts(d)


def draft_vocab_view(cfg, model, target):
    """`model` (a trained drafter) with cfg.drafter.draft_vocab applied at draft time (drafters.vocab_trim):
    itself when the option is null; counts from cfg.drafter.draft_vocab_counts, else the run's data_gen."""
    from conf.schema import run_dir
    from drafters.vocab_trim import draft_vocab_size, trim_draft_vocab

    dc = cfg.drafter
    k = draft_vocab_size(dc.draft_vocab, int(target.vocab_size))
    if k is None:
        return model
    counts = draft_vocab_counts(dc.draft_vocab_counts or run_dir(cfg) / "data_gen", dc.draft_vocab_source, target)
    return trim_draft_vocab(model, counts, k)
