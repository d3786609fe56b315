"""Helpers for the engine/checkpoint/train tests (no tests here): a tiny TrainableDrafter, a minimal
data_gen output writer (the data helper's on-disk layout), and a child entry for subprocess runs.

    python -m tests.train_fixtures <factory> <override>...             # one training run (subprocess)
    torchrun --nproc_per_node 2 -m tests.train_fixtures hidden run.device=cpu ...   # two ranks
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drafters import losses as L
from drafters.base import Drafter, TargetSignal, TrainableDrafter


class HeadDrafter(TrainableDrafter):
    """Two linear heads: depth 1 predicts token t+1 from the target's last hidden state at t, depth 2
    predicts token t+2 from the tapped features at t; both distilled with forward KL against the
    target's logits. With use_target_states=False the heads read an own token embedding instead (for
    the top-k-only cache). Losses are means over loss_mask positions, as the families' are."""

    family = "testhead"

    def __init__(self, hidden: int, feat_dim: int, vocab: int, use_target_states: bool = True, extra: int = 0):
        super().__init__()
        self.use_target_states = use_target_states
        self.cfg = {"hidden": hidden, "feat_dim": feat_dim, "vocab": vocab, "use_target_states": use_target_states,
                    "extra": extra}
        if use_target_states:
            self.head1 = nn.Linear(hidden, vocab + extra)
            self.head2 = nn.Linear(feat_dim, vocab + extra)
        else:
            self.embed = nn.Embedding(vocab, 16)
            self.head1 = nn.Linear(16, vocab + extra)
            self.head2 = nn.Linear(16, vocab + extra)
        # a frozen parameter (like a copy of the target's embedding): left out of checkpoints, restored at build
        self.frozen_scale = nn.Parameter(torch.full((hidden if use_target_states else 16,), 1.5), requires_grad=False)
        self.vocab = vocab
        self.calls = 0
        self.noise = 0.0
        self.nan_at_call = None  # test hook: a NaN loss from this (1-based) training call on
        self.sleep = float(os.environ.get("DRAFTSMITH_TEST_SLEEP", "0"))  # test hook: slow steps

    @classmethod
    def from_target(cls, cfg, target, token_counts=None, **kw):
        return cls(target.hidden_size, target.num_taps * target.hidden_size, target.vocab_size, **kw)

    def loss(self, signal: TargetSignal):
        if self.use_target_states:
            x1, x2 = signal.last_hidden, signal.features
        else:
            x1 = x2 = self.embed(signal.input_ids)
        x1 = x1 * self.frozen_scale
        if self.training and self.noise:  # EAGLE-1-style input noise: exact resume must restore the RNG
            x1 = x1 + (torch.rand_like(x1) - 0.5) * self.noise
        l1 = self.head1(x1)[..., :self.vocab]
        l2 = self.head2(x2)[..., :self.vocab]
        p = signal.logits
        m = signal.loss_mask
        loss1 = L.forward_kl(l1[:, :-1], p[:, :-1], m[:, 1:])
        loss2 = L.forward_kl(l2[:, :-2], p[:, 1:-1], m[:, 2:])
        loss = loss1 + 0.5 * loss2
        loss1, loss2 = loss1.detach(), loss2.detach()
        with torch.no_grad():
            acc1 = L.masked_mean((l1[:, :-1].argmax(-1) == p[:, :-1].argmax(-1)).float(), m[:, 1:])
            acc2 = L.masked_mean((l2[:, :-2].argmax(-1) == p[:, 1:-1].argmax(-1)).float(), m[:, 2:])
        if self.training:
            self.calls += 1
            if self.sleep:
                time.sleep(self.sleep)
            if self.nan_at_call is not None and self.calls >= self.nan_at_call:
                loss = loss * float("nan")
        return loss, {"loss/depth1": loss1.item(), "loss/depth2": loss2.item(), "acc/1": acc1.item(),
                      "acc/2": acc2.item()}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled  # recorded in drafter_config.json so tests can see it arrived

    def as_drafter(self, target) -> Drafter:
        raise NotImplementedError("the test drafter is never decoded with")

    def save_pretrained(self, path):
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "drafter_config.json").write_text(json.dumps(
            {"family": self.family, **self.cfg, "gradient_checkpointing": getattr(self, "gradient_checkpointing", None)}))

    @classmethod
    def from_pretrained(cls, path, target=None):
        from safetensors.torch import load_file

        cfg = json.loads((Path(path) / "drafter_config.json").read_text())
        cfg.pop("family")
        cfg.pop("gradient_checkpointing")
        m = cls(**cfg)
        m.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return m


