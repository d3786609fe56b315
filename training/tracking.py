"""Progress and metrics of the train stage (rank 0 only): a tqdm bar (loss, tokens/s, ETA), wandb
(offline into the run directory unless train.wandb_project is set), tensorboard, `metrics.jsonl`, and a
PNG of the curves at the end.

Simulated acceptance length. With per-depth held-out accuracies a_1..a_K (a_k = fraction of positions
where the drafter's argmax at depth k equals the target's argmax), a greedy chain draft accepts depth k
only if depths 1..k all match, so, treating depths as independent,

    tau_sim = 1 + sum_{k=1..K} prod_{j=1..k} a_j

(the 1 is the target's own token each verification step adds). It is a cheap proxy computed from
teacher-forced accuracies; eval's speculative decoder measures the real tau.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from runtime.files import atomic_write_text


def tau_sim(accs: dict) -> float:
    """1 + sum_k prod_{j<=k} acc_j over depths in increasing order ({depth: acc} or {"acc/<d>": acc})."""
    items = sorted(((int(str(k).split("/")[-1]), float(v)) for k, v in accs.items()), key=lambda kv: kv[0])
    tau, run = 1.0, 1.0
    for _, a in items:
        run *= a
        tau += run
    return tau


class Tracker:
    """One per train run; every method is a no-op on ranks other than 0."""

    def __init__(self, cfg, out_dir: Path, is_main: bool, total_steps: int, start_step: int):
        self.active = is_main
        self.out_dir = Path(out_dir)
        self.log_every = max(1, cfg.train.log_every)
        self.total_steps = total_steps
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None
        self._step_seconds, self._tokens_since = 0.0, 0
        if not self.active:
            return
        self._trim_jsonl(start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint (no duplicates on resume)
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = _init_wandb(cfg, self.out_dir)

    def _trim_jsonl(self, start_step: int) -> None:
        """Resume: keep only records up to the checkpoint's step, so no step appears twice."""
        if not self.jsonl.exists():
            return
        keep = [ln for ln in self.jsonl.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
        atomic_write_text(self.jsonl, "".join(ln + "\n" for ln in keep))

    def step(self, step: int, loss: float, input_tokens: int, seconds: float) -> None:
        """Advance the bar by one optimizer step that took `seconds` (the bar's tok/s is that of the steps,
        without eval and checkpoint time)."""
        if not self.active:
            return
        self._tokens_since += input_tokens
        self._step_seconds += seconds
        rate = self._tokens_since / max(self._step_seconds, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(1)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Write one record (`train` every log_every steps, `eval` at each evaluation) to every sink."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "time": round(time.time(), 3), **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in clean.items()}, step=step)
        if kind == "eval":
            self.write(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in clean.items()))

    def write(self, msg: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> Path | None:
        """Close the sinks and draw the curves; returns the PNG path."""
        if not self.active:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_metrics(self.jsonl, self.out_dir / "curves.png")


def _init_wandb(cfg, out_dir: Path):
    """Offline into the run dir by default; a project name turns on train.wandb_mode (online needs
    network and a login). WANDB_MODE in the environment wins (tests set it to disabled)."""
    mode = os.environ.get("WANDB_MODE") or (cfg.train.wandb_mode if cfg.train.wandb_project else "offline")
    if mode == "disabled":
        return None
    import wandb
    from omegaconf import OmegaConf

    return wandb.init(project=cfg.train.wandb_project or "draftsmith", name=cfg.run.name, dir=str(out_dir),
                      mode=mode, config=OmegaConf.to_container(OmegaConf.structured(cfg)), reinit="finish_previous")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def distinct_series(series: list[tuple[str, list, list]]) -> list[tuple[str, list, list]]:
    """(label, steps, values) series with exactly the same points merged into one, labelled with every name
    ("loss = loss/soft_ce (identical)"): a one-term objective logs its total and its term as the same number,
    and two lines drawn on top of each other read as one line with a mislabelled legend."""
    merged: dict[tuple, tuple[list[str], list, list]] = {}
    for label, xs, ys in series:
        merged.setdefault((tuple(xs), tuple(ys)), ([], xs, ys))[0].append(label)
    return [(" = ".join(names) + (" (identical)" if len(names) > 1 else ""), xs, ys)
            for names, xs, ys in merged.values()]


def _series(rs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rs if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _legend_outside(ax) -> None:
    """The legend right of the axes, where it cannot cover a curve."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def curves_figure(recs: list[dict]):
    """The train stage's curves against optimizer step: loss (train terms and held-out), learning rate,
    per-depth accuracy (train and held-out) and tau_sim. Axis ranges: step, loss and learning rate from 0,
    accuracy 0..1, tau_sim from 1 (no draft token accepted) to at least 2, so a small change is not
    stretched across the whole panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), layout="constrained")

    ax = axes[0][0]
    keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
    for label, xs, ys in distinct_series([(f"train {k}", *_series(train, k)) for k in keys]):
        ax.plot(xs, ys, label=label)
    if any("loss" in r for r in evals):
        ax.plot(*_series(evals, "loss"), "o--", label="held-out loss")
    ax.set(title="loss", xlabel="optimizer step", ylabel="loss (lower is better)")
    ax.set_ylim(0, 1.05 * max([y for line in ax.get_lines() for y in line.get_ydata()], default=1.0))
    _legend_outside(ax)

    ax = axes[0][1]
    ax.plot(*_series(train, "lr"))
    ax.set(title="learning rate", xlabel="optimizer step", ylabel="learning rate")
    ax.set_ylim(bottom=0)

    ax = axes[1][0]
    depths = sorted({k for r in recs for k in r if k.startswith("acc/")}, key=lambda k: int(k.split("/")[1]))
    colors = plt.get_cmap("viridis")([i / max(len(depths) - 1, 1) for i in range(len(depths))])
    for key, c in zip(depths, colors):  # one colour per depth; train solid, held-out dashed with markers
        ax.plot(*_series(train, key), color=c, label=f"depth {key.split('/')[1]}")
        if any(key in r for r in evals):
            ax.plot(*_series(evals, key), "o--", color=c)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", label="train"),
                Line2D([], [], color="gray", ls="--", marker="o", label="held-out")]
    ax.set(title="per-depth accuracy (drafter argmax = target argmax)", xlabel="optimizer step",
           ylabel="accuracy", ylim=(0, 1))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)

    ax = axes[1][1]
    xs, ys = _series(evals, "tau_sim")
    ax.set(title="simulated acceptance length (held-out)", xlabel="optimizer step",
           ylabel="τ_sim (tokens per target forward)", ylim=(1, max([2.0] + [1.1 * y for y in ys])))
    if xs:
        ax.plot(xs, ys, "o-")
    else:
        ax.text(0.5, 0.5, "no held-out evaluation in this run\n(train.eval_every=0)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    for ax in axes.flat:
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
        ax.grid(alpha=0.3)
    return fig


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    """Draw curves_figure() of a metrics.jsonl into png; None when nothing was logged."""
    recs = read_metrics(jsonl)
    if not recs:
        return None
    import matplotlib.pyplot as plt

    fig = curves_figure(recs)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
