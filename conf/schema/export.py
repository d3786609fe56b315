"""`export=` group: serving formats for a trained drafter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ExportConfig:
    format: str = "sglang"  # sglang | vllm | medusa | hf
    out_dir: Optional[str] = None  # None = <run dir>/export/<format>
    dtype: str = "bfloat16"
