"""One committed unit of data_gen work: render (+ regenerate, + cache) a chunk of conversations and
commit it atomically as `shards/shard-<first index>/` (used by data_gen/stage.py).

A shard folder holds rows/ (a datasets.Dataset), cache-<b>.safetensors (one per forward batch, when
caching) and accounting.json (every conversation index it covers: written or skipped with a reason).
Everything is written into `.tmp-<name>-<pid>/` first and renamed at the end (runtime.files.replace_folder):
a rename is atomic, so a SIGKILL leaves either the whole shard or a temp folder that the next run deletes.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from conf.errors import DraftsmithError
from data_gen.cache import compute_cache, write_cache_file
from data_gen.regenerate import regenerate
from data_gen.render import render_conversation
from runtime.files import replace_folder, write_json
from runtime.rundir import kill_hook


def row_features():
    """The Arrow schema of data_gen rows (num_turns = assistant turns in the rendered conversation)."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "loss_mask": List(Value("int8")),
                     "conv_id": Value("string"), "conv_index": Value("int64"), "source": Value("string"),
                     "num_turns": Value("int32"), "regenerated": Value("bool"), "truncated": Value("bool")})


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


class ShardWriter:
    """Writes shards for one rank and keeps this invocation's counters."""

    def __init__(self, target, template: str, data, out: Path):
        self.target, self.template, self.data, self.out = target, template, data, out
        self.eos = target.eos_token_ids
        self.rendered = self.tokens = self.generated_tokens = 0
        self.skipped: Counter = Counter()

    def write(self, chunk: list[tuple[int, object]], bar, t0: float) -> Path:
        """Process `chunk` [(conversation index, Conversation)] and commit it as one shard."""
        from datasets import Dataset

        data, target = self.data, self.target
        name = f"shard-{chunk[0][0]:09d}"
        final = self.out / "shards" / name
        if final.exists():
            raise DraftsmithError(f"{final} already exists although its conversations are not done: "
                                  f"delete {self.out} and rerun")
        tmp = self.out / "shards" / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir(parents=True)
        rows: dict[int, dict] = {}
        skipped: dict[str, str] = {}
        cache_files: list[str] = []
        cache_of: dict[str, list] = {}
        caching = data.cache_features or data.cache_topk > 0
        # similar lengths share a batch (less padding); the order is a pure function of the chunk
        order = sorted(chunk, key=lambda ic: (_chars(ic[1].messages), ic[0]))
        for b in range(0, len(order), data.batch_size):
            batch = order[b:b + data.batch_size]
            msgs = [c.messages for _, c in batch]
            if data.regenerate:
                msgs, st = regenerate(target, msgs, [c.id for _, c in batch], data)
                self.generated_tokens += st.generated_tokens
            done = []
            for (i, conv), m in zip(batch, msgs):
                r, reason = render_conversation(target.tokenizer, m, self.template, self.eos, data.max_length)
                if r is None:
                    skipped[str(i)] = reason
                    self.skipped[reason] += 1
                    continue
                rows[i] = {"input_ids": r.input_ids, "loss_mask": r.loss_mask, "conv_id": conv.id,
                           "conv_index": i, "source": conv.source,
                           "num_turns": sum(x["role"] == "assistant" for x in m),
                           "regenerated": bool(data.regenerate), "truncated": r.truncated}
                done.append(i)
            if caching and done:
                pairs = [(rows[i]["input_ids"], rows[i]["loss_mask"]) for i in done]
                items = compute_cache(target, pairs, data.cache_topk, data.cache_features)
                fname = f"cache-{len(cache_files):04d}.safetensors"
                write_cache_file(tmp / fname, items, [len(p[0]) for p in pairs])
                cache_files.append(fname)
                cache_of.update({str(i): [fname, j] for j, i in enumerate(done)})
            self.rendered += len(done)
            self.tokens += sum(len(rows[i]["input_ids"]) for i in done)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        ordered = [rows[i] for i in sorted(rows)]
        cols = {k: [r[k] for r in ordered] for k in row_features()}
        Dataset.from_dict(cols, features=row_features()).save_to_disk(str(tmp / "rows"))
        write_json(tmp / "accounting.json", {
            "indices": [i for i, _ in chunk], "written": len(rows), "skipped": skipped,
            "truncated": sum(r["truncated"] for r in ordered), "cache_files": cache_files, "cache": cache_of}, sort_keys=True)
        kill_hook("shard_written")
        return replace_folder(tmp, final)
