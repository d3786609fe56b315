"""Train-step time of the small-drafter objectives: token (plain distillation) vs on_policy (DistillSpec
rollouts, Draft-OPD speculative rollouts) vs adaspec (a frozen reference forward on top).

    python bench/bench_objectives.py                                    # random 6x384 Llama stand-in target, CPU
    python bench/bench_objectives.py --target assets/demo-target --steps 10
    python bench/bench_objectives.py --target Qwen/Qwen2.5-1.5B-Instruct --device cuda --max-length 2048

Renders N bundled ShareGPT conversations once (data_gen, no regeneration), then runs the real train stage
(training.stage.train, drafter=small, ZeRO-0, one process) per objective into a temporary run root and prints
seconds per optimizer step, measured between the first and last step's log lines (the first step's warm-up
excluded), and rollout tokens per step where there are rollouts. adaspec's reference is the token run's final
drafter. A random stand-in never emits EOS, so every rollout runs to its cap: a worst case for generation time.
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
    "token": ["objective=token"],
    "on_policy": ["objective=on_policy"],
    "on_policy_spec": ["objective=on_policy", "objective.rollout=speculative"],
    "adaspec": ["objective=adaspec"],  # + objective.reference=<token run's final>
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="target folder or hub id (default: a random 6x384 Llama stand-in)")
    ap.add_argument("--conversations", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="objective.max_new_tokens of the rollouts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0) or 0),
                    help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    import torch

    from bench.bench_data_gen import bench_target
    from conf.schema import load_config
    from data_gen.stage import run as data_gen
    from training.stage import train
    from training.tracking import read_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    target = bench_target(args.target, root)
    common = [f"target.path={target}", f"run.root={root}", f"run.device={args.device}", "experiment=demo",
              f"data.max_conversations={args.conversations}", f"data.max_length={args.max_length}"]
    data_gen(load_config(common + ["run.name=data"]))
    print(f"target {target} | device {args.device} | torch threads {torch.get_num_threads()} | drafter=small | "
          f"{args.steps} steps x micro-batch {args.micro_batch} | max_length {args.max_length} | rollouts "
          f"max_new_tokens {args.max_new_tokens} | {time.strftime('%Y-%m-%d')}")
    print(f"{'objective':<16} {'s/step':>7} {'x token':>8} {'tokens/step':>11} {'final loss':>10}")
    base = None
    reference = None
    for name in args.variants.split(","):
        (root / name).mkdir(exist_ok=True)
        if not (root / name / "data_gen").exists():
            (root / name / "data_gen").symlink_to(root / "data" / "data_gen")
        extra = list(VARIANTS[name])
        if name == "adaspec":
            if reference is None:
                print(f"{name:<16} skipped: needs the token variant first (its final drafter is the reference)")
                continue
            extra.append(f"objective.reference={reference}")
        if name.startswith("on_policy"):
            extra.append(f"objective.max_new_tokens={args.max_new_tokens}")
        cfg = load_config(common + [f"run.name={name}", "drafter=small", f"train.max_steps={args.steps}",
                                    f"train.micro_batch_size={args.micro_batch}", "train.log_every=1",
                                    "train.eval_every=0", "train.eval_rows=0", f"train.save_every={10**6}",
                                    "train.tensorboard=false", *extra])
        res = train(cfg)
        logged = [x for x in read_metrics(Path(res["metrics"])) if x["kind"] == "train"]
        per_step = (logged[-1]["time"] - logged[0]["time"]) / max(len(logged) - 1, 1)
        if name == "token":
            base, reference = per_step, res["final_dir"]
        ratio = f"{per_step / base:.2f}" if base else "-"
        tokens = res["input_tokens"] / max(res["steps"], 1)
        print(f"{name:<16} {per_step:>7.2f} {ratio:>8} {tokens:>11.0f} {res['final_loss']:>10.5f}", flush=True)
    print(f"outputs under {root}")


if __name__ == "__main__":
    main()
