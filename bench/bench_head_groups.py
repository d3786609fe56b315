"""What CORAL's LM-head grouping (drafter.head_groups / active_groups, drafters/head_groups.py) saves per draft
step: the draft head over the whole draft vocabulary vs the router plus the router's top groups, timed on
random weights of a given size (the drafter's decoder layer is the same either way and is left out).

    python bench/bench_head_groups.py --threads 1                      # H 2048, V_d 32000, 10 rows per step
    python bench/bench_head_groups.py --hidden 4096 --vocab 32000 --rows 1,10,60 --groups 16 --active 1,2,4

rows = tree nodes expanded in one drafter call (a chain drafts 1, EAGLE-2's dynamic tree top_k = 10). The
weight blocks read are the union of the rows' groups, so rows that disagree read more of the head: the
random router here spreads rows over groups as an untrained one would (worst case); a trained router
concentrates them. Prints a Markdown table (median of --repeats timed calls after
a warm-up).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000, help="draft vocabulary size V_d")
    ap.add_argument("--rows", default="1,10")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--active", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from drafters.head_groups import HeadRouter, grouped_logits
    from eval.report import machine_info

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.randn(args.vocab, args.hidden) / args.hidden**0.5
    router = HeadRouter(args.hidden, args.groups).eval()

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    m = machine_info(torch.device("cpu"))
    print(f"- machine: {m['device_name']}; torch {m['torch']} ({torch.get_num_threads()} threads); date {m['date']}")
    print(f"- head {args.vocab} x {args.hidden} (fp32), {args.groups} groups; median of {args.repeats} calls\n")
    print("| rows per call | full head ms | " + " | ".join(f"{a} of {args.groups} groups ms (×)"
                                                       for a in map(int, args.active.split(","))) + " |")
    print("|---" * (2 + len(args.active.split(","))) + "|")
    with torch.no_grad():
        for rows in map(int, args.rows.split(",")):
            h = torch.randn(rows, args.hidden)
            full = timed(lambda h=h: (h @ head.t()).float())
            cells = []
            for a in map(int, args.active.split(",")):
                ms = timed(lambda h=h, a=a: grouped_logits(h, head, router(h), a))
                cells.append(f"{ms:.2f} ({full / ms:.1f}×)")
            print(f"| {rows} | {full:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
