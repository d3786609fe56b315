"""The planner's estimates against measurements: the demo train step's peak (CPU RSS and tracked tensor
bytes), the 8B EAGLE-3 online bench's 41.4 GiB (H200, measured 2026-12-04), the demo's offline cache on disk.

    python bench/bench_plan.py --root /tmp/plan-runs --steps 3     # after data_gen with the cache (below)
    python train.py stage=data_gen run.root=/tmp/plan-runs data.cache_features=true data.cache_topk=10

The demo train step runs in <root>/demo/train, which is deleted first (use a scratch root). Tracked tensor bytes: a TorchDispatchMode sees every tensor an op returns and counts its storage once until
the storage is freed (weakref finalizer), so the figure is the peak of live storages made inside the train
stage (target weights loaded there included). Peak RSS is the process's ru_maxrss (everything: Python,
libraries, allocator slack).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

GiB, MiB = 2**30, 2**20


class StorageTracker(TorchDispatchMode):
    """Live bytes of storages created under it, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.seen:
                    n = st.nbytes()
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def demo_train(root: str, steps: int) -> dict:
    from conf.schema import load_config
    from plan.stage import build_plan
    from training.stage import train

    over = [f"run.root={root}", "run.name=demo", f"train.max_steps={steps}", "train.eval_every=0", "run.threads=1",
            "train.save_every=0", "train.tensorboard=false"]
    cfg = load_config(over)
    import shutil

    shutil.rmtree(Path(root) / "demo" / "train", ignore_errors=True)  # a scratch root: train from step 0 every time
    p = build_plan(cfg, sample=False)
    before = rss()
    tracker = StorageTracker()
    with tracker:
        train(cfg)
    return {"estimate_peak": p["stages"]["train"]["peak"], "estimate_tensors": p["stages"]["train"]["tensors"],
            "estimate_parts": p["stages"]["train"]["memory"], "estimate_detail": p["stages"]["train"]["activation_detail"],
            "measured_rss": rss(), "rss_before_train": before, "measured_tensors": tracker.peak}


def bench_8b() -> dict:
    """The planner on bench_train_mfu's run: random 8B Llama (Llama-3.1-8B's shape, vocab 128256), eagle3,
    batch 4 x 1024, 7 TTT steps, draft vocab 32000, bf16, torch AdamW under DeepSpeed ZeRO-0, one H200."""
    from conf.schema import load_config
    from plan.stage import build_plan

    cfg = load_config(["target=llama3_8b", "drafter=eagle3", "train.micro_batch_size=4", "train.grad_accum=1",
                       "train.max_length=1024", "data.max_length=1024", "plan.gpu=h200", "plan.rows=1000",
                       "plan.row_tokens=1024", "run.root=/tmp/plan-bench-8b"])
    p = build_plan(cfg)
    return {"estimate": p["stages"]["train"]["tensors"], "measured": 41.4 * GiB, "parts": p["stages"]["train"]["memory"],
            "detail": p["stages"]["train"]["activation_detail"]}


def demo_cache(root: str) -> dict:
    """The cache estimate before data_gen (600 conversations sampled with the tokenizer) and from the run's
    own token counts, against the bytes of the cache files on disk."""
    from conf.schema import load_config
    from plan.stage import build_plan

    d = Path(root) / "demo" / "data_gen"
    files = json.loads((d / "cache_files.json").read_text())
    on_disk = sum((d / f).stat().st_size for f in files)
    over = [f"run.root={root}", "data.cache_features=true", "data.cache_topk=10"]
    after = build_plan(load_config([*over, "run.name=demo"]))["stages"]["data_gen"]["disk"]["feature cache"]
    before = build_plan(load_config([*over, "run.name=fresh-no-data"]))["stages"]["data_gen"]["disk"]["feature cache"]
    return {"on_disk": on_disk, "estimate_from_meta": after, "estimate_before_data_gen": before, "files": len(files)}


GPU_CASES = [(4, 1024, False), (2, 2048, False), (4, 1024, True), (8, 1024, True)]
DRY_CASES = [(1, 64, False), (1, 64, True)]


