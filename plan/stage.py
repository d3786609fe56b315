"""`stage=plan`: what a run will cost before it starts, from the target's config.json (and tokenizer) alone.

    python train.py stage=plan                                                  # the demo run, this machine
    python train.py stage=plan target=llama3_70b drafter=eagle3 plan.gpus=8 plan.gpu=h100-80gb experiment=full
    python train.py stage=plan target.path=org/model plan.gpu=h200 deepspeed=zero2 train.micro_batch_size=2

For data_gen, train, eval and export it estimates memory per device (parts listed), disk and time, then
the settings that fit: the largest micro batch per ZeRO stage (and with optimizer offload), the gradient
accumulation for plan.global_batch, online vs offline features, the draft vocabulary; for a run that does
not fit, the smallest change that makes it fit. Prints a table and writes <run>/plan.json. The train
stage's preflight runs the same plan and refuses a run that cannot fit (train.force=true starts it anyway).
Estimates are formulas (plan/estimate.py); BENCHMARKS.md compares them with measured peaks.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from conf.errors import DraftsmithError
from conf.schema import Config, project_path, run_dir
from plan import estimate as E
from plan.hardware import GEN_BANDWIDTH_UTIL, PREFILL_MFU, Device, device_for, train_mfu
from plan.shapes import TargetShape, read_target_config

SHAREGPT_ROWS = 17671  # complete conversations in the bundled ShareGPT file (data_gen/sources.py)
DEFAULT_SCORED_SHARE = 0.78  # share of positions whose next token is an assistant token (demo data_gen: 0.781)
RUNTIME_CPU = int(0.64 * 2**30)  # the CPU process beside its tensors: Python, torch, transformers, DeepSpeed (bench/bench_plan.py: peak RSS - tracked tensors)
RENDER_TOKENS_S = 64912  # data_gen without the target: chat template + masks (bench_data_gen.py, demo, 2026-11-23)
RUNTIME_CUDA = int(0.5 * 2**30)  # CUDA context and kernels, outside torch's allocated figure


def run(cfg: Config) -> dict:
    """Build the plan, print it, write <run>/plan.json."""
    p = build_plan(cfg)
    print(render(p))
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    from runtime.files import write_json

    write_json(out / "plan.json", p, indent=1)
    return p


# --------------------------------------------------------------------------------------------------
# Inputs: target shape, device, data size
# --------------------------------------------------------------------------------------------------
def _precision(cfg: Config, dev: Device) -> str:
    prec = cfg.deepspeed.precision
    if prec == "auto":
        return "fp32" if dev.kind == "cpu" else "bf16"
    return prec


def _weight_bytes(cfg: Config, dev: Device) -> int:
    dt = cfg.target.dtype
    if dt == "auto":
        return 4 if dev.kind == "cpu" else 2
    return 4 if dt in ("float32", "fp32") else 2


def data_size(cfg: Config, shape: TargetShape, sample: bool = True) -> dict:
    """Rows, tokens and assistant tokens: data_gen's meta.json when this run has one, else a sample of the
    prompt source rendered with the target's tokenizer, else plan.rows / plan.row_tokens or assumptions."""
    meta = run_dir(cfg) / "data_gen" / "meta.json"
    m = json.loads(meta.read_text()) if meta.exists() else {}
    if "rows" in m and "tokens" in m:
        return {"rows": m["rows"], "tokens": m["tokens"], "scored": m.get("assistant_tokens", 0),
                "source": f"{meta} (measured)"}
    pl = cfg.plan
    rows = pl.rows or cfg.data.max_conversations or (SHAREGPT_ROWS if cfg.data.source == "sharegpt" else None)
    sample = _sample_source(cfg) if sample and pl.row_tokens is None else None
    if sample:
        rows = pl.rows or int((rows or sample["read"]) * sample["kept"])
        per_row, share, src = sample["row_tokens"], sample["scored_share"], f"{sample['n']} rows rendered with the tokenizer"
    else:
        per_row = pl.row_tokens or cfg.data.max_length // 2
        share, src = DEFAULT_SCORED_SHARE, ("plan.row_tokens" if pl.row_tokens else
                                           "assumed: rows average half of data.max_length")
    if rows is None:
        raise DraftsmithError("stage=plan cannot size this data source: set plan.rows=<conversations> (and "
                              "plan.row_tokens=<mean tokens>), or data.max_conversations")
    tokens = int(rows * per_row)
    return {"rows": int(rows), "tokens": tokens, "scored": int(tokens * share), "source": src}


