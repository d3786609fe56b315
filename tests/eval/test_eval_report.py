"""Eval metrics (tau, acceptance by depth, speedup, time split) and the report files (JSON, Markdown, PNG).

    python -m pytest -q tests/eval/test_eval_report.py
"""
from __future__ import annotations

import json

import pytest

from eval.metrics import GenRecord, acceptance_by_depth, first_divergence, summarize
from eval.report import BF16_NOTE, FLOAT32_NOTE, LOSSY, LOSSY_NOTE, _plot_title, markdown, write_report


def _records():
    # 4 + 4 cycles of depth-3 drafts: depth 1 tried 8 times, accepted 5; depth 2 tried 5, accepted 2; ...
    spec = [GenRecord(new_tokens=10, wall_s=1.0, forwards=4, forward_tokens=10, depth_attempted=[4, 3, 2],
                      depth_accepted=[3, 2, 1], draft_s=0.2, verify_s=0.6, other_s=0.2, tokens=[1, 2, 3]),
            GenRecord(new_tokens=6, wall_s=0.5, forwards=4, forward_tokens=6, depth_attempted=[4, 2],
                      depth_accepted=[2, 0], draft_s=0.1, verify_s=0.3, other_s=0.1, tokens=[4, 5])]
    ar = [GenRecord(new_tokens=10, wall_s=2.0, forwards=9, forward_tokens=9, tokens=[1, 2, 3]),
          GenRecord(new_tokens=6, wall_s=1.0, forwards=5, forward_tokens=5, tokens=[4, 6])]
    return spec, ar


def test_acceptance_by_depth_pools_cycles_over_generations():
    spec, _ = _records()
    assert acceptance_by_depth(spec) == [5 / 8, 2 / 5, 1 / 2]
    assert acceptance_by_depth([GenRecord(1, 0.1, 1, 1, [2, 0], [0, 0])]) == [0.0, None]  # never reached depth 2


def test_summarize_uses_ratios_of_sums():
    spec, ar = _records()
    s = summarize([spec[:1], spec[1:]], [ar[:1], ar[1:]])  # two prompts, one turn each
    assert s["tau"] == 2.0  # 16 tokens / 8 target forwards
    assert s["tok_s_spec"] == pytest.approx(16 / 1.5) and s["tok_s_ar"] == pytest.approx(16 / 3.0)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["accept_by_depth"] == [pytest.approx(5 / 8), pytest.approx(2 / 5), pytest.approx(1 / 2)]
    assert s["time_split"] == {"draft": pytest.approx(0.2), "verify": pytest.approx(0.6), "other": pytest.approx(0.2)}
    assert s["outside_target"] == pytest.approx(0.4)
    assert (s["identical_outputs"], s["generations"], s["target_forwards"]) == (1, 2, 8)
    assert s["first_divergence_mean"] == 1.0  # [4, 5] vs [4, 6]; the equal pair does not count


def test_first_divergence_on_hand_made_sequences():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([], []) is None
    assert first_divergence([7, 2, 3], [1, 2, 3]) == 0
    assert first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped (EOS) where the other went on
    assert first_divergence([1, 2, 3], [1]) == 1
    spec = [GenRecord(3, 1.0, 1, 3, tokens=t) for t in ([1, 2, 3], [1, 9, 3], [5, 6, 7, 8])]
    ar = [GenRecord(3, 1.0, 3, 3, tokens=t) for t in ([1, 2, 3], [1, 2, 3], [5, 6, 7, 0])]
    assert summarize([[s] for s in spec], [[a] for a in ar])["first_divergence_mean"] == pytest.approx((1 + 3) / 2)
    assert summarize([spec[:1]], [ar[:1]])["first_divergence_mean"] is None


def _report(lossy=False, temps=(0.0, 1.0)):
    spec, ar = _records()
    rows = [{"benchmark": b, "temperature": t, "prompts": 2, "skipped": {"prompt over 100 tokens": 1} if b == "gsm8k" else {},
             **summarize([spec[:1], spec[1:]], [ar[:1], ar[1:]]), "peer": None} for b in ("mtbench", "gsm8k") for t in temps]
    rows[0]["peer"] = {"generations": 2, "tok_s_assisted": 30.0, "tok_s_greedy": 20.0, "speedup": 1.5, "identical": 2}
    return {"drafter": {"name": "ngram", "checkpoint": None}, "target": "/tmp/tiny-llama", "lossy": lossy,
            "acceptance": "typical" if lossy else "lossless",
            "tree": {"kind": "chain", "depth": 3, "top_k": 8, "total_tokens": 60}, "max_new_tokens": 16,
            "machine": {"device": "cpu", "device_name": "x86_64", "torch": "2", "transformers": "5", "date": "today"},
            "config": {"eval": {"num_prompts": 2}}, "results": rows}


