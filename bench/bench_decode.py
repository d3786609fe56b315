"""Decoding benchmark: speculative vs autoregressive tokens/s of one target, for the reference drafters
(ngram, target) and any trained drafter folders, on held-out ShareGPT prompts. Prints a table with the
machine, the command and the date, and updates that machine's section of BENCHMARKS.md.

    python bench/bench_decode.py                                        # demo target on this machine's CPU
    python bench/bench_decode.py --note "2-core CPU shared with other jobs"
    python bench/bench_decode.py --drafter eagle3=runs/demo/train/final --trees chain:4 dynamic:5:8:60
    python bench/bench_decode.py --random-llama 1b                      # GPU: a random-weight Llama-3.2-1B shape
    python bench/bench_decode.py --no-write --prompts 2 --max-new-tokens 32   # quick look, BENCHMARKS.md untouched

Timing is eval.stage's: warm-up first, then speculative and autoregressive decoding of the same prompt
back to back, prompt by prompt, in the same process and KV-cache path. A random-weight target says
nothing about acceptance (its text is noise) but measures the decoder's overhead per cycle exactly: with
drafter `target` every draft is accepted at T=0, so tau = depth + 1 and the speedup is pure mechanics.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from conf.errors import DraftsmithError  # noqa: E402
from conf.schema import PROJECT_ROOT, load_config, project_path  # noqa: E402

BENCHMARKS_MD = PROJECT_ROOT / "BENCHMARKS.md"
# Llama shapes for --random-llama: (layers, hidden, intermediate, heads, kv heads)
SHAPES = {"demo": (6, 384, 1024, 6, 6), "1b": (16, 2048, 8192, 32, 8), "3b": (28, 3072, 8192, 24, 8),
          "8b": (32, 4096, 14336, 32, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="assets/demo-target", help="HF folder or hub id (default: the demo target)")
    ap.add_argument("--random-llama", choices=SHAPES,
                    help="random-weight Llama of this shape with --target's tokenizer (or, with no target folder, "
                         "the demo recipe's BPE trained on ShareGPT)")
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


def sharegpt_bpe(conversations: int = 2000):
    """The demo recipe's tokenizer (byte-level BPE, pretrain.vocab_size tokens, ChatML template) trained on
    ShareGPT training conversations: for --random-llama when there is no target folder to take one from."""
    import itertools

    from conf.schema.pretrain import PretrainConfig
    from data_gen.sources import iter_sharegpt
    from training.tokenizer import train_tokenizer

    texts = [m["content"] for c in itertools.islice(iter_sharegpt(split="train"), conversations) for m in c.messages]
    return train_tokenizer(texts, vocab_size=PretrainConfig().vocab_size)


def random_llama(shape: str, tokenizer_path: str, device: str):
    """A random-weight Llama of `shape` (bf16 on GPU) with the tokenizer and chat template of tokenizer_path,
    as a drafters.target.Target; nothing is written to disk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from drafters.target import Target, resolve_device, resolve_dtype

    layers, hidden, inter, heads, kv = SHAPES[shape]
    tok = (AutoTokenizer.from_pretrained(project_path(tokenizer_path)) if Path(project_path(tokenizer_path)).is_dir()
           else sharegpt_bpe())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype("auto", dev), attn_implementation="sdpa")
    model.generation_config.eos_token_id = tok.eos_token_id
    return Target(model.to(dev), tok, name=f"random-llama-{shape}")


def bench(args) -> tuple[list[dict], dict, str]:
    """Time every drafter x tree; returns (rows, machine info, target description)."""
    import torch

    from drafters.target import load_target
    from eval.report import machine_info
    from eval.stage import build_drafter, evaluate, validate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target == "assets/demo-target" and not args.random_llama and not Path(project_path(args.target)).exists():
        raise DraftsmithError("assets/demo-target does not exist: build it with `python train.py stage=target_pretrain "
                              "pretrain.out_dir=assets/demo-target`, or pass --target")
    base = [f"target.path={args.target}", f"run.device={args.device}", f"eval.benchmarks=[{args.benchmark}]",
            f"eval.temperatures=[{','.join(str(t) for t in args.temperatures)}]", f"eval.num_prompts={args.prompts}",
            f"eval.max_new_tokens={args.max_new_tokens}", f"eval.max_prompt_tokens={args.max_prompt_tokens}",
            "eval.compare_assistant=true", "run.root=" + tempfile.gettempdir()]
    drafters = [(name, []) for name in args.reference]
    for spec in args.drafter:
        family, sep, folder = spec.partition("=")
        if not sep:
            raise DraftsmithError(f"--drafter {spec!r}: use FAMILY=DIR, e.g. eagle3=runs/demo/train/final")
        drafters.append((family, [f"drafter.checkpoint={folder}"]))
    if args.random_llama:
        target = random_llama(args.random_llama, args.target, args.device)
        src = args.target if Path(project_path(args.target)).is_dir() else "a ShareGPT BPE"
        desc = f"random-weight Llama ({args.random_llama} shape, vocab {target.vocab_size}, tokenizer of {src})"
    else:
        cfg0 = load_config(base + ["drafter=ngram"])
        target, desc = load_target(cfg0.target, cfg0.run.device), args.target
    rows = []
    for name, extra in drafters:
        for tree in args.trees:
            cfg = load_config(base + [f"drafter={name}", *extra, *tree_overrides(tree)])
            validate(cfg)
            drafter, assistant = build_drafter(cfg, target)
            for r in evaluate(cfg, target, drafter, assistant):
                rows.append({"drafter": name, "tree": tree, **r})
    return rows, machine_info(target.device), desc


def table(rows: list[dict]) -> str:
    """Markdown tables of the rows (one per drafter x tree x temperature): the eval report's decoding columns
    (τ and speedup with 95 % intervals, prompts, cycles) and its acceptance-by-depth table."""
    from eval.report import INTERVAL_NOTE, acceptance_columns, decode_columns, depth_rows, md_table

    name = [("drafter", lambda r: r["drafter"]), ("tree", lambda r: r["tree"])]
    depth = [(h, lambda x, cell=cell: cell(x["of"])) for h, cell in name]
    return "\n".join(md_table(name + decode_columns(), rows) + ["", INTERVAL_NOTE, "", "Acceptance by depth (of the "
                      "cycles that reached depth d with 1..d-1 accepted, the share accepting d):", ""]
                      + md_table(depth + acceptance_columns(), depth_rows(rows)))


def section(rows, machine, desc, args, command: str, seconds: float) -> tuple[str, str]:
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
             f"prompts ≤ {args.max_prompt_tokens} tokens", "", table(rows), ""]
    for r in rows:
        if r.get("peer"):
            p = r["peer"]
            lines.append(f"- transformers generate(assistant_model={r['drafter']}), greedy: "
                         f"{p['tok_s_assisted']:.1f} tok/s vs {p['tok_s_greedy']:.1f} plain "
                         f"({p['speedup']:.2f}×), output = greedy {p['identical']}/{p['generations']}")
    lines.append("<!-- /bench_decode -->")
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
        rows, machine, desc = bench(args)
    except DraftsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key, text = section(rows, machine, desc, args, command.strip(), time.time() - t0)
    print(text)
    if not args.no_write:
        update_markdown(Path(args.out), key, text)
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
