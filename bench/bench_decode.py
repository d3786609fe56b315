"""Decoding benchmark: speculative vs autoregressive tokens/s of one target, for the reference drafters
(ngram, target) and any trained drafter folders, on held-out ShareGPT prompts. Prints a table with the
machine, the command and the date, and updates that machine's section of BENCHMARKS.md.

    python bench/bench_decode.py                                        # demo target on this machine's CPU
    python bench/bench_decode.py --note "2-core CPU shared with other jobs"
    python bench/bench_decode.py --drafter eagle3=runs/demo/train/final --trees chain:4 dynamic:5:8:60
    python bench/bench_decode.py --random-llama 1b                      # GPU: a random-weight Llama-3.2-1B shape
    python bench/bench_decode.py --random-llama 8b --vocab 128256 --random-drafter eagle3 --trees dynamic:5:8:60
    python bench/bench_decode.py --random-llama 1b --reference target --trees chain:4 --exact --no-peers
    python bench/bench_decode.py --no-write --prompts 2 --max-new-tokens 32   # quick look, BENCHMARKS.md untouched

Timing is eval.stage's: warm-up first, then speculative and autoregressive decoding of the same prompt
back to back, prompt by prompt, in the same process and KV-cache path. A random-weight target says
nothing about acceptance (its text is noise) but measures the decoder's overhead per cycle exactly: with
drafter `target` every draft is accepted at T=0, so tau = depth + 1 and the speedup is pure mechanics.

Peers (bench/peers.py), same prompts and process: transformers' greedy `generate` with a static cache
(compiled by transformers on CUDA) and, for a drafter that is a plain causal LM (`small`),
`generate(assistant_model=...)`. "vs best AR" divides by the faster of our autoregressive decoding and
transformers' greedy one; the memory floor is the weights one token must read over the memory bandwidth
(--bandwidth, default from the GPU's datasheet). --exact: the target verifies and the baseline decodes in
float32 (eval.exact when this decoder has it, else the whole target in float32), so T=0 output must equal
autoregressive output token for token. --json appends every measured row to a file as it finishes (the
GPU suite builds its tables from that, so a step stopped by its timeout keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.targets import SHAPES  # noqa: E402
from conf.errors import DraftsmithError  # noqa: E402
from conf.schema import PROJECT_ROOT, load_config, project_path  # noqa: E402
from eval.report import cell  # noqa: E402  (one number format for every table)

BENCHMARKS_MD = PROJECT_ROOT / "BENCHMARKS.md"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="assets/demo-target", help="HF folder or hub id (default: the demo target)")
    ap.add_argument("--random-llama", choices=SHAPES,
                    help="random-weight Llama of this shape, built on the device, with --target's tokenizer (or, "
                         "with no target folder, the demo recipe's BPE trained on ShareGPT)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="--random-llama: pad the vocabulary to this size (128256 = Llama-3's LM head)")
    ap.add_argument("--random-drafter", action="append", default=[], metavar="FAMILY",
                    help="a randomly initialised trainable drafter (eagle3, small, ...) for speed only (repeatable)")
    ap.add_argument("--dtype", default="auto", help="target dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    ap.add_argument("--exact", action="store_true", help="float32 verification and baseline (T=0 output = AR)")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers' generate peers")
    ap.add_argument("--hf-compile", choices=("auto", "off"), default="auto",
                    help="let transformers compile its static-cache generate (auto: on CUDA)")
    ap.add_argument("--hf-compile-limit", type=int, default=0, metavar="S",
                    help="run transformers eager when its compiling warm-up takes over S seconds (0 = wait)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="memory bandwidth in GB/s for the floor (default: the GPU's datasheet, H100 3350, H200 4800)")
    ap.add_argument("--json", default=None, help="append one JSON record per measured row to this file")
    ap.add_argument("--drafter", action="append", default=[], metavar="FAMILY=DIR",
                    help="a trained drafter folder, e.g. eagle3=runs/demo/train/final (repeatable)")
    ap.add_argument("--reference", nargs="*", default=["ngram", "target"], help="reference drafters to time")
    ap.add_argument("--trees", nargs="+", default=["chain:4", "dynamic:5:8:60"],
                    help="kind:depth[:top_k:total_tokens] (default: chain:4 dynamic:5:8:60)")
    ap.add_argument("--benchmark", default="sharegpt_heldout")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--note", default="", help="said beside the machine, e.g. 'shared with other jobs'")
    ap.add_argument("--out", default=str(BENCHMARKS_MD), help="Markdown file whose section is updated")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def tree_overrides(spec: str) -> list[str]:
    """`chain:4` / `dynamic:5:8:60` -> eval.tree overrides."""
    parts = spec.split(":")
    kind = parts[0]
    if kind not in ("chain", "dynamic") or len(parts) not in (2, 4) or not all(p.isdigit() for p in parts[1:]):
        raise DraftsmithError(f"--trees {spec!r}: use chain:DEPTH or dynamic:DEPTH:TOP_K:TOTAL_TOKENS")
    out = [f"eval.tree.kind={kind}", f"eval.tree.depth={parts[1]}"]
    if len(parts) == 4:
        out += [f"eval.tree.top_k={parts[2]}", f"eval.tree.total_tokens={parts[3]}"]
    return out


def random_drafter(family: str, cfg, target):
    """(decoding Drafter, HF assistant model or None) of a randomly initialised `family` drafter, built on
    the target's device in its dtype (what serving would use)."""
    import torch

    from drafters.registry import TRAINABLE, drafter_class
    from eval.stage import hf_assistant_model

    if family not in TRAINABLE:
        raise DraftsmithError(f"--random-drafter {family}: choose a trainable family, one of {', '.join(TRAINABLE)}")
    torch.manual_seed(0)
    with torch.device(target.device):
        trainable = drafter_class(family).from_target(cfg.drafter, target).to(target.dtype).eval()
    return trainable.as_drafter(target), hf_assistant_model(trainable, Path("/nonexistent"), target)


