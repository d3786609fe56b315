"""EAGLE-3 online training speed and peak memory, this checkout against another one, side by side.

    python bench/bench_train_throughput.py --baseline /path/to/other/worktree      # 170 steps, demo target
    python bench/bench_train_throughput.py --baseline ../base --steps 30           # a quicker look
    python bench/bench_train_throughput.py --profile                               # where one step's time goes
    python bench/bench_train_throughput.py --profile --repo ../base                # ... in another checkout

Side by side: data_gen renders the demo recipe's data once (experiment=demo: 600 ShareGPT conversations,
max_length 512 -> 515 rows, 451 trained on), then two processes start at the same moment, one per
checkout, each running that checkout's real train stage (training.stage.train, drafter=eagle3, online,
ZeRO-0, same seed, rows, optimizer, schedule, batch, TTT length and draft vocabulary) with ONE torch thread
(`torch.set_num_threads(1)`, printed by each worker). Running both at once on a shared machine keeps the
ratio fair: whatever else runs slows both alike. Printed per side: tokens/s over the training loop (the
train stage's own figure at its last step: input tokens / seconds since the loop started), peak RSS
(ru_maxrss of the worker process: imports, target, data, training and the final held-out evaluation), the
first and last step's loss (the same data and the same loss function give the same first loss), and
the ratios; the load average is sampled while they run.

--profile: one process, one thread, the same config; times the parts of a training step over a few
steps after warm-up by wrapping the drafter's own methods (so it profiles whichever checkout --repo
names): collate, target forward, the target's LM head, feature fusion (fc), each TTT step's decoder layer,
each step's LM head + loss, the rest of the loss (masks, target-side gathers), backward, optimizer. The
head + loss backward is timed separately on a detached copy of each step's input (an estimate: the
same operations, run once more). Saved-for-backward bytes are counted per part with autograd hooks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
MARKER = ".bench_train_throughput"  # written into --root: only a root this script made is ever cleared


def overrides(root: Path, name: str, steps: int) -> list[str]:
    """The run config both sides train with (the demo recipe, eagle3, online, a fixed step count)."""
    return [f"run.root={root}", f"run.name={name}", "run.device=cpu", "experiment=demo", "drafter=eagle3",
            "objective=token", "train.mode=online", f"train.max_steps={steps}", "train.log_every=1",
            "train.eval_every=0", f"train.save_every={steps}", "train.tensorboard=false"]


# --------------------------------------------------------------------------------------------------
# Workers (run inside the checkout under test: --repo goes first on sys.path)
# --------------------------------------------------------------------------------------------------
def _import_repo(repo: str) -> None:
    sys.path.insert(0, str(Path(repo).resolve()))
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(1)


def train_worker(args) -> None:
    _import_repo(args.repo)
    import torch

    import drafters
    from conf.schema import load_config, run_dir
    from data_gen.output import load_dataset_dir
    from training.data import DataPlan
    from training.stage import train
    from training.tracking import read_metrics

    cfg = load_config(overrides(Path(args.root), args.name, args.steps))
    res = train(cfg)
    logged = [r for r in read_metrics(Path(res["metrics"])) if r["kind"] == "train"]
    # input tokens of every step (the plan's rows, as collate truncates them), to rate any window of steps
    t = cfg.train
    dataset = load_dataset_dir(run_dir(cfg) / "data_gen")
    lengths = [min(len(x), t.max_length) for x in dataset["input_ids"]]
    plan = DataPlan(len(lengths), t.eval_rows, cfg.run.seed, t.micro_batch_size, t.grad_accum, 1, 0)
    per_step = [sum(lengths[r] for rows in plan.micro_batches(k * plan.global_batch) for r in rows)
                for k in range(res["steps"])]
    cumulative = [sum(per_step[:k + 1]) for k in range(len(per_step))]
    print(json.dumps({"threads": torch.get_num_threads(), "code": str(Path(drafters.__file__).parent.parent),
                      "tokens_per_s": logged[-1]["tokens_per_s"], "steps": res["steps"],
                      "log": [(r["step"], r["time"], cumulative[r["step"] - 1]) for r in logged],
                      "input_tokens": res["input_tokens"], "loss_tokens": res["loss_tokens"],
                      "first_loss": logged[0]["loss"], "final_loss": logged[-1]["loss"],
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _saved_bytes():
    """Context manager counting bytes of distinct tensors autograd saves for backward inside it."""
    import torch

    class Count(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self):
            self.seen, self.bytes = set(), 0

            def pack(t):
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in self.seen:
                    self.seen.add(key)
                    self.bytes += key[1]
                return t
            super().__init__(pack, lambda t: t)
    return Count()


def profile_worker(args) -> None:
    _import_repo(args.repo)
    import torch

    from conf.schema import load_config, run_dir
    from drafters.target import load_target
    from training.data import DataPlan, collate, load_data_gen
    from training.engine import build_optimizer
    from training.signal import make_signal
    from training.stage import build_drafter, seed_all

    cfg = load_config(overrides(Path(args.root), args.name, args.steps))
    t = cfg.train
    target = load_target(cfg.target, device="cpu")
    data = load_data_gen(run_dir(cfg) / "data_gen", target, need_cache=False)
    plan = DataPlan(len(data.dataset), t.eval_rows, cfg.run.seed, t.micro_batch_size, t.grad_accum, 1, 0)
    seed_all(cfg.run.seed)
    drafter = build_drafter(cfg, target, data.token_counts)
    drafter.train()
    opt = build_optimizer(drafter, t)
    pad = target.tokenizer.pad_token_id or 0
    ms: dict[str, float] = defaultdict(float)  # part -> seconds summed over measured steps
    mem: dict[str, int] = defaultdict(int)  # part -> saved-for-backward bytes (last step)
    state = {"step": 0, "on": False, "extra": 0.0}

    def wrap(name, fn, per_step=False, head=False):
        def timed(*a, **k):
            if per_step and not head:
                state["step"] += 1  # TTT steps count from 1; the head + loss after a step shares its number
            label = f"{name} {state['step']}" if per_step else name
            c = _saved_bytes()
            with c:
                t0 = time.perf_counter()
                out = fn(*a, **k)
                dt = time.perf_counter() - t0
            if state["on"]:
                ms[label] += dt
                mem[label] = c.bytes
            if head and state["on"]:  # time this head + loss's backward alone, on a detached input
                t_extra = time.perf_counter()
                leaf = [x.detach().requires_grad_() if torch.is_tensor(x) and x.requires_grad else x for x in a]
                terms = fn(*leaf, **k)[0]
                t0 = time.perf_counter()
                sum(terms.values()).backward()
                ms[f"backward: {label}"] += time.perf_counter() - t0
                state["extra"] += time.perf_counter() - t_extra  # not part of the step: taken off its time
            return out
        return timed

    drafter.project = wrap("fusion (fc)", drafter.project)
    drafter.core = wrap("TTT step", drafter.core, per_step=True)
    drafter._step_loss = wrap("LM head + loss, step", drafter._step_loss, per_step=True, head=True)
    batches = [b[0] for b in (plan.micro_batches(i * plan.global_batch) for i in range(args.warmup + args.steps))]
    tokens = 0
    for i, rows in enumerate(batches):
        state.update(step=0, on=i >= args.warmup, extra=0.0)
        t0 = time.perf_counter()
        batch = collate(data, rows, pad, t.max_length)
        t1 = time.perf_counter()
        signal = make_signal("online", target, batch)
        t2 = time.perf_counter()
        head = signal.lm_head
        head_time = [0.0]

        def timed_head(x, _head=head, _acc=head_time):
            s = time.perf_counter()
            y = _head(x)
            _acc[0] += time.perf_counter() - s
            return y
        signal.lm_head = timed_head
        parts_before = sum(v for k, v in ms.items() if not k.startswith("backward"))
        t3 = time.perf_counter()
        loss, _ = drafter.loss(signal)
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), t.grad_clip)
        opt.step()
        t6 = time.perf_counter()
        if state["on"]:
            tokens += int(batch["attention_mask"].sum())
            inner = sum(v for k, v in ms.items() if not k.startswith("backward")) - parts_before
            ms["collate"] += t1 - t0
            ms["target forward"] += t2 - t1
            ms["target LM head"] += head_time[0]
            ms["rest of the loss (masks, target gathers, metrics)"] += (t4 - t3) - inner - head_time[0] - state["extra"]
            ms["backward (all)"] += t5 - t4
            ms["optimizer (clip + AdamW)"] += t6 - t5
    n = args.steps
    total = sum(v for k, v in ms.items() if not k.startswith("backward:"))
    print(json.dumps({"threads": torch.get_num_threads(), "steps": n, "tokens_per_step": tokens / n,
                      "ms": {k: 1000 * v / n for k, v in ms.items()}, "total_ms": 1000 * total / n,
                      "saved_mib": {k: v / 2**20 for k, v in mem.items()},
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def git_commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "?") + ("+dirty" if dirty else "")


def prepare_root(root: Path, names: list[str]) -> None:
    """Render the data once into <root>/data (kept between runs) and give every side a fresh run dir
    whose data_gen links to it. A root this script did not make is refused, never cleared."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        sys.exit(f"error: --root {root} exists and was not made by this script: pass a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    if not (root / "data" / "data_gen" / "meta.json").exists():
        subprocess.run([sys.executable, str(HERE / "train.py"), "stage=data_gen",
                        *overrides(root, "data", 1)[:5]], cwd=HERE, check=True, env=_env())
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir()
        (root / name / "data_gen").symlink_to(root / "data" / "data_gen")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _worker(kind: str, repo: Path, root: Path, name: str, args) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={kind}", f"--repo={repo}", f"--root={root}",
           f"--name={name}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    return subprocess.Popen(cmd, cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, name: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"error: the {name} worker failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def window_rate(log: list, start: float, end: float) -> float:
    """Tokens/s of the steps logged inside [start, end]: (step, wall time, cumulative tokens) records."""
    inside = [(t, tok) for _, t, tok in log if start <= t <= end]
    if len(inside) < 2:
        sys.exit("error: the two runs hardly overlapped: run more --steps")
    (t0, k0), (t1, k1) = inside[0], inside[-1]
    return (k1 - k0) / (t1 - t0)


