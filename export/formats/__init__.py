"""Serving formats: write a trained drafter for a consumer, check a folder against the consumer's layout,
and load an exported folder back as a decoding drafter.

    from export.formats import write_export, check_format, load_exported
    write_export(trainable, target, "sglang", out_dir, ExportContext(dtype=torch.bfloat16, target_ref=...))
    check_format(out_dir, "sglang")           # [] or one line per violation
    drafter = load_exported(out_dir, target)  # drafters.base.Drafter, for decoding.decoder.SpeculativeDecoder

| format | families | consumer |
|---|---|---|
| sglang | eagle1, eagle3 | SGLang LlamaForCausalLMEagle / LlamaForCausalLMEagle3 (export/formats/eagle.py) |
| vllm | eagle3 | speculators layout: vLLM and the speculators library (export/formats/eagle.py) |
| medusa | medusa | Medusa heads file + config: TGI, TensorRT-LLM, FasterDecoding/Medusa (export/formats/medusa.py) |
| hf | small, pard | a plain transformers causal LM: generate(assistant_model=...); PARD's mask token id in config.json (export/formats/hf.py) |
| dflash | dflash | z-lab's DFlash layout: vLLM DFlashQwen3ForCausalLM, SGLang DFlashDraftModel (export/formats/dflash.py) |
Hydra heads have no serving format (no engine implements them): evaluate them with stage=eval.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from conf.errors import DraftsmithError
from conf.schema.export import FORMATS
from export.formats import dflash, eagle, hf, medusa
from export.formats.common import (
    CONFIG,
    README,
    README_HEADER,
    Checker,
    ExportContext,
    dtype_name,
    is_hub_id,
)

# formats that hold a reduced draft vocabulary (drafter.draft_vocab) for a family: EAGLE-3's d2t / t2d maps,
# EAGLE-1's hot_token_ids.pt (SGLang --speculative-token-map); the
# others carry the full LM head (the Medusa and transformers formats have no draft-vocabulary field)
VOCAB_FORMATS = {"sglang": ("eagle1", "eagle3"), "vllm": ("eagle3",)}  # EAGLE-1: SGLang's FR-Spec token map
# why a format cannot hold a family whose drafters other formats do serve (named in the refusal)
WHY_NOT = {("vllm", "eagle1"): "speculators 0.9.0 loads no EAGLE-1 checkpoint (its model types: dflash, dflash2, "
                               "dspark, eagle3, mtp, peagle, xpress) and vLLM reads only eagle3/peagle speculators "
                               "folders (its own EAGLE-1 model has no fc bias), so neither would load this folder; SGLang serves EAGLE-1"}

__all__ = ["FORMATS", "VOCAB_FORMATS", "ExportContext", "check_family", "check_format", "detect", "load_exported",
           "load_exported_model", "write_export"]


def check_family(fmt: str, family: str) -> None:
    """A one-line error when `fmt` is unknown or cannot hold a `family` drafter."""
    if fmt not in FORMATS:
        raise DraftsmithError(f"export.format={fmt!r} is not a format: choose from {', '.join(FORMATS)}")
    if family not in FORMATS[fmt]:
        ok = [f for f, fams in FORMATS.items() if family in fams]
        fix = (f"export it with export.format={' or '.join(ok)}" if ok else
               "no serving engine loads it; evaluate it with stage=eval instead")
        why = f" ({WHY_NOT[(fmt, family)]})" if (fmt, family) in WHY_NOT else ""
        raise DraftsmithError(f"export.format={fmt} takes {', '.join(FORMATS[fmt])} drafters, not {family}{why}: "
                              f"{fix}")


def write_export(model, target, fmt: str, out: str | Path, ctx: ExportContext) -> Path:
    """Write `model` (a TrainableDrafter) into folder `out` (created) in format `fmt`, README included."""
    family = model.family
    check_family(fmt, family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt in ("sglang", "vllm"):
        eagle.write(fmt, model, target, out, ctx)
    elif fmt == "medusa":
        medusa.write(model, target, out, ctx)
    elif fmt == "dflash":
        dflash.write(model, target, out, ctx)
    else:
        hf.write(model, target, out, ctx)
    (out / README).write_text(readme(fmt, family, model, target, out, ctx))
    return out


def detect(folder: str | Path) -> tuple[str, str]:
    """(format, family) an exported folder's config.json declares."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise DraftsmithError(f"{folder} has no {CONFIG}: it is not an exported drafter folder")
    cfg = json.loads(path.read_text())
    spec = cfg.get("speculators_model_type")
    if spec is not None:
        family = {v: k for k, v in eagle.SPEC_TYPE.items()}.get(spec)
        if family is None:
            raise DraftsmithError(f"{path}: speculators_model_type {spec!r} is not one draftsmith exports")
        return "vllm", family
    arch = cfg.get("architectures") or []
    for family, name in eagle.ARCH.items():
        if arch == [name]:
            return "sglang", family
    if "medusa_num_heads" in cfg:
        return "medusa", "medusa"
    if arch == [dflash.ARCH]:
        return "dflash", "dflash"
    return "hf", "pard" if hf.MASK_FIELD in cfg else "small"


