"""DFlash's training block mask: sdpa with a materialised bool mask against a FlexAttention BlockMask, on the
same random batch of the demo target: the loss (and on CUDA the gradients) of both, and the time per step.

    python bench/bench_dflash_attention.py                         # CPU: forward only (FlexAttention has no CPU backward)
    python bench/bench_dflash_attention.py --device cuda --rows 8 --length 1024 --anchors 256 --block 16

Prints one line per backend (ms per step, median of --reps after one warm-up) and the largest differences
(loss, and every parameter's gradient on CUDA). FlexAttention runs compiled on CUDA
(drafters.dflash_blocks.flex_attend), eagerly elsewhere.
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from conf.schema import TargetConfig
    from conf.schema.drafter import DFlashConfig
    from drafters.base import TargetSignal
    from drafters.dflash import DFlashDrafter
    from drafters.target import load_target

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    target = load_target(TargetConfig(path="assets/demo-target"), device=dev)
    torch.manual_seed(0)
    model = DFlashDrafter.from_target(DFlashConfig(block_size=args.block, anchors=args.anchors), target)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, target.vocab_size, (args.rows, args.length), generator=g).to(dev)
    attn = torch.ones_like(ids)
    loss_mask = attn.clone()
    loss_mask[:, : args.length // 4] = 0
    with torch.no_grad():
        out = target(ids, attention_mask=attn)
    signal = TargetSignal(ids, attn, loss_mask, features=out.features, last_hidden=out.last_hidden,
                          lm_head=target.lm_head, vocab_size=target.vocab_size)
    backward = dev.type == "cuda"  # FlexAttention has no CPU backward
    model.train(backward)
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; rows {args.rows} x length "
          f"{args.length}, {args.anchors} anchors x block {args.block}; backward: {backward}")
    results = {}
    for attention in ("sdpa", "flex"):
        model.cfg.attention = attention
        times = []
        for rep in range(args.reps + 1):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same anchors for both backends
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                loss, _ = model.loss(signal)
                if backward:
                    loss.backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attention] = (loss.item(), grads)
        print(f"{attention:5s} loss {loss.item():.6f}  {1e3 * statistics.median(times):.1f} ms/step")
    (la, ga), (lb, gb) = results["sdpa"], results["flex"]
    gdiff = max(((ga[n] - gb[n]).abs().max().item() for n in ga), default=0.0)
    print(f"|loss sdpa - loss flex| = {abs(la - lb):.2e}; max |grad difference| = {gdiff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