def test_markdown_table_rows():
    md = markdown(_report())
    lines = md.splitlines()
    assert lines[0] == "# draftsmith eval: drafter ngram on /tmp/tiny-llama"
    assert ("| benchmark | T | prompts | cycles | τ [95 %] | tok/s spec | tok/s AR | speedup [95 %] | draft % | "
            "verify % | other % | = AR | 1st diff |") in lines
    # two prompts: τ 2.5 and 1.5 alone, 2.0 pooled; both prompts have speedup exactly 2, so every resample does
    assert ("| mtbench | 0 | 2 | 8 | 2.00 [1.50, 2.50] | 10.7 | 5.3 | 2.00× [2.00×, 2.00×] | 20 | 60 | 20 | 1/2 "
            "| 1.0 |") in lines
    assert "| gsm8k | 1 | 2 | 8 | 2.00 [1.50, 2.50] | 10.7 | 5.3 | 2.00× [2.00×, 2.00×] | 20 | 60 | 20 | - | - |" in lines
    assert "- gsm8k T=0: skipped 1 (prompt over 100 tokens)" in lines
    assert "| mtbench | 30.0 | 20.0 | 1.50× | 2/2 |" in lines
    # acceptance by depth, one line per depth with the cycles behind it: depth 1 is 3/4 and 2/4 (resamples
    # 0.5, 0.625, 0.75); depth 2 is 2/3 and 0/2; depth 3 was reached by one prompt only: no interval
    i = lines.index("| benchmark | T | depth | cycles reaching it | acceptance [95 %] |")
    assert lines[i + 2:i + 5] == ["| mtbench | 0 | 1 | 8 | 0.62 [0.50, 0.75] |", "| mtbench | 0 | 2 | 5 | 0.40 [0.00, 0.67] |",
                                  "| mtbench | 0 | 3 | 2 | 0.50 |"]
    assert "conditional on reaching the depth" in md and "percentile-bootstrap interval over prompts" in md
    assert LOSSY not in md


def test_report_columns_are_a_list_to_extend():
    from eval.report import decode_columns, md_table

    rows = _report()["results"][:1]
    cols = [("benchmark", lambda r: r["benchmark"]), *decode_columns(), ("new", lambda r: "x")]
    head, rule, line = md_table(cols, rows)
    assert head.endswith("| = AR | 1st diff | new |") and rule == "|" + "---|" * 14 and line.endswith("| 1/2 | 1.0 | x |")


def test_differing_greedy_outputs_are_explained_by_the_verify_dtype():
    """A T=0 row whose outputs differ gets one line saying why: bf16 summation order, or (float32) a near-tie."""
    rep = _report()
    assert FLOAT32_NOTE in markdown(rep) and BF16_NOTE not in markdown(rep)  # no dtype recorded: float32
    rep["verify_dtype"] = "bfloat16"
    md = markdown(rep)
    assert BF16_NOTE in md and FLOAT32_NOTE not in md and "target verifies in bfloat16" in md
    for r in rep["results"]:
        r["identical_outputs"] = r["generations"]
    assert BF16_NOTE not in markdown(rep)


def test_typical_acceptance_is_flagged_lossy_everywhere(tmp_path):
    rep = _report(lossy=True)
    md = markdown(rep)
    assert md.splitlines()[0].endswith(f"[{LOSSY}]") and LOSSY_NOTE in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| mtbench") or ln.startswith("| gsm8k")]
    # 4 decoding rows, 4 x 3 acceptance-by-depth rows, 1 assisted-peer row
    assert len(rows) == 17 and all(f" {LOSSY} |" in ln.split("|", 2)[1] + "|" for ln in rows)
    assert f"## acceptance by depth {LOSSY}" in md
    assert "## transformers generate(assistant_model=...) (greedy) LOSSY" in md
    assert LOSSY in _plot_title(rep, "tau") and LOSSY not in _plot_title(_report(), "tau")
    paths = write_report(rep, tmp_path)
    assert json.loads(paths["json"].read_text())["lossy"] is True