def bench_prompts(cfg, target) -> list[list[int]]:
    """The first-turn prompt ids evaluate() decodes, for the peers (same prompts)."""
    from eval.benchmarks import render_prompt
    from eval.stage import prompt_limit, select_prompts

    prompts, _, _ = select_prompts(cfg.eval.benchmarks[0], cfg, target, prompt_limit(cfg, target))
    return [render_prompt(target.tokenizer, target.chat_template, [{"role": "user", "content": p.turns[0]}])
            for p in prompts]


class Recorder:
    """Rows as they finish: kept in memory and, with --json, appended to a file at once."""

    def __init__(self, path: str | None, context: dict):
        self.path, self.context, self.rows = path, context, []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path:
            rec = {**self.context, **{k: v for k, v in row.items() if k != "outputs"}}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        return row


def bench(args) -> tuple[list[dict], dict, dict, str, list[dict]]:
    """Time every drafter x tree, then the peers; returns (rows, AR baselines, machine info, target, peers)."""
    import torch

    from bench.peers import hf_assisted, hf_greedy
    from bench.targets import random_llama_target
    from drafters.target import load_target
    from eval.report import machine_info
    from eval.stage import build_drafter, evaluate, validate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target == "assets/demo-target" and not args.random_llama and not Path(project_path(args.target)).exists():
        raise DraftsmithError("assets/demo-target does not exist: build it with `python train.py stage=target_pretrain "
                              "pretrain.out_dir=assets/demo-target`, or pass --target")
    exact, exact_desc = (["eval.exact=true"], "eval.exact=true") if args.exact else ([], "")
    base = [f"target.path={args.target}", f"run.device={args.device}", f"eval.benchmarks=[{args.benchmark}]",
            f"eval.temperatures=[{','.join(str(t) for t in args.temperatures)}]", f"eval.num_prompts={args.prompts}",
            f"eval.max_new_tokens={args.max_new_tokens}", f"eval.max_prompt_tokens={args.max_prompt_tokens}",
            "eval.compare_assistant=false", "run.root=" + tempfile.gettempdir(), f"target.dtype={args.dtype}",
            *exact]  # peers: below, once; exact's float32 (when it is a dtype) wins over --dtype
    drafters = [(name, [], False) for name in args.reference] + [(name, [], True) for name in args.random_drafter]
    for spec in args.drafter:
        family, sep, folder = spec.partition("=")
        if not sep:
            raise DraftsmithError(f"--drafter {spec!r}: use FAMILY=DIR, e.g. eagle3=runs/demo/train/final")
        drafters.append((family, [f"drafter.checkpoint={folder}"], False))
    cfg0 = load_config(base + ["drafter=ngram"])
    if args.random_llama:
        target = random_llama_target(args.random_llama, args.target, args.device, args.vocab, cfg0.target.dtype)
        src = args.target if Path(project_path(args.target)).is_dir() else "a ShareGPT BPE"
        desc = f"random-weight Llama ({args.random_llama} shape, vocab {target.vocab_size}, tokenizer of {src})"
    else:
        target, desc = load_target(cfg0.target, cfg0.run.device), args.target
    desc += f", exact: {exact_desc}" if exact_desc else ""
    machine = machine_info(target.device)
    rec = Recorder(args.json, {"bench": "decode", "target": desc, "device_name": machine["device_name"]})
    rows, assistants = [], {}
    for name, extra, random_init in drafters:
        for tree in args.trees:
            cfg = load_config(base + [f"drafter={name}", *extra, *tree_overrides(tree)])
            if random_init:
                validate(load_config(base + ["drafter=ngram", *tree_overrides(tree)]))  # all but the drafter
                drafter, assistant = random_drafter(name, cfg, target)
            else:
                validate(cfg)
                drafter, assistant = build_drafter(cfg, target)
            if assistant is not None:
                assistants[name] = assistant
            label = f"{name} (random)" if random_init else name
            for r in evaluate(cfg, target, drafter, assistant):
                rec.add({"row": "spec", "drafter": label, "tree": tree, **r})
    rows = list(rec.rows)
    rec.add(ar_baselines(rows, [], target, machine, args.bandwidth))  # kept if the peers outlast a time limit
    peers = [] if args.no_peers else [rec.add(hf_greedy(target, bench_prompts(cfg0, target), args.max_new_tokens,
                                                        "static", args.hf_compile, args.hf_compile_limit))]
    for name, assistant in assistants.items():
        peers.append(rec.add(hf_assisted(target, assistant, bench_prompts(cfg0, target), args.max_new_tokens,
                                         peers[0]["outputs"] if peers else None) | {"assistant": name}))
    baselines = rec.add(ar_baselines(rows, peers, target, machine, args.bandwidth))
    return rows, baselines, machine, desc, peers


