"""OPT-Tree vs EAGLE-2's dynamic tree: τ and tokens/s at equal node budgets, and the budget OPT-Tree picks
from its cost model on this machine. Prints a table with the machine, the command and the date, and updates
its section of BENCHMARKS.md.

    python bench/bench_opt_tree.py --drafter eagle3=runs/demo/train/final              # demo target, T=0
    python bench/bench_opt_tree.py --drafter eagle3=DIR --budgets 16 32 60 --prompts 16 --max-new-tokens 64 --threads 1
    python bench/bench_opt_tree.py --drafter eagle3=DIR --prompts 2 --max-new-tokens 16 --no-write   # quick look

Settings, all with depth 5 and top_k 8 (at most 8 nodes expanded per depth for both, so one drafter step
costs about the same): `dynamic@n` (EAGLE-2: top_k children of the 8 best nodes per depth, the n best kept),
`opt@n` (OPT-Tree with a fixed budget of n nodes, drafting deeper while the cost model says a step pays),
`opt@cost≤N` (OPT-Tree choosing the budget each cycle, N = the largest --budgets), and the autoregressive
baseline. The opt settings share one verification-time model (measured once, by opt@cost's decoder, when
it starts); each measures its own drafter step time while it drafts. Every setting decodes every prompt, interleaved prompt by prompt in a rotating order, so load on
a shared machine falls on all of them alike; tokens/s are compared as ratios on the same prompts
(a paired percentile bootstrap over prompts), which is what a noisy machine can still measure.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import numpy as np  # noqa: E402

from bench.bench_decode import BENCHMARKS_MD, bench_prompts, update_markdown  # noqa: E402
from conf.errors import DraftsmithError  # noqa: E402
from conf.schema import load_config  # noqa: E402
from eval.report import cell, md_table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="assets/demo-target")
    ap.add_argument("--drafter", required=True, metavar="FAMILY=DIR", help="a trained drafter folder, e.g. eagle3=DIR")
    ap.add_argument("--budgets", nargs="+", type=int, default=[16, 32, 60])
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--benchmark", default="sharegpt_heldout")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, printed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--note", default="", help="said beside the machine, e.g. 'shared with other jobs'")
    ap.add_argument("--out", default=str(BENCHMARKS_MD))
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def settings(args) -> list[tuple[str, dict | None]]:
    """(label, eval.tree overrides or None for autoregressive), in the order decoded for the first prompt."""
    base = {"depth": args.depth, "top_k": args.top_k}
    out = [("AR", None)]
    for n in args.budgets:
        out += [(f"dynamic@{n}", {**base, "kind": "dynamic", "total_tokens": n}),
                (f"opt@{n}", {**base, "kind": "opt", "total_tokens": n, "opt_budget": "fixed"})]
    return out + [(f"opt@cost≤{max(args.budgets)}", {**base, "kind": "opt", "total_tokens": max(args.budgets)})]


def run(args):
    """Decode every prompt with every setting; returns (per-setting records, decoders, machine, prompts)."""
    import torch

    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder
    from decoding.opt_tree import OptCost
    from drafters.target import load_target
    from eval.report import machine_info
    from eval.stage import ar_generate, build_drafter, spec_generate, validate

    torch.set_num_threads(args.threads)
    family, sep, folder = args.drafter.partition("=")
    if not sep:
        raise DraftsmithError(f"--drafter {args.drafter!r}: use FAMILY=DIR, e.g. eagle3=runs/demo/train/final")
    cfg = load_config([f"target.path={args.target}", f"run.device={args.device}", f"drafter={family}",
                       f"drafter.checkpoint={folder}", f"eval.benchmarks=[{args.benchmark}]",
                       f"eval.num_prompts={args.prompts}", f"eval.max_new_tokens={args.max_new_tokens}",
                       f"eval.max_prompt_tokens={args.max_prompt_tokens}", "eval.compare_assistant=false"])
    validate(cfg)
    target = load_target(cfg.target, cfg.run.device)
    drafter, _ = build_drafter(cfg, target)
    prompts = bench_prompts(cfg, target)
    eos = sorted(target.eos_token_ids)
    decs = {}
    for label, tree in settings(args):
        tree_cfg = TreeConfig(**tree) if tree else TreeConfig(kind="chain", depth=1)
        decs[label] = SpeculativeDecoder(target, drafter, tree_cfg, 0.0)
    g = torch.Generator(device=target.device)
    cost = None
    for label, dec in reversed(decs.items()):  # untimed warm-up; opt@cost (last) measures the cost model
        if cost is not None and dec.tree_cfg.kind == "opt":  # one verification model for every opt setting,
            dec.opt_cost = OptCost(list(cost.verify_points), source="measured")  # so load noise differs not
        (ar_generate if label == "AR" else spec_generate)(dec, prompts[0], min(16, args.max_new_tokens), eos, g)
        if dec.opt_cost is not None:
            cost = cost or dec.opt_cost
            dec.opt_cost.history.clear()
    labels = list(decs)
    recs = {label: [] for label in labels}
    for i, ids in enumerate(prompts):
        order = labels[i % len(labels):] + labels[:i % len(labels)]  # rotate: no setting always runs first
        for label in order:
            gen = ar_generate if label == "AR" else spec_generate
            recs[label].append(gen(decs[label], ids, args.max_new_tokens, eos, g))
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    return recs, decs, machine_info(target.device), prompts


def _interval(cols, stat):
    from eval.metrics import bootstrap

    return bootstrap(np.column_stack(cols), stat)


def rows(recs: dict, decs: dict) -> list[dict]:
    """One row per setting: τ, tok/s and their ratios to dynamic at the same budget and to AR (intervals over
    prompts), the budget and drafter steps OPT-Tree used, and whether its output equals AR's."""
    def cols(label):
        r = recs[label]
        return {k: np.array([getattr(x, k) for x in r], float) for k in ("forward_tokens", "forwards", "new_tokens",
                                                                          "wall_s")}

    def ratio(s):
        return s[..., 0] / s[..., 1]

    def rr(s):
        return (s[..., 0] / s[..., 1]) / (s[..., 2] / s[..., 3])

    ar = cols("AR")
    out = []
    for label, dec in decs.items():
        if label == "AR":
            continue
        c = cols(label)
        n = label.split("@")[1]
        peer = f"dynamic@{n}" if label.startswith("opt@") and f"dynamic@{n}" in recs else None
        row = {"setting": label, "tau": c["forward_tokens"].sum() / c["forwards"].sum(),
               "tau_ci": _interval([c["forward_tokens"], c["forwards"]], ratio),
               "tok_s": c["new_tokens"].sum() / c["wall_s"].sum(),
               "tok_s_ci": _interval([c["new_tokens"], c["wall_s"]], ratio),
               "vs_ar": rr(np.array([c["new_tokens"].sum(), c["wall_s"].sum(), ar["new_tokens"].sum(),
                                     ar["wall_s"].sum()])),
               "vs_ar_ci": _interval([c["new_tokens"], c["wall_s"], ar["new_tokens"], ar["wall_s"]], rr),
               "same_as_ar": sum(a.tokens == b.tokens for a, b in zip(recs[label], recs["AR"])),
               "prompts": len(recs[label])}
        if peer:
            p = cols(peer)
            row["vs_dyn"] = rr(np.array([c["new_tokens"].sum(), c["wall_s"].sum(), p["new_tokens"].sum(),
                                         p["wall_s"].sum()]))
            row["vs_dyn_ci"] = _interval([c["new_tokens"], c["wall_s"], p["new_tokens"], p["wall_s"]], rr)
            row["tau_diff_ci"] = _interval([c["forward_tokens"], c["forwards"], p["forward_tokens"], p["forwards"]],
                                           lambda s: s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3])
        cost = dec.opt_cost
        if cost is not None:
            nodes = np.array([h[0] for h in cost.history])
            row.update(budget=nodes.mean(), budget_q=np.quantile(nodes, [0.1, 0.5, 0.9]).tolist(),
                       steps=cost.mean_steps(), predicted=1 + cost.mean_expected())
        out.append(row)
    return out


