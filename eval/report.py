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
import os
import platform
from collections.abc import Callable
from pathlib import Path

from eval.metrics import REPS, SEED
from runtime.files import write_json

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


def cell(x, fmt: str = "{:.2f}") -> str:
    """One number of a table as `fmt` writes it; "-" for a missing one (every report and bench table)."""
    return "-" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def with_interval(x, ci, fmt: str = "{:.2f}") -> str:
    """'2.00 [1.85, 2.14]'; the point alone where there is no interval (fewer than 2 prompts)."""
    if x is None or ci is None:
        return cell(x, fmt)
    return f"{fmt.format(x)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


# A table is a list of columns (header, cell of one result row): a new column is one entry in the list.
Column = tuple[str, Callable[[dict], str]]


def md_table(columns: list[Column], rows: list[dict]) -> list[str]:
    """Markdown lines of a table: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + [md_row(columns, r) for r in rows]


def md_row(columns: list[Column], row: dict) -> str:
    return "| " + " | ".join(cell(row) for _, cell in columns) + " |"


def decode_columns() -> list[Column]:
    """The decoding table's columns after the row's name (benchmark here, drafter x tree in bench_decode)."""
    return [
        ("T", lambda r: f"{r['temperature']:g}"),
        ("prompts", lambda r: str(r["prompts"])),
        ("cycles", lambda r: str(r["target_forwards"])),
        ("τ [95 %]", lambda r: with_interval(r["tau"], r["ci"]["tau"])),
        ("tok/s spec", lambda r: cell(r["tok_s_spec"], "{:.1f}")),
        ("tok/s AR", lambda r: cell(r["tok_s_ar"], "{:.1f}")),
        ("speedup [95 %]", lambda r: with_interval(r["speedup"], r["ci"]["speedup"], "{:.2f}×")),
        ("draft %", lambda r: _pct(r["time_split"]["draft"])),
        ("verify %", lambda r: _pct(r["time_split"]["verify"])),
        ("other %", lambda r: _pct(r["time_split"]["other"])),
        ("= AR", lambda r: f"{r['identical_outputs']}/{r['generations']}" if r["temperature"] == 0 else "-"),
        ("1st diff", lambda r: cell(r.get("first_divergence_mean"), "{:.1f}") if r["temperature"] == 0 else "-"),
    ]


def depth_rows(rows: list[dict]) -> list[dict]:
    """One row per result row x depth reached, for acceptance_columns(); the result row is under "of"."""
    return [{"of": r, "depth": d, "cycles": n, "rate": a, "ci": ci}
            for r in rows
            for d, (a, n, ci) in enumerate(zip(r["accept_by_depth"], r["depth_attempted"], r["ci"]["accept_by_depth"]), 1)
            if n]


def acceptance_columns() -> list[Column]:
    """The acceptance-by-depth table's columns after the row's name (cells of depth_rows() rows)."""
    return [("T", lambda x: f"{x['of']['temperature']:g}"),
            ("depth", lambda x: str(x["depth"])),
            ("cycles reaching it", lambda x: str(x["cycles"])),
            ("acceptance [95 %]", lambda x: with_interval(x["rate"], x["ci"]))]


INTERVAL_NOTE = (f"[95 %]: percentile-bootstrap interval over prompts ({REPS} resamples, seed {SEED}; the ratio of "
                 "sums is recomputed on each resample); none with a single prompt. prompts / cycles: the prompts and "
                 "the speculative cycles (target forwards) behind the figures.")


def markdown(report: dict) -> str:
    """The Markdown report: a heading, the decoding table, acceptance by depth and, where timed,
    transformers' assisted peer."""
    rows = report["results"]
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
              f"machine: {m['device']} ({m['device_name']}), {m.get('torch_threads')} CPU threads (run.threads), "
              f"torch {m['torch']}, transformers {m['transformers']}, "
              f"{m['date']}"]
    if report.get("command"):
        lines.append(f"command: `{report['command']}`")
    lines.append("")
    name: Column = ("benchmark", lambda r: f"{r['benchmark']}{lossy}")
    lines += md_table([name, *decode_columns()], rows)
    lines += ["", "τ: generated tokens per target forward; = AR: turns whose output equals the autoregressive "
              "baseline's (T=0 only); 1st diff: mean position of the first differing token over the turns that "
              "differ; draft/verify/other: share of the speculative cycle's time. " + INTERVAL_NOTE]
    if any(r["temperature"] == 0 and r["identical_outputs"] < r["generations"] for r in rows):
        lines.append(FLOAT32_NOTE if report.get("verify_dtype", "float32") == "float32" else BF16_NOTE)
    skipped = [(r["benchmark"], r["temperature"], r["skipped"]) for r in rows if r.get("skipped")]
    for b, t, s in skipped:
        lines.append(f"- {b} T={t:g}: skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(s.items())))
    lines += ["", f"## acceptance by depth{lossy}", "",
              "Of the cycles whose draft reached depth d with depths 1..d-1 all accepted, the share that accepted "
              "depth d: a rate conditional on reaching the depth, so deep rates stand on fewer cycles. No interval "
              "where fewer than 2 prompts reached the depth or its cycles all accepted (or all rejected): every "
              "resample would then give the same rate.", ""]
    lines += md_table([("benchmark", lambda x: f"{x['of']['benchmark']}{lossy}"), *acceptance_columns()],
                      depth_rows(rows))
    peers = [r for r in rows if r.get("peer")]
    if peers:
        lines += ["", f"## transformers generate(assistant_model=...) (greedy){lossy}", "",
                  "| benchmark | tok/s assisted | tok/s greedy | speedup | output = greedy |", "|---|---|---|---|---|"]
        for r in peers:
            p = r["peer"]
            lines.append(f"| {r['benchmark']}{lossy} | {cell(p['tok_s_assisted'], '{:.1f}')} | "
                         f"{cell(p['tok_s_greedy'], '{:.1f}')} | {cell(p['speedup'], '{:.2f}×')} | "
                         f"{p['identical']}/{p['generations']} |")
    return "\n".join(lines) + "\n"


def _label(r: dict) -> str:
    return f"{r['benchmark']} T={r['temperature']:g}"


def _yerr(points: list[tuple[float, tuple[float, float] | None]]) -> list[list[float]]:
    """errorbar/bar yerr [[below], [above]] of (value, interval) pairs; 0 where there is no interval."""
    return [[v - ci[0] if ci else 0.0 for v, ci in points], [ci[1] - v if ci else 0.0 for v, ci in points]]


def acceptance_figure(report: dict):
    """Acceptance rate by depth with 95 % intervals (top) over the cycles that reached each depth (bottom):
    one series per benchmark x temperature, side by side at each depth."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in report["results"] if any(r["depth_attempted"])]
    fig, (ax, cx) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, height_ratios=[3, 1.4], layout="constrained")
    width = 0.8 / max(len(rows), 1)
    for j, r in enumerate(rows):
        pts = [(d, a, ci, n) for d, (a, ci, n) in
               enumerate(zip(r["accept_by_depth"], r["ci"]["accept_by_depth"], r["depth_attempted"]), 1) if n]
        shift = (j - (len(rows) - 1) / 2) * width  # side by side: intervals of different rows do not overlap
        xs = [d + shift for d, *_ in pts]
        line = ax.errorbar(xs, [a for _, a, _, _ in pts], yerr=_yerr([(a, ci) for _, a, ci, _ in pts]), marker="o",
                           capsize=3, label=_label(r))
        bars = cx.bar(xs, [n for *_, n in pts], width=width * 0.9, color=line[0].get_color())
        cx.bar_label(bars, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole numbers
    ax.set(ylabel="P(accept d | 1..d-1 accepted)", ylim=(0, 1.02))
    ax.set_title(_plot_title(report, "acceptance by depth"), fontsize=9)
    ax.grid(alpha=0.3)
    most = max((n for r in rows for n in r["depth_attempted"]), default=1)
    cx.set(xlabel="draft depth d", ylabel="cycles reaching d", ylim=(0, 1.25 * most))  # room for the counts
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # off the data
    fig.text(0.01, 0.005, "rate at depth d is conditional on the draft reaching d with 1..d-1 accepted; "
             "bars: 95 % bootstrap interval over prompts", fontsize=7, va="bottom")
    fig.get_layout_engine().set(h_pad=0.15)  # room for that note under the x axis
    return fig


def tau_figure(report: dict):
    """τ per benchmark with 95 % intervals: bars grouped by benchmark, one bar per temperature, each labelled
    with τ and the prompts / cycles behind it."""
    plt = _pyplot()
    rows = report["results"]
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    width = 0.8 / max(len(temps), 1)
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    top = 1.0
    for j, t in enumerate(temps):
        sel = [(i, r) for i, b in enumerate(benches) for r in rows
               if r["benchmark"] == b and r["temperature"] == t and r["tau"] is not None]
        xs = [i + (j - (len(temps) - 1) / 2) * width for i, _ in sel]
        pts = [(r["tau"], r["ci"]["tau"]) for _, r in sel]
        ax.bar(xs, [v for v, _ in pts], width=width, yerr=_yerr(pts), capsize=3, label=f"T={t:g}")
        for x, (v, ci), (_, r) in zip(xs, pts, sel):  # above the interval, not across it
            ax.annotate(f"{v:.2f}\n{r['prompts']} prompts\n{r['target_forwards']} cycles", (x, ci[1] if ci else v),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)
        top = max([top] + [ci[1] if ci else v for v, ci in pts])
    ax.set_xticks(range(len(benches)), benches)
    ax.set(ylabel="τ (tokens per target forward)", ylim=(0, top * 1.35))  # from 0; room for the bar labels
    ax.set_title(_plot_title(report, "τ per benchmark (95 % interval over prompts)"), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def plot_acceptance(report: dict, path: Path) -> Path:
    return _save(acceptance_figure(report), path)


def plot_tau(report: dict, path: Path) -> Path:
    return _save(tau_figure(report), path)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    write_json(paths["json"], report)
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
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