def _sample_source(cfg: Config, n: int = 64) -> dict | None:
    """Render the first n conversations with the target's tokenizer (a local folder only: never downloads)."""
    path = Path(project_path(cfg.target.path))
    if not path.is_dir() or not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import itertools

    from transformers import AutoTokenizer

    from data_gen.render import render_conversation
    from data_gen.sources import SourceReport, iter_source

    tok = AutoTokenizer.from_pretrained(str(path))
    template = cfg.target.chat_template or tok.chat_template
    if not template:
        return None
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    read = kept = tokens = scored = 0
    for conv in itertools.islice(iter_source(cfg.data, SourceReport()), n):
        read += 1
        r, _ = render_conversation(tok, conv.messages, template, eos, cfg.data.max_length)
        if r is None:
            continue
        kept += 1
        tokens += len(r.input_ids)
        scored += sum(r.loss_mask[1:])
    if not kept:
        return None
    return {"n": read, "read": read, "kept": kept / read, "row_tokens": tokens / kept, "scored_share": scored / tokens}


# --------------------------------------------------------------------------------------------------
# Per-stage estimates
# --------------------------------------------------------------------------------------------------
def _taps(cfg: Config, shape: TargetShape) -> int:
    return len(cfg.target.feature_layers or shape.feature_layers())


def train_memory(cfg: Config, shape: TargetShape, dev: Device, world: int, micro: int, seq: int, zero: int,
                 offload: bool, gc: bool, vd: int | None = None) -> dict:
    """Per-device bytes of one train micro-step at its peak, by part."""
    d = cfg.drafter
    fam = d.name
    prec = _precision(cfg, dev)
    a = 4 if prec == "fp32" else 2
    taps = _taps(cfg, shape)
    if fam == "eagle3" and vd is not None:
        d = copy.copy(d)
        d.draft_vocab_size = vd
    P = E.drafter_params(fam, shape, d, taps)
    states = E.model_state_bytes(P, prec, zero, world, offload, E.largest_module_params(fam, shape, d, taps))
    T = micro * seq
    online = cfg.train.mode == "online"
    if fam == "eagle3":
        v = min(d.draft_vocab_size or shape.vocab, shape.vocab)
        act = E.eagle3_activation_bytes(shape, micro, seq, d.ttt_steps, v, taps, a, gc)
    elif fam == "eagle1":
        act = E.eagle3_activation_bytes(shape, micro, seq, 1, shape.vocab, 1, a, gc)
        act["saved"] += T * shape.vocab * E.F32 * 2  # full-vocabulary logits and their softmax (unfused soft_ce)
    elif fam in ("medusa", "hydra"):
        act = {"signal": T * shape.hidden * a + T * shape.vocab * E.F32, "transient": 0,
               "saved": E.lm_activation_bytes(shape.hidden, 0, 0, 0, shape.vocab, micro, seq, a, d.num_heads, gc)
               + d.num_heads * T * shape.hidden * a * (2 + (getattr(d, "mlp_layers", None) or getattr(d, "num_layers", 1)))}
    elif fam in ("small", "pard"):
        Hs, heads, _, inter = E.small_shape(shape, d.hidden_size)
        outs = getattr(d, "k", 1)
        act = {"signal": T * shape.vocab * E.F32, "transient": 0,
               "saved": E.lm_activation_bytes(Hs, heads, d.num_layers, inter, shape.vocab, micro, seq * outs, a, 1, gc)}
    elif fam == "kangaroo":
        act = {"signal": T * shape.vocab * E.F32, "transient": E.target_forward_bytes(shape, micro, seq, a, False),
               "saved": E.lm_activation_bytes(shape.hidden, shape.heads, 1, 0, shape.vocab, micro, seq, a, 1, gc)}
    else:
        act = {"signal": 0, "saved": 0, "transient": 0}
    drafter_phase = act["signal"] + act["saved"] + act["transient"]
    wb = _weight_bytes(cfg, dev)
    target_phase = (E.target_forward_bytes(shape, micro, seq, wb) if online else T * (taps + 1) * shape.hidden * wb)
    logits_phase = act["signal"] + T * shape.vocab * wb  # the LM head's output before its fp32 copy
    parts = {"target weights": shape.params * wb, "drafter weights": states["weights"],
             "gradients": states["gradients"], "optimizer states": states["optimizer"],
             "activations": max(drafter_phase, target_phase, logits_phase)}
    detail = {"signal (features, last hidden, fp32 target logits)": act["signal"],
              "saved for backward (all TTT steps)" if fam == "eagle3" else "saved for backward": act["saved"],
              "transient at the peak": act["transient"], "target forward (online, no grad)": target_phase}
    tensors = sum(parts.values())
    runtime = RUNTIME_CPU if dev.kind == "cpu" else RUNTIME_CUDA
    return {"parts": {k: int(v) for k, v in parts.items()}, "activation_detail": {k: int(v) for k, v in detail.items()},
            "tensors": int(tensors), "runtime": runtime, "peak": int(tensors + runtime),
            "host_offload": states["host_offload"], "drafter_params": P, "precision": prec}


