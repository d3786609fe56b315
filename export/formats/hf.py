"""An independent small drafter (`small`, `pard`) as a plain Hugging Face causal-LM folder (`export.format=hf`).

    python -m pytest -q tests/export/test_export_heads.py tests/drafters/test_pard.py

config.json + model.safetensors (any LoRA merged) + the target's tokenizer: transformers'
`generate(assistant_model=AutoModelForCausalLM.from_pretrained(dir))` uses it as it is, and SGLang /
vLLM serve it as a standalone draft model. A PARD drafter's config.json adds `pard_token` (its mask token
id, the field vLLM's parallel drafting reads) and `pard_k` (tokens drafted per forward); with an added mask
row its vocabulary is one larger than the target's, so transformers needs `tokenizer=` and
`assistant_tokenizer=` (the target's tokenizer, twice) to take it as an assistant.
"""
from __future__ import annotations

import copy
from pathlib import Path

from conf.errors import DraftsmithError
from drafters.pard import K_FIELD, MASK_FIELD
from export.formats.common import CONFIG, WEIGHTS, Checker, ExportContext

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write(model, target, out: Path, ctx: ExportContext) -> None:
    """save_pretrained of the drafter's plain causal LM in ctx.dtype, and the target's tokenizer."""
    # A cast copy saved as transformers saves any model: its tied parameters stay one tensor, so a tied LM
    # head is written once (as embed_tokens), as transformers writes and reads it. (A state_dict= of cast
    # clones would break the tie and write lm_head.weight as a separate, unexpected tensor.)
    hf = copy.deepcopy(model.plain_model()).to(ctx.dtype)
    hf.config.dtype = ctx.dtype
    hf.save_pretrained(str(out))
    target.tokenizer.save_pretrained(str(out))


def _expected_names(config) -> set[str]:
    """Tensor names transformers saves for this config: the architecture's parameters and persistent
    buffers, a tied parameter once (under its first name)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    names = {n for n, _ in m.named_parameters()}
    persistent = {n for n, _ in m.named_buffers() if n in m.state_dict()}
    return names | persistent


def check(ck: Checker, cfg: dict, family: str = "small") -> None:
    from transformers import AutoConfig

    if family == "pard":
        mask, k, rows = cfg.get(MASK_FIELD), cfg.get(K_FIELD), cfg.get("vocab_size")
        if not isinstance(mask, int) or not isinstance(rows, int) or not 0 <= mask < rows:
            ck.fail(CONFIG, f"{MASK_FIELD} is {mask!r}, expected a token id below vocab_size {rows!r}")
        if not isinstance(k, int) or k < 1:
            ck.fail(CONFIG, f"{K_FIELD} is {k!r}, expected the tokens drafted per forward (>= 1)")

    arch = cfg.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        ck.fail(CONFIG, f"architectures is {arch!r}, expected a causal LM class")
    if not any((ck.folder / f).is_file() for f in TOKENIZER_FILES):
        ck.fail("tokenizer", f"none of {', '.join(TOKENIZER_FILES)} (assisted generation needs the target's tokenizer)")
    try:
        config = AutoConfig.from_pretrained(str(ck.folder))
    except (OSError, ValueError) as e:
        ck.fail(CONFIG, f"transformers cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})")
        return
    t = ck.tensors(WEIGHTS)
    if t:
        ck.names(WEIGHTS, t, _expected_names(config))
        ck.float_dtypes(WEIGHTS, t, skip={k for k, v in t.items() if not v.is_floating_point()})


def load(folder: Path, cfg: dict, target):
    """A SmallDrafter over the exported causal LM (in the file's dtype), checking it speaks the target's
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conf.schema.drafter import PardConfig, SmallConfig
    from drafters.pard import PardDrafter
    from drafters.small_lm import SmallDrafter, check_vocab

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").to(target.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    try:
        check_vocab(model, tokenizer, target, str(folder))
    except DraftsmithError as e:
        raise DraftsmithError(f"exported folder {folder}: {e}") from None
    if MASK_FIELD in cfg:  # PARD: the mask token id is in the model's config, k beside it
        return PardDrafter(PardConfig(init=str(folder), k=int(cfg[K_FIELD])), model, target)
    return SmallDrafter(SmallConfig(init=str(folder)), model, target)