def check_format(folder: str | Path, fmt: str | None = None) -> list[str]:
    """Every violation of `folder` against format `fmt` (None = the one its config declares): missing or
    unexpected files, config fields and tensor names, shapes and dtypes. [] = consumers can load it."""
    folder = Path(folder)
    ck = Checker(folder)
    cfg = ck.json(CONFIG)
    if not cfg:
        return ck.violations
    found, family = detect(folder)
    fmt = fmt or found
    if fmt not in FORMATS:
        raise DraftsmithError(f"format {fmt!r} is not a format: choose from {', '.join(FORMATS)}")
    if found != fmt:
        ck.fail(CONFIG, f"declares a {found} folder, not {fmt}")
        return ck.violations
    readme_path = ck.file(README)
    if readme_path is not None and not readme_path.read_text().startswith(README_HEADER):
        ck.fail(README, f"does not start with {README_HEADER!r}")
    if fmt in ("sglang", "vllm"):
        eagle.check(ck, cfg, family, fmt)
    elif fmt == "medusa":
        medusa.check(ck, cfg)
    elif fmt == "dflash":
        dflash.check(ck, cfg)
    else:
        hf.check(ck, cfg, family)
    return ck.violations


def load_exported_model(folder: str | Path, target):
    """The TrainableDrafter an exported folder holds, rebuilt from the folder alone (after check_format)."""
    folder = Path(folder)
    fmt, family = detect(folder)
    bad = check_format(folder, fmt)
    if bad:
        raise DraftsmithError(f"{folder} is not a valid {fmt} export ({len(bad)} problems, first: {bad[0]}): "
                              "re-export it")
    cfg = json.loads((folder / CONFIG).read_text())
    if fmt in ("sglang", "vllm"):
        return eagle.load(folder, cfg, family, fmt, target)
    if fmt == "medusa":
        return medusa.load(folder, cfg, target)
    if fmt == "dflash":
        return dflash.load(folder, cfg, target)
    return hf.load(folder, cfg, target)


def load_exported(folder: str | Path, target):
    """A decoding drafters.base.Drafter over an exported folder. Medusa-2 folders hold their fine-tuned
    base model in base/ (export.formats.medusa.base_path): decode with that as the target."""
    return load_exported_model(folder, target).as_drafter(target)


# --------------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------------
_TITLES = {("sglang", "eagle3"): "EAGLE-3 drafter for SGLang", ("sglang", "eagle1"): "EAGLE-1 drafter for SGLang",
           ("vllm", "eagle3"): "EAGLE-3 speculator for vLLM (speculators format)",
           ("medusa", "medusa"): "Medusa heads", ("hf", "small"): "independent draft model (Hugging Face folder)",
           ("hf", "pard"): "PARD parallel draft model (Hugging Face folder)",
           ("dflash", "dflash"): "DFlash block drafter (z-lab layout) for vLLM and SGLang"}