def stage_estimates(cfg: Config, shape: TargetShape, dev: Device, data: dict, gpu_name: str) -> dict:
    t, world = cfg.train, cfg.plan.gpus
    seq = min(t.max_length, cfg.data.max_length)
    wb = _weight_bytes(cfg, dev)
    taps = _taps(cfg, shape)
    runtime = RUNTIME_CPU if dev.kind == "cpu" else RUNTIME_CUDA
    tw = shape.params * wb
    # data_gen: one forward over data.batch_size rows (hidden states of every layer), regeneration's KV cache
    dg = cfg.data
    dg_act = E.target_forward_bytes(shape, dg.batch_size, dg.max_length, wb)
    if dg.regenerate:
        dg_act += E.kv_cache_bytes(shape, dg.batch_size, dg.max_length + dg.gen_max_new_tokens, wb)
    if dg.cache_topk:
        dg_act += dg.max_length * shape.vocab * E.F32  # one row's scored positions through the LM head, fp32
    files = E.ceil_div(data["rows"], dg.batch_size)
    cache = E.feature_cache_bytes(data["tokens"], data["scored"], data["rows"], files, shape.hidden, taps,
                                  dg.cache_topk, dg.cache_features) if (dg.cache_features or dg.cache_topk) else 0
    offline_cache = E.feature_cache_bytes(data["tokens"], data["scored"], data["rows"], files, shape.hidden, taps,
                                          0, True)
    prefill = E.target_forward_flops(shape, data["tokens"], seq, False)
    caching = dg.cache_features or dg.cache_topk
    dg_time = E.seconds(prefill, world, dev.peak_flops, PREFILL_MFU) if caching else data["tokens"] / (RENDER_TOKENS_S * world)
    if dg.regenerate and dev.bandwidth:
        new = data["rows"] * dg.gen_max_new_tokens
        dg_time = (dg_time or 0) + new * tw / (dg.batch_size * world * dev.bandwidth * GEN_BANDWIDTH_UTIL)
    # train
    tm = train_memory(cfg, shape, dev, world, t.micro_batch_size, seq, cfg.deepspeed.zero_stage,
                      cfg.deepspeed.offload_optimizer, t.gradient_checkpointing)
    global_batch = t.micro_batch_size * t.grad_accum * world
    train_rows = max(1, data["rows"] - t.eval_rows)
    steps = t.max_steps or max(1, int(t.epochs * train_rows // global_batch))
    row_tokens = data["tokens"] / max(1, data["rows"])
    train_tokens = int(steps * global_batch * min(row_tokens, seq))
    d = cfg.drafter
    mfu, mfu_src = train_mfu(gpu_name, cfg.plan.mfu)
    if d.name == "eagle3":
        vd = min(d.draft_vocab_size or shape.vocab, shape.vocab)
        flops = E.eagle3_train_flops(shape, train_tokens, seq, d.ttt_steps, vd, taps, t.mode == "online")
    else:  # the target's forward + 3 x a drafter forward of 2 P FLOPs per token
        flops = E.target_forward_flops(shape, train_tokens, seq, True) + 6 * tm["drafter_params"] * train_tokens
    if dev.kind == "cpu":
        mfu, mfu_src = 1.0, "the demo run's measured CPU rate (plan/hardware.py CPU_EFFECTIVE_FLOPS)"
    ckpt = E.checkpoint_bytes(tm["drafter_params"], tm["precision"])
    final = tm["drafter_params"] * (4 if tm["precision"] == "fp32" else 2)
    # eval: target + drafter weights, the target's KV cache for one prompt + answer, tree verification logits
    ev = cfg.eval
    ctx = seq + ev.max_new_tokens
    ev_parts = {"target weights": tw, "drafter weights": final,
                "KV caches": E.kv_cache_bytes(shape, 1, ctx, wb) * 2,
                "verification logits (60-node tree, fp32)": 64 * shape.vocab * E.F32 * 2,
                "target features (taps of the context)": ctx * (taps + 1) * shape.hidden * wb}
    per_token = tw / (dev.bandwidth * GEN_BANDWIDTH_UTIL) if dev.bandwidth else None
    ev_time = None if per_token is None else ev.num_prompts * ev.max_new_tokens * len(ev.temperatures) * 2 * per_token
    ex_parts = {"target weights (reload check)": tw, "drafter weights": final * 2}
    dg_parts = {"target weights": tw, "forward activations": dg_act}
    return {
        "data_gen": {"memory": dg_parts, "peak": sum(dg_parts.values()) + runtime, "runtime": runtime,
                     "disk": {"dataset (token ids, masks)": data["tokens"] * 5, "feature cache": cache},  # int32 + int8 (demo: 5.1 B/token)
                     "time": {"tokens": data["tokens"], "seconds": dg_time,
                              "basis": (f"prefill at {PREFILL_MFU:.0%} MFU" if caching else
                                        f"rendering at {RENDER_TOKENS_S:,} tokens/s a process (measured, demo)")
                                       + (f"; regeneration at {GEN_BANDWIDTH_UTIL:.0%} of the memory bandwidth"
                                          if dg.regenerate else "")}},
        "train": {"memory": tm["parts"], "activation_detail": tm["activation_detail"], "peak": tm["peak"],
                  "tensors": tm["tensors"], "runtime": tm["runtime"], "host_offload": tm["host_offload"],
                  "disk": {f"checkpoints (keep {t.keep_checkpoints})": ckpt * t.keep_checkpoints, "final drafter": final},
                  "time": {"tokens": train_tokens, "steps": steps, "global_batch": global_batch,
                           "seconds": E.seconds(flops, world, dev.peak_flops, mfu), "flops": flops,
                           "basis": f"MFU {mfu:.1%} ({mfu_src})"}},
        "eval": {"memory": ev_parts, "peak": sum(ev_parts.values()) + runtime, "runtime": runtime, "disk": {"report": 1 << 20},
                 "time": {"tokens": ev.num_prompts * ev.max_new_tokens * len(ev.temperatures) * 2, "seconds": ev_time,
                          "basis": f"autoregressive + speculative decoding, each token one weight read at "
                                   f"{GEN_BANDWIDTH_UTIL:.0%} bandwidth (an upper bound for speculative)"}},
        "export": {"memory": ex_parts, "peak": sum(ex_parts.values()) + runtime, "runtime": runtime,
                   "disk": {f"{cfg.export.format} folder": final},
                   "time": {"tokens": 0, "seconds": None, "basis": "writing and reloading the drafter"}},
        "_offline_cache": offline_cache, "_drafter_params": tm["drafter_params"], "_precision": tm["precision"],
    }


# --------------------------------------------------------------------------------------------------
# Recommendations
# --------------------------------------------------------------------------------------------------
MICRO = (1, 2, 4, 8, 16, 32, 64)


def largest_micro(cfg, shape, dev, usable, zero, offload, gc, seq, vd=None) -> int:
    best = 0
    for m in MICRO:
        if train_memory(cfg, shape, dev, cfg.plan.gpus, m, seq, zero, offload, gc, vd)["peak"] <= usable:
            best = m
        else:
            break
    return best


def recommend(cfg: Config, shape: TargetShape, dev: Device, usable: int, est: dict, disk_free: float | None) -> dict:
    t, ds, world = cfg.train, cfg.deepspeed, cfg.plan.gpus
    seq = min(t.max_length, cfg.data.max_length)
    gc = t.gradient_checkpointing
    by_zero = {f"zero{z}": largest_micro(cfg, shape, dev, usable, z, False, gc, seq) for z in range(4)}
    by_zero.update({f"zero{z}+offload": largest_micro(cfg, shape, dev, usable, z, True, gc, seq) for z in (1, 2, 3)})
    fits = est["train"]["peak"] <= usable
    want = cfg.plan.global_batch or t.micro_batch_size * t.grad_accum * world
    micro = min(t.micro_batch_size, by_zero[f"zero{ds.zero_stage}"] or t.micro_batch_size)
    accum = E.ceil_div(want, micro * world)
    cache = est["_offline_cache"]
    room = disk_free is None or cache < disk_free
    offline = t.epochs > 1 and room
    mode = {"choice": "offline" if offline else "online", "cache_bytes": cache,
            "why": (f"the features are read {t.epochs:g} times: caching them ({E.fmt_bytes(cache)}) saves "
                    f"{t.epochs - 1:g} target forwards per row" if offline else
                    "one pass over the data: the cache would cost a target forward anyway, plus "
                    f"{E.fmt_bytes(cache)} of disk" + ("" if room else " (more than the free disk)")) +
                   "; offline still loads the target's weights (its embeddings and LM head)"}
    out = {"micro_batch_by_zero": by_zero, "micro_batch": micro, "grad_accum": accum,
           "global_batch": micro * accum * world, "mode": mode}
    d = cfg.drafter
    if d.name == "eagle3":
        vd = min(d.draft_vocab_size or shape.vocab, shape.vocab)
        full = train_memory(cfg, shape, dev, world, t.micro_batch_size, seq, ds.zero_stage, ds.offload_optimizer,
                            gc, shape.vocab)["peak"]
        out["draft_vocab"] = {"choice": min(32000, shape.vocab), "configured": vd,
                              "why": "EAGLE-3's published 32k most frequent tokens; the full vocabulary would add "
                                     f"{E.fmt_bytes(max(0, full - est['train']['peak']))} per device"}
    out["fits"] = fits
    out["change"] = None if fits else smallest_change(cfg, shape, dev, usable, seq)
    return out


def smallest_change(cfg: Config, shape: TargetShape, dev: Device, usable: int, seq: int) -> dict:
    """The first of these, cheapest first, that fits: a smaller micro batch (same global batch through
    accumulation: same maths), a higher ZeRO stage (same maths), gradient checkpointing (~1/3 more compute),
    optimizer offload (slower steps), then combinations, then a shorter max_length or smaller draft vocab."""
    t, ds = cfg.train, cfg.deepspeed
    z0, gc0, off0 = ds.zero_stage, t.gradient_checkpointing, ds.offload_optimizer
    world = cfg.plan.gpus

    def fits(m=None, z=None, gc=None, off=None, s=None, vd=None):
        return train_memory(cfg, shape, dev, world, m or t.micro_batch_size, s or seq, z0 if z is None else z,
                            off0 if off is None else off, gc0 if gc is None else gc, vd)["peak"] <= usable

    def accum(m):
        return E.ceil_div(t.micro_batch_size * t.grad_accum, m)

    tries = []
    for m in MICRO:
        if m < t.micro_batch_size:
            tries.append(({"m": m}, f"train.micro_batch_size={m} train.grad_accum={accum(m)}"))
    for z in range(z0 + 1, 4):
        tries.append(({"z": z, "m": 1}, f"deepspeed=zero{z} train.micro_batch_size=1 train.grad_accum={accum(1)}"))
        tries.append(({"z": z}, f"deepspeed=zero{z}"))
    tries.append(({"gc": True}, "train.gradient_checkpointing=true"))
    tries.append(({"gc": True, "m": 1}, f"train.gradient_checkpointing=true train.micro_batch_size=1 train.grad_accum={accum(1)}"))
    for z in range(max(1, z0), 4):
        tries.append(({"z": z, "off": True, "m": 1},
                      f"deepspeed=zero{z} deepspeed.offload_optimizer=true train.micro_batch_size=1 train.grad_accum={accum(1)}"))
        tries.append(({"z": z, "off": True, "m": 1, "gc": True},
                      f"deepspeed=zero{z} deepspeed.offload_optimizer=true train.gradient_checkpointing=true "
                      f"train.micro_batch_size=1 train.grad_accum={accum(1)}"))
    s = seq // 2
    while s >= 256:
        tries.append(({"s": s, "m": 1, "gc": True, "z": 3, "off": world > 0}, f"train.max_length={s} deepspeed=zero3 "
                      "deepspeed.offload_optimizer=true train.gradient_checkpointing=true train.micro_batch_size=1"))
        s //= 2
    for kw, text in tries:
        if fits(**kw):
            return {"fits_with": text}
    floor = shape.params * _weight_bytes(cfg, dev) + (RUNTIME_CPU if dev.kind == "cpu" else RUNTIME_CUDA)
    why = (f"the frozen target's weights alone take {E.fmt_bytes(floor)} per device (every rank holds the whole "
           f"target: draftsmith does not shard it), and {E.fmt_bytes(usable)} is usable" if floor > usable * 0.9 else
           "no setting tried fits (micro batch 1, ZeRO-3, offload, gradient checkpointing, max_length 256)")
    return {"fits_with": None, "why": why,
            "needs": "a device with more memory (plan.gpu=...), or a target sharded across devices, which "
                     "draftsmith does not do yet" if floor > usable * 0.9 else "a device with more memory"}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def build_plan(cfg: Config, sample: bool = True) -> dict:
    """The plan as a JSON-ready dict. `sample=False` (the train stage's preflight) never renders the prompt
    source: memory does not depend on the data's size, and the preflight must stay instant."""
    cfg.plan.check()
    raw, source = read_target_config(cfg.target.path)
    shape = TargetShape.from_config(raw)
    gpu = cfg.plan.gpu
    dev = device_for(gpu, cfg.run.device)
    usable = int(dev.memory * cfg.plan.headroom)
    data = data_size(cfg, shape, sample)
    est = stage_estimates(cfg, shape, dev, data, gpu)
    disk_free = cfg.plan.disk_gb * 1e9 if cfg.plan.disk_gb is not None else _free_disk(cfg)
    rec = recommend(cfg, shape, dev, usable, est, disk_free)
    stages = {k: v for k, v in est.items() if not k.startswith("_")}
    for st in stages.values():
        st["fits"] = st["peak"] <= usable
    return {"target": {"path": cfg.target.path, "config": source, "model_type": shape.model_type,
                       "params": shape.params, "active_params": shape.active_params, "layers": shape.layers,
                       "hidden": shape.hidden, "vocab": shape.vocab, "experts": shape.experts},
            "drafter": {"family": cfg.drafter.name, "params": est["_drafter_params"]},
            "device": {"name": dev.name, "plan.gpu": gpu, "count": cfg.plan.gpus, "memory": dev.memory,
                       "usable": usable, "headroom": cfg.plan.headroom},
            "settings": {"micro_batch": cfg.train.micro_batch_size, "seq": min(cfg.train.max_length, cfg.data.max_length),
                         "grad_accum": cfg.train.grad_accum, "zero": cfg.deepspeed.zero_stage,
                         "offload": cfg.deepspeed.offload_optimizer, "precision": est["_precision"],
                         "mode": cfg.train.mode, "gradient_checkpointing": cfg.train.gradient_checkpointing},
            "data": data, "stages": stages, "recommendations": rec, "disk_free": disk_free}


def _free_disk(cfg: Config) -> float | None:
    p = Path(cfg.run.root)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return float(shutil.disk_usage(p).free)
    except OSError:
        return None


def refusal(p: dict) -> str | None:
    """The one-line reason the train stage refuses this plan, or None when it fits."""
    st, rec = p["stages"]["train"], p["recommendations"]
    if st["fits"]:
        return None
    dev = p["device"]
    head = (f"the plan says train does not fit: {E.fmt_bytes(st['peak'])} per device at its peak "
            f"(target {E.fmt_bytes(st['memory']['target weights'])}, drafter states "
            f"{E.fmt_bytes(st['memory']['drafter weights'] + st['memory']['gradients'] + st['memory']['optimizer states'])}, "
            f"activations {E.fmt_bytes(st['memory']['activations'])}) on {dev['name']} with "
            f"{E.fmt_bytes(dev['usable'])} usable")
    ch = rec["change"] or {}
    fix = f"set {ch['fits_with']}" if ch.get("fits_with") else f"{ch.get('why', '')}; needs {ch.get('needs', '')}"
    return f"{head}: {fix} (stage=plan shows the table), or train.force=true to start it anyway"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def render(p: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    tg, dv, s = p["target"], p["device"], p["settings"]
    import io

    console = Console(record=True, width=120, force_terminal=False, file=io.StringIO())  # the caller prints
    moe = f", MoE {tg['active_params'] / 1e9:.1f}B active" if tg["experts"] else ""
    size = f"{tg['params'] / 1e9:.2f}B" if tg["params"] >= 1e9 else f"{tg['params'] / 1e6:.1f}M"
    console.print(f"[bold]plan[/bold]: {tg['path']} ({size} params{moe}; {tg['config']}) + "
                  f"{p['drafter']['family']} ({p['drafter']['params'] / 1e6:.1f}M trainable) on {dv['count']} x "
                  f"{dv['name']} ({E.fmt_bytes(dv['memory'])}, {E.fmt_bytes(dv['usable'])} usable)")
    console.print(f"settings: micro batch {s['micro_batch']} x {s['seq']} tokens, accumulation {s['grad_accum']}, "
                  f"ZeRO-{s['zero']}{' + offload' if s['offload'] else ''}, {s['precision']}, {s['mode']}, "
                  f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; data: "
                  f"{p['data']['rows']:,} rows, {p['data']['tokens']:,} tokens ({p['data']['source']})")
    t = Table(title="memory per device, disk, time")
    for col in ("stage", "memory part", "bytes", "peak / fits", "disk", "time"):
        t.add_column(col)
    for name, st in p["stages"].items():
        parts = list(st["memory"].items()) + [("runtime (process, CUDA context)", st.get("runtime", 0))]
        disk = "; ".join(f"{k} {E.fmt_bytes(v)}" for k, v in st["disk"].items() if v)
        tm = st["time"]
        time = E.fmt_seconds(tm["seconds"]) + (f" ({tm['tokens']:,} tokens)" if tm["tokens"] else "")
        for i, (k, v) in enumerate(parts):
            fit = (f"{E.fmt_bytes(st['peak'])} {'fits' if st['fits'] else '[red]DOES NOT FIT[/red]'}" if i == 0 else "")
            t.add_row(name if i == 0 else "", k, E.fmt_bytes(v), fit, disk if i == 0 else "", time if i == 0 else "")
        t.add_section()
    console.print(t)
    for name, st in p["stages"].items():
        console.print(f"time of {name}: {st['time']['basis']}")
    r = p["recommendations"]
    z = ", ".join(f"{k}: {v or 'none'}" for k, v in r["micro_batch_by_zero"].items())
    console.print(f"largest micro batch per ZeRO stage: {z}")
    console.print(f"for a global batch of {r['global_batch']}: micro batch {r['micro_batch']} x accumulation "
                  f"{r['grad_accum']} x {dv['count']} devices; features: {r['mode']['choice']} ({r['mode']['why']})")
    if "draft_vocab" in r:
        console.print(f"draft vocabulary: {r['draft_vocab']['choice']} (configured {r['draft_vocab']['configured']}; "
                      f"{r['draft_vocab']['why']})")
    if r["fits"]:
        console.print("[green]train fits[/green]")
    elif r["change"].get("fits_with"):
        console.print(f"[red]train does not fit[/red]; smallest change that fits: {r['change']['fits_with']}")
    else:
        console.print(f"[red]train does not fit[/red]: {r['change']['why']}; needs {r['change']['needs']}")
    return console.export_text()


def preflight(cfg: Config) -> None:
    """stage=plan has nothing to check before it runs (it writes only plan.json)."""