def ar_baselines(rows: list[dict], peers: list[dict], target, machine: dict, bandwidth_gbs: float | None) -> dict:
    """Our autoregressive rate (pooled over every row's back-to-back AR runs), transformers' greedy one,
    the best of both, and the memory floor: weights read per token / memory bandwidth."""
    from bench.targets import peak_for, weight_bytes_per_token

    tok = sum(r["new_tokens_ar"] for r in rows)
    wall = sum(r["wall_s_ar"] for r in rows)
    ours = 1000 * wall / tok if tok else None
    hf = next((p for p in peers if p["peer"].startswith("hf-greedy")), None)
    hf_ms = hf["ms_per_token"] if hf else None
    bw = bandwidth_gbs * 1e9 if bandwidth_gbs else peak_for(machine["device_name"])[0]
    nbytes = weight_bytes_per_token(target.model)
    return {"row": "ar", "ours_ms_per_token": ours, "hf_ms_per_token": hf_ms, "hf_peer": hf and hf["peer"],
            "hf_compiled": hf and hf["compiled"], "hf_note": hf and hf["note"],
            "best_ms_per_token": min((x for x in (ours, hf_ms) if x), default=None),
            "weight_bytes": nbytes, "bandwidth_gbs": bw and bw / 1e9,
            "bandwidth_from": "--bandwidth" if bandwidth_gbs else ("datasheet" if bw else None),
            "floor_ms_per_token": 1000 * nbytes / bw if bw else None}


