"""Stage `export`: write a trained drafter in a serving engine's format, then prove the folder works.

    python train.py stage=export export=sglang run.name=l31-eagle3          # -> runs/l31-eagle3/export/sglang/
    python train.py stage=export export=vllm export.dtype=float16 export.out_dir=/models/l31-eagle3
    python train.py stage=export export=medusa drafter=medusa drafter.checkpoint=runs/m1/train/final
    python -m pytest -q tests/export/test_export_stage.py

Reads the drafter folder the train stage wrote (<run>/train/final, or drafter.checkpoint); its family comes
from the folder's drafter_config.json and must be the command's `drafter=` (as stage=eval requires). Writes export.out_dir (default <run>/export/<format>/) atomically:
built beside it, then swapped in, so a crash never leaves half a folder; an existing out_dir is replaced
only when it is empty or an earlier draftsmith export (runtime/rundir.py). Then every export is checked, and a broken one
fails with a one-line error:
  1. check_format: file names, config fields, exact tensor names, shapes and dtypes vs the consumer's spec;
  2. reload: the importer rebuilds the drafter from the folder alone; every weight must equal the
     trained one cast to export.dtype (and a copied target weight, vLLM's embed_tokens or Medusa-2's base/,
     the target's);
  3. decode: the reloaded drafter drives the built-in speculative decoder (decoding.decoder); greedy output
     must equal the target's own greedy output on export.check_prompts prompts.
Formats, families and layouts: export/formats/__init__.py.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from conf.errors import DraftsmithError
from conf.schema import Config, run_dir, trained_drafter_dir
from data_gen.output import draft_vocab_view
from decoding.decoder import SpeculativeDecoder
from decoding.tree import fit_depth
from export.formats import (
    VOCAB_FORMATS,
    check_family,
    check_format,
    load_exported_model,
    write_export,
)
from export.formats.common import (
    ExportContext,
    export_dtype,
    placeholder,
    target_ref,
)
from runtime.rundir import check_replaceable, normalise_modes, stage_session, swap_in, writable_dir

# prompts of the decode check (rendered with the target's chat template when it has one)
CHECK_PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is, with an example.",
                 "List three fruits and say which one you like best.", "def fibonacci(n):"]


def out_dir(cfg: Config) -> Path:
    return Path(cfg.export.out_dir) if cfg.export.out_dir else run_dir(cfg) / "export" / cfg.export.format


def preflight(cfg: Config) -> None:
    """Before any stage of a `stages=[...]` command runs: an out_dir that is not ours stops it at once."""
    _check_replaceable(out_dir(cfg))


def run(cfg: Config) -> dict:
    """Export the trained drafter of this run (see the module docstring); returns the check results."""
    with stage_session(cfg, "export"):
        return _run(cfg)


def _run(cfg: Config) -> dict:
    from drafters.folder import check_family as check_folder_family
    from drafters.folder import read_checkpoint_config
    from drafters.registry import drafter_class
    from drafters.target import load_target

    ex = cfg.export
    ex.check()  # format, dtype and check sizes (conf/schema/export.py), again for a config changed in code
    dtype = export_dtype(ex.dtype)
    ckpt = trained_drafter_dir(cfg)
    meta = read_checkpoint_config(ckpt)
    family = meta.get("family")
    check_family(ex.format, family)  # before loading anything: the likelier mistakes fail in milliseconds
    check_folder_family(meta, cfg.drafter.name, ckpt)  # drafter=<name> must name what the folder holds, as in eval
    out = out_dir(cfg)
    _check_replaceable(out)
    writable_dir(out.parent, "export.out_dir", "choose a writable export.out_dir")

    target = load_target(_target_config(cfg, meta, ckpt), device=cfg.run.device)
    model = drafter_class(family).from_pretrained(str(ckpt), target).eval()
    if family in VOCAB_FORMATS.get(ex.format, ()):  # the format holds a reduced draft vocabulary (d2t / t2d)
        model = draft_vocab_view(cfg, model, target)
    elif cfg.drafter.draft_vocab is not None:
        print(f"export: export.format={ex.format} has no reduced draft vocabulary for {family}: the folder carries "
              "the full LM head (drafter.draft_vocab applies to stage=eval only)", flush=True)
    tree = cfg.eval.tree
    ctx = ExportContext(dtype=dtype, target_ref=target_ref(cfg.target.path),
                        speculative_tokens=ex.speculative_tokens or tree.depth, top_k=tree.top_k,
                        draft_tokens=tree.total_tokens, final_dir=out)

    def build(tmp: Path) -> None:
        write_export(model, target, ex.format, tmp, ctx)
        save_portable_config(cfg, tmp)
    publish(out, build)

    result = verify_export(model, target, out, ex.format, dtype, tree, ex.check_prompts, ex.check_max_new_tokens)
    result.update(checkpoint=str(ckpt), dtype=ex.dtype)
    dec = result["decode_check"]
    decoded = (f"greedy decode equals the target's on {dec['prompts']} prompts (tau {dec['tau']:.2f})"
               if "tau" in dec else f"decode check skipped: {dec['skipped']}")
    print(f"export: {family} -> {ex.format} at {out} ({len(result['files'])} files, {ex.dtype}); format check "
          f"passed; reload matches {result['tensors_checked']} tensors; {decoded}")
    return result


def _target_config(cfg: Config, meta: dict, ckpt: Path):
    """cfg.target, with the feature layers the drafter was trained on when its checkpoint records them
    (`target.feature_layers` in drafter_config.json): an EAGLE-3 or DFlash export names those layers, and a
    different tap choice would be silently wrong."""
    trained = (meta.get("target") or {}).get("feature_layers")
    if trained is None or meta.get("family") not in ("eagle3", "dflash"):
        return cfg.target
    if cfg.target.feature_layers is None:
        return dataclasses.replace(cfg.target, feature_layers=list(trained))
    if list(cfg.target.feature_layers) != list(trained):
        raise DraftsmithError(
            f"target.feature_layers={list(cfg.target.feature_layers)} but the drafter at {ckpt} was trained on "
            f"{list(trained)}: drop the override or set target.feature_layers={list(trained)}")
    return cfg.target


def save_portable_config(cfg: Config, folder: Path) -> Path:
    """The run's resolved config as `folder/config.yaml`, with no path of this machine in it: the folder is
    shared and moved, and an absolute run.root or target path would be the only machine path in it. Each
    absolute path becomes relative to the project when it lies inside it, else a `<path of NAME>` placeholder."""
    from omegaconf import OmegaConf

    from conf.schema import PROJECT_ROOT

    def portable(v):
        if isinstance(v, dict):
            return {k: portable(x) for k, x in v.items()}
        if isinstance(v, list):
            return [portable(x) for x in v]
        if isinstance(v, str) and os.path.isabs(os.path.expanduser(v)):
            p = Path(os.path.expanduser(v)).resolve()
            return str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else placeholder(p.name)
        return v

    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    path = folder / "config.yaml"
    path.write_text(OmegaConf.to_yaml(portable(tree)))
    return path


# --------------------------------------------------------------------------------------------------
# Writing the folder atomically
# --------------------------------------------------------------------------------------------------
def _check_replaceable(out: Path) -> None:
    check_replaceable(out, "export.out_dir", "choose another export.out_dir")


def publish(out: Path, build) -> Path:
    """Run build(tmp) in a sibling temp folder, then swap it in for `out` (replacing an earlier export)."""
    _check_replaceable(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    writable_dir(tmp, "export.out_dir", "choose a writable export.out_dir")
    try:
        build(tmp)
        normalise_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return swap_in(tmp, out, "export.out_dir", "choose another export.out_dir")


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def expected_weights(model, dtype: torch.dtype, target) -> dict[str, torch.Tensor]:
    """What the reloaded drafter's weights must be: the trained ones cast to `dtype`, with EAGLE-3's fc
    taken through the same exact tap remapping export and import apply."""
    from export.formats.common import cast_tensors

    if model.family == "small":
        return cast_tensors(model.plain_model().state_dict(), dtype)
    if model.family == "medusa":
        return cast_tensors(model.heads_state_dict(), dtype)
    state = cast_tensors(model.state_dict(), dtype)
    if model.family == "eagle3":
        from export.formats.eagle import engine_layers, remap_fc

        taps, H = list(target.feature_layers), model.dims.hidden_size
        layers = engine_layers(taps, target.num_layers)
        exported = remap_fc(model.state_dict()["fc.weight"], H, taps, layers).to(dtype)
        state["fc.weight"] = remap_fc(exported.cpu(), H, layers, taps)
    return state


def reloaded_weights(model) -> dict[str, torch.Tensor]:
    if model.family == "small":
        return {k: v.cpu() for k, v in model.model.state_dict().items()}
    if model.family == "medusa":
        return {k: v.cpu() for k, v in model.heads_state_dict().items()}
    return {k: v.cpu() for k, v in model.state_dict().items()}


def verify_export(model, target, out: Path, fmt: str, dtype: torch.dtype, tree_cfg, prompts: int,
                  max_new_tokens: int) -> dict:
    """The three checks of the module docstring; DraftsmithError on the first that fails."""
    bad = check_format(out, fmt)
    if bad:
        raise DraftsmithError(f"the {fmt} export at {out} is broken ({len(bad)} problems): {'; '.join(bad)}")
    reloaded = load_exported_model(out, target)
    want, have = expected_weights(model, dtype, target), reloaded_weights(reloaded)
    if set(want) != set(have):
        raise DraftsmithError(f"reloading {out} gave weights {sorted(set(have) ^ set(want))[:3]} that the trained "
                              "drafter does not have (or lacks some it has): the exporter and importer disagree")
    diff = [k for k in want if want[k].dtype != have[k].dtype or not torch.equal(want[k], have[k])]
    if diff:
        raise DraftsmithError(f"reloading {out} changed {len(diff)} weights (first: {diff[0]}): the exported "
                              "tensors do not round-trip; re-export, and report it if it persists")
    n_base = check_base_weights(out, target, dtype) + (fmt == "vllm")  # vllm: embed_tokens, checked on reload
    drafter = reloaded.as_drafter(target)
    decode = decode_check(target, drafter, fit_depth(tree_cfg, getattr(drafter, "max_depth", None)), prompts,
                          max_new_tokens)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"format": fmt, "family": model.family, "out_dir": str(out), "files": files, "violations": [],
            "tensors_checked": len(want) + n_base, "decode_check": decode}


def check_base_weights(out: Path, target, dtype: torch.dtype) -> int:
    """Medusa-2's base/ must hold exactly the (merged) target it was exported from, cast to `dtype`;
    compared tensor by tensor from the files, so no second copy of the model is loaded. Returns the
    number of tensors compared (0 without base/)."""
    from safetensors import safe_open

    from export.formats.medusa import base_path

    base = base_path(out)
    if base is None:
        return 0
    state = {k: v.detach() for k, v in target.model.state_dict().items()}
    seen: set[str] = set()
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                want = state.get(k)
                got = sf.get_tensor(k)
                if want is not None:
                    want = want.cpu().to(dtype) if want.is_floating_point() else want.cpu()
                if want is None or got.dtype != want.dtype or not torch.equal(got, want):
                    raise DraftsmithError(f"{base}: tensor {k} is not the merged target's: re-export")
                seen.add(k)
    ptrs = {state[k].data_ptr() for k in seen}
    missing = [k for k in state if k not in seen and state[k].data_ptr() not in ptrs]  # tied ones are saved once
    if missing:
        raise DraftsmithError(f"{base} lacks {len(missing)} weights of the target (first: {missing[0]}): re-export")
    return len(seen)


def check_prompt_ids(target, n: int) -> list[list[int]]:
    """Token ids of the first n check prompts, as chat turns when the target has a template."""
    tok, out = target.tokenizer, []
    try:
        template = target.chat_template
    except DraftsmithError:  # no template: plain text prompts
        template = None
    for text in (CHECK_PROMPTS * (n // len(CHECK_PROMPTS) + 1))[:n]:
        if template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                          add_generation_prompt=True, chat_template=template)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        else:
            out.append(tok(text)["input_ids"])
    return out


def decode_check(target, drafter, tree_cfg, prompts: int, max_new_tokens: int) -> dict:
    """Greedy speculative decoding with `drafter` must reproduce the target's greedy output exactly."""
    if prompts == 0:
        return {"skipped": "export.check_prompts=0"}
    dec = SpeculativeDecoder(target, drafter, tree_cfg, temperature=0.0)
    cycles = produced = 0
    for i, ids in enumerate(check_prompt_ids(target, prompts)):
        spec, st = dec.generate(ids, max_new_tokens)
        base, _ = dec.generate_autoregressive(ids, max_new_tokens)
        if not torch.equal(spec.cpu(), base.cpu()):
            raise DraftsmithError(
                f"decode check failed on prompt {i}: greedy speculative output with the exported drafter differs "
                f"from the target's own greedy output ({spec.tolist()[:8]}... vs {base.tolist()[:8]}...); the "
                "decoder is lossless, so the export does not fit this target")
        cycles, produced = cycles + st.cycles, produced + st.cycle_tokens
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "tau": produced / max(cycles, 1)}
