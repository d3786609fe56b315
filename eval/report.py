"""The eval report: report.json (every number, the config, the machine), report.md (tables) and PNG plots.

    from eval.report import write_report
    paths = write_report(report, out_dir)   # {"json": ..., "md": ..., "acceptance_png": ..., "tau_png": ...}

`report` is the dict eval.stage builds: {"drafter", "target", "acceptance", "lossy", "machine", "command",
"config", "results": [one eval.metrics.summarize() dict per benchmark x temperature, plus "benchmark",
"temperature", "prompts", "skipped", "peer"]}. Typical acceptance is not lossless: when `lossy` is set,
every table row, every title and every plot says LOSSY.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

LOSSY = "LOSSY"
LOSSY_NOTE = "LOSSY: typical acceptance, outputs may differ from the target's own"
BF16_NOTE = ("Outputs that differ at T=0 are rounding, not loss: in bf16/fp16 a (1+N)-token verification forward "
             "and N+1 one-token forwards sum in different orders, so a near-tie can go the other way and the two "
             "continuations part there. eval.exact=true verifies and decodes in float32, where they agree.")
FLOAT32_NOTE = ("The target verified in float32 and outputs still differ at T=0: a float32 near-tie (two logits "
                "within ~1e-6) or a decoder bug; drafter=target with eval.exact=true must give τ = depth + 1.")


def machine_info(device) -> dict:
    """Where the figures were measured: device name, library versions, date."""
    import torch
    import transformers

    dev = str(device)
    name = torch.cuda.get_device_name(device) if dev.startswith("cuda") else _cpu_name()
    return {"device": dev, "device_name": name, "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def title(report: dict) -> str:
    t = f"draftsmith eval: drafter {report['drafter']['name']} on {report['target']}"
    return f"{t} [{LOSSY}]" if report.get("lossy") else t


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def markdown(report: dict) -> str:
    """The Markdown report: a heading, the decoding table and, where timed, transformers' assisted peer."""
    rows = report["results"]
    depth = max((len(r["accept_by_depth"]) for r in rows), default=0)
    lossy = f" {LOSSY}" if report.get("lossy") else ""
    m = report["machine"]
    lines = [f"# {title(report)}", ""]
    if report.get("lossy"):
        lines += [f"**{LOSSY_NOTE}.**", ""]
    tree = report.get("tree") or {}
    lines += [f"acceptance: {report['acceptance']}{lossy}; tree: {tree.get('kind')} depth {tree.get('depth')}, "
              f"top_k {tree.get('top_k')}, total_tokens {tree.get('total_tokens')}; "
              f"max_new_tokens {report.get('max_new_tokens')}"
              + (f"; target verifies in {report['verify_dtype']}" + (" (eval.exact)" if report.get("exact") else "")
                 if report.get("verify_dtype") else ""),
              f"machine: {m['device']} ({m['device_name']}), torch {m['torch']}, transformers {m['transformers']}, "
              f"{m['date']}"]
    if report.get("command"):
        lines.append(f"command: `{report['command']}`")
    lines.append("")
    head = (["benchmark", "T", "prompts", "τ"] + [f"acc@{d}" for d in range(1, depth + 1)]
            + ["tok/s spec", "tok/s AR", "speedup", "draft %", "verify %", "other %", "= AR", "1st diff"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r["accept_by_depth"] + [None] * (depth - len(r["accept_by_depth"]))
        split = r["time_split"]
        same = f"{r['identical_outputs']}/{r['generations']}" if r["temperature"] == 0 else "-"
        diff = _f(r.get("first_divergence_mean"), "{:.1f}") if r["temperature"] == 0 else "-"
        cells = ([f"{r['benchmark']}{lossy}", f"{r['temperature']:g}", str(r["prompts"]), _f(r["tau"])]
                 + [_f(a) for a in acc]
                 + [_f(r["tok_s_spec"], "{:.1f}"), _f(r["tok_s_ar"], "{:.1f}"), _f(r["speedup"], "{:.2f}×"),
                    _pct(split["draft"]), _pct(split["verify"]), _pct(split["other"]), same, diff])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "τ: generated tokens per target forward; acc@d: of the cycles whose draft reached depth d with "
              "1..d-1 accepted, the share accepting depth d; = AR: turns whose output equals the autoregressive "
              "baseline's (T=0 only); 1st diff: mean position of the first differing token over the turns that "
              "differ; draft/verify/other: share of the speculative cycle's time."]
    if any(r["temperature"] == 0 and r["identical_outputs"] < r["generations"] for r in rows):
        lines.append(FLOAT32_NOTE if report.get("verify_dtype", "float32") == "float32" else BF16_NOTE)
    skipped = [(r["benchmark"], r["temperature"], r["skipped"]) for r in rows if r.get("skipped")]
    for b, t, s in skipped:
        lines.append(f"- {b} T={t:g}: skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(s.items())))
    peers = [r for r in rows if r.get("peer")]
    if peers:
        lines += ["", f"## transformers generate(assistant_model=...) (greedy){lossy}", "",
                  "| benchmark | tok/s assisted | tok/s greedy | speedup | output = greedy |", "|---|---|---|---|---|"]
        for r in peers:
            p = r["peer"]
            lines.append(f"| {r['benchmark']}{lossy} | {_f(p['tok_s_assisted'], '{:.1f}')} | "
                         f"{_f(p['tok_s_greedy'], '{:.1f}')} | {_f(p['speedup'], '{:.2f}×')} | "
                         f"{p['identical']}/{p['generations']} |")
    return "\n".join(lines) + "\n"


def plot_acceptance(report: dict, path: Path) -> Path:
    """Acceptance rate by depth: one line per benchmark x temperature."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["results"]:
        xs = [d for d, a in enumerate(r["accept_by_depth"], 1) if a is not None]
        ys = [a for a in r["accept_by_depth"] if a is not None]
        ax.plot(xs, ys, marker="o", label=f"{r['benchmark']} T={r['temperature']:g}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole numbers
    ax.set(xlabel="draft depth", ylabel="acceptance rate", ylim=(0, 1.02))
    ax.set_title(_plot_title(report, "acceptance by depth"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tau(report: dict, path: Path) -> Path:
    """τ per benchmark: bars grouped by benchmark, one bar per temperature."""
    plt = _pyplot()
    rows = report["results"]
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    width = 0.8 / max(len(temps), 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max((r["tau"] for r in rows if r["tau"] is not None), default=1.0)
    for j, t in enumerate(temps):
        xs, ys = [], []
        for i, b in enumerate(benches):
            r = next((r for r in rows if r["benchmark"] == b and r["temperature"] == t), None)
            if r is not None and r["tau"] is not None:
                xs.append(i + (j - (len(temps) - 1) / 2) * width)
                ys.append(r["tau"])
        bars = ax.bar(xs, ys, width=width, label=f"T={t:g}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(benches)), benches)
    ax.set(ylabel="τ (tokens per target forward)", ylim=(0, top * 1.15))  # room for the bar labels
    ax.set_title(_plot_title(report, "τ per benchmark"), fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    paths["acceptance_png"] = plot_acceptance(report, out / "acceptance_by_depth.png")
    paths["tau_png"] = plot_tau(report, out / "tau.png")
    return paths


def _plot_title(report: dict, what: str) -> str:
    t = f"{what}: {report['drafter']['name']} on {Path(str(report['target'])).name}"
    return f"{t}\n{LOSSY_NOTE}" if report.get("lossy") else t


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