def _variables(tgt: str, lang: str) -> list[str]:
    """The two names every command below takes explicitly, so each runs from any working directory."""
    if lang == "python":
        return [f"TARGET = \"{tgt}\"  # the target (verifier): its path or hub id", "DRAFT = \".\"  # this folder: "
                "its path when you run this from another directory"]
    return [f"TARGET=\"{tgt}\"  # the target (verifier): its path or hub id",
            "DRAFT=.  # this folder: its path when you run these from another directory"]


def readme(fmt: str, family: str, model, target, out: Path, ctx: ExportContext) -> str:
    """How to serve this folder, with the command lines filled in. Every command takes the target and this
    folder explicitly (TARGET, DRAFT), so it runs from any directory: config files name the target only by a
    hub id, or by the placeholder `<path of NAME>` for a local target (ctx.target_ref), never by a path of
    this machine."""
    tgt, k, dt = ctx.target_ref, ctx.speculative_tokens, dtype_name(ctx.dtype)
    joint = fmt == "medusa" and model.cfg.joint
    if joint:
        tgt_line = (f"Base model (verifier): `base/`, the target `{tgt}` trained jointly with the heads (LoRA merged); "
                    "config.json names it `base`, relative to this folder.")
        tgt = "base"  # in the commands: set TARGET to $DRAFT/base when run from elsewhere
    elif is_hub_id(tgt):
        tgt_line = f"Target (verifier): `{tgt}`, a hub id (config files name it too)."
    else:
        tgt_line = (f"Target (verifier): the local folder the drafter was trained on. No path to a folder resolves "
                    f"on every machine and from every directory, so config files name it `{tgt}`, a placeholder, "
                    "and every command below takes the target as `TARGET`: set it to that folder's path (or the "
                    "target's hub id).")
    sh, py = _variables(tgt, "bash"), _variables(tgt, "python")
    lines = [f"{README_HEADER}: {_TITLES[(fmt, family)]}", "", tgt_line +
             f" Weights in {dt}: serve with dtype {dt}. Written by `python train.py stage=export "
             f"export.format={fmt}` on {time.strftime('%Y-%m-%d')}; `config.yaml` here is the run's resolved config "
             "(paths of the machine that wrote it replaced by `<path of NAME>`).", "", "## Serve", "",
             "Each command passes the target (`TARGET`) and this folder (`DRAFT`) explicitly, so it runs from any "
             "directory once the two are set.", ""]
    if fmt == "sglang":
        algo = "EAGLE3" if family == "eagle3" else "EAGLE"
        token_map = f" --speculative-token-map \"$DRAFT/{eagle.TOKEN_MAP}\"" if (out / eagle.TOKEN_MAP).is_file() else ""
        lines += ["SGLang:", "", "```bash", *sh, f"python -m sglang.launch_server --model-path \"$TARGET\" --dtype {dt} \\",
                  f"    --speculative-algorithm {algo} --speculative-draft-model-path \"$DRAFT\" \\",
                  f"    --speculative-num-steps {k} --speculative-eagle-topk {ctx.top_k} "
                  f"--speculative-num-draft-tokens {ctx.draft_tokens}{token_map}", "```", ""]
        if family == "eagle3":
            lines += ["SpecForge (0.2.0, which trains this layout): build the model from config.json and load the "
                      "weights yourself. Its `AutoDraftModel.from_pretrained` leaves the rotary buffers "
                      "uninitialised, so a model loaded that way drafts NaN from every EAGLE-3 folder, this one "
                      "included.", "", "```python", "from safetensors.torch import load_file",
                      "from specforge.modeling.auto import AutoDraftModel, AutoDraftModelConfig", *py,
                      "config = AutoDraftModelConfig.from_file(f\"{DRAFT}/config.json\")",
                      "model = AutoDraftModel.from_config(config, attention_backend=\"sdpa\")",
                      "missing, unexpected = model.load_state_dict(load_file(f\"{DRAFT}/model.safetensors\"), "
                      "strict=False)  # every tensor but embed_tokens",
                      "model.load_embedding(TARGET)  # the target's input embedding, which SGLang shares", "```", ""]
        lines += ["vLLM: " + ("export this drafter with `export.format=vllm` (vLLM reads the speculators layout, "
                              "which numbers the target layers differently)." if family == "eagle3" else
                              "not supported (vLLM and speculators load no EAGLE-1 drafter with an fc bias); "
                              "serve this folder with SGLang.")]
    elif fmt == "vllm":
        spec = f"{{\\\"model\\\": \\\"$DRAFT\\\", \\\"method\\\": \\\"eagle3\\\", \\\"num_speculative_tokens\\\": {k}}}"
        lines += ["vLLM:", "", "```bash", *sh, f"vllm serve \"$TARGET\" --dtype {dt} --speculative-config \"{spec}\""]
        if is_hub_id(tgt):
            lines += ["# or, with the target config.json names (the hub id above):", f"vllm serve \"$DRAFT\" --dtype {dt}"]
        lines += ["```", "", "The speculators library (0.9.0) loads the target's LM head from the verifier that config.json "
                  "names, so give it the target there:", "", "```python",
                  "from speculators import SpeculatorModel, SpeculatorModelConfig", *py,
                  "config = SpeculatorModelConfig.from_pretrained(DRAFT)",
                  "config.speculators_config.verifier.name_or_path = TARGET",
                  "model = SpeculatorModel.from_pretrained(DRAFT, config=config)", "```", "",
                  "SGLang: export this drafter with `export.format=sglang` (SGLang reads the SpecForge layout)."]
    elif fmt == "dflash":
        n = model.cfg.block_size - 1
        lines += ["vLLM:", "", "```bash", f"vllm serve {tgt} --dtype {dt} --speculative-config "
                  f"'{{\"model\": \".\", \"method\": \"dflash\", \"num_speculative_tokens\": {n}}}'", "```", "",
                  "SGLang:", "", "```bash", f"python -m sglang.launch_server --model-path {tgt} --dtype {dt} \\",
                  "    --speculative-algorithm DFLASH --speculative-draft-model-path .", "```", "",
                  "## DFlash", "", f"One forward drafts {n} tokens: the block is the last accepted token and "
                  f"{n} copies of the mask token (dflash_config.mask_token_id = {model.mask_id}, a row of the "
                  f"target's own embedding). The drafter reads the outputs of target layers "
                  f"{dflash.zlab_layer_ids(model.target_layer_ids, target.num_layers)} (dflash_config.target_layer_ids;"
                  " eagle_aux_hidden_state_layer_ids lists each plus one) and uses the target's embedding and LM "
                  "head: the folder ships neither. The target architecture must support hidden-state capture in "
                  "the engine."]
    elif fmt == "medusa":
        lines += ["TGI reads config.json + medusa_lm_head.safetensors, and the base model from "
                  f"`base_model_name_or_path` (`{ctx.target_ref if not joint else 'base'}`"
                  + ("" if joint or is_hub_id(tgt) else ": set it to the target's path first")
                  + (", relative to the directory TGI runs in" if joint else "") + "):", "", "```bash", *sh,
                  f"text-generation-launcher --model-id \"$DRAFT\" --dtype {dt}", "```", "",
                  "FasterDecoding/Medusa (`pip install medusa-llm`, 0.1; tested with transformers 5.25): "
                  "`MedusaModel.from_pretrained` builds the base model with medusa-llm's own KV-cache Llama, which "
                  "predates transformers 5 and fails there (`KeyError: 'type'`). Build the base model with "
                  "transformers and load the heads (medusa_lm_head.pt) into a `MedusaModel`; its forward then gives "
                  "the heads' logits:", "", "```python", "import torch",
                  "from medusa.model.medusa_model import MedusaModel",
                  "from transformers import AutoModelForCausalLM", *py,
                  f"base = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.{dt})",
                  f"model = MedusaModel(base, medusa_num_heads={model.cfg.num_heads}, "
                  f"medusa_num_layers={model.cfg.num_layers}, base_model_name_or_path=TARGET)",
                  "model.medusa_head.load_state_dict(torch.load(f\"{DRAFT}/medusa_lm_head.pt\", map_location=base.device))",
                  "```", "",
                  "vLLM 0.33 has no Medusa model and SGLang serves no Medusa heads: use TGI or FasterDecoding/Medusa."]
        if model.cfg.num_layers > 1:
            lines += ["", f"FasterDecoding/Medusa repeats one ResBlock object {model.cfg.num_layers} times per head, "
                      "so it keeps only the last block's weights: only TGI reads these heads faithfully."]
        if joint:
            lines += ["", "Medusa-2: `base/` is the jointly trained target (LoRA merged): the heads were trained on "
                      "its hidden states, so it is the model to serve them with (`base_model_name_or_path` is `base`; "
                      "from another directory set `TARGET` to `$DRAFT/base`)."]
    else:
        lines += ["transformers (assisted generation):", "", "```python", "import torch",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", *py,
                  f"target = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.{dt})",
                  "draft = AutoModelForCausalLM.from_pretrained(DRAFT, dtype=\"auto\")",
                  "tok = AutoTokenizer.from_pretrained(DRAFT)",
                  "out = target.generate(**tok(\"Hello\", return_tensors=\"pt\"), assistant_model=draft, "
                  "do_sample=False, max_new_tokens=64)", "```", "", "SGLang and vLLM (standalone draft model):", "",
                  "```bash", *sh, f"python -m sglang.launch_server --model-path \"$TARGET\" --dtype {dt} "
                  f"--speculative-algorithm STANDALONE --speculative-draft-model-path \"$DRAFT\" --speculative-num-steps {k}",
                  f"vllm serve \"$TARGET\" --dtype {dt} --speculative-config \"{{\\\"model\\\": \\\"$DRAFT\\\", "
                  f"\\\"method\\\": \\\"draft_model\\\", \\\"num_speculative_tokens\\\": {k}}}\"", "```"]
        if family == "pard":
            lines += ["", "## PARD", "", f"config.json's `{hf.MASK_FIELD}` = {model.mask_id} is the mask token id: "
                      f"the model drafts `{hf.K_FIELD}` = {model.cfg.k} tokens in one forward by reading the context "
                      f"followed by {model.cfg.k - 1} copies of it (`{hf.MASK_FIELD}` is the field vLLM's parallel "
                      "drafting reads). The assisted generation and standalone commands above use it as a plain "
                      "autoregressive draft model, one token per forward."]
            if model.model.config.vocab_size != target.model.config.vocab_size:
                lines += ["", "Its vocabulary is the target's plus the mask row, which transformers takes for another "
                          "tokenizer: pass `tokenizer=tok, assistant_tokenizer=tok` to `generate` (universal "
                          "assisted decoding) along with `assistant_model=draft`."]
    if family == "eagle3":
        lines += ["", "## Target layers", "",
                  f"The drafter reads the hidden states entering target layers "
                  f"{eagle.engine_layers(target.feature_layers, target.num_layers)} (vLLM's "
                  "`eagle_aux_hidden_state_layer_ids`; SGLang's `eagle_config` lists each minus one, as SGLang "
                  "adds one). The target architecture must support EAGLE-3 capture in the engine."]
    return "\n".join(lines) + "\n"