def side_by_side(args) -> None:
    root = Path(args.root).resolve()
    sides = {"this": HERE, "baseline": Path(args.baseline).resolve()}
    prepare_root(root, list(sides))
    loads, done = [], threading.Event()

    def sample():
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    procs = {name: _worker("train", repo, root, name, args) for name, repo in sides.items()}
    res = {name: _result(p, name) for name, p in procs.items()}
    done.set()
    wall = time.time() - t0
    print(f"EAGLE-3 online training, demo target, {args.steps} steps, both checkouts at once; "
          f"wall {wall:.0f} s; load average (1 min) during the run: mean {sum(loads) / max(len(loads), 1):.1f}, "
          f"max {max(loads, default=0):.1f} on {os.cpu_count()} cores")
    print("| side | commit | torch threads | tokens | loss tokens | tokens/s (whole loop) | peak RSS GiB | first loss | last loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {git_commit(sides[name])} | {r['threads']} | {r['input_tokens']} | {r['loss_tokens']} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_kib'] / 2**20:.2f} | {r['first_loss']:.4f} | "
              f"{r['final_loss']:.4f} |")
    a, b = res["this"], res["baseline"]
    start = max(r["log"][0][1] for r in res.values())  # both past their first (warm-up) step ...
    end = min(r["log"][-1][1] for r in res.values())  # ... and neither finished: the machine was shared alike
    both = {name: window_rate(r["log"], start, end) for name, r in res.items()}
    print(f"while both trained ({end - start:.0f} s, steps after the first): "
          + ", ".join(f"{name} {rate:.0f} tokens/s" for name, rate in both.items())
          + f"; ratio this/baseline {both['this'] / both['baseline']:.2f}x")
    print(f"whole loop (each side's own figure; the side that finishes first leaves the other the machine): "
          f"ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; peak RSS ratio {a['peak_rss_kib'] / b['peak_rss_kib']:.2f}x")
    if (a["input_tokens"], a["loss_tokens"]) != (b["input_tokens"], b["loss_tokens"]):
        print("warning: the two sides trained on different tokens: the comparison is not like for like")


