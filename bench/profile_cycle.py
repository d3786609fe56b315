"""Where a speculative cycle's time goes on this device: torch.profiler over one generate per case, per cycle:
kernel launches, CUDA graph launches, stream synchronisations and copies; with the decoder's own phase split
(draft / verify / other), tau, and the speedup over our autoregressive decoding on the same prompt.

    python bench/profile_cycle.py --device cuda --shape 8b --vocab 128256      # GPU: random-weight Llama-3-8B shape
    python bench/profile_cycle.py --device cpu --shape tiny --tokens 16         # the dry run (CPU: launches are 0)
    python bench/profile_cycle.py ... --json out.jsonl                          # rows for bench/gpu_report.py

Cases (drafter, tree): ngram chain:4, oracle chain:4 and dynamic:5:8:60 (the decoder's ceiling: every draft
accepted at T = 0, drafting at no model cost), EAGLE-3 (random weights) chain:4 and dynamic:5:8:60. Timing: a
repeating prompt, two warm-up generates (the graph regions are captured then), the best of three timed
generates each way. The profiled generate is a separate, fourth one (the profiler's overhead stays out of
the timings).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

CASES = [("ngram", "chain:4"), ("oracle", "chain:4"), ("oracle", "dynamic:5:8:60"), ("eagle3", "chain:4"),
         ("eagle3", "dynamic:5:8:60")]
EVENTS = {"launches": "cudaLaunchKernel", "graph_launches": "cudaGraphLaunch", "syncs": "cudaStreamSynchronize",
          "copies": "cudaMemcpyAsync"}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile_case(target, family: str, tree: str, tokens: int, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bench.bench_decode import random_drafter, tree_overrides
    from conf.schema import load_config
    from eval.stage import build_drafter, make_decoder

    cfg = load_config([f"run.device={device}", f"drafter={family}", *tree_overrides(tree),
                       "eval.compare_assistant=false"])
    drafter = random_drafter(family, cfg, target)[0] if family == "eagle3" else build_drafter(cfg, target)[0]
    dec = make_decoder(cfg, target, drafter, 0.0)
    ids = [100 + i % 37 for i in range(96)]  # repeats: prompt lookup finds matches
    if family == "oracle":
        drafter.replay_autoregressive(dec, ids, tokens)
    dev = target.device
    for _ in range(2):
        dec.generate(ids, tokens, eos_ids=[])
        dec.generate_autoregressive(ids, tokens, eos_ids=[])
    spec, ar = [], []
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        out, st = dec.generate(ids, tokens, eos_ids=[])
        _sync(dev)
        spec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref, _ = dec.generate_autoregressive(ids, tokens, eos_ids=[])
        _sync(dev)
        ar.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _, pst = dec.generate(ids, tokens, eos_ids=[])
        _sync(dev)
    counts = {e.key: e.count for e in prof.key_averages()}
    c = max(pst.cycles, 1)
    row = {"bench": "profile", "drafter": family if family != "eagle3" else "eagle3 (random)", "tree": tree,
           "tokens": tokens, "cycles": st.cycles, "tau": st.tau, "spec_ms": 1000 * min(spec),
           "ar_ms": 1000 * min(ar), "speedup": min(ar) / min(spec), "equal_ar": out.tolist() == ref.tolist(),
           "ms_per_cycle": {k: 1000 * getattr(st, f"time_{k}") / max(st.cycles, 1) for k in ("draft", "verify", "other")},
           "aten_ops": sum(v for k, v in counts.items() if k.startswith("aten::")) / c}
    row.update({k: counts.get(name, 0) / c for k, name in EVENTS.items()})
    return row


def table(rows: list[dict]) -> list[str]:
    out = ["| drafter | tree | tau | speedup over our AR | draft / verify / other ms per cycle | kernel launches | "
           "graph launches | stream syncs | copies | aten ops | = AR |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms_per_cycle"]
        out.append(f"| {r['drafter']} | {r['tree']} | {r['tau']:.2f} | {r['speedup']:.2f}x | {ms['draft']:.2f} / "
                   f"{ms['verify']:.2f} / {ms['other']:.2f} | {r['launches']:.0f} | {r['graph_launches']:.1f} | "
                   f"{r['syncs']:.1f} | {r['copies']:.1f} | {r['aten_ops']:.0f} | {'yes' if r['equal_ar'] else 'no'} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", help="random-weight Llama shape (bench/targets.py SHAPES)")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generate")
    ap.add_argument("--cases", nargs="+", default=[f"{f}={t}" for f, t in CASES], help="FAMILY=TREE ...")
    ap.add_argument("--json", help="append each row to this JSONL file")
    args = ap.parse_args(argv)
    import torch

    from bench.targets import random_llama_target
    from conf.schema import load_config

    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg0 = load_config([f"run.device={args.device}", "drafter=ngram"])
    target = random_llama_target(args.shape, "assets/demo-target", args.device, args.vocab, cfg0.target.dtype)
    print(f"profile: random-weight Llama {args.shape} (vocab {target.vocab_size}) on {target.device}, "
          f"{args.tokens} new tokens, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows = []
    for case in args.cases:
        family, _, tree = case.partition("=")
        t0 = time.time()
        row = profile_case(target, family, tree, args.tokens, args.device)
        row["target"] = f"random-weight Llama ({args.shape} shape, vocab {target.vocab_size})"
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{case}: {time.time() - t0:.0f} s", flush=True)
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
