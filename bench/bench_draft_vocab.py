"""Draft-time vocabulary trimming (drafter.draft_vocab: FR-Spec / VocabTrim) on already-trained drafters: τ,
drafter ms per draft step and tok/s for each kept share of the vocabulary, measured interleaved.

    python bench/bench_draft_vocab.py --root /work/bench/me --variants eagle1,medusa,hydra,small --threads 1
    python bench/bench_draft_vocab.py --root runs --variants eagle1 --fractions 1,0.25 --prompts 4 --max-new-tokens 16

--root holds <variant>/train/final (bench/bench_drafters.py's layout) and <variant>/data_gen (the counts,
source `data`); --counts names another data_gen folder (e.g. one run with data.regenerate=true, then
--source generated). For each variant and prompt, the target's autoregressive decoding runs once and then
every size's speculative decoding, in an order rotated prompt by prompt, so a noisy (shared) machine slows
all sizes alike; each size's figures are also given as a ratio to the full head's on the same prompts, with a
95 % bootstrap interval over prompts. "drafter ms/cycle" is the time inside the drafter's own calls (start,
expand, commit: its forwards and LM heads, not the tree building) per speculative cycle, since families spend
their LM head in different calls (Medusa computes every head at commit, EAGLE and the LMs at expand).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drafters.base import Drafter  # noqa: E402

OPTION = {"eagle1": "eagle1", "eagle3": "eagle3", "medusa": "medusa", "medusa2": "medusa2", "hydra": "hydra",
          "hydra_pp": "hydra_pp", "small": "small"}  # variant (run name) -> conf/drafter option


class TimedDrafter(Drafter):
    """Passes calls through to `inner`, adding the seconds spent in them to `spent`."""

    def __init__(self, inner):
        self.inner, self.spent = inner, 0.0
        for a in ("name", "uses_features", "feature_source", "vocab_size", "max_depth"):
            if hasattr(inner, a):
                setattr(self, a, getattr(inner, a))

    def prepare(self, room, cuda_graphs=False):
        self.inner.prepare(room, cuda_graphs)

    def _timed(self, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        self.spent += time.perf_counter() - t0
        return out

    def start(self, input_ids, features):
        self._timed(self.inner.start, input_ids, features)

    def expand(self, tree, frontier):
        return self._timed(self.inner.expand, tree, frontier)

    def commit(self, new_ids, new_features):
        self._timed(self.inner.commit, new_ids, new_features)

    def close(self):
        self.inner.close()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="folder with <variant>/train/final and <variant>/data_gen")
    ap.add_argument("--variants", default="eagle1,medusa,hydra,small")
    ap.add_argument("--fractions", default="1,0.5,0.25,0.125", help="kept shares of the target vocabulary")
    ap.add_argument("--source", default="data", choices=["data", "generated"])
    ap.add_argument("--counts", default=None, help="data_gen folder of the counts (default <root>/<variant>/data_gen)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="assets/demo-target")
    ap.add_argument("--note", default="")
    return ap.parse_args(argv)


def _ratio_vs(cols, num, den, base_num, base_den):
    """(value, 95 % interval) of (sum num / sum den) / (sum base_num / sum base_den) over prompts."""
    import numpy as np

    from eval.metrics import bootstrap

    x = np.column_stack([cols[num], cols[den], cols[base_num], cols[base_den]]).astype(float)

    def stat(s):
        return (s[..., 0] / s[..., 1]) / (s[..., 2] / s[..., 3])
    return float(stat(x.sum(0))), bootstrap(x, stat)


def run_variant(variant: str, args, fractions: list[float], temp: float) -> list[dict]:

    from conf.schema import load_config
    from data_gen.output import draft_vocab_counts
    from drafters.registry import drafter_class
    from drafters.target import load_target
    from drafters.vocab_trim import draft_vocab_size, trim_draft_vocab
    from eval.metrics import paired_difference, per_prompt, summarize
    from eval.stage import (
        ar_generate,
        converse,
        fit_tree,
        make_decoder,
        prompt_limit,
        select_prompts,
        spec_generate,
    )

    root = Path(args.root)
    cfg = load_config([f"drafter={OPTION[variant]}", f"target.path={args.target}", f"run.root={root}",
                       f"run.name={variant}", f"eval.num_prompts={args.prompts}",
                       f"eval.max_new_tokens={args.max_new_tokens}", "run.device=cpu"])
    target = load_target(cfg.target, "cpu")
    trained = drafter_class(cfg.drafter.name).from_pretrained(str(root / variant / "train" / "final"), target)
    counts = draft_vocab_counts(args.counts or root / variant / "data_gen", args.source, target)
    sizes = [draft_vocab_size(f if f < 1 else None, target.vocab_size) for f in fractions]
    drafters = [TimedDrafter(trim_draft_vocab(trained, counts, k).as_drafter(target)) for k in sizes]
    fit_tree(cfg, drafters[0])
    ev, eos = cfg.eval, target.eos_token_ids
    decs = [make_decoder(cfg, target, d, temp) for d in drafters]
    limit = prompt_limit(cfg, target)
    prompts, skipped, _ = select_prompts("sharegpt_heldout", cfg, target, limit)
    first = prompts[0]
    for dec in decs:  # untimed warm-up
        converse(lambda ids, g, dec=dec: spec_generate(dec, ids, 16, eos, g), first, target, limit, ev.seed, Counter())
    spec = [[] for _ in sizes]
    spent = [[] for _ in sizes]
    ar = []
    for i, p in enumerate(prompts):
        ar.append(converse(lambda ids, g: ar_generate(decs[0], ids, ev.max_new_tokens, eos, g), p, target, limit,
                           ev.seed + i, Counter()))
        order = [(i + j) % len(sizes) for j in range(len(sizes))]  # rotated: no size always runs first
        for j in order:
            d = drafters[j]
            s0 = d.spent
            spec[j].append(converse(lambda ids, g, dec=decs[j]: spec_generate(dec, ids, ev.max_new_tokens, eos, g),
                                    p, target, limit, ev.seed + i, Counter()))
            spent[j].append(d.spent - s0)
        print(f"{variant} T={temp:g}: prompt {i + 1}/{len(prompts)}", flush=True)
    ids = [p.id for p in prompts]
    rows, base = [], None
    for j, (f, k) in enumerate(zip(fractions, sizes)):
        n = [min(len(s), len(a)) for s, a in zip(spec[j], ar)]  # the same turns on both sides
        sp, aa = [s[:m] for s, m in zip(spec[j], n)], [a[:m] for a, m in zip(ar, n)]
        row = summarize(sp, aa, ids)
        cols = {**per_prompt(sp, aa, ids), "drafter_s": spent[j]}
        row.update(variant=variant, fraction=f, kept=k or target.vocab_size, temperature=temp,
                   tree_depth=ev.tree.depth, cols=cols,
                   drafter_ms_cycle=1000 * sum(cols["drafter_s"]) / max(1, sum(cols["cycles"])))
        if base is None:
            base = row
        else:
            bc = base["cols"]
            both = {**{f"b_{c}": v for c, v in bc.items() if c != "prompt_ids"}, **cols}
            row["ms_ratio"] = _ratio_vs(both, "drafter_s", "cycles", "b_drafter_s", "b_cycles")
            row["tok_s_ratio"] = _ratio_vs(both, "new_tokens_spec", "wall_s_spec", "b_new_tokens_spec", "b_wall_s_spec")
            row["dtau"] = paired_difference(cols, bc)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    from eval.report import with_interval

    def iv(pair, fmt="{:.2f}"):
        return "" if pair is None else with_interval(pair[0], pair[1], fmt)

    out = ["| drafter | kept | τ [95 %] | Δτ vs full [95 %] | drafter ms/cycle | × full [95 %] | tok/s | × full [95 %] "
           "| = AR |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("dtau")
        dt = "" if d is None else with_interval(d["diff"], d["ci"], "{:+.2f}")
        if d is not None and d["outside_noise"]:
            dt = f"**{dt}**"
        share = "full" if r["fraction"] >= 1 else f"1/{round(1 / r['fraction'])}"
        out.append(f"| {r['variant']} | {share} ({r['kept']}) | {with_interval(r['tau'], r['ci']['tau'])} | {dt} | "
                   f"{r['drafter_ms_cycle']:.2f} | {iv(r.get('ms_ratio'))} | {r['tok_s_spec']:.1f} | "
                   f"{iv(r.get('tok_s_ratio'))} | {r['identical_outputs'] if r['temperature'] == 0 else '-'}"
                   f"/{r['generations']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_draft_vocab.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    import torch

    from conf.errors import DraftsmithError
    from eval.report import machine_info

    torch.set_num_threads(args.threads)
    print(f"torch CPU threads: {torch.get_num_threads()}", flush=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    if fractions[0] != 1 or any(not 0 < f <= 1 for f in fractions):
        print("error: --fractions must start with 1 (the full head every ratio is taken against), each in (0, 1]",
              file=sys.stderr)
        return 2
    t0, rows = time.time(), []
    try:
        for temp in (float(t) for t in args.temperatures.split(",")):
            for v in args.variants.split(","):
                rows += run_variant(v, args, fractions, temp)
                print(table(rows), flush=True)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = machine_info(torch.device("cpu"))
    print("\n".join([
        f"- machine: {m['device_name']}{' — ' + args.note if args.note else ''}; torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}",
        f"- date: {m['date']}; wall time {time.time() - t0:.0f} s", f"- command: `{command.strip()}`",
        f"- counts: source {args.source} ({args.counts or '<root>/<variant>/data_gen'}); "
        f"{args.prompts} sharegpt_heldout prompts × {args.max_new_tokens} new tokens; temperatures {args.temperatures}",
        "", table(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