def profile(args) -> None:
    root = Path(args.root).resolve()
    prepare_root(root, ["profile"])
    r = _result(_worker("profile", Path(args.repo or HERE).resolve(), root, "profile", args), "profile")
    print(f"profile of one EAGLE-3 training step ({git_commit(Path(args.repo or HERE))}), mean of {r['steps']} steps "
          f"after {args.warmup} warm-up, {r['tokens_per_step']:.0f} tokens/step, torch threads {r['threads']}, "
          f"load average {os.getloadavg()[0]:.1f}; peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB")
    print("| part | ms/step | share | saved for backward MiB |")
    print("|---|---|---|---|")
    for k, v in r["ms"].items():
        share = "" if k.startswith("backward:") else f"{100 * v / r['total_ms']:.0f} %"
        saved = r["saved_mib"].get(k)
        print(f"| {k} | {v:.0f} | {share} | {'' if saved is None else f'{saved:.0f}'} |")
    print(f"| total | {r['total_ms']:.0f} | 100 % | {sum(r['saved_mib'].values()):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="the other checkout (a git worktree of the commit to compare with)")
    ap.add_argument("--profile", action="store_true", help="profile one step instead (one process)")
    ap.add_argument("--repo", help="--profile: the checkout to profile (default: this one)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 170; --profile: 4)")
    ap.add_argument("--warmup", type=int, default=2, help="--profile: steps run before timing")
    ap.add_argument("--root", default="/tmp/bench-train-throughput", help="run root (made and reused by this script)")
    ap.add_argument("--worker", choices=["train", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        (train_worker if args.worker == "train" else profile_worker)(args)
    elif args.profile:
        args.steps = args.steps or 4
        profile(args)
    elif args.baseline:
        args.steps = args.steps or 170
        side_by_side(args)
    else:
        ap.error("pass --baseline <checkout> (side by side) or --profile")


if __name__ == "__main__":
    main()
