"""What one speculative decode cycle would cost a GPU, counted on any device: host syncs per cycle, ops run
eagerly outside the decoder's graph regions, and ops inside them, for every drafter family x tree kind x
acceptance rule (decoding/counting.py says what counts).

    python bench/bench_cycle.py                       # the whole table (tiny random target, CPU, ~1 minute)
    python bench/bench_cycle.py --families ngram eagle3 --trees chain dynamic --rules greedy
    python bench/bench_cycle.py --markdown out.md     # also write the table as Markdown

Drafters are randomly initialised on a 2-layer random Llama with the demo tokenizer (what they propose does not change what a cycle
runs, only how many tokens it keeps); every case decodes the same prompt for --tokens new tokens. On a GPU
the eager ops are kernel launches (or allocations) the host issues one by one, and each sync stalls the host
until the device has caught up; the captured ops run inside CUDA graphs, launched once per region.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import torch  # noqa: E402

FAMILIES = ["ngram", "oracle", "target", "eagle1", "eagle3", "medusa", "hydra", "hydra_pp", "small", "pard", "kangaroo"]
TREES = {  # name -> eval.tree overrides
    "chain": ["eval.tree.kind=chain", "eval.tree.depth=3"],
    "static": ["eval.tree.kind=static", "eval.tree.paths=[[0],[1],[0,0],[0,1],[1,0],[0,0,0]]"],
    "dynamic": ["eval.tree.kind=dynamic", "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8"],
    "delayed": ["eval.tree.kind=dynamic", "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8",
                "eval.tree.delay=1"],
    "opt": ["eval.tree.kind=opt", "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8",
            "eval.tree.opt_budget=fixed"],
    "vocab": ["eval.tree.kind=dynamic", "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8",
              "drafter.draft_vocab=64"],
}
RULES = {  # name -> (temperature, eval overrides)
    "greedy": (0.0, []),
    "lossless": (1.0, []),
    "traversal": (1.0, ["eval.acceptance=traversal"]),
    "typical": (1.0, ["eval.acceptance=typical"]),
}
VOCAB_FAMILIES = {"eagle1", "eagle3", "medusa", "hydra", "hydra_pp", "small"}  # drafter.draft_vocab applies to these


@dataclass
class Case:
    family: str
    tree: str
    rule: str

    def skip_reason(self) -> str | None:
        if self.tree == "vocab" and self.family not in VOCAB_FAMILIES:
            return "draft_vocab is not a setting of this family"
        return None


def tiny_target(device: str = "cpu"):
    """A 2-layer, 64-wide random Llama with the demo target's tokenizer (families read its special tokens)."""
    from bench.targets import random_llama_target

    return random_llama_target("tiny", "assets/demo-target", device)


def build(case: Case, target, prompt: list[int], tokens: int):
    """(decoder, temperature) for one case."""
    from conf.schema import load_config
    from drafters.reference import OracleDrafter
    from drafters.registry import TRAINABLE, drafter_class
    from eval.stage import make_decoder

    temp, rule_over = RULES[case.rule]
    cfg = load_config([f"drafter={case.family}", *TREES[case.tree], *rule_over, "eval.cuda_graphs=true"])
    torch.manual_seed(0)
    if cfg.drafter.name in TRAINABLE:
        model = drafter_class(cfg.drafter.name).from_target(cfg.drafter, target).eval()
        if case.tree == "vocab":  # FR-Spec / VocabTrim: the most frequent tokens of made-up counts
            from drafters.vocab_trim import trim_draft_vocab

            counts = torch.arange(target.vocab_size, 0, -1).float()
            model = trim_draft_vocab(model, counts, cfg.drafter.draft_vocab)
        drafter = model.as_drafter(target)
    elif case.family == "oracle":
        drafter = OracleDrafter.from_config(cfg.drafter, target)
    else:
        drafter = drafter_class(cfg.drafter.name).from_config(cfg.drafter, target)
    dec = make_decoder(cfg, target, drafter, temp)
    if case.family == "oracle":
        drafter.replay_autoregressive(dec, prompt, tokens)
    return dec


def count(case: Case, target, prompt: list[int], tokens: int = 16) -> dict:
    """Per-cycle syncs / eager ops / captured ops of one case (a warm-up generate first)."""
    from decoding.counting import CycleCounter

    dec = build(case, target, prompt, tokens)
    g = torch.Generator().manual_seed(0)
    dec.generate(prompt, tokens, eos_ids=[], generator=g)
    with CycleCounter() as c:
        _, st = dec.generate(prompt, tokens, eos_ids=[], generator=g)
    out = c.per_cycle(st.cycles)
    out.update(cycles=st.cycles, tau=st.tau)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--trees", nargs="+", default=list(TREES))
    ap.add_argument("--rules", nargs="+", default=list(RULES))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    target = tiny_target()
    prompt = [int(t) for t in torch.randint(3, target.vocab_size, (12,), generator=torch.Generator().manual_seed(1))]
    prompt = prompt + prompt[:6]  # a repeat, so prompt lookup finds something
    rows = ["| family | tree | rule | cycles | tau | syncs/cycle | eager ops/cycle | captured ops/cycle | syncs from |",
            "|---|---|---|---|---|---|---|---|---|"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.tokens} new tokens per case")
    print(rows[0])
    for fam in args.families:
        for tree in args.trees:
            for rule in args.rules:
                case = Case(fam, tree, rule)
                why = case.skip_reason()
                if why is None:
                    try:
                        r = count(case, target, prompt, args.tokens)
                    except Exception as e:  # noqa: BLE001 - a case the config refuses is reported, not fatal
                        why = str(e).splitlines()[0][:90]
                if why is not None:
                    row = f"| {fam} | {tree} | {rule} | - | - | - | - | - | skipped: {why} |"
                else:
                    src = ", ".join(f"{k} {v:.1f}" for k, v in r["sync_ops"].items()) or "-"
                    row = (f"| {fam} | {tree} | {rule} | {r['cycles']} | {r['tau']:.2f} | {r['syncs']:.1f} | "
                           f"{r['eager']:.0f} | {r['captured']:.0f} | {src} |")
                rows.append(row)
                print(row, flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
