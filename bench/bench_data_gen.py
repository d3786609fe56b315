"""data_gen throughput: tokens/s with and without the target cache and regeneration, and cache bytes/token.

    python bench/bench_data_gen.py --target assets/demo-target            # the demo target
    python bench/bench_data_gen.py                                        # no target: a random 6x384 Llama stand-in
    python bench/bench_data_gen.py --target meta-llama/Llama-3.1-8B-Instruct --device cuda --conversations 512

Runs the real stage (data_gen.stage.run) on the first N bundled ShareGPT training conversations, once per
variant, into a temporary run root, and prints one line per variant. tokens/s counts the rendered tokens
written (prompt + answer); with regeneration the generated tokens/s is printed too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "render": [],
    "cache": ["data.cache_features=true", "data.cache_topk=10"],
    "regen": ["data.regenerate=true"],
    "regen+cache": ["data.regenerate=true", "data.cache_features=true", "data.cache_topk=10"],
}


def stand_in_target(path: Path, hidden: int = 384, layers: int = 6, vocab: int = 8192, inter: int = 1024) -> str:
    """A random Llama (default 6 layers, hidden 384, 8192-token BPE trained on ShareGPT text, tied embeddings,
    512 positions): realistic sizes for timing without a trained target, NOT a trained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_gen.sources import iter_sharegpt
    from training.tokenizer import train_tokenizer

    texts = []
    for conv in iter_sharegpt(split="train"):
        texts += [m["content"] for m in conv.messages]
        if len(texts) > 6000:
            break
    tok = train_tokenizer(texts, vocab_size=vocab)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                         num_key_value_heads=hidden // 64, max_position_embeddings=512,
                                         tie_word_embeddings=True))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def bench_target(target: str | None, root: Path, note: str = "") -> str:
    """`target` as given, or (None) a random stand-in built under root, announced once."""
    if target:
        return target
    print("target: random stand-in Llama (6 layers, hidden 384, 8192-token BPE): speeds only, not a trained "
          f"model{note}")
    return stand_in_target(root / "stand-in")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="target folder or hub id (default: a random 6x384 Llama stand-in)")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--gen-max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0) or 0),
                    help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    import torch

    from conf.schema import load_config
    from data_gen.stage import run

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-data-gen-"))
    target = bench_target(args.target, root, " (random weights never stop early: every answer runs to the cap)")
    print(f"target {target} | device {args.device} | torch threads {torch.get_num_threads()} | "
          f"{args.conversations} ShareGPT conversations | max_length {args.max_length} | "
          f"batch {args.batch_size} | gen_max_new_tokens {args.gen_max_new_tokens} | {time.strftime('%Y-%m-%d')}")
    print(f"{'variant':<12} {'rows':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'gen tok/s':>9} {'cache B/token':>13}")
    for name in args.variants.split(","):
        cfg = load_config([f"target.path={target}", f"run.root={root}", f"run.name={name}", f"run.device={args.device}",
                           "experiment=demo", f"data.max_conversations={args.conversations}",
                           f"data.max_length={args.max_length}", f"data.batch_size={args.batch_size}",
                           f"data.gen_max_new_tokens={args.gen_max_new_tokens}", *VARIANTS[name]])
        res = run(cfg)
        tr = res.accounting["this_run"]
        print(f"{name:<12} {res.rows:>5} {tr['tokens']:>7} {tr['seconds']:>8.1f} {tr['tokens_per_s'] or 0:>9.0f} "
              f"{tr['generated_tokens_per_s'] or 0:>9.0f} {res.cache_bytes_per_token or 0:>13.0f}", flush=True)
    print(f"outputs under {root}")


if __name__ == "__main__":
    main()