def table(rows: list[dict], best_ms: float | None = None) -> str:
    """Markdown tables of the rows (one per drafter x tree x temperature): the eval report's decoding columns
    (τ and speedup with 95 % intervals, prompts, cycles) and its acceptance-by-depth table; `best_ms` adds the
    speedup over the best autoregressive decoding (ours or transformers')."""
    from eval.report import INTERVAL_NOTE, acceptance_columns, decode_columns, depth_rows, md_table

    name = [("drafter", lambda r: r["drafter"]), ("tree", lambda r: r["tree"])]
    depth = [(h, lambda x, cell=cell: cell(x["of"])) for h, cell in name]
    cols = name + decode_columns()
    if best_ms:
        at = next(i for i, (h, _) in enumerate(cols) if h.startswith("speedup")) + 1
        cols.insert(at, ("vs best AR", lambda r: cell(r["tok_s_spec"] and r["tok_s_spec"] * best_ms / 1000, "{:.2f}×")))
    return "\n".join(md_table(cols, rows) + ["", INTERVAL_NOTE, "", "Acceptance by depth (of the cycles that "
                      "reached depth d with 1..d-1 accepted, the share accepting d):", ""]
                      + md_table(depth + acceptance_columns(), depth_rows(rows)))


def baseline_lines(b: dict, peers: list[dict]) -> list[str]:
    """The autoregressive baselines and peers as Markdown bullets."""
    floor = (f"{cell(b['floor_ms_per_token'], '{:.2f}')} ms/token = {b['weight_bytes'] / 1e9:.3g} GB of weights per "
             f"token / {b['bandwidth_gbs']:.0f} GB/s ({b['bandwidth_from']})" if b["floor_ms_per_token"]
             else f"- ({b['weight_bytes'] / 1e9:.3g} GB of weights per token; no bandwidth known: pass --bandwidth)")
    hf = "not run" if b["hf_ms_per_token"] is None else (
        f"{b['hf_ms_per_token']:.2f} ms/token ({b['hf_peer']}, {'compiled' if b['hf_compiled'] else 'eager'}"
        f"{'; ' + b['hf_note'] if b['hf_note'] else ''})")
    out = [f"- autoregressive, ours: {cell(b['ours_ms_per_token'])} ms/token; transformers greedy generate: {hf}; "
           f"best: {cell(b['best_ms_per_token'])} ms/token; memory floor: {floor}"]
    for p in peers:
        if p["peer"] == "hf-assisted":
            out.append(f"- transformers generate(assistant_model={p['assistant']}), greedy: {cell(p['ms_per_token'])} "
                       f"ms/token ({cell(p['tok_s'], '{:.1f}')} tok/s), output = greedy generate "
                       f"{cell(p['identical'], '{}')}/{p['generations']}")
    return out


def section(rows, baselines, machine, desc, args, command: str, seconds: float, peers=()) -> tuple[str, str]:
    """(key, Markdown section) for BENCHMARKS.md; the key names the machine and target, so a rerun on the
    same machine and target replaces its own section and leaves the others."""
    where = f"{machine['device']} ({machine['device_name']})"
    key = f"{where} | {desc}"
    note = f" — {args.note}" if args.note else ""
    lines = [f"<!-- bench_decode: {key} -->", f"### {desc} on {where}", "",
             f"- machine: {where}{note}; torch {machine['torch']} ({machine['torch_threads']} threads), "
             f"transformers {machine['transformers']}, Python {machine['python']}",
             f"- date: {machine['date']}; wall time {seconds:.0f} s",
             f"- command: `{command}`",
             f"- prompts: {args.prompts} × {args.benchmark} (first user turn), max_new_tokens {args.max_new_tokens}, "
             f"prompts ≤ {args.max_prompt_tokens} tokens", "", table(rows, baselines["best_ms_per_token"]), "",
             *baseline_lines(baselines, list(peers)), "<!-- /bench_decode -->"]
    return key, "\n".join(lines)


def update_markdown(path: Path, key: str, text: str, tag: str = "bench_decode") -> None:
    """Replace the section `<!-- tag: key -->...<!-- /tag -->`, or append it (every bench script's sections)."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"<!-- {tag}: {re.escape(key)} -->.*?<!-- /{tag} -->", re.S)
    new = pat.sub(lambda _: text, old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_decode.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    try:
        rows, baselines, machine, desc, peers = bench(args)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key, text = section(rows, baselines, machine, desc, args, command.strip(), time.time() - t0, peers)
    print(text)
    if not args.no_write:
        update_markdown(Path(args.out), key, text)
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
