"""EAGLE-1 / EAGLE-3 drafters as SGLang and vLLM (speculators) load them.

    from export.formats import write_export, check_format, load_exported
    python -m pytest -q tests/export/test_export_eagle.py

SGLang (`export.format=sglang`), checked against sglang/srt/models/llama_eagle3.py and llama_eagle.py:
  EAGLE-3  config.json: architectures [LlamaForCausalLMEagle3], a one-layer Llama config (vocab_size = the
           target's), draft_vocab_size, tie_word_embeddings false (true would make SGLang use the
           embedding as LM head), eagle_config {eagle_aux_hidden_state_layer_ids, use_aux_hidden_state}.
           model.safetensors: fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t (int64 offsets:
           SGLang's hot_token_id = d2t + arange, as in SpecForge's output), t2d (bool; SGLang skips it);
           both also at full vocabulary (the identity maps, below).
           No embed_tokens: SGLang shares the target's.
  EAGLE-1  architectures [LlamaForCausalLMEagle], num_hidden_layers = the drafter's; fc.{weight,bias},
           layers.<i>.* (layer 0 without input_layernorm); embeddings and LM head come from the target.
           A reduced draft vocabulary (drafter.draft_vocab) is SGLang's FR-Spec token map: hot_token_ids.pt,
           a torch.save'd list of the kept target ids, passed as --speculative-token-map (SGLang then cuts
           the target's LM head to those rows: speculative/eagle_worker.py load_token_map, hot_token_id).
vLLM (`export.format=vllm`), EAGLE-3 only: the speculators layout (speculators 0.9.0's
Eagle3SpeculatorConfig / Eagle3DraftModel; vLLM 0.33.0's transformers_utils/configs/speculators and
model_executor/models/llama_eagle3.py):
  config.json: speculators_model_type eagle3, speculators_config {algorithm, proposal_methods
           [{proposal_type greedy, speculative_tokens, ...}], default_proposal_method, verifier
           {name_or_path, architectures}}, transformer_layer_config, draft_vocab_size,
           norm_before_residual false (written explicitly: vLLM defaults a missing one to true, which is
           not this layer), eagle_aux_hidden_state_layer_ids.
  model.safetensors: as SGLang's with midlayer.* named layers.0.* (speculators' own name), plus
           embed_tokens.weight = the target's input embedding. speculators copies the embedding from the
           verifier only while its own is still NaN after loading (speculators/model.py:168-170), but
           transformers 5.24 initialises a missing embed_tokens first (all zeros, seen with 0.9.0), so a
           folder without it drafts from a blank embedding. vLLM loads it and shares the target's
           instead when the two are equal (v1/spec_decode/llm_base_proposer.py:1437-1470).
  EAGLE-1 is refused: speculators 0.9.0 registers no `eagle` model type and vLLM 0.33.0 registers only
  eagle3/peagle speculators configs (transformers_utils/configs/speculators/algos.py) and builds its
  EAGLE-1 fc without the bias ours has (model_executor/models/llama_eagle.py:110-117).
Full draft vocabulary (draft_vocab_size == the target's vocab_size): the SGLang layout writes the identity
maps (d2t all zeros, t2d all true), as SpecForge's exporter does, which lists them as required; without them
SpecForge's from_pretrained fills d2t with whatever memory held. SGLang loads them as an identity hot-token
map (and would treat a missing d2t as the identity too: sglang/srt/models/llama_eagle3.py:350-353). The vLLM
layout writes none: vLLM creates draft_id_to_target_id only when the vocabularies differ
(llama_eagle3.py:339-345) but renames any d2t it is given to that name (llama_eagle3.py:428-429), so a
full-vocab d2t fails to load ("no module or parameter named 'draft_id_to_target_id'").

Feature taps. Engines capture the residual stream *entering* chosen target layers, each layer once, in
increasing order, and EAGLE-3's fc reads exactly 3 of them. Our checkpoints fuse target.feature_layers in
the order given (defaults can repeat a layer on shallow targets, e.g. [2, 2, 1] for 4 layers). Export
rewrites fc exactly onto 3 distinct increasing layers: blocks of a repeated layer are summed, missing slots
get an all-zero block on an unused layer. vLLM ids are those layers; SGLang's are one less (it adds 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from conf.errors import DraftsmithError
from export.formats.common import (
    CONFIG,
    WEIGHTS,
    Checker,
    ExportContext,
    cast_tensors,
    dims_from_layer_config,
    dtype_name,
    layer_config,
    load_tensors,
    save_tensors,
)
from runtime.files import write_json

ENGINE_TAPS = 3  # SGLang's and vLLM's EAGLE-3 fc reads 3 target layers
ARCH = {"eagle3": "LlamaForCausalLMEagle3", "eagle1": "LlamaForCausalLMEagle"}
SPEC_TYPE = {"eagle3": "eagle3"}
EMBED = "embed_tokens.weight"
TOKEN_MAP = "hot_token_ids.pt"  # EAGLE-1's reduced draft vocabulary: SGLang's --speculative-token-map file
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------
# Feature taps
# --------------------------------------------------------------------------------------------------
def engine_layers(feature_layers: list[int], num_layers: int) -> list[int]:
    """The 3 distinct increasing target layers (inputs of) an engine captures for these taps."""
    bad = [i for i in feature_layers if not 1 <= i <= num_layers - 1]
    if bad:
        raise DraftsmithError(
            f"target.feature_layers {list(feature_layers)} has {bad}: SGLang and vLLM capture the hidden state "
            f"entering layers 1..{num_layers - 1} only (not the embeddings, 0, nor the final normed output, "
            f"{num_layers}); retrain with target.feature_layers inside that range")
    layers = sorted(set(feature_layers))
    if len(layers) > ENGINE_TAPS:
        raise DraftsmithError(
            f"target.feature_layers {list(feature_layers)} taps {len(layers)} layers, but SGLang and vLLM EAGLE-3 "
            f"read exactly {ENGINE_TAPS}: retrain with {ENGINE_TAPS} target.feature_layers")
    spare = [i for i in range(1, num_layers) if i not in layers]
    if len(layers) + len(spare) < ENGINE_TAPS:
        raise DraftsmithError(f"a {num_layers}-layer target has fewer than {ENGINE_TAPS} capturable layers "
                              "(1..L-1): SGLang and vLLM cannot serve EAGLE-3 for it")
    return sorted(layers + spare[:ENGINE_TAPS - len(layers)])


def remap_fc(weight: torch.Tensor, hidden: int, from_layers: list[int], to_layers: list[int]) -> torch.Tensor:
    """fc weight [H, len(from)*H] reading features at `from_layers` -> an equal map reading `to_layers`.

    Each input block goes to the first output slot of the same layer (blocks of a repeated layer add up);
    output slots nobody maps to stay zero. A non-zero block whose layer is not in `to_layers` cannot be
    represented and is an error."""
    if weight.shape[1] != len(from_layers) * hidden:
        raise DraftsmithError(
            f"the drafter's fc reads {weight.shape[1] // hidden} feature taps but target.feature_layers gives "
            f"{len(from_layers)} ({list(from_layers)}): load the target with the feature layers it was trained on")
    out = torch.zeros(weight.shape[0], len(to_layers) * hidden, dtype=torch.float32, device=weight.device)
    for j, layer in enumerate(from_layers):
        block = weight[:, j * hidden:(j + 1) * hidden].float()
        if layer not in to_layers:
            if block.any():
                raise DraftsmithError(
                    f"the exported drafter reads target layer {layer}, which target.feature_layers "
                    f"{list(to_layers)} does not tap: set target.feature_layers to include it")
            continue
        i = to_layers.index(layer)
        out[:, i * hidden:(i + 1) * hidden] += block
    return out.to(weight.dtype)


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
def _token_ids(target) -> dict:
    """bos/eos ids of the target, for configs that carry them."""
    c = target.config
    return {k: getattr(c, k) for k in ("bos_token_id", "eos_token_id") if getattr(c, k, None) is not None}


def speculators_config(algorithm: str, target, ctx: ExportContext) -> dict:
    """The speculators_config block: one greedy proposal method and the verifier (the target)."""
    return {
        "algorithm": algorithm,
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": ctx.speculative_tokens,
                              "verifier_accept_k": 1, "accept_tolerance": 0.0}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": ctx.target_ref,
                     "architectures": list(getattr(target.config, "architectures", None) or [])},
    }


def full_vocab(draft_vocab: int, vocab: int) -> bool:
    """A draft vocabulary that is the whole target vocabulary: no d2t/t2d maps are written (module doc)."""
    return draft_vocab == vocab


def write(fmt: str, model, target, out: Path, ctx: ExportContext) -> None:
    """Write config.json + model.safetensors of an Eagle1Drafter / Eagle3Drafter in format `fmt`."""
    family, dims = model.family, model.dims
    # CORAL's head router (drafter.head_groups) has no place in the engines' layouts: they run the full head,
    # which drafts from all groups (the target verifies either way, so the output is the same)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("router.")}
    head = getattr(model, "draft_head", None) if family == "eagle1" else None  # drafters/vocab_trim.py
    if head is not None:
        state = {k: v for k, v in state.items() if not k.startswith("draft_head.")}
        torch.save(head.ids.cpu().tolist(), out / TOKEN_MAP)
    if family == "eagle3":
        layers = engine_layers(target.feature_layers, target.num_layers)
        state["fc.weight"] = remap_fc(state["fc.weight"], dims.hidden_size, list(target.feature_layers), layers)
        vd = int(state["d2t"].shape[0])
        if fmt == "vllm" and full_vocab(vd, dims.vocab_size):  # vLLM fails on a full-vocabulary d2t; SGLang's
            del state["d2t"], state["t2d"]  # layout keeps the identity maps SpecForge's loader needs
    if fmt == "sglang":
        n_layers = len(model.layers) if family == "eagle1" else 1
        cfg = {"architectures": [ARCH[family]], **layer_config(dims, n_layers, ctx.dtype), **_token_ids(target)}
        if family == "eagle3":
            cfg.update(draft_vocab_size=vd, eagle_config={
                "eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers], "use_aux_hidden_state": True})
    else:  # vllm (check_family admits eagle3 only)
        state = {k.replace("midlayer.", "layers.0.", 1): v for k, v in state.items()}
        state[EMBED] = target.model.get_input_embeddings().weight
        cfg = {"architectures": ["Eagle3DraftModel"], "speculators_model_type": "eagle3",
               "speculators_config": speculators_config("eagle3", target, ctx),
               "transformer_layer_config": layer_config(dims, 1, ctx.dtype, **_token_ids(target)),
               "draft_vocab_size": vd, "norm_before_residual": False, "norm_before_fc": False,
               "target_hidden_size": None, "eagle_aux_hidden_state_layer_ids": layers,
               "embed_requires_grad": False, "tie_word_embeddings": False, "torch_dtype": dtype_name(ctx.dtype)}
    save_tensors(out / WEIGHTS, cast_tensors(state, ctx.dtype))
    write_json(out / CONFIG, cfg)


# --------------------------------------------------------------------------------------------------
# Spec checks
# --------------------------------------------------------------------------------------------------
def _layer_names(prefix: str, input_norm: bool, hidden_norm: bool) -> set[str]:
    names = {f"{prefix}self_attn.{p}.weight" for p in _ATTN} | {f"{prefix}mlp.{p}.weight" for p in _MLP}
    names.add(f"{prefix}post_attention_layernorm.weight")
    if input_norm:
        names.add(f"{prefix}input_layernorm.weight")
    if hidden_norm:
        names.add(f"{prefix}hidden_norm.weight")
    return names


def _layer_shapes(ck: Checker, t: dict, prefix: str, lc: dict, attn_in: int) -> None:
    H, heads = lc["hidden_size"], lc["num_attention_heads"]
    kv, hd, inter = lc.get("num_key_value_heads") or heads, lc.get("head_dim") or H // heads, lc["intermediate_size"]
    for name, shape in ((f"{prefix}self_attn.q_proj.weight", (heads * hd, attn_in)),
                        (f"{prefix}self_attn.k_proj.weight", (kv * hd, attn_in)),
                        (f"{prefix}self_attn.v_proj.weight", (kv * hd, attn_in)),
                        (f"{prefix}self_attn.o_proj.weight", (H, heads * hd)),
                        (f"{prefix}mlp.gate_proj.weight", (inter, H)), (f"{prefix}mlp.up_proj.weight", (inter, H)),
                        (f"{prefix}mlp.down_proj.weight", (H, inter))):
        ck.shape(WEIGHTS, t, name, shape)
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        ck.shape(WEIGHTS, t, f"{prefix}{norm}.weight", (H,))


def _check_layer_config(ck: Checker, where: str, lc: dict, num_layers: int | None) -> bool:
    """The Llama fields a draft layer is built from; False when they are too broken to check shapes."""
    ck.equal(where, lc, "model_type", "llama")
    ok = all(ck.int_field(where, lc, k) is not None for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "vocab_size", "num_hidden_layers"))
    ck.number_field(where, lc, "rms_norm_eps")
    ck.number_field(where, lc, "rope_theta")
    if lc.get("hidden_act") != "silu":
        ck.fail(where, f"hidden_act is {lc.get('hidden_act')!r}, expected 'silu'")
    if num_layers is not None and lc.get("num_hidden_layers") != num_layers:
        ck.fail(where, f"num_hidden_layers is {lc.get('num_hidden_layers')!r}, expected {num_layers}")
    if ok and lc["num_attention_heads"] % lc["num_key_value_heads"]:
        ck.fail(where, "num_attention_heads is not a multiple of num_key_value_heads")
    return ok


def _check_vocab_maps(ck: Checker, t: dict, vd: int, V: int) -> None:
    d2t, t2d = t.get("d2t"), t.get("t2d")
    if d2t is not None:
        if d2t.dtype != torch.int64:
            ck.fail(WEIGHTS, f"d2t is {d2t.dtype}, expected torch.int64 offsets (target id = draft id + d2t)")
        elif tuple(d2t.shape) != (vd,):
            ck.shape(WEIGHTS, t, "d2t", (vd,))
        else:
            ids = d2t + torch.arange(vd)
            if vd and (ids[0] < 0 or ids[-1] >= V or (vd > 1 and not bool((ids[1:] > ids[:-1]).all()))):
                ck.fail(WEIGHTS, f"d2t + arange must list distinct increasing target ids in [0, {V})")
            elif t2d is not None and t2d.dtype == torch.bool and tuple(t2d.shape) == (V,) and not (
                    bool(t2d[ids].all()) and int(t2d.sum()) == vd):
                ck.fail(WEIGHTS, "t2d does not mark exactly the target ids d2t maps to")
    if t2d is not None:
        if t2d.dtype != torch.bool:
            ck.fail(WEIGHTS, f"t2d is {t2d.dtype}, expected torch.bool")
        ck.shape(WEIGHTS, t, "t2d", (V,))


def _check_taps(ck: Checker, where: str, ids, key: str) -> None:
    if not (isinstance(ids, list) and len(ids) == ENGINE_TAPS and all(isinstance(i, int) for i in ids)
            and all(a < b for a, b in zip(ids, ids[1:]))):
        ck.fail(where, f"{key} is {ids!r}, expected {ENGINE_TAPS} increasing layer ids")


def check(ck: Checker, cfg: dict, family: str, fmt: str) -> None:
    """Every violation of config.json + model.safetensors against the `fmt` layout of `family`."""
    t = ck.tensors()
    if fmt == "sglang":
        ck.equal(CONFIG, cfg, "architectures", [ARCH[family]])
        ck.equal(CONFIG, cfg, "tie_word_embeddings", False)
        lc, where = cfg, CONFIG
        n_layers = 1 if family == "eagle3" else lc.get("num_hidden_layers")
    else:
        ck.equal(CONFIG, cfg, "speculators_model_type", SPEC_TYPE[family])
        _check_speculators_config(ck, cfg.get("speculators_config"), SPEC_TYPE[family])
        lc, where, n_layers = cfg.get("transformer_layer_config"), f"{CONFIG} transformer_layer_config", 1
        if not isinstance(lc, dict):
            ck.fail(CONFIG, "transformer_layer_config is missing or not an object")
            lc = {}
    ok = _check_layer_config(ck, where, lc, n_layers)
    if family == "eagle3":
        vd = ck.int_field(CONFIG, cfg, "draft_vocab_size")
        if fmt == "sglang":
            ec = cfg.get("eagle_config")
            if not isinstance(ec, dict):
                ck.fail(CONFIG, "eagle_config is missing (SGLang reads the target layers to capture from it)")
            else:
                _check_taps(ck, f"{CONFIG} eagle_config", ec.get("eagle_aux_hidden_state_layer_ids"),
                            "eagle_aux_hidden_state_layer_ids")
                ck.equal(f"{CONFIG} eagle_config", ec, "use_aux_hidden_state", True)
            prefix = "midlayer."
        else:
            ck.equal(CONFIG, cfg, "norm_before_residual", False)
            ck.equal(CONFIG, cfg, "norm_before_fc", False)
            _check_taps(ck, CONFIG, cfg.get("eagle_aux_hidden_state_layer_ids"), "eagle_aux_hidden_state_layer_ids")
            prefix = "layers.0."
        V = lc.get("vocab_size") if ok else None
        want = {"fc.weight", "norm.weight", "lm_head.weight"} | _layer_names(prefix, True, True)
        if fmt == "vllm":
            want.add(EMBED)
        maps = {"d2t", "t2d"}
        if fmt == "vllm" and vd is not None and full_vocab(vd, V):
            if maps & set(t):
                ck.fail(WEIGHTS, "d2t/t2d with a full draft vocabulary: vLLM has no draft_id_to_target_id to load "
                                 "d2t into and fails: re-export without them")
            t = {k: v for k, v in t.items() if k not in maps}
        else:  # SGLang's layout always has them (identity at full vocabulary: SpecForge's loader requires them)
            want |= maps
        ck.names(WEIGHTS, t, want)
        ck.float_dtypes(WEIGHTS, t, skip=maps)
        if ok:
            H = lc["hidden_size"]
            _layer_shapes(ck, t, prefix, lc, 2 * H)
            ck.shape(WEIGHTS, t, "fc.weight", (H, ENGINE_TAPS * H))
            ck.shape(WEIGHTS, t, "norm.weight", (H,))
            ck.shape(WEIGHTS, t, EMBED, (V, H))
            if vd is not None:
                ck.shape(WEIGHTS, t, "lm_head.weight", (vd, H))
                _check_vocab_maps(ck, t, vd, V)
        return
    # eagle1 (SGLang only)
    n = lc.get("num_hidden_layers") if isinstance(lc.get("num_hidden_layers"), int) else 0
    want = {"fc.weight", "fc.bias"}.union(*(_layer_names(f"layers.{i}.", i > 0, False) for i in range(n)))
    ck.names(WEIGHTS, t, want)
    ck.float_dtypes(WEIGHTS, t)
    if (ck.folder / TOKEN_MAP).is_file():
        ids = token_map(ck.folder)
        V = lc.get("vocab_size")
        if ids is None or not ids or ids != sorted(set(ids)) or ids[0] < 0 or (isinstance(V, int) and ids[-1] >= V):
            ck.fail(TOKEN_MAP, f"must be a torch.save'd list of distinct increasing token ids in [0, {V})")
    if ok:
        H = lc["hidden_size"]
        ck.shape(WEIGHTS, t, "fc.weight", (H, 2 * H))
        ck.shape(WEIGHTS, t, "fc.bias", (H,))
        for i in range(n):
            _layer_shapes(ck, t, f"layers.{i}.", lc, H)


def _check_speculators_config(ck: Checker, sc, algorithm: str) -> None:
    where = f"{CONFIG} speculators_config"
    if not isinstance(sc, dict):
        ck.fail(CONFIG, "speculators_config is missing or not an object")
        return
    ck.equal(where, sc, "algorithm", algorithm)
    methods = sc.get("proposal_methods")
    if not (isinstance(methods, list) and methods and all(isinstance(m, dict) for m in methods)):
        ck.fail(where, "proposal_methods must be a non-empty list of objects")
        return
    for i, m in enumerate(methods):
        if not isinstance(m.get("proposal_type"), str):
            ck.fail(where, f"proposal_methods[{i}].proposal_type is missing")
        ck.int_field(f"{where} proposal_methods[{i}]", m, "speculative_tokens")
    if sc.get("default_proposal_method") not in [m.get("proposal_type") for m in methods]:
        ck.fail(where, f"default_proposal_method {sc.get('default_proposal_method')!r} names no proposal method")
    ver = sc.get("verifier")
    if not isinstance(ver, dict) or not isinstance(ver.get("name_or_path"), str) or not ver["name_or_path"]:
        ck.fail(where, "verifier.name_or_path is missing (vLLM loads the target from it)")
    elif not isinstance(ver.get("architectures"), list):
        ck.fail(where, "verifier.architectures is missing")


# --------------------------------------------------------------------------------------------------
# Importer
# --------------------------------------------------------------------------------------------------
def load(folder: Path, cfg: dict, family: str, fmt: str, target):
    """The TrainableDrafter an exported folder holds, rebuilt from config.json + model.safetensors alone,
    its fc mapped onto `target.feature_layers`, in the file's dtype."""
    from conf.schema.drafter import Eagle1Config, Eagle3Config
    from drafters.eagle1 import Eagle1Drafter
    from drafters.eagle3 import Eagle3Drafter

    state = load_tensors(folder / WEIGHTS)
    if fmt == "sglang":
        lc, n_layers = cfg, int(cfg["num_hidden_layers"])
        ids = [i + 1 for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]] if family == "eagle3" else None
    else:
        lc, n_layers, ids = cfg["transformer_layer_config"], 1, cfg.get("eagle_aux_hidden_state_layer_ids")
        check_embedding(folder, state.pop(EMBED), target)
        state = {k.replace("layers.0.", "midlayer.", 1): v for k, v in state.items()}
    dims = dims_from_layer_config(lc, num_taps=target.num_taps)
    for key, want in (("vocab_size", target.vocab_size), ("hidden_size", target.hidden_size)):
        if getattr(dims, key) != want:
            raise DraftsmithError(f"{folder} was exported for a target with {key} {getattr(dims, key)}, but "
                                  f"{target.name} has {want}: load the target it was exported for")
    dtype = state["fc.weight"].dtype
    if family == "eagle3":
        state["fc.weight"] = remap_fc(state["fc.weight"], dims.hidden_size, ids, list(target.feature_layers))
        vd = int(cfg["draft_vocab_size"])
        if full_vocab(vd, dims.vocab_size) and "d2t" not in state:  # the vLLM layout has no maps: identity
            from drafters.vocab import maps_from_ids

            full = maps_from_ids(torch.arange(vd), vd, "full")
            state.update(d2t=full.d2t, t2d=full.t2d)
        model = Eagle3Drafter.from_meta(Eagle3Config(num_layers=1, draft_vocab_size=vd), target, dims,
                                        {"draft_vocab_size": vd, "vocab_source": "export"})
    else:
        model = Eagle1Drafter.from_meta(Eagle1Config(num_layers=n_layers), target, dims, {})
    model.to(dtype)
    model.load_state_dict({k: v.to(target.device) for k, v in state.items()}, strict=True)
    if family == "eagle1" and (folder / TOKEN_MAP).is_file():  # FR-Spec: draft over the token map's ids only
        from drafters.vocab_trim import ScatterHead, view

        head = ScatterHead(target.model.get_output_embeddings(), torch.tensor(token_map(folder)), dims.vocab_size)
        model = view(model, {"draft_head": head.to(dtype)})
    return model.eval()


def token_map(folder: Path) -> list[int] | None:
    """The ids of an EAGLE-1 folder's hot_token_ids.pt (as SGLang's load_token_map reads it); None when unreadable."""
    try:
        ids = torch.load(folder / TOKEN_MAP, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is a format violation, reported by check()
        return None
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None


def check_embedding(folder: Path, embed: torch.Tensor, target) -> None:
    """The folder's embed_tokens must be `target`'s input embedding (compared in the narrower of the two
    dtypes, so a bf16 export checks against a float32 target and the other way round): speculators drafts
    with the folder's copy, our decoder with the target's."""
    have = target.model.get_input_embeddings().weight.detach().cpu()
    dt = embed.dtype if embed.element_size() <= have.element_size() else have.dtype
    if embed.shape != have.shape or not torch.equal(embed.to(dt), have.to(dt)):
        raise DraftsmithError(f"{folder}/{WEIGHTS}: embed_tokens.weight is not {target.name}'s input embedding: "
                              "load the target it was exported for, or re-export")