class OtherHead(HeadDrafter):
    family = "otherhead"


FACTORIES = {
    "hidden": lambda cfg, target, counts: HeadDrafter.from_target(cfg, target, counts),
    "tokens": lambda cfg, target, counts: HeadDrafter.from_target(cfg, target, counts, use_target_states=False),
    "wider": lambda cfg, target, counts: HeadDrafter.from_target(cfg, target, counts, extra=3),
    "other": lambda cfg, target, counts: OtherHead.from_target(cfg, target, counts),
    "noisy": lambda cfg, target, counts: _with(HeadDrafter.from_target(cfg, target, counts), noise=0.5),
    "nan_at_3": lambda cfg, target, counts: _with(HeadDrafter.from_target(cfg, target, counts), nan_at_call=3),
}


def _with(drafter, **attrs):
    for k, v in attrs.items():
        setattr(drafter, k, v)
    return drafter


# --------------------------------------------------------------------------------------------------
# A minimal data_gen output in the data helper's layout (dataset/, meta.json, token_counts.npy, cache)
# --------------------------------------------------------------------------------------------------
def write_data_gen(run_dir: Path, target, n_rows: int = 24, seed: int = 0, min_len: int = 10, max_len: int = 30,
                   cache: str | None = None, topk: int = 0) -> Path:
    """Random token rows (first 3 tokens = prompt, loss_mask 0; the rest mostly assistant). cache: None,
    "fp32" / "bf16" (features + last_hidden, plus top-k when topk > 0, written here one row at a time in
    data_gen's layout) or "data_gen" (data_gen.cache's own writer)."""
    import datasets

    out = Path(run_dir) / "data_gen"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n_rows):
        n = int(rng.integers(min_len, max_len + 1))
        ids.append(rng.integers(3, target.vocab_size, n).tolist())
        m = (rng.random(n) < 0.85).astype(int)
        m[:3] = 0
        masks.append(m.tolist())
    datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks, "conv_index": list(range(n_rows))}) \
        .save_to_disk(str(out / "dataset"))
    counts = np.zeros(target.vocab_size, dtype=np.int64)
    for x, m in zip(ids, masks):
        np.add.at(counts, np.asarray(x)[np.asarray(m, bool)], 1)
    np.save(out / "token_counts.npy", counts)
    from drafters.target import target_identity

    meta = {"target": target_identity(target), "rows": n_rows, "cache": None}
    if cache == "data_gen":  # the data helper's own writer (bf16, one padded forward for all rows)
        from data_gen.cache import compute_cache, write_cache_file

        items = compute_cache(target, list(zip(ids, masks)), topk, with_features=True)
        write_cache_file(out / "cache-0.safetensors", items, [len(x) for x in ids])
        np.save(out / "cache_index.npy", np.array([[0, j] for j in range(len(ids))], dtype=np.int64))
        (out / "cache_files.json").write_text(json.dumps(["cache-0.safetensors"]))
        meta["cache"] = {"features": True, "topk": topk, "feature_layers": list(target.feature_layers)}
    elif cache:
        meta["cache"] = _write_cache(out, target, ids, masks, torch.float32 if cache == "fp32" else torch.bfloat16,
                                     topk)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@torch.no_grad()
