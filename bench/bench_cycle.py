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
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

import torch  # noqa: E402

# conf/drafter options; "+key=value" adds overrides (the tiny target has 2 layers: Kangaroo exits after 1;
# ngram's lookup is the one a GPU runs: on a CPU `auto` picks the host walk, which syncs by design)
FAMILIES = ["ngram+drafter.lookup=device", "oracle", "target", "eagle1", "eagle3", "medusa", "hydra", "hydra_pp", "small", "pard",
            "kangaroo+drafter.exit_layer=1+drafter.threshold=0", "kangaroo+drafter.exit_layer=1", "dflash"]
DYN = {"kind": "dynamic", "depth": 3, "top_k": 3, "total_tokens": 8}
TREES = {  # name -> eval.tree fields (and "draft_vocab": drafter.draft_vocab)
    "chain": {"kind": "chain", "depth": 3},
    "static": {"kind": "static", "paths": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]},
    "dynamic": DYN,
    "delayed": {**DYN, "delay": 1},
    "opt": {**DYN, "kind": "opt", "opt_budget": "fixed"},
    "vocab": {**DYN, "draft_vocab": 64},
}
RULES = {"greedy": (0.0, "lossless"), "lossless": (1.0, "lossless"), "traversal": (1.0, "traversal"),
         "typical": (1.0, "typical")}  # name -> (temperature, eval.acceptance)
VOCAB_FAMILIES = {"eagle1", "eagle3", "medusa", "hydra", "hydra_pp", "small", "pard", "kangaroo"}  # drafter.draft_vocab applies to these


@dataclass
class Case:
    family: str
    tree: str
    rule: str

    def skip_reason(self) -> str | None:
        if self.tree == "vocab" and self.family.split("+")[0] not in VOCAB_FAMILIES:
            return "draft_vocab is not a setting of this family"
        return None


def tiny_target(device: str = "cpu", dtype: str = "auto"):
    """A 2-layer, 64-wide random Llama with the demo target's tokenizer (families read its special tokens)."""
    from bench.targets import random_llama_target

    return random_llama_target("tiny", "assets/demo-target", device, dtype=dtype)


@functools.cache
def family_config(family: str):
    """The composed config of one FAMILIES entry (Hydra composes once per family; trees and rules are set in
    code below, through the same schema checks)."""
    from conf.schema import load_config

    option, *extra = family.split("+")
    return load_config([f"drafter={option}", *extra, "eval.cuda_graphs=true"])


def build(case: Case, target, prompt: list[int], tokens: int, graphs: bool = True):
    """The decoder of one case (the oracle has learnt the prompt's continuation); `graphs`: eval.cuda_graphs."""
    from conf.schema.eval import TreeConfig
    from drafters.reference import OracleDrafter
    from drafters.registry import TRAINABLE, drafter_class
    from eval.stage import make_decoder

    temp, acceptance = RULES[case.rule]
    base = family_config(case.family)
    fields = dict(TREES[case.tree])
    vocab = fields.pop("draft_vocab", None)
    tree = TreeConfig(**{**dataclasses.asdict(base.eval.tree), **fields})
    cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, tree=tree, acceptance=acceptance,
                                                             cuda_graphs=graphs),
                              drafter=dataclasses.replace(base.drafter, draft_vocab=vocab))
    name = cfg.drafter.name
    torch.manual_seed(0)
    if name in TRAINABLE:
        model = drafter_class(name).from_target(cfg.drafter, target).eval()
        if vocab is not None:  # FR-Spec / VocabTrim: the most frequent tokens of made-up counts
            from drafters.vocab_trim import trim_draft_vocab

            model = trim_draft_vocab(model, torch.arange(target.vocab_size, 0, -1).float(), vocab)
        drafter = model.as_drafter(target)
    elif name == "oracle":
        drafter = OracleDrafter.from_config(cfg.drafter, target)
    else:
        drafter = drafter_class(name).from_config(cfg.drafter, target)
    dec = make_decoder(cfg, target, drafter, temp)
    if name == "oracle":
        drafter.replay_autoregressive(dec, prompt, tokens)
    return dec


def count(case: Case, target, prompt: list[int], tokens: int = 16, warm: bool = True) -> dict:
    """Per-cycle syncs / eager ops / captured ops of one case (after a warm-up generate unless warm=False)."""
    from decoding.counting import CycleCounter

    dec = build(case, target, prompt, tokens)
    g = torch.Generator().manual_seed(0)
    if warm:
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
