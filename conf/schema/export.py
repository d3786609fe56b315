"""`export=` group: serving formats for a trained drafter (export/stage.py, export/formats/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ExportConfig:
    # sglang (eagle1, eagle3) | vllm (eagle3: speculators layout) | medusa (medusa) | hf (small)
    format: str = "sglang"
    out_dir: Optional[str] = None  # None = <run dir>/export/<format>
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16: the exported weights' dtype
    # draft length written into serving configs (vLLM speculative_tokens, the README's SGLang num-steps);
    # None = eval.tree.depth, the depth the drafter was evaluated at
    speculative_tokens: Optional[int] = None
    # after writing, the folder is reloaded and decoded with the built-in speculative decoder: greedy output
    # must equal the target's on this many prompts (0 = skip the decode check; the format check always runs)
    check_prompts: int = 2
    check_max_new_tokens: int = 32