def _ci(ci, fmt="{:.2f}"):
    return "" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def table(rs: list[dict]) -> list[str]:
    cols = [("setting", lambda r: r["setting"]),
            ("τ [95 % CI]", lambda r: f"{r['tau']:.2f}{_ci(r['tau_ci'])}"),
            ("tok/s [95 % CI]", lambda r: f"{r['tok_s']:.1f}{_ci(r['tok_s_ci'], '{:.1f}')}"),
            ("tok/s ÷ dynamic, same budget", lambda r: f"{r['vs_dyn']:.3f}×{_ci(r['vs_dyn_ci'], '{:.3f}')}"
             if "vs_dyn" in r else "–"),
            ("τ − dynamic's", lambda r: _ci(r["tau_diff_ci"], "{:+.2f}").strip() or "–" if "vs_dyn" in r else "–"),
            ("tok/s ÷ AR", lambda r: f"{r['vs_ar']:.2f}×{_ci(r['vs_ar_ci'])}"),
            ("nodes verified: mean (p10/p50/p90)", lambda r: f"{r['budget']:.1f} ({'/'.join(cell(q, '{:.0f}') for q in r['budget_q'])})"
             if "budget" in r else "–"),
            ("drafter steps", lambda r: cell(r.get("steps"), "{:.2f}")),
            ("predicted 1 + Σ p̂", lambda r: cell(r.get("predicted"), "{:.2f}")),
            ("= AR", lambda r: f"{r['same_as_ar']}/{r['prompts']}")]
    return md_table(cols, rs)