def _write_cache(out: Path, target, ids, masks, dtype, topk: int) -> dict:
    from safetensors.torch import save_file

    feats, last, tv, ti, tp, tok_off, top_off = [], [], [], [], [], [0], [0]
    for x, m in zip(ids, masks):
        o = target(torch.tensor([x]), logits=False)
        feats.append(o.features[0].to(dtype))
        last.append(o.last_hidden[0].to(dtype))
        tok_off.append(tok_off[-1] + len(x))
        if topk:
            pos = torch.tensor([t for t in range(len(x) - 1) if m[t + 1]], dtype=torch.long)
            v, i = target.lm_head(o.last_hidden[0, pos]).float().topk(topk, dim=-1)
            tp.append(pos.to(torch.int32))
            tv.append(v.to(dtype))
            ti.append(i.to(torch.int32))
            top_off.append(top_off[-1] + len(pos))
    tensors = {"tok_offsets": torch.tensor(tok_off), "features": torch.cat(feats), "last_hidden": torch.cat(last)}
    if topk:
        tensors.update(topk_offsets=torch.tensor(top_off), topk_positions=torch.cat(tp), topk_values=torch.cat(tv),
                       topk_indices=torch.cat(ti))
    save_file(tensors, str(out / "cache-0.safetensors"))
    np.save(out / "cache_index.npy", np.array([[0, j] for j in range(len(ids))], dtype=np.int64))
    (out / "cache_files.json").write_text(json.dumps(["cache-0.safetensors"]))
    return {"features": True, "topk": topk, "feature_layers": list(target.feature_layers), "dtype": str(dtype)}


# --------------------------------------------------------------------------------------------------
# the `trainer` fixture (registered for every test module by conftest.py)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path, tiny_target_dir, llama_target):
    """trainer(*overrides, factory="hidden", name="t", data={...}) -> train()'s result, in this process, on
    the tiny Llama with a data_gen output written once per run name."""

    def run(*overrides: str, factory: str = "hidden", name: str = "t", data: dict | None = None):
        from conf.schema import load_config
        from training.stage import train

        root = tmp_path / "runs"
        if not (root / name / "data_gen" / "meta.json").exists():
            write_data_gen(root / name, llama_target, **(data or {}))
        cfg = load_config(base_overrides(tiny_target_dir("llama"), root, name) + list(overrides))
        return train(cfg, drafter_factory=FACTORIES[factory], target=llama_target)

    return run


def base_overrides(target_path, root, name) -> list[str]:
    return [f"target.path={target_path}", f"run.root={root}", f"run.name={name}", "run.device=cpu",
            "experiment=smoke", "train.max_steps=3", "train.lr=0.001", "train.schedule=constant",
            "train.tensorboard=false"]


def child_env() -> dict:
    """The environment for a subprocess run: no inherited rank variables from this (rank-0) process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path):
    from training.tracking import read_metrics as read

    return read(path)


def final_weights(train_result_or_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = train_result_or_dir["final_dir"] if isinstance(train_result_or_dir, dict) else train_result_or_dir
    return load_file(str(Path(d) / "model.safetensors"))


def run_train(overrides: list[str], drafter_factory=None) -> None:
    """A child process's train run (one thread): the result as one `RESULT <json>` line on rank 0, or the
    stage's `error:` line and exit status 2, as train.py gives it. Read the line back with `read_result`."""
    from conf.errors import DraftsmithError
    from conf.schema import load_config
    from training.stage import train

    torch.set_num_threads(1)
    try:
        result = train(load_config(overrides), drafter_factory=drafter_factory)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result, default=str))


def read_result(stdout: str) -> dict:
    """The result a child's run_train printed."""
    return json.loads(re.search(r"^RESULT (.*)$", stdout, re.M).group(1))


def child_main(argv: list[str]) -> None:
    """Subprocess entry: `python -m tests.train_fixtures <factory> <overrides...>` (FACTORIES' drafters)."""
    run_train(argv[1:], FACTORIES[argv[0]])


if __name__ == "__main__":
    child_main(sys.argv[1:])
