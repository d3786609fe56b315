"""EAGLE-3 online training throughput: tokens/s and MFU of the train stage's own step on a random-weight
target of a given shape (the target's forward, the drafter's unrolled TTT steps, backward, optimizer).

    python bench/bench_train_mfu.py --random-llama 8b --vocab 128256 --device cuda   # the 8B shape
    python bench/bench_train_mfu.py --random-llama tiny --device cpu --steps 2       # dry run

The step is training.stage's `train_step` under training.engine's DeepSpeed Engine with the default
config (bf16 on GPU, torch AdamW, ZeRO-0), on synthetic batches: random ids, every position after a
16-token prompt scored. tokens/s counts input tokens, as the train stage's log does. MFU = useful FLOPs
per step / step time / the GPU's dense bf16 peak (--peak-tflops, default from the datasheet), where
useful FLOPs are printed as a formula (eagle3_flops): the target's forward (linear layers, full-vocab LM
head for the soft targets, causal attention) plus 3x the drafter's forward (forward + backward) over the
rows each TTT step runs. torch's FlopCounterMode count of one step (what the kernels actually execute, masked attention
entries included) is printed beside it; attention kernels are counted by our own formula
(bench/train_phases.py: attention_flops), since torch's asserts equal query and key heads and fails on GQA.
The report ends with the step's time by phase (target forward, each TTT step's layer and loss, backward,
optimizer; CUDA events on a GPU, perf_counter on the CPU), averaged over the timed steps. Random weights:
speed only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.targets import SHAPES  # noqa: E402
from conf.errors import DraftsmithError  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-llama", choices=SHAPES, default="8b")
    ap.add_argument("--vocab", type=int, default=None, help="pad the vocabulary (128256 = Llama-3's)")
    ap.add_argument("--target", default="assets/demo-target", help="tokenizer source (default: the demo target's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (train.micro_batch_size)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak for MFU (default: the GPU's datasheet, H100/H200 SXM 989)")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. drafter.ttt_steps=3")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    return ap.parse_args(argv)


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def eagle3_flops(target, drafter, loss_mask: torch.Tensor) -> dict:
    """Useful FLOPs of one online EAGLE-3 step on a batch with this `loss_mask` [B, S], term by term, with
    the formula. A matmul of a [T, n] by [n, m] weight is 2*T*n*m; attention reads the keys a row sees
    (QK^T and AV: 4 * width per key); backward = 2x forward. The drafter's terms count the rows it runs
    (drafters/eagle3.py): step 0 unrolls all T rows, step i >= 1 only the N_i rows some step >= i scores,
    and only the R_i scored rows reach the LM head (with a draft vocab smaller than the target's, the
    rows whose target argmax falls outside it are left out too: R_i is then an upper bound)."""
    from drafters.common import shifted

    cfg = target.config
    B, S = loss_mask.shape
    T, L = B * S, cfg.num_hidden_layers
    h_q = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    p_target = linear_params(target.model.model.layers)
    head = target.model.get_output_embeddings().weight.numel()
    k = drafter.cfg.ttt_steps
    p_fc, p_layer, p_dhead = (linear_params(m) for m in (drafter.fc, drafter.midlayer, drafter.lm_head))
    dq = drafter.midlayer.self_attn.num_heads * drafter.midlayer.self_attn.head_dim
    f_attention = 4 * h_q * T * (S + 1) / 2 * L  # row t reads t + 1 keys
    f_target = 2 * T * (p_target + head) + f_attention
    # row t predicts token t + 2 + i at step i; it is unrolled while some later step scores it
    scored = torch.stack([shifted(loss_mask > 0, 2 + i, S) for i in range(k)])  # [k, B, S]
    needed = scored.flip(0).cummax(0).values.flip(0)
    needed[0] = True
    t = torch.arange(S)
    rows = [int(needed[i].sum()) for i in range(k)]
    scored_rows = [int(scored[i].sum()) for i in range(k)]
    # step i's row t reads the causal prefix (t + 1 keys) plus the i entries its earlier steps appended
    keys = [int(((t + 1 + i) * needed[i]).sum()) for i in range(k)]
    f_draft_fwd = 2 * T * p_fc + sum(2 * rows[i] * p_layer + 2 * scored_rows[i] * p_dhead + 4 * dq * keys[i]
                                     for i in range(k))
    formula = (f"FLOPs/step = target fwd [2*T*(P_layers + P_head) + 4*h_q*T*(S+1)/2*L] + drafter fwd+bwd "
               f"3*[2*T*P_fc + sum_(i<k) (2*N_i*P_layer + 2*R_i*P_dhead + 4*h_d*K_i)]; T={T} tokens, S={S}, "
               f"L={L}, h_q={h_q}, P_layers={p_target:.4g}, P_head={head:.4g}, k={k} TTT steps, P_fc={p_fc:.4g}, "
               f"P_layer={p_layer:.4g}, P_dhead={p_dhead:.4g} (draft vocab {drafter.draft_vocab_size}), h_d={dq}, "
               f"rows unrolled N_i={rows}, scored R_i={scored_rows}, keys read K_i={keys}")
    return {"target": f_target, "target_attention": f_attention, "drafter": 3 * f_draft_fwd,
            "total": f_target + 3 * f_draft_fwd, "formula": formula}


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    loss = torch.ones_like(ids)
    loss[:, :16] = 0  # a short prompt, then the scored answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss}


def run(args) -> dict:
    from bench.targets import peak_for, random_llama_target
    from bench.train_phases import PhaseClock, counted_flops, phase_rows
    from conf.schema import load_config
    from eval.report import machine_info
    from training.engine import Engine, build_ds_config, setup_distributed
    from training.objectives import build_objective
    from training.stage import build_drafter, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(["drafter=eagle3", f"run.device={args.device}", f"train.micro_batch_size={args.batch}",
                       "train.grad_accum=1", f"train.max_length={args.seq}", *args.override])
    env = setup_distributed(cfg.run.device)
    target = random_llama_target(args.random_llama, args.target, str(env.device), args.vocab, cfg.target.dtype)
    torch.manual_seed(0)
    with torch.device(env.device):
        drafter = build_drafter(cfg, target, None)
    eng = Engine(drafter, build_objective(cfg, target), cfg, build_ds_config(cfg, 1, env.device),
                 args.warmup + args.steps + 2, env)
    plan = SimpleNamespace(accum=1, world=1)
    vocab = len(target.tokenizer)
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    eng.train(True)
    for i in range(args.warmup):
        train_step(eng, target, [synthetic_batch(args.batch, args.seq, vocab, i)], "online", env, plan)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times, tokens, losses = [], 0, []
    clock = PhaseClock(env.device)
    undo = clock.attach(eng, drafter, target)
    try:
        for i in range(args.steps):
            b = synthetic_batch(args.batch, args.seq, vocab, 100 + i)
            sync()
            t0 = time.perf_counter()
            clock.begin_step()
            metrics, _, n_input, _ = train_step(eng, target, [b], "online", env, plan)
            sync()
            times.append(time.perf_counter() - t0)
            clock.end_step()
            tokens += n_input
            losses.append(metrics["loss"])
    finally:
        undo()
    try:  # a cross-check after the timing: a counter that cannot follow a kernel must not lose the result
        counted = counted_flops(lambda: train_step(eng, target, [synthetic_batch(args.batch, args.seq, vocab, 999)],
                                                   "online", env, plan))
    except Exception as e:  # noqa: BLE001 - e.g. compiled FlexAttention under a dispatch mode; said in the report
        counted = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    machine = machine_info(env.device)
    flops = eagle3_flops(target, drafter, synthetic_batch(args.batch, args.seq, vocab, 999)["loss_mask"])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_for(machine["device_name"])[1]
    step_s = sum(times) / len(times)
    return {"bench": "train", "target": f"random-weight Llama ({args.random_llama} shape, vocab {target.vocab_size})",
            "device_name": machine["device_name"], "machine": machine, "batch": args.batch, "seq": args.seq,
            "ttt_steps": drafter.cfg.ttt_steps, "draft_vocab": drafter.draft_vocab_size, "steps": args.steps,
            "step_s": step_s, "tokens_per_s": tokens / sum(times), "flops_per_step": flops["total"],
            "flops_target": flops["target"], "flops_drafter": flops["drafter"], "formula": flops["formula"],
            "flops_counted": counted, "achieved_tflops": flops["total"] / step_s / 1e12,
            "peak_tflops": peak and peak / 1e12, "peak_from": "--peak-tflops" if args.peak_tflops else "datasheet",
            "mfu": flops["total"] / step_s / peak if peak else None, "loss_first": losses[0], "loss_last": losses[-1],
            "peak_mem_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None,
            "precision": build_ds_config(cfg, 1, env.device)["bf16"]["enabled"] and "bf16" or "fp32",
            "attention": drafter.attention, "threads": torch.get_num_threads(),
            "phases": phase_rows(clock.mean()),
            "phase_clock": "CUDA events" if env.device.type == "cuda" else "perf_counter (CPU ops are synchronous)"}


def report(r: dict) -> str:
    from bench.train_phases import phase_table

    counted = (f"torch FlopCounterMode counted {r['flops_counted'] / 1e12:.4g} TFLOP for one step (as executed: "
               "full attention matrices, masked entries included; attention by attention_flops)"
               if isinstance(r["flops_counted"], (int, float)) else
               f"torch FlopCounterMode could not count the step ({r['flops_counted']})")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
    peak = "no peak known: pass --peak-tflops" if r["peak_tflops"] is None else \
        f"{r['peak_tflops']:.0f} TFLOP/s ({r['peak_from']})"
    mem = "" if r["peak_mem_gib"] is None else f"; peak GPU memory {r['peak_mem_gib']:.1f} GiB"
    return "\n".join([
        f"- EAGLE-3 online training, {r['target']}, {r['precision']}, batch {r['batch']} x {r['seq']} tokens, "
        f"{r['ttt_steps']} TTT steps, draft vocab {r['draft_vocab']}, train.attention -> {r.get('attention', 'sdpa')}, "
        f"{r['steps']} timed steps on {r['device_name']}: "
        f"**{r['tokens_per_s']:.0f} tokens/s** ({1000 * r['step_s']:.1f} ms/step), {r['achieved_tflops']:.1f} TFLOP/s "
        f"useful, **MFU {mfu}** of {peak}{mem}; loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
        f"- {r['formula']} = {r['flops_per_step'] / 1e12:.4g} TFLOP (target {r['flops_target'] / 1e12:.4g}, drafter "
        f"{r['flops_drafter'] / 1e12:.4g}); {counted}",
        *([""] + phase_table(r["phases"], f"mean of {r['steps']} timed steps, {r['phase_clock']}")
          if r.get("phases") else [])])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        r = run(args)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(r), flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(r, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