def gpu_check(device: str = "cuda", shape: str = "8b") -> list[dict]:
    """On a CUDA device: the train step's peak torch.cuda.max_memory_allocated for a random 8B Llama (vocab
    128256) with eagle3 under the train stage's Engine (bf16, AdamW, ZeRO-0), per (micro batch, length,
    gradient checkpointing), against the planner's tensor estimate for the same settings on an H200.
    `device="cpu", shape="tiny"` is a dry run of the code path (its figures mean nothing)."""
    from types import SimpleNamespace

    from bench.bench_train_mfu import synthetic_batch
    from bench.targets import random_llama_target
    from conf.schema import load_config
    from plan.stage import build_plan
    from training.engine import Engine, build_ds_config, setup_distributed
    from training.objectives import build_objective
    from training.stage import build_drafter, train_step

    env = setup_distributed(device)
    target = random_llama_target(shape, "assets/demo-target", str(env.device), 128256, "auto")
    cuda = env.device.type == "cuda"
    out = []
    for micro, seq, gc in (GPU_CASES if device == "cuda" else DRY_CASES):
        over = ["drafter=eagle3", f"run.device={device}", f"train.micro_batch_size={micro}", "train.grad_accum=1",
                f"train.max_length={seq}", f"data.max_length={seq}", f"train.gradient_checkpointing={str(gc).lower()}"]
        cfg = load_config(over)
        est = build_plan(load_config([*over, "target=llama3_8b", "plan.gpu=h200", "plan.rows=1000",
                                      f"plan.row_tokens={seq}", "run.root=/tmp/plan-gpu"]), sample=False)
        torch.manual_seed(0)
        with torch.device(env.device):
            drafter = build_drafter(cfg, target, None)
        drafter.set_gradient_checkpointing(gc)
        eng = Engine(drafter, build_objective(cfg, target), cfg, build_ds_config(cfg, 1, env.device), 10, env)
        eng.train(True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        for i in range(2 if cuda else 1):
            train_step(eng, target, [synthetic_batch(micro, seq, len(target.tokenizer), i)], "online", env,
                        SimpleNamespace(accum=1, world=1))
        peak = torch.cuda.max_memory_allocated(env.device) if cuda else 1
        row = {"micro": micro, "seq": seq, "gc": gc, "measured": peak, "estimate": est["stages"]["train"]["tensors"]}
        print(f"8B eagle3 micro {micro} x {seq}, checkpointing {gc}: measured {peak / GiB:.1f} GiB, estimate "
              f"{row['estimate'] / GiB:.1f} GiB ({row['estimate'] / peak:.3f}x)", flush=True)
        out.append(row)
        del eng, drafter
        if cuda:
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/plan-runs")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="only the GPU check (gpu_check): needs CUDA, ~1 min on an H200")
    ap.add_argument("--gpu-dry-run", action="store_true", help="the GPU check's code path on the CPU, tiny shape")
    args = ap.parse_args(argv)
    if args.gpu or args.gpu_dry_run:
        gpu_check(*(("cpu", "tiny") if args.gpu_dry_run else ()))
        return 0
    torch.set_num_threads(1)
    print(f"threads: {torch.get_num_threads()}")
    b = bench_8b()
    print(f"8B EAGLE-3 online, batch 4 x 1024, H200: estimate {b['estimate'] / GiB:.1f} GiB of tensors vs 41.4 GiB "
          f"measured (max_memory_allocated): {b['estimate'] / b['measured']:.3f}x")
    print("  parts: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in b["parts"].items()))
    print("  activations: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in b["detail"].items()))
    c = demo_cache(args.root)
    print(f"demo offline cache ({c['files']} files): on disk {c['on_disk']:,} bytes; estimate from data_gen's counts "
          f"{c['estimate_from_meta']:,} ({c['estimate_from_meta'] / c['on_disk']:.4f}x); estimate before data_gen "
          f"(64 conversations rendered) {c['estimate_before_data_gen']:,} ({c['estimate_before_data_gen'] / c['on_disk']:.3f}x)")
    if not args.skip_train:
        r = demo_train(args.root, args.steps)
        print(f"demo train step (CPU, fp32, micro 4 x 512): tracked tensors peak {r['measured_tensors'] / MiB:.1f} MiB vs "
              f"estimate {r['estimate_tensors'] / MiB:.1f} MiB ({r['estimate_tensors'] / r['measured_tensors']:.3f}x); "
              f"peak RSS {r['measured_rss'] / MiB:.0f} MiB (RSS before the stage {r['rss_before_train'] / MiB:.0f} MiB) vs "
              f"estimate {r['estimate_peak'] / MiB:.0f} MiB ({r['estimate_peak'] / r['measured_rss']:.3f}x)")
        print("  estimate parts: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in r["estimate_parts"].items()))
        print("  activations: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in r["estimate_detail"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
