"""`export=` group: serving formats for a trained drafter (export/stage.py, export/formats/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from conf.errors import DraftsmithError

# export.format -> the drafter families it can hold (export/formats/ writes each)
FORMATS = {"sglang": ("eagle1", "eagle3"), "vllm": ("eagle3",), "medusa": ("medusa",), "hf": ("small", "pard"),
           "dflash": ("dflash",)}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # export.dtype: the exported weights' dtype


@dataclass
class ExportConfig:
    # sglang (eagle1, eagle3) | vllm (eagle3: speculators layout) | medusa (medusa) | hf (small, pard)
    # | dflash (dflash: z-lab's layout, served by vLLM and SGLang)
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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The format, dtype and decode-check sizes, each a one-line error (at construction; the export stage
        runs it again for a config changed in code). Whether the format takes the trained family is checked
        by the stage, which reads the drafter folder."""
        if self.format not in FORMATS:
            raise DraftsmithError(f"export.format={self.format!r} is not a format: choose from {', '.join(FORMATS)}")
        if self.dtype not in EXPORT_DTYPES:
            raise DraftsmithError(f"export.dtype={self.dtype!r}: use one of {', '.join(EXPORT_DTYPES)}")
        if self.check_prompts < 0 or self.check_max_new_tokens < 1:
            raise DraftsmithError("export.check_prompts must be >= 0 and export.check_max_new_tokens >= 1")