def cost_lines(decs: dict) -> list[str]:
    out = []
    for label, dec in decs.items():
        c = dec.opt_cost
        if c is not None:
            pts = ", ".join(f"{n}: {ms:.1f}" for n, ms in c.verify_points)
            out.append(f"- {label} cost model ({c.source}): verification ms by nodes {{{pts}}}; drafter step "
                       f"{c.draft_ms:.1f} ms")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_opt_tree.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    try:
        recs, decs, machine, prompts = run(args)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"{machine['device']} ({machine['device_name']})"
    note = f" — {args.note}" if args.note else ""
    key = f"{where} | {args.target} | {args.drafter}"
    lines = [f"<!-- bench_opt_tree: {key} -->", f"### OPT-Tree vs EAGLE-2 dynamic trees: {args.target}, "
             f"{args.drafter.split('=')[0]} on {where}", "",
             f"- machine: {where}{note}; torch {machine['torch']} ({machine['torch_threads']} threads), "
             f"transformers {machine['transformers']}, Python {machine['python']}",
             f"- date: {machine['date']}; wall time {time.time() - t0:.0f} s",
             f"- command: `{command.strip()}`",
             f"- {len(prompts)} × {args.benchmark} prompts (first user turn, ≤ {args.max_prompt_tokens} tokens), "
             f"{args.max_new_tokens} new tokens, T = 0, depth {args.depth}, top_k {args.top_k}; settings "
             "interleaved prompt by prompt (rotating order); intervals: 95 % percentile bootstrap over prompts, "
             "ratios paired on the same prompts",
             "- tok/s move with the machine's load (absolute values are not comparable between runs); compare the "
             "ratios of settings decoded back to back on the same prompts", "", *table(rows(recs, decs)), "",
             *cost_lines(decs),
             "<!-- /bench_opt_tree -->"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_markdown(Path(args.out), key, text, tag="bench_opt_tree")
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
