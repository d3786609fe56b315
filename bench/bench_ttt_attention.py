"""EAGLE-3's unrolled training attention, train.attention=sdpa against train.attention=flex, side by side in one
run on the same batch: tokens/s of the drafter's loss and the largest loss difference (and on CUDA the
backward and the largest gradient difference).

    python bench/bench_ttt_attention.py --threads 1                                   # CPU: forward only
    python bench/bench_ttt_attention.py --device cuda --random-llama 8b --vocab 128256 --batch 4 --seq 1024

The target is a random-weight Llama of a bench/targets.py shape (tiny: 4 query heads over 2 key/value heads,
so the GQA path is exercised); its forward and LM head run once, outside the timing. The drafter's loss
(drafters/eagle3.py, every TTT step) is timed: median of --reps after one warm-up. On the CPU FlexAttention
runs eagerly and forward only (torch 2.13 has no CPU backward; drafters.layers.resolve_attention), so both
backends are timed without gradients there, and sdpa's forward + backward is printed for scale.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.targets import SHAPES  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-llama", choices=SHAPES, default="tiny")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--target", default="assets/demo-target", help="tokenizer source")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def time_loss(model, signal, backward: bool, reps: int, sync) -> tuple[float, float, dict]:
    """(median seconds, loss, gradients) of model.loss(signal) [+ backward] over `reps` after a warm-up."""
    import torch

    times = []
    for rep in range(reps + 1):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            loss, _ = model.loss(signal)
            if backward:
                loss.backward()
        sync()
        if rep:
            times.append(time.perf_counter() - t0)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return statistics.median(times), loss.item(), grads


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    # the eager CPU path is the point of the comparison there: torch's advice to compile it is noise here
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    from bench.bench_train_mfu import synthetic_batch
    from bench.targets import random_llama_target
    from conf.schema.drafter import Eagle3Config
    from drafters.eagle3 import Eagle3Drafter
    from training.signal import make_signal

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    target = random_llama_target(args.random_llama, args.target, str(dev), args.vocab, "float32")
    torch.manual_seed(0)
    model = Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=None, ttt_steps=args.ttt_steps), target)
    batch = synthetic_batch(args.batch, args.seq, len(target.tokenizer), 0)
    signal = make_signal("online", target, batch)
    _ = signal.logits  # the target's LM head once, outside the timing
    tokens = args.batch * args.seq
    c = target.config
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; random-weight Llama "
          f"({args.random_llama} shape: {c.num_attention_heads} query heads over {c.num_key_value_heads} key/value "
          f"heads, head_dim {model.dims.head_dim}), batch {args.batch} x {args.seq} tokens, {args.ttt_steps} TTT "
          f"steps, float32")
    print("| train.attention | pass | ms/step | tokens/s |", "|---|---|---|---|", sep="\n")
    res = {}
    for attention in ("sdpa", "flex"):
        model.set_attention(attention, dev)
        model.train(cuda)
        res[attention] = time_loss(model, signal, cuda, args.reps, sync)
        s = res[attention][0]
        print(f"| {attention} | loss forward{' + backward' if cuda else ''} | {1e3 * s:.1f} | {tokens / s:.0f} |")
    if not cuda:  # sdpa's training step for scale: the pass flex cannot run on this device
        model.set_attention("sdpa")
        model.train(True)
        s = time_loss(model, signal, True, args.reps, sync)[0]
        print(f"| sdpa | loss forward + backward | {1e3 * s:.1f} | {tokens / s:.0f} |")
    (_, la, ga), (_, lb, gb) = res["sdpa"], res["flex"]
    gdiff = max(((ga[n] - gb[n]).abs().max().item() for n in ga), default=None)
    print(f"\nloss {la:.6f} (sdpa) vs {lb:.6f} (flex): |difference| = {abs(la - lb):.2e}" +
          (f"; max |gradient difference| = {gdiff:.2e}" if gdiff is not None else "; gradients: not on this device"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
