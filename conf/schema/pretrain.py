"""`pretrain=` group: the demo target's recipe (stage target_pretrain)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PretrainConfig:
    out_dir: Optional[str] = None  # None = <run dir>/target_pretrain; assets/demo-target to refresh the demo
    vocab_size: int = 8192
    num_layers: int = 6
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_heads: int = 6
    num_kv_heads: int = 6
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_minutes: float = 30.0  # wall-clock budget for the optimisation loop
    max_tokens: Optional[int] = None
    max_conversations: Optional[int] = None
    eval_every: int = 200
    heldout_prompts: int = 100  # for the degeneracy measures (distinct-2, repeated 3-grams)
