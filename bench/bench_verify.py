"""Traversal Verification against the token-level lossless rule, and delayed tree expansion, on drafters that
bench/bench_drafters.py already trained: τ only (tokens per target forward), no training.

    python bench/bench_verify.py --root /work/bench/me --variants eagle3,medusa,small --threads 1

--root is a bench_drafters root: <root>/<variant>/train/final (the trained drafter) and <root>/<variant>/data_gen
(its held-out ShareGPT prompts). Two tables:

- rules: each drafter x tree x temperature decodes the same prompts twice, eval.acceptance=lossless and
  =traversal, with the same per-prompt seed; Δτ = traversal - lossless with a paired percentile bootstrap over
  prompts (eval.metrics.paired_difference). Trees: a sampled chain (where traversal is block verification),
  a sampled tree of i.i.d. rollouts, and an EAGLE-2 dynamic tree (top-k children: point masses, where the
  two rules accept any path with the same probability, so Δτ should be noise).
- delay (first variant, EAGLE-3 by default): τ per node budget for eval.tree.delay in --delays, dynamic trees
  (total_tokens = the budget, the trunk included) at T = 0 and 1, and i.i.d. rollouts at T = 1 with
  traversal (node counts as built: the trunk plus its rollouts).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.metrics import paired_difference  # noqa: E402
from eval.report import INTERVAL_NOTE, md_table, with_interval  # noqa: E402

RULES = ("lossless", "traversal")


def rollouts(k: int, length: int) -> list[list[int]]:
    """Static paths of k i.i.d. rollouts `length` deep: k children of the root, one child below each."""
    return [[r] + [0] * d for d in range(length) for r in range(k)]


def rule_trees(max_depth: int, which: list[str]) -> dict:
    """name -> (TreeConfig, sample): the trees (of `which`: chain, rollouts, dynamic) the rules table compares on."""
    from conf.schema.eval import TreeConfig

    d = min(4, max_depth)
    trees = {"chain": (f"chain {d} (sampled)", TreeConfig(kind="chain", depth=d), None),
             "rollouts": (f"2 rollouts x {d} (sampled)", TreeConfig(kind="static", paths=rollouts(2, d)), True),
             "dynamic": (f"dynamic {d}/4/16 (top-k)", TreeConfig(kind="dynamic", depth=d, top_k=4, total_tokens=16),
                         None)}
    return {trees[w][0]: trees[w][1:] for w in which}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="a bench_drafters root holding <variant>/train/final")
    ap.add_argument("--variants", default="eagle3,medusa,small")
    ap.add_argument("--temperatures", default="1,0.7")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--delays", default="0,1,2")
    ap.add_argument("--budgets", default="8,16,32", help="node budgets of the delay table's dynamic trees")
    ap.add_argument("--trees", default="chain,rollouts,dynamic", help="the rules table's trees")
    ap.add_argument("--tables", default="rules,delay", help="rules, delay (the first variant's) or both")
    ap.add_argument("--delay-temperatures", default="0,1")
    ap.add_argument("--no-rollouts", action="store_true", help="delay table: dynamic trees only")
    ap.add_argument("--render", nargs="+", metavar="LOG", default=None,
                    help="write the section from the JSON row lines of earlier runs' logs (runs split across "
                         "processes, or stopped early) instead of measuring; --commands says what ran")
    ap.add_argument("--commands", nargs="*", default=[], help="with --render: the commands behind the logs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, printed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", default=None, help="Markdown file whose section is updated (default BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="also write every row here")
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


class Bench:
    """One trained drafter on the demo target, its held-out prompts, and τ per (tree, T, rule)."""

    def __init__(self, root: Path, variant: str, args):
        from conf.schema import load_config
        from drafters.target import load_target
        from eval.benchmarks import render_prompt
        from eval.stage import build_drafter, prompt_limit, select_prompts

        final = root / variant / "train" / "final"
        family = json.loads((final / "drafter_config.json").read_text())["family"]
        cfg = load_config([f"run.root={root}", f"run.name={variant}", f"run.device={args.device}", "experiment=demo",
                           "stage=eval", f"drafter={family}", f"drafter.checkpoint={final}",
                           f"eval.num_prompts={args.prompts}", f"eval.max_new_tokens={args.max_new_tokens}"])
        self.target = load_target(cfg.target, cfg.run.device)
        self.drafter, _ = build_drafter(cfg, self.target)
        self.max_depth = getattr(self.drafter, "max_depth", None) or 99
        prompts, _, _ = select_prompts("sharegpt_heldout", cfg, self.target, prompt_limit(cfg, self.target))
        self.prompts = [(p.id, render_prompt(self.target.tokenizer, self.target.chat_template,
                                             [{"role": "user", "content": p.turns[0]}])) for p in prompts]
        self.variant, self.max_new, self.seed = variant, args.max_new_tokens, cfg.eval.seed

    def per_prompt(self, tree, temperature: float, rule: str, sample) -> dict:
        """per_prompt()-style columns (prompt_ids, cycle_tokens, cycles) over the prompts, seed per prompt."""
        import torch

        from decoding.decoder import SpeculativeDecoder
        from decoding.tree import fit_depth

        dec = SpeculativeDecoder(self.target, self.drafter, fit_depth(tree, self.max_depth), temperature,
                                 acceptance=rule, sample=sample)
        out = {"prompt_ids": [], "cycle_tokens": [], "cycles": [], "nodes": 0}
        for i, (pid, ids) in enumerate(self.prompts):
            g = torch.Generator(device=self.target.device).manual_seed(self.seed * 1000 + i)
            _, st = dec.generate(ids, self.max_new, eos_ids=None, generator=g)
            out["prompt_ids"].append(pid)
            out["cycle_tokens"].append(st.cycle_tokens)
            out["cycles"].append(st.cycles)

        def count(t, a):  # the node count of the trees it built
            out["nodes"] = max(out["nodes"], t.num_nodes)
        dec.generate(self.prompts[0][1], 4, eos_ids=[], on_cycle=count,
                     generator=torch.Generator(device=self.target.device).manual_seed(0))
        return out


def tau(pp: dict) -> float:
    return sum(pp["cycle_tokens"]) / max(sum(pp["cycles"]), 1)


def rules_rows(b: Bench, temps: list[float], which: list[str]) -> list[dict]:
    rows = []
    for name, (tree, sample) in rule_trees(b.max_depth, which).items():
        for t in temps:
            pp = {r: b.per_prompt(tree, t, r, sample) for r in RULES}
            diff = paired_difference(pp["traversal"], pp["lossless"])
            row = {"drafter": b.variant, "tree": name, "T": t, "nodes": pp["lossless"]["nodes"],
                   "tau_lossless": tau(pp["lossless"]), "tau_traversal": tau(pp["traversal"]),
                   "cycles": sum(pp["lossless"]["cycles"]) + sum(pp["traversal"]["cycles"]), **diff}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    return rows


def delay_rows(b: Bench, delays: list[int], budgets: list[int], temps: list[float], rollout_rows: bool) -> list[dict]:
    from conf.schema.eval import TreeConfig

    rows = []
    depth = min(5, b.max_depth)
    for t in temps:
        for n in budgets:
            for d in delays:
                tree = TreeConfig(kind="dynamic", depth=depth, top_k=4, total_tokens=n, delay=d)
                pp = b.per_prompt(tree, t, "lossless", None)
                rows.append({"tree": f"dynamic {depth}/4", "T": t, "budget": n, "delay": d, "nodes": pp["nodes"],
                             "tau": tau(pp), "cycles": sum(pp["cycles"])})
                print(json.dumps(rows[-1]), flush=True)
    for d, k in zip(delays if rollout_rows else [], (2, 2, 3)):  # rollouts 4 deep: d + k (4 - d) nodes, k chosen to keep them near 8
        tree = TreeConfig(kind="static", paths=rollouts(k, min(4, b.max_depth) - d), delay=d)
        pp = b.per_prompt(tree, 1.0, "traversal", True)
        rows.append({"tree": f"{k} rollouts (sampled, traversal)", "T": 1.0, "budget": None, "delay": d,
                     "nodes": pp["nodes"], "tau": tau(pp), "cycles": sum(pp["cycles"])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _verdict(r: dict) -> str:
    if r.get("outside_noise") is None:
        return "no verdict"
    return "outside the noise" if r["outside_noise"] else "within the noise"


RULES_COLUMNS = [
    ("drafter", lambda r: r["drafter"]), ("tree", lambda r: r["tree"]), ("T", lambda r: f"{r['T']:g}"),
    ("nodes", lambda r: str(r["nodes"])), ("τ lossless", lambda r: f"{r['tau_lossless']:.3f}"),
    ("τ traversal", lambda r: f"{r['tau_traversal']:.3f}"),
    ("Δτ [95 %]", lambda r: with_interval(r["diff"], r["ci"], "{:+.3f}")), ("verdict", _verdict),
    ("prompts / cycles", lambda r: f"{r['prompts']} / {r['cycles']}"),
]
DELAY_COLUMNS = [
    ("tree", lambda r: r["tree"]), ("T", lambda r: f"{r['T']:g}"),
    ("node budget", lambda r: "-" if r["budget"] is None else str(r["budget"])), ("delay", lambda r: str(r["delay"])),
    ("nodes built", lambda r: str(r["nodes"])), ("τ", lambda r: f"{r['tau']:.3f}"), ("cycles", lambda r: str(r["cycles"])),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_verify.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    import torch

    from bench.bench_decode import BENCHMARKS_MD, update_markdown
    from eval.report import machine_info

    torch.set_num_threads(args.threads)
    print(f"bench_verify: {torch.get_num_threads()} torch CPU threads", flush=True)
    t0 = time.time()
    root = Path(args.root)
    temps = [float(t) for t in args.temperatures.split(",")]
    rows, drows = [], []
    if args.render:
        seen = set()  # a row two runs both measured (same seeds: the same figures) is shown once
        for log in args.render:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{") and line not in seen:
                    seen.add(line)
                    r = json.loads(line)
                    (rows if "drafter" in r else drows).append(r)
        command = "; ".join(args.commands) or command
    for i, variant in enumerate([] if args.render else args.variants.split(",")):
        print(f"=== {variant}", flush=True)
        b = Bench(root, variant, args)
        if i == 0 and "delay" in args.tables:
            drows = delay_rows(b, [int(d) for d in args.delays.split(",")], [int(n) for n in args.budgets.split(",")],
                               [float(t) for t in args.delay_temperatures.split(",")], not args.no_rollouts)
        if "rules" in args.tables:
            rows += rules_rows(b, temps, args.trees.split(","))
    machine = machine_info(torch.device(args.device))
    note = f"; {args.note}" if args.note else ""
    text = "\n".join([
        "<!-- bench_verify: rules -->",
        "## Traversal Verification and delayed tree expansion (`bench/bench_verify.py`)", "",
        f"- command: `{command}`",
        f"- machine: {machine['device_name']} ({machine['cpu_count']} CPUs){note}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}; {machine['date']}"
        + ("" if args.render else f"; {time.time() - t0:.0f} s"),
        f"- demo target, drafters trained by bench_drafters.py; {args.prompts} held-out ShareGPT prompts x "
        f"{args.max_new_tokens} new tokens, the same per-prompt seed under both rules.", "",
        "τ under the token-level lossless rule and under Traversal Verification; Δτ = traversal − lossless, "
        "paired over the same prompts (both resampled together). " + INTERVAL_NOTE, "",
        *(md_table(RULES_COLUMNS, rows) + [""] if rows else []),
        *(["Delayed expansion (first drafter): τ per node budget; `delay` tokens drafted as a single path "
           "(top-1) before the tree branches. Dynamic trees keep `total_tokens` = budget nodes, trunk included.",
           "", *md_table(DELAY_COLUMNS, drows), ""] if drows else []),
        "<!-- /bench_verify -->"])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rules": rows, "delay": drows, "command": command,
                                               "machine": machine}, indent=1))
    if not args.no_write:
        update_markdown(Path(args.out or BENCHMARKS_MD), "rules", text, tag="bench_verify")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
