"""FastDraft's before/after τ table on one target: the small drafter after pre-training only, after pre-training
+ alignment, aligned without pre-training (same regenerated data), and the plain small drafter trained on
data_gen's rendered ShareGPT rows (the bench_drafters `small` row), all evaluated on the same prompts.

    python bench/bench_fastdraft.py --root /work/bench/fastdraft --threads 1          # demo target, CPU
    python bench/bench_fastdraft.py --root R --pretrain-steps 40 --align-steps 20 --prompts 4 --no-write

Every step is a real `python train.py` command (printed), the same settings as `experiment=fastdraft`,
split into run directories so that independent steps run side by side (the experiment runs them in one
process, one after another; the results are the same, since each step is deterministic):

    fd-pre      stage=drafter_pretrain                       -> fd-pre/drafter_pretrain/final
    fd          stage=data_gen data.regenerate=true, then stage=train train.init_from=<fd-pre final>
    fd-scratch  stage=train on fd's regenerated rows, fresh drafter (the "no pre-training" control)
    small       the bench_drafters `small` variant (rendered, not regenerated, rows; --align-steps steps),
                reused when <root>/small/train/final exists (e.g. linked from a bench_drafters root), else trained

then stage=eval of each with eval.temperatures=[0,1]. Δτ: paired bootstrap over the same prompts
(eval.metrics.paired_difference), as in bench_drafters. Finished steps are skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_drafters import TEMPS, comparison_table, eval_fields  # noqa: E402
from eval.metrics import paired_difference  # noqa: E402
from eval.report import md_table, with_interval  # noqa: E402

# row -> (run name, what it is)
ROWS = {
    "pretrain only": ("fd-pre", "drafter_pretrain alone: CE on packed ShareGPT text"),
    "pretrain + align": ("fd", "FastDraft: pre-trained, then distilled on regenerated data"),
    "align only": ("fd-scratch", "fresh drafter distilled on the same regenerated data"),
    "small (reference)": ("small", "fresh drafter distilled on rendered ShareGPT rows (bench_drafters `small`)"),
}
# (row, control) pairs whose Δτ is reported
PAIRS = [("pretrain + align", "small (reference)"), ("pretrain + align", "align only"),
         ("pretrain + align", "pretrain only"), ("align only", "small (reference)"),
         ("pretrain only", "small (reference)")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="run root; reruns skip finished steps")
    ap.add_argument("--target", default=None, help="target folder or hub id (default: the demo target)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-conversations", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--align-steps", type=int, default=150)
    ap.add_argument("--conversations", type=int, default=400, help="data.max_conversations (regenerated)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gen-max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None, help="Markdown file whose section is updated (default BENCHMARKS.md)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the eval reports already under --root (a missing row is left out)")
    return ap.parse_args(argv)


def common(args) -> list[str]:
    return ([f"run.root={args.root}", "run.device=cpu", f"run.threads={args.threads}", "experiment=fastdraft",
             f"data.max_conversations={args.conversations}", f"data.max_length={args.max_length}",
             f"data.gen_max_new_tokens={args.gen_max_new_tokens}", f"train.max_length={args.max_length}",
             f"train.lr={args.lr}", "train.micro_batch_size=4", "train.eval_every=0", "train.tensorboard=false",
             f"drafter_pretrain.max_steps={args.pretrain_steps}", f"drafter_pretrain.lr={args.lr}",
             f"drafter_pretrain.seq_len={args.seq_len}",
             f"drafter_pretrain.max_conversations={args.pretrain_conversations}"]
            + ([f"target.path={args.target}"] if args.target else []))


def launch(args, log: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *common(args), *overrides]
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], root: Path) -> None:
    for name, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"error: step {name} failed (exit {p.returncode}): see {root / (name + '.log')}")


def run_group(args, root: Path, steps: dict[str, tuple[Path, list[str]]]) -> None:
    """Run the steps whose `done` file is missing, side by side."""
    procs = {name: launch(args, root / f"{name}.log", *ov) for name, (done, ov) in steps.items() if not done.exists()}
    wait_all(procs, root)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_fastdraft.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    import torch

    from bench.bench_decode import BENCHMARKS_MD, update_markdown
    from eval.report import INTERVAL_NOTE, machine_info

    t0 = time.time()
    root = Path(args.root).resolve()
    args.root = str(root)
    root.mkdir(parents=True, exist_ok=True)
    pre_final = root / "fd-pre" / "drafter_pretrain" / "final"
    scratch_data = root / "fd-scratch" / "data_gen"
    steps = {"pretrain": (pre_final, ["run.name=fd-pre", "stage=drafter_pretrain"]),
             "regenerate": (root / "fd" / "data_gen" / "meta.json", ["run.name=fd", "stage=data_gen"])}
    if not (root / "small" / "train" / "final").exists():  # the reference: bench_drafters' small recipe
        steps["small"] = (root / "small" / "train" / "final",
                          ["run.name=small", "stages=[data_gen,train]", "data.regenerate=false", "train.init_from=null",
                           f"train.max_steps={args.align_steps}"])
    if args.report_only:
        steps = {}
    run_group(args, root, steps)
    if not scratch_data.exists() and (root / "fd" / "data_gen").exists():
        scratch_data.parent.mkdir(parents=True, exist_ok=True)
        scratch_data.symlink_to(root / "fd" / "data_gen")
    ev = ["stage=eval", "eval.temperatures=[0,1]", f"eval.num_prompts={args.prompts}",
          f"eval.max_new_tokens={args.max_new_tokens}", "eval.compare_assistant=false"]
    report = {name: root / run / "eval" / "small" / "report.json" for name, (run, _) in ROWS.items()}
    later = [{
        "align": (root / "fd" / "train" / "final", ["run.name=fd", "stage=train", f"train.max_steps={args.align_steps}",
                                                      f"train.init_from={pre_final}"]),
        "scratch": (root / "fd-scratch" / "train" / "final",
                    ["run.name=fd-scratch", "stage=train", f"train.max_steps={args.align_steps}", "train.init_from=null"]),
        "eval-pre": (report["pretrain only"], ["run.name=fd-pre", f"drafter.checkpoint={pre_final}", *ev]),
        "eval-small": (report["small (reference)"], ["run.name=small", *ev])},
        {"eval-fd": (report["pretrain + align"], ["run.name=fd", *ev]),
         "eval-scratch": (report["align only"], ["run.name=fd-scratch", *ev])}]
    for group in ([] if args.report_only else later):
        run_group(args, root, group)

    rows = {}
    for name, (_run, what) in ROWS.items():
        if not report[name].exists():
            print(f"no eval report for {name} ({report[name]}): left out of the table")
            continue
        r = json.loads(report[name].read_text())
        rows[name] = {"variant": name, "what": what, **eval_fields(r["results"])}
    threads = next(iter(json.loads(p.read_text())["machine"]["torch_threads"] for p in report.values() if p.exists()), None)
    text = render(args, rows, command, time.time() - t0, machine_info(torch.device("cpu")), threads, INTERVAL_NOTE)
    print(text)
    if not args.no_write:
        out = Path(args.out) if args.out else BENCHMARKS_MD
        update_markdown(out, f"cpu | {args.target or 'assets/demo-target'}", text, tag="bench_fastdraft")
        print(f"updated {out}")
    (root / "bench_fastdraft.json").write_text(json.dumps(rows, indent=1))
    return 0


def render(args, rows: dict, command: str, seconds: float, machine: dict, threads: int, interval_note: str) -> str:
    cols = [("variant", lambda r: r["variant"]), ("what", lambda r: r["what"])]
    for t in TEMPS:
        k = int(t)
        cols += [(f"cycles T={k}", lambda r, k=k: str(r[f"cycles_t{k}"])),
                 (f"τ T={k} [95 %]", lambda r, k=k: with_interval(r[f"tau_t{k}"], r[f"tau_ci_t{k}"]))]
    cols += [("= AR (T=0)", lambda r: r["identical_t0"])]
    comps = []
    for a, b in [(a, b) for a, b in PAIRS if a in rows and b in rows]:
        for t in TEMPS:
            k = int(t)
            comps.append({"variant": a, "control": b, "temperature": t,
                          **paired_difference(rows[a][f"per_prompt_t{k}"], rows[b][f"per_prompt_t{k}"])})
    target = args.target or "assets/demo-target"
    return "\n".join([
        f"<!-- bench_fastdraft: cpu | {target} -->", f"### FastDraft (small drafter): {target} on CPU", "",
        f"- machine: {machine['device_name']}{' — ' + args.note if args.note else ''}; torch {machine['torch']} "
        f"({threads} thread per process), transformers {machine['transformers']}",
        f"- date: {machine['date']}; " + ("wall time not measured (--report-only tabulates earlier steps)"
                                          if args.report_only else f"wall time {seconds:.0f} s"),
        f"- command: `{command.strip()}`",
        f"- pre-training: {args.pretrain_steps} steps × 4 blocks of {args.seq_len} tokens (CE, lr {args.lr}, "
        f"{args.pretrain_conversations} train-split ShareGPT conversations); alignment: {args.align_steps} steps × 4 "
        f"rows (forward KL to the target, lr {args.lr}) on {args.conversations} conversations regenerated by the "
        f"target (greedy, ≤ {args.gen_max_new_tokens} new tokens a turn, rows cut at {args.max_length}); eval: "
        f"{args.prompts} sharegpt_heldout prompts × {args.max_new_tokens} new tokens, the default dynamic tree", "",
        *md_table(cols, list(rows.values())), "",
        "Δτ = τ of the variant minus the control's on the same prompts (paired bootstrap); outside the noise = its "
        "95 % interval excludes 0:", "", comparison_table(comps), "", interval_note, "", "<!-- /bench_fastdraft -->"])


if __name__ == "__main__":
    sys.exit(main())
