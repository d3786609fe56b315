"""train/curves.png: labelled axes, identical series drawn once, legends off the data, axes from 0 (tau_sim
from 1), checked on the matplotlib figure itself.

    python -m pytest -q tests/training/test_train_curves.py
"""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from training.tracking import curves_figure, distinct_series, plot_metrics


def _recs(evals: bool = True) -> list[dict]:
    """Ten train steps and two evaluations; loss/ce is logged equal to loss (as a one-term objective logs its
    total and its term), loss/kl is a different series."""
    out = []
    for s in range(1, 11):
        loss = 30.0 - s
        out.append({"step": s, "kind": "train", "loss": loss, "loss/ce": loss, "loss/kl": 0.1 * s, "lr": 1e-3 / s,
                    "acc/1": 0.05 * s, "acc/2": 0.02 * s})
        if evals and s % 5 == 0:
            out.append({"step": s, "kind": "eval", "loss": loss + 1, "loss/ce": loss + 1, "acc/1": 0.04 * s,
                        "acc/2": 0.01 * s, "tau_sim": 1.0 + 0.01 * s})
    return out


def _legend_right_of_data(fig, ax) -> bool:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return ax.get_legend().get_window_extent(r).x0 >= ax.get_window_extent(r).x1


def test_distinct_series_merges_only_identical_points():
    a = ("loss", [1, 2], [3.0, 2.0])
    assert distinct_series([a, ("loss/ce", [1, 2], [3.0, 2.0]), ("loss/kl", [1, 2], [0.1, 0.2]),
                            ("shifted", [2, 3], [3.0, 2.0])]) == [
        ("loss = loss/ce (identical)", [1, 2], [3.0, 2.0]), ("loss/kl", [1, 2], [0.1, 0.2]),
        ("shifted", [2, 3], [3.0, 2.0])]
    assert distinct_series([a]) == [a]


def test_curves_figure_reads_at_a_glance():
    fig = curves_figure(_recs())
    loss, lr, acc, tau = fig.axes
    for ax in (loss, lr, acc, tau):
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() and ax.get_xlim()[0] == 0
    # loss: the total and its identical term drawn once, the other term, held-out; axis from 0
    assert [ln.get_label() for ln in loss.get_lines()] == ["train loss = train loss/ce (identical)", "train loss/kl",
                                                           "held-out loss"]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [ln.get_label() for ln in loss.get_lines()]
    assert loss.get_ylim() == (0, pytest.approx(29 * 1.05))
    assert lr.get_ylim()[0] == 0 and lr.get_legend() is None
    # accuracy: one colour per depth, train and held-out lines, a legend of depths and of the two styles
    assert len(acc.get_lines()) == 4 and acc.get_ylim() == (0, 1)
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["depth 1", "depth 2", "train", "held-out"]
    colors = [tuple(ln.get_color()) for ln in acc.get_lines()]
    assert colors[0] == colors[1] != colors[2] == colors[3]
    # tau_sim from 1 (nothing accepted) to at least 2: a rise of 0.1 is not stretched over the whole panel
    assert tau.get_ylim() == (1, 2) and list(tau.get_lines()[0].get_ydata()) == [1.05, 1.1]
    assert _legend_right_of_data(fig, loss) and _legend_right_of_data(fig, acc)
    plt.close(fig)


def test_curves_without_held_out_evaluation_say_so(tmp_path):
    fig = curves_figure(_recs(evals=False))
    loss, _, _, tau = fig.axes
    assert [ln.get_label() for ln in loss.get_lines()] == ["train loss = train loss/ce (identical)", "train loss/kl"]
    assert not tau.get_lines() and [t.get_text() for t in tau.texts] == [
        "no held-out evaluation in this run\n(train.eval_every=0)"]
    plt.close(fig)
    jsonl = tmp_path / "metrics.jsonl"
    assert plot_metrics(jsonl, tmp_path / "curves.png") is None  # nothing logged: no plot
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _recs()))
    png = plot_metrics(jsonl, tmp_path / "train" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
