"""Every drafter family and objective on one target, with the same data and the same step budget: train,
then measure tau and speedup with the built-in speculative decoder at T=0 and T=1.

    python bench/bench_drafters.py                            # the README tables: demo target, CPU (~1 h on 2 cores)
    python bench/bench_drafters.py --variants eagle3,eagle3+gto --steps 40 --finetune-steps 20 --no-write
    python bench/bench_drafters.py --target meta-llama/Llama-3.1-8B-Instruct --device cuda --conversations 20000 \\
        --steps 4000 --finetune-steps 1000 --max-length 2048 --prompts 80 --max-new-tokens 256

One data_gen run (the bundled ShareGPT, rendered on the target's chat template) feeds every variant; each
variant is a real `train` stage run (ZeRO-0, one process) into its own run directory, then the real `eval`
stage on sharegpt_heldout (prompts never seen in training). Families (table "drafters") train from
scratch for --steps optimizer steps. Objectives (table "objectives"): hass, griffin, on_policy and adaspec
train from scratch with the same --steps as their baseline; gto fine-tunes the trained eagle3 for
--finetune-steps, and `eagle3+more` continues the same eagle3 for the same --finetune-steps with its plain
token loss, so the GTO row is compared with an equal amount of extra training. `small+pard` adapts the trained
`small` into a PARD drafter (drafter.init) for --finetune-steps at --finetune-lr, PARD's own recipe. adaspec's reference is the
trained `small`. DFlash (table "dflash"): B=16 on EAGLE-3's tree, then its ablation (B 8 vs 16, position
decay on/off), each at its full block depth; `dflash@depth15` evaluates the `dflash` run again without training it again.
Writes the tables into BENCHMARKS.md (section per machine and target) and prints them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.metrics import MIN_VERDICT_PROMPTS, paired_difference  # noqa: E402
from eval.report import cell, md_row, md_table, with_interval  # noqa: E402

# name -> (table, overrides, what it starts from: None = scratch, else the variant whose final drafter it loads)
VARIANTS = {
    "eagle1": ("drafters", ["drafter=eagle1"], None),
    "eagle3": ("drafters", ["drafter=eagle3"], None),
    "medusa": ("drafters", ["drafter=medusa"], None),
    "medusa2": ("drafters", ["drafter=medusa2"], None),
    "hydra": ("drafters", ["drafter=hydra"], None),
    "hydra_pp": ("drafters", ["drafter=hydra_pp"], None),
    "small": ("drafters", ["drafter=small"], None),
    "kangaroo": ("drafters", ["drafter=kangaroo"], None),
    "pard": ("drafters", ["drafter=pard"], None),  # the `small` model's size (same defaults), drafting k=5 per forward
    "small+pard": ("drafters", ["drafter=pard"], "small"),  # PARD's recipe: adapt the trained `small` (drafter.init)
    "eagle3+hass": ("objectives", ["drafter=eagle3", "objective=hass"], None),
    "eagle3+griffin": ("objectives", ["drafter=eagle3", "objective=griffin"], None),
    "eagle3+more": ("objectives", ["drafter=eagle3"], "eagle3"),
    "eagle3+gto": ("objectives", ["drafter=eagle3", "objective=gto"], "eagle3"),
    "small+on_policy": ("objectives", ["drafter=small", "objective=on_policy"], None),
    "small+adaspec": ("objectives", ["drafter=small", "objective=adaspec"], "small"),
    "eagle3+coral": ("objectives", ["drafter=eagle3", "objective=coral"], None),
    "eagle3+coral+groups": ("objectives", ["drafter=eagle3", "objective=coral", "drafter.head_groups=16",
                                           "drafter.active_groups=4"], None),
    # DFlash (B=16, gamma 7) on EAGLE-3's tree (depth 5), and its ablation: each block size evaluated at its
    # full depth B-1 (a dynamic tree from per-position top-k, the same 60-node budget), gamma on / off
    "dflash": ("drafters", ["drafter=dflash"], None),
    "dflash+distill": ("drafters", ["drafter=dflash", "drafter.loss=distill"], None),  # soft CE, as EAGLE-3 trains
    "dflash+distill+2l": ("drafters", ["drafter=dflash", "drafter.loss=distill", "drafter.num_layers=2"], None),
    "dflash@depth15": ("dflash", ["drafter=dflash", "eval.tree.depth=15"], None),
    "dflash-flat": ("dflash", ["drafter=dflash", "drafter.gamma=0", "eval.tree.depth=15"], None),
    "dflash-b8": ("dflash", ["drafter=dflash", "drafter.block_size=8", "eval.tree.depth=7"], None),
    "dflash-b8-flat": ("dflash", ["drafter=dflash", "drafter.block_size=8", "drafter.gamma=0", "eval.tree.depth=7"],
                       None),
}
# variants that only evaluate another variant's trained drafter (with their own eval overrides)
EVAL_OF = {"dflash@depth15": "dflash"}
# name -> the row its τ is compared with, paired on the same prompts: objectives with their baseline or
# equal-steps control, families with the default recipe
CONTROL = {"eagle1": "eagle3", "medusa": "eagle3", "medusa2": "eagle3", "hydra": "eagle3", "hydra_pp": "eagle3",
           "small": "eagle3", "kangaroo": "eagle3", "pard": "small", "small+pard": "small", "eagle3+hass": "eagle3",
           "eagle3+griffin": "eagle3", "eagle3+more": "eagle3",
           "eagle3+gto": "eagle3+more", "small+on_policy": "small", "small+adaspec": "small",
           "eagle3+coral": "eagle3", "eagle3+coral+groups": "eagle3+coral", "dflash": "eagle3",
           "dflash+distill": "eagle3", "dflash+distill+2l": "dflash+distill", "dflash@depth15": "eagle3", "dflash-flat": "dflash@depth15", "dflash-b8": "dflash@depth15",
           "dflash-b8-flat": "dflash-b8"}
TABLES = {"drafters": "drafter", "objectives": "objective", "dflash": "DFlash setting"}  # table -> what a row is
TEMPS = (0.0, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="target folder or hub id (default: the demo target)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--conversations", type=int, default=400, help="data.max_conversations of the shared data_gen")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every from-scratch variant")
    ap.add_argument("--finetune-steps", type=int, default=30,
                    help="gto and its control: steps on top of eagle3; small+pard: steps adapting small")
    ap.add_argument("--finetune-lr", type=float, default=3e-4,
                    help="gto and its control; the paper's 5e-6 moves nothing in a few dozen steps")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3, help="train.lr of from-scratch variants (gto keeps its own)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--root", default=None, help="run root (default: a fresh temporary folder); reruns reuse "
                                                "finished variants found there")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", default=None, help="Markdown file whose sections are updated (default BENCHMARKS.md)")
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def run_variant(name: str, args, common: list[str], root: Path, done: dict) -> dict:
    """Train (unless its final folder exists) and evaluate one variant; returns its table row."""
    from conf.schema import load_config
    from eval.stage import run as eval_stage
    from training.stage import train

    table, overrides, start = VARIANTS[name]
    trained_by = EVAL_OF.get(name, name)
    if trained_by not in done and trained_by != name:
        raise SystemExit(f"error: variant {name} evaluates {trained_by}: put {trained_by} before it in --variants")
    run_name = trained_by.replace("+", "-")
    (root / run_name).mkdir(exist_ok=True)
    link = root / run_name / "data_gen"
    if not link.exists():
        link.symlink_to(root / "data" / "data_gen")
    steps, extra = args.steps, [f"train.lr={args.lr}"]
    if start is not None:
        if start not in done:
            raise SystemExit(f"error: variant {name} starts from {start}: put {start} before it in --variants")
        if name.startswith("small+adaspec"):
            extra.append(f"objective.reference={done[start]['final_dir']}")
        elif name == "small+pard":  # a small drafter's final folder is an HF causal LM: PARD adapts it
            steps = args.finetune_steps
            extra = [f"drafter.init={done[start]['final_dir']}", f"train.lr={args.finetune_lr}"]
        else:
            steps = args.finetune_steps  # gto and its control: the same extra steps at the same lr
            extra = [f"drafter.checkpoint={done[start]['final_dir']}", f"train.lr={args.finetune_lr}"]
    if "objective=on_policy" in overrides:
        extra.append(f"objective.max_new_tokens={args.max_new_tokens}")
    train_cfg = load_config(common + overrides + extra + [
        f"run.name={run_name}", f"train.max_steps={steps}", f"train.micro_batch_size={args.micro_batch}",
        "train.eval_every=0", "train.log_every=10", f"train.save_every={steps}", "train.tensorboard=false"])
    summary_path = root / run_name / "bench_train.json"
    if summary_path.exists():
        res = json.loads(summary_path.read_text())
    else:
        res = train(train_cfg)
        res = {k: res[k] for k in ("steps", "input_tokens", "tokens_per_s", "final_loss", "final_dir", "eval")}
        summary_path.write_text(json.dumps(res, indent=1))
    # eval reads the run's own final folder (drafter.checkpoint unset): the fine-tuned one, not its start
    eval_over = [o for o in overrides if not o.startswith("objective=")]
    report = eval_stage(load_config(common + eval_over + [f"run.name={run_name}", "eval.temperatures=[0,1]",
                                                          f"eval.num_prompts={args.prompts}",
                                                          f"eval.max_new_tokens={args.max_new_tokens}",
                                                          "eval.compare_assistant=false"]))["report"]
    origin = f"scratch, reference {start}" if name.startswith("small+adaspec") else start
    return {"variant": name, "table": table, "start": origin, "steps": res["steps"],
            "tokens_per_s": res["tokens_per_s"], "final_loss": res["final_loss"],
            "tau_sim": (res.get("eval") or {}).get("tau_sim"), "final_dir": res["final_dir"],
            **eval_fields(report["results"])}


def eval_fields(results: list[dict]) -> dict:
    """A variant's eval figures at each of TEMPS (eval report rows): τ and speedup with their intervals, the
    prompts and cycles behind them, and the per-prompt sums that comparisons() pairs."""
    by_t = {r["temperature"]: r for r in results}
    out = {"prompts": len(by_t[TEMPS[0]]["per_prompt"]["prompt_ids"]),
           "identical_t0": f"{by_t[0.0]['identical_outputs']}/{by_t[0.0]['generations']}"}
    for t in TEMPS:
        r, k = by_t[t], int(t)
        out.update({f"tau_t{k}": r["tau"], f"tau_ci_t{k}": r["ci"]["tau"], f"speedup_t{k}": r["speedup"],
                    f"speedup_ci_t{k}": r["ci"]["speedup"], f"outside_target_t{k}": r["outside_target"],
                    f"cycles_t{k}": r["target_forwards"], f"per_prompt_t{k}": r["per_prompt"],
                    f"drafter_fwd_t{k}": r.get("drafter_forwards_per_cycle"), f"tok_s_t{k}": r["tok_s_spec"],
                    f"tok_s_ar_t{k}": r["tok_s_ar"],
                    f"draft_ms_t{k}": 1e3 * r["draft_s"] / r["target_forwards"] if r.get("draft_s") is not None
                    and r["target_forwards"] else None})
    return out


def columns() -> list:
    """The variants table (eval.report.Column list: one entry per column)."""
    cols = [("variant", lambda r: r["variant"]), ("from", lambda r: r["start"] or "scratch"),
            ("steps", lambda r: str(r["steps"])), ("train tok/s", lambda r: cell(r["tokens_per_s"], "{:.0f}")),
            ("final loss", lambda r: cell(r["final_loss"], "{:.3f}")), ("τ sim", lambda r: cell(r["tau_sim"])),
            ("prompts", lambda r: str(r["prompts"]))]
    for t in TEMPS:
        k = int(t)
        cols += [(f"cycles T={k}", lambda r, k=k: str(r[f"cycles_t{k}"])),
                 (f"τ T={k} [95 %]", lambda r, k=k: with_interval(r[f"tau_t{k}"], r[f"tau_ci_t{k}"])),
                 (f"speedup T={k} [95 %]",
                  lambda r, k=k: with_interval(r[f"speedup_t{k}"], r[f"speedup_ci_t{k}"], "{:.2f}×"))]
    return cols + [("= AR (T=0)", lambda r: r["identical_t0"]),
                   ("draft ms/cycle T=0", lambda r: cell(r.get("draft_ms_t0"), "{:.1f}"))]


def table(rows: list[dict]) -> str:
    cols = columns()
    out = md_table(cols, [])
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['start'] or 'scratch'} | failed: {r['error']} |" + " |" * (len(cols) - 3))
        else:
            out.append(md_row(cols, r))
    return "\n".join(out)


def cost_table(rows: list[dict]) -> str:
    """Drafter forwards per cycle and tokens/s of the variants whose drafter counts its forwards (LM drafters:
    `small`, `pard`), so a parallel drafter's one forward a cycle is seen next to the autoregressive one's."""
    cols = [("variant", lambda r: r["variant"])]
    for t in TEMPS:
        k = int(t)
        cols += [(f"drafter fwd/cycle T={k}", lambda r, k=k: cell(r.get(f"drafter_fwd_t{k}"))),
                 (f"τ T={k}", lambda r, k=k: cell(r[f"tau_t{k}"])),
                 (f"tok/s T={k}", lambda r, k=k: cell(r.get(f"tok_s_t{k}"), "{:.1f}")),
                 (f"tok/s AR T={k}", lambda r, k=k: cell(r.get(f"tok_s_ar_t{k}"), "{:.1f}"))]
    sel = [r for r in rows if "error" not in r and r.get(f"drafter_fwd_t{int(TEMPS[0])}") is not None]
    return "\n".join(md_table(cols, sel)) if sel else ""


def comparisons(rows: list[dict]) -> list[dict]:
    """Each variant's τ minus its CONTROL's at each temperature, paired over the same eval prompts
    (eval.metrics.paired_difference), for the variants whose control also ran."""
    ok = {r["variant"]: r for r in rows if "error" not in r}
    out = []
    for r in rows:
        c = ok.get(CONTROL.get(r["variant"]))
        if "error" in r or c is None:
            continue
        for t in TEMPS:
            k = int(t)
            comp = {"variant": r["variant"], "control": c["variant"], "temperature": t}
            try:
                comp.update(paired_difference(r[f"per_prompt_t{k}"], c[f"per_prompt_t{k}"]))
            except ValueError as e:  # evaluated on different prompts: a row saying so, not a lost hour of runs
                comp.update(diff=None, ci=None, prompts=len(r[f"per_prompt_t{k}"]["prompt_ids"]), outside_noise=None,
                            error=str(e))
            out.append(comp)
    return out


def _verdict(c: dict) -> str:
    if c.get("error"):
        return "- (not the same prompts)"
    return {True: "yes", False: "no"}.get(c["outside_noise"], f"- (under {MIN_VERDICT_PROMPTS} prompts)")


def comparison_table(comps: list[dict]) -> str:
    cols = [("variant", lambda c: c["variant"]), ("vs", lambda c: c["control"]),
            ("T", lambda c: f"{c['temperature']:g}"), ("prompts", lambda c: str(c["prompts"])),
            ("Δτ [95 %]", lambda c: with_interval(c["diff"], c["ci"], "{:+.2f}")),
            ("outside the noise", _verdict)]
    return "\n".join(md_table(cols, comps))


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_drafters.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    import tempfile

    import torch

    from bench.bench_decode import BENCHMARKS_MD, update_markdown
    from conf.errors import DraftsmithError
    from conf.schema import load_config
    from data_gen.stage import run as data_gen
    from eval.report import INTERVAL_NOTE, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-drafters-"))
    root.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    common = [f"run.root={root}", f"run.device={args.device}", "experiment=demo",
              f"data.max_conversations={args.conversations}", f"data.max_length={args.max_length}",
              f"train.max_length={args.max_length}"] + ([f"target.path={args.target}"] if args.target else [])
    rows, done = [], {}
    try:
        if not (root / "data" / "data_gen" / "meta.json").exists():
            data_gen(load_config(common + ["run.name=data"]))
        for name in names:
            print(f"=== {name}", flush=True)
            try:
                row = run_variant(name, args, common, root, done)
                done[name] = row
            except DraftsmithError as e:  # one variant's failure (e.g. a NaN loss) is a row, not the end
                print(f"error: {name}: {e}", file=sys.stderr)
                row = {"variant": name, "table": VARIANTS[name][0], "start": VARIANTS[name][2], "error": str(e)}
            rows.append(row)
            print(table(rows), flush=True)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = machine_info(torch.device(args.device))
    target = args.target or "assets/demo-target"
    where = f"{machine['device']} ({machine['device_name']})"
    note = f" — {args.note}" if args.note else ""
    comps = comparisons(rows)
    for tab in TABLES:
        sel = [r for r in rows if r["table"] == tab]
        if not sel:
            continue
        key = f"{tab} | {where} | {target}"
        text = "\n".join([
            f"<!-- bench_drafters: {key} -->", f"### {tab}: {target} on {where}", "",
            f"- machine: {where}{note}; torch {machine['torch']} ({machine['torch_threads']} threads), "
            f"transformers {machine['transformers']}", f"- date: {machine['date']}; wall time {time.time() - t0:.0f} s",
            f"- command: `{command.strip()}`",
            f"- data: {args.conversations} ShareGPT conversations (data_gen, max_length {args.max_length}); "
            f"micro-batch {args.micro_batch}; lr {args.lr} from scratch, {args.finetune_lr} fine-tuning; eval: {args.prompts} sharegpt_heldout "
            f"prompts × {args.max_new_tokens} new tokens, the default dynamic tree", "", table(sel), "",
            *(["Drafter forwards per cycle (target forward) and tokens/s of the drafters that count them, with the "
               "autoregressive decoding timed beside each:", "", cost, ""] if (cost := cost_table(sel)) else []),
            f"τ of each {TABLES[tab]} minus its control's on the same prompts (paired bootstrap: both resampled "
            "with the same prompts); outside the noise = the 95 % interval of the difference excludes 0:", "",
            comparison_table([c for c in comps if c["variant"] in {r["variant"] for r in sel}]), "",
            INTERVAL_NOTE, "", "<!-- /bench_drafters -->"])
        print(text)
        if not args.no_write:
            out = Path(args.out) if args.out else BENCHMARKS_MD
            update_markdown(out, key, text, tag="bench_drafters")
            print(f"updated {out}")
    (root / "bench_drafters.json").write_text(json.dumps(rows, indent=1))
    print(f"runs under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
