"""A DFlash drafter in z-lab's Hugging Face layout (`export.format=dflash`), the folder vLLM's and SGLang's
DFlash loaders read:

    python train.py stage=export export=dflash run.name=df
    python -m pytest -q tests/export/test_export_dflash.py

config.json: architectures [DFlashDraftModel], model_type qwen3 and the draft layer's Qwen3 sizes
(hidden_size, intermediate_size, heads, head_dim, num_hidden_layers = the drafter's layers, rms_norm_eps,
silu, no attention bias, RoPE in both spellings), vocab_size = the target's, block_size, and
dflash_config {mask_token_id, mask_token, target_layer_ids, num_target_layers, block_size}.
target_layer_ids are z-lab's numbering: the output of target layer j (HF hidden_states[j + 1]), i.e. our
tap index (the hidden state entering layer i) minus one; eagle_aux_hidden_state_layer_ids carries our
indices as they are (vLLM's "before layer i" numbering, read first when present; without it vLLM adds one to
target_layer_ids, as SGLang's capture does).
model.safetensors: fc, hidden_norm, layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
post_attention_layernorm, mlp.{gate,up,down}_proj}, norm: no embedding and no LM head (both engines use
the target's). fusion=layerwise has no field in this layout and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from conf.errors import DraftsmithError
from export.formats.common import (
    CONFIG,
    WEIGHTS,
    Checker,
    ExportContext,
    cast_tensors,
    dtype_name,
    load_tensors,
    read_rope,
    rope_fields,
    save_tensors,
)

ARCH = "DFlashDraftModel"
LAYER_TENSORS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def zlab_layer_ids(taps: list[int], num_layers: int) -> list[int]:
    """z-lab's target_layer_ids for our tap indices: i - 1. The engines capture the output of a decoder layer,
    so tap 0 (the embeddings) and tap L (the final normed output) have no id there."""
    bad = [i for i in taps if not 1 <= i <= num_layers - 1]
    if bad:
        raise DraftsmithError(
            f"the drafter reads target tap(s) {bad}, but vLLM and SGLang capture the output of target layers 0.."
            f"{num_layers - 2} only (taps 1..{num_layers - 1}): retrain with drafter.target_layer_ids / "
            "target.feature_layers inside that range")
    return [i - 1 for i in taps]


def expected_names(num_layers: int) -> set[str]:
    return {"fc.weight", "hidden_norm.weight", "norm.weight",
            *(f"layers.{i}.{t}.weight" for i in range(num_layers) for t in LAYER_TENSORS)}


def write(model, target, out: Path, ctx: ExportContext) -> None:
    if model.tap_mix is not None:
        raise DraftsmithError("drafter.fusion=layerwise has no field in z-lab's DFlash layout, so vLLM and SGLang "
                              "would load it wrongly: export a drafter trained with drafter.fusion=none, or evaluate "
                              "this one with stage=eval")
    d, c = model.dims, model.cfg
    ids = zlab_layer_ids(model.target_layer_ids, target.num_layers)
    tok = target.tokenizer
    mask_text = tok.convert_ids_to_tokens(model.mask_id) if tok is not None else None
    config = {
        "architectures": [ARCH], "model_type": "qwen3",
        "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
        "num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_key_value_heads,
        "head_dim": d.head_dim, "num_hidden_layers": c.num_layers, "rms_norm_eps": d.rms_norm_eps,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": d.max_position_embeddings, "vocab_size": d.vocab_size,
        "tie_word_embeddings": False, **rope_fields(d.rope_parameters),
        "block_size": c.block_size, "num_target_layers": target.num_layers,
        "target_hidden_size": d.hidden_size, "eagle_aux_hidden_state_layer_ids": list(model.target_layer_ids),
        "dflash_config": {"mask_token_id": model.mask_id, "target_layer_ids": ids, "block_size": c.block_size,
                          "num_target_layers": target.num_layers,
                          **({"mask_token": mask_text} if mask_text else {})},
        "dtype": dtype_name(ctx.dtype), "target_model": ctx.target_ref,
    }
    save_tensors(out / WEIGHTS, cast_tensors(model.state_dict(), ctx.dtype))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def check(ck: Checker, cfg: dict) -> None:
    dc = cfg.get("dflash_config") or {}
    L, H = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    if not isinstance(L, int) or not 1 <= L <= 5:
        ck.fail(CONFIG, f"num_hidden_layers is {L!r}, expected the drafter's 1..5 layers")
        return
    ids, aux = dc.get("target_layer_ids"), cfg.get("eagle_aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        ck.fail(CONFIG, f"dflash_config.target_layer_ids is {ids!r}, expected a non-empty list of target layer ids")
        return
    if aux is not None and aux != [i + 1 for i in ids]:
        ck.fail(CONFIG, f"eagle_aux_hidden_state_layer_ids is {aux!r}, expected target_layer_ids + 1 "
                        f"{[i + 1 for i in ids]} (vLLM reads it first)")
    mask, rows = dc.get("mask_token_id"), cfg.get("vocab_size")
    if not isinstance(mask, int) or not isinstance(rows, int) or not 0 <= mask < rows:
        ck.fail(CONFIG, f"dflash_config.mask_token_id is {mask!r}, expected a row of the target's {rows!r} embeddings")
    block = dc.get("block_size", cfg.get("block_size"))
    if not isinstance(block, int) or block < 2:
        ck.fail(CONFIG, f"block_size is {block!r}, expected >= 2")
    if cfg.get("hidden_act") != "silu":
        ck.fail(CONFIG, f"hidden_act is {cfg.get('hidden_act')!r}; SGLang's DFlash MLP supports silu only")
    t = ck.tensors(WEIGHTS)
    if t:
        ck.names(WEIGHTS, t, expected_names(L))
        fc = t.get("fc.weight")
        if fc is not None and tuple(fc.shape) != (H, len(ids) * H):
            ck.fail(WEIGHTS, f"fc.weight is {tuple(fc.shape)}, expected {(H, len(ids) * H)} (hidden_size x "
                             f"{len(ids)} target layers: the shape SGLang's loader requires)")
        ck.float_dtypes(WEIGHTS, t)


def load(folder: Path, cfg: dict, target):
    """A DFlashDrafter rebuilt from the folder alone, in the file's dtype, reading the same taps of `target`."""
    from conf.schema.drafter import DFlashConfig
    from drafters.dflash import DFlashDrafter
    from drafters.folder import load_tensors as load_into
    from drafters.layers import DrafterDims

    dc = cfg["dflash_config"]
    taps = [i + 1 for i in dc["target_layer_ids"]]
    dims = DrafterDims.from_target(target)
    if (dims.hidden_size, dims.vocab_size) != (cfg["hidden_size"], cfg["vocab_size"]):
        raise DraftsmithError(f"{folder} drafts for a target of hidden size {cfg['hidden_size']} and {cfg['vocab_size']} "
                              f"tokens, but the loaded target has {dims.hidden_size} and {dims.vocab_size}: load the "
                              "target it was trained for")
    if read_rope(cfg) != dims.rope_parameters:
        raise DraftsmithError(f"{folder} uses RoPE {read_rope(cfg)} but the target {dims.rope_parameters}: load the "
                              "target it was trained for")
    dcfg = DFlashConfig(block_size=int(dc.get("block_size", cfg.get("block_size", 16))),
                        num_layers=int(cfg["num_hidden_layers"]), target_layer_ids=taps,
                        mask_token_id=int(dc["mask_token_id"]))
    from drafters.dflash_blocks import choose_mask_token, resolve_taps

    mask, _ = choose_mask_token(target, dcfg.mask_token_id)
    state = load_tensors(folder / WEIGHTS)
    model = DFlashDrafter(dcfg, dims, target, mask, resolve_taps(target.feature_layers, taps))
    model = model.to(device=target.device, dtype=state["fc.weight"].dtype)
    load_into(model, state, folder)
    return model.eval()
