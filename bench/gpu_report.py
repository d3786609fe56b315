"""Tables of one bench/gpu_suite.sh run, from what its steps left in the results folder (JSON rows written
as each measurement finished, the eval report of the default pipeline, the step log), into a Markdown
file and into BENCHMARKS.md's GPU section. A step that failed or ran out of time is listed as such;
its finished rows still count.

    python bench/gpu_report.py --results runs/gpu-suite/<stamp> --device cuda --command "bash bench/gpu_suite.sh"
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_decode import baseline_lines, table  # noqa: E402
from bench.bench_train_mfu import report as train_lines  # noqa: E402
from eval.report import cell  # noqa: E402

END = "<!-- end of GPU section: bench/gpu_suite.sh inserts its results above this line -->"
PLACEHOLDER = re.compile(r"<!-- gpu_suite: not yet measured -->.*?<!-- /gpu_suite -->\n*", re.S)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_steps(res: Path) -> list[dict]:
    """steps.tsv: name, exit status, seconds, limit, command (written by gpu_suite.sh's `step`)."""
    out = []
    for line in (res / "steps.tsv").read_text().splitlines() if (res / "steps.tsv").exists() else []:
        name, rc, secs, limit, cmd = line.split("\t", 4)
        out.append({"name": name, "rc": int(rc), "seconds": float(secs), "limit": int(limit), "command": cmd})
    return out


def status(s: dict) -> str:
    if s["rc"] == 0:
        return "ok"
    if s["rc"] in (124, 137):
        return f"**stopped at its {s['limit']} s limit**"
    if s["rc"] == 200:
        return "**skipped: suite time budget spent**"
    return f"**failed (exit {s['rc']})**: see {s['name']}.log"


def last_ar(rows: list[dict]) -> dict | None:
    """The latest autoregressive summary (bench_decode writes one before its peers and one after)."""
    return next((r for r in reversed(rows) if r.get("row") == "ar"), None)


def decode_block(rows: list[dict]) -> list[str]:
    spec = [r for r in rows if r.get("row") == "spec"]
    peers = [r for r in rows if "peer" in r]
    base = last_ar(rows)
    out = [f"Target: {rows[0]['target']}", ""]
    if spec:
        out += [table(spec, base and base["best_ms_per_token"]), ""]
    if base:
        out += baseline_lines(base, peers)
    elif peers:
        out.append("- (the step ended before its autoregressive summary: peers measured: "
                   + ", ".join(f"{p['peer']} {cell(p['ms_per_token'])} ms/token" for p in peers) + ")")
    return out + [""]


def ar_summary(decode_steps: list[tuple[str, list[dict]]]) -> list[str]:
    """One line per target: ours vs transformers vs the floor."""
    head = ["step", "target", "ours ms/token", "transformers generate ms/token", "best", "memory floor ms/token",
            "ours / floor"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in decode_steps:
        b = last_ar(rows)
        if b is None:
            continue
        hf = "-" if b["hf_ms_per_token"] is None else \
            f"{b['hf_ms_per_token']:.2f} ({'compiled' if b['hf_compiled'] else 'eager'})"
        ratio = b["ours_ms_per_token"] / b["floor_ms_per_token"] if b["floor_ms_per_token"] and b["ours_ms_per_token"] \
            else None
        out.append("| " + " | ".join([name, b["target"], cell(b["ours_ms_per_token"]), hf, cell(b["best_ms_per_token"]),
                                      cell(b["floor_ms_per_token"]), cell(ratio, "{:.1f}×")]) + " |")
    return out if len(out) > 2 else ["(no autoregressive baseline finished)"]


DEMO_RUN = "gpu-demo"  # run names of the --demo step (gpu-demo, gpu-demo-dflash): bench/gpu_suite.sh


def pipeline_block(res: Path, demo: bool = False) -> list[str]:
    """The eval reports of the default pipeline's runs, or (demo) of the --demo step's runs."""
    reports = sorted(p for p in (res / "runs").glob("*/eval/*/report.json")
                     if p.parts[-4].startswith(DEMO_RUN) == demo)
    if not reports:
        return ["(no eval report: the pipeline step did not reach its eval stage)", ""]
    out = []
    for p in reports:
        rep = json.loads(p.read_text())
        rows = [{"drafter": rep["drafter"]["name"], "tree": _tree(rep["tree"]), **r} for r in rep["results"]]
        out += [f"Eval report `{p.relative_to(res)}` (target {rep['target']}):", "", table(rows), ""]
    return out


def demo_block(res: Path) -> list[str]:
    """experiment=gpu_demo: the pretrained target's size, budget and held-out loss, its autoregressive cost, then
    the eval tables of EAGLE-3 and DFlash on it."""
    f = res / "runs" / DEMO_RUN / "target_pretrain" / "metrics.json"
    if not f.exists():
        return ["(no pretrained target: the demo step did not finish target_pretrain)", ""]
    m = json.loads(f.read_text())
    a = m["architecture"]
    out = [f"- target: {m['parameters'] / 1e6:.1f}M parameters ({a['num_layers']} layers x {a['hidden_size']}, "
           f"{a['num_heads']} query / {a['num_kv_heads']} key-value heads, vocab {a['vocab_size']}), pretrained "
           f"{m['train_seconds']:.0f} s on {m['tokens_seen']:,} tokens ({m['tokens_per_s']:,.0f} tokens/s; "
           f"{m['total_seconds']:.0f} s with setup and measurement), held-out loss {m['heldout_loss']:.3f} nats/token"]
    for p in sorted((res / "runs").glob(f"{DEMO_RUN}*/eval/*/report.json")):
        rep = json.loads(p.read_text())
        ar = [r["tok_s_ar"] for r in rep["results"] if r.get("tok_s_ar")]
        if ar:
            out.append(f"- autoregressive decoding ({rep['drafter']['name']} run, verify dtype "
                       f"{rep.get('verify_dtype')}): {1000 / ar[0]:.2f} ms/token")
    return out + ["", *pipeline_block(res, demo=True)]


def _tree(t: dict) -> str:
    return f"{t['kind']}:{t['depth']}" + (f":{t['top_k']}:{t['total_tokens']}" if t["kind"] == "dynamic" else "")


def build(res: Path, machine: dict, command: str, wall: float) -> tuple[str, str]:
    """(key, Markdown block) of one suite run."""
    steps = read_steps(res)
    demo_only = bool(steps) and all(s["name"] == "demo" for s in steps)
    # --demo has a block of its own: it must not replace the full suite's block of the same machine
    key = machine["device_name"] + (" --demo" if demo_only else "")
    lines = [f"<!-- gpu_suite: {key} -->", f"### GPU suite{' --demo' if demo_only else ''} on {machine['device_name']}", "",
             f"- machine: {machine['device']} ({machine['device_name']}), {machine['cpu_count']} CPU cores; torch "
             f"{machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}",
             f"- date: {machine['date']}; wall time {wall:.0f} s", f"- command: `{command}`", "",
             "| step | status | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {status(s)} | {s['seconds']:.0f} | `{s['command']}` |" for s in steps]
    decode = [(s["name"], read_jsonl(res / f"{s['name']}.jsonl")) for s in steps if s["name"].startswith("decode")]
    decode = [(n, rows) for n, rows in decode if rows]
    if not demo_only:
        lines += ["", "#### Autoregressive decoding: ours vs transformers vs the memory floor", "", *ar_summary(decode)]
    lines.append("")
    for name, rows in decode:
        lines += [f"#### {name}", "", *decode_block(rows)]
    from bench.profile_cycle import table as profile_table

    for s in steps:
        prof = read_jsonl(res / f"{s['name']}.jsonl") if s["name"].startswith("profile") else []
        if prof:
            lines += [f"#### {s['name']}: per cycle, torch.profiler over one generate ({prof[0]['tokens']} new tokens, "
                      f"{prof[0]['target']})", "", *profile_table(prof), "",
                      "tau / speedup: best of 3 generates each way on one repeating prompt (no interval: one "
                      "prompt); launches, syncs, copies and aten ops per cycle from the profiled fourth generate.",
                      ""]
    train = [r for s in steps if s["name"].startswith("train") for r in read_jsonl(res / f"{s['name']}.jsonl")]
    if any(s["name"] == "demo" for s in steps):
        lines += ["#### experiment=gpu_demo: a pretrained target, EAGLE-3 and DFlash", "", *demo_block(res)]
    if any(not s["name"].startswith("demo") for s in steps):
        lines += ["#### EAGLE-3 training throughput", ""]
        lines += [line for r in train for line in train_lines(r).splitlines()] or ["(the training step left no result)"]
        lines += ["", "#### Default pipeline (`python train.py`) on this machine", "", *pipeline_block(res)]
    lines.append("<!-- /gpu_suite -->")
    return key, "\n".join(lines)


def insert(md: Path, key: str, block: str) -> None:
    """Replace this machine's block in BENCHMARKS.md's GPU section, else put it where the section says
    (the 'not yet measured' placeholder goes once a real block is there)."""
    text = md.read_text()
    pat = re.compile(rf"<!-- gpu_suite: {re.escape(key)} -->.*?<!-- /gpu_suite -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    elif END in text:
        text = PLACEHOLDER.sub("", text).replace(END, block + "\n\n" + END)
    else:
        text = text.rstrip("\n") + "\n\n## GPU (`bench/gpu_suite.sh`)\n\n" + block + "\n\n" + END + "\n"
    md.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--command", default="bash bench/gpu_suite.sh")
    ap.add_argument("--wall", type=float, default=0.0, help="the suite's wall time, seconds")
    ap.add_argument("--benchmarks", default=None, help="BENCHMARKS.md to update (default: none)")
    args = ap.parse_args(argv)
    from eval.report import machine_info
    from runtime.device import resolve_device

    res = Path(args.results)
    key, block = build(res, machine_info(resolve_device(args.device)), args.command, args.wall)
    (res / "gpu-suite.md").write_text(block + "\n")
    print(block)
    if args.benchmarks:
        insert(Path(args.benchmarks), key, block)
        print(f"updated {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