def test_write_report_files(tmp_path):
    rep = _report()
    paths = write_report(rep, tmp_path / "eval" / "ngram")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(rep))
    assert paths["md"].read_text() == markdown(rep)
    for key in ("acceptance_png", "tau_png"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bench_decode_updates_only_its_own_section(tmp_path):
    import importlib.util

    from conf.schema import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("bench_decode", PROJECT_ROOT / "bench" / "bench_decode.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n")
    a = "<!-- bench_decode: cpu | demo -->\nold A\n<!-- /bench_decode -->"
    b = "<!-- bench_decode: cuda:0 | demo -->\nB\n<!-- /bench_decode -->"
    bd.update_markdown(md, "cpu | demo", a)
    bd.update_markdown(md, "cuda:0 | demo", b)
    bd.update_markdown(md, "cpu | demo", a.replace("old A", "new A"))
    assert md.read_text() == "# Benchmarks\n\nintro\n\n" + a.replace("old A", "new A") + "\n\n" + b + "\n"
    assert bd.tree_overrides("dynamic:5:8:60") == ["eval.tree.kind=dynamic", "eval.tree.depth=5", "eval.tree.top_k=8",
                                                   "eval.tree.total_tokens=60"]


def _outside(fig, ax) -> bool:
    """Whether ax's legend lies wholly right of ax's data area (drawn, so the extents are real)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return ax.get_legend().get_window_extent(r).x0 >= ax.get_window_extent(r).x1


def test_acceptance_figure_shows_the_cycles_behind_each_conditional_rate():
    import matplotlib.pyplot as plt

    from eval.report import acceptance_figure

    fig = acceptance_figure(_report(temps=(0.0,)))
    ax, cx = fig.axes
    assert ax.get_ylabel() == "P(accept d | 1..d-1 accepted)" and ax.get_ylim() == (0, 1.02)
    assert (cx.get_xlabel(), cx.get_ylabel(), cx.get_ylim()) == ("draft depth d", "cycles reaching d", (0, 10))
    # the bottom panel: cycles that reached depths 1, 2, 3, per series, as bars labelled with the count
    assert [p.get_height() for p in cx.patches] == [8, 5, 2, 8, 5, 2]
    assert [t.get_text() for t in cx.texts] == ["8", "5", "2"] * 2
    assert any("conditional on the draft reaching d" in t.get_text() for t in fig.texts)
    # error bars = the report's intervals (depth 3: one prompt reached it, no bar)
    first = ax.containers[0]
    segments = first.lines[2][0].get_segments()
    assert [tuple(s[:, 1]) for s in segments] == [(0.5, 0.75), (0.0, pytest.approx(2 / 3)), (0.5, 0.5)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mtbench T=0", "gsm8k T=0"]
    assert _outside(fig, ax)
    plt.close(fig)


def test_tau_figure_labels_each_bar_with_its_prompts_and_cycles():
    import matplotlib.pyplot as plt

    from eval.report import tau_figure

    fig = tau_figure(_report())
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "τ (tokens per target forward)"
    assert [t.get_text() for t in ax.texts] == ["2.00\n2 prompts\n8 cycles"] * 4
    assert [t.xy[1] for t in ax.texts] == [2.5] * 4  # above the interval's top, not across the error bar
    bars = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert [tuple(s[:, 1]) for c in bars for s in c.errorbar.lines[2][0].get_segments()] == [(1.5, 2.5)] * 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T=0", "T=1"] and _outside(fig, ax)
    plt.close(fig)


def test_bench_decode_table_is_the_reports_with_drafter_and_tree():
    import importlib.util

    from conf.schema import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("bench_decode", PROJECT_ROOT / "bench" / "bench_decode.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    rows = [{"drafter": "ngram", "tree": "chain:3", **r} for r in _report(temps=(0.0,))["results"][:1]]
    lines = bd.table(rows).splitlines()
    assert lines[2] == ("| ngram | chain:3 | 0 | 2 | 8 | 2.00 [1.50, 2.50] | 10.7 | 5.3 | 2.00× [2.00×, 2.00×] | 20 | 60 "
                        "| 20 | 1/2 | 1.0 |")
    assert lines[-3:] == ["| ngram | chain:3 | 0 | 1 | 8 | 0.62 [0.50, 0.75] |",
                          "| ngram | chain:3 | 0 | 2 | 5 | 0.40 [0.00, 0.67] |", "| ngram | chain:3 | 0 | 3 | 2 | 0.50 |"]
