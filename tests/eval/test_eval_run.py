"""The eval stage end to end on a tiny target: train.py stage=eval, exact tau for the self-drafting target,
the LOSSY flag of typical acceptance, and the one-line errors a user sees.

    python -m pytest -q tests/eval/test_eval_run.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT
from eval.report import LOSSY

FAST = ["eval.tree.kind=chain", "eval.tree.depth=3", "eval.max_new_tokens=8", "eval.num_prompts=1",
        "eval.max_prompt_tokens=160", "eval.warmup=0"]


def _train_py(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_train_py_stage_eval_prints_the_table(tiny_target_dir, tmp_path):
    p = _train_py("stage=eval", "drafter=ngram", "experiment=smoke", f"target.path={tiny_target_dir('llama')}",
                  f"run.root={tmp_path}", "run.device=cpu", *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "| benchmark | T | prompts | cycles | τ [95 %] | tok/s spec | tok/s AR | speedup [95 %] |" in out
    assert "| benchmark | T | depth | cycles reaching it | acceptance [95 %] |" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("| sharegpt_heldout | 0 | 1 |"))
    assert row.endswith("| 1/1 | - |")  # lossless: greedy speculative output == greedy autoregressive output
    d = tmp_path / "smoke" / "eval" / "ngram"
    rep = json.loads((d / "report.json").read_text())
    r = rep["results"][0]
    assert r["identical_outputs"] == r["generations"] == 1
    # one prompt: its sums are kept, and there is no interval to give
    assert len(r["per_prompt"]["prompt_ids"]) == 1 and r["per_prompt"]["cycles"] == [r["target_forwards"]]
    assert r["ci"]["tau"] is None and r["ci"]["speedup"] is None
    assert f"(1 prompts, {r['target_forwards']} cycles)" in out
    assert rep["machine"]["device"] == "cpu" and rep["config"]["drafter"]["name"] == "ngram"
    assert (d / "report.md").read_text() in out
    for f in ("acceptance_by_depth.png", "tau.png", "config.yaml"):
        assert (d / f).stat().st_size > 0


def test_train_py_negative_temperature_is_one_error_line(tiny_target_dir, tmp_path):
    p = _train_py("stage=eval", "drafter=ngram", f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path}",
                  "eval.temperatures=[0,-1]")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("error: eval.temperatures has -1.0: temperatures must be >= 0 "
                                                 "(0 = greedy)")
    assert "Traceback" not in p.stderr


def test_self_drafting_target_has_exact_tau(cfg_for):
    from eval.stage import run

    rep = run(cfg_for("drafter=target", *FAST))["report"]
    r = rep["results"][0]
    assert r["tau"] == 4.0  # a depth-3 chain of the target's own argmax: every draft accepted
    assert r["accept_by_depth"] == [1.0, 1.0, 1.0] and r["identical_outputs"] == r["generations"] == 1


def test_exact_mode_on_a_bf16_target(cfg_for):
    """eval.exact=true with a bf16 target: verification, baseline and the self-drafting target run on its
    float32 copy (tau = depth + 1, = AR), and the report says so."""
    from eval.stage import run

    res = run(cfg_for("drafter=target", "target.dtype=bfloat16", "eval.exact=true", *FAST))
    rep, r = res["report"], res["report"]["results"][0]
    assert (rep["exact"], rep["verify_dtype"]) == (True, "float32")
    assert r["tau"] == 4.0 and r["identical_outputs"] == r["generations"] == 1
    assert "target verifies in float32 (eval.exact)" in res["paths"]["md"].read_text()


def test_typical_acceptance_is_flagged_lossy_in_every_output(cfg_for, capsys, tmp_path):
    from eval.stage import run

    q = tmp_path / "question.jsonl"  # MT-bench: both turns are generated, the second on the first answer
    q.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}))
    res = run(cfg_for("drafter=ngram", "eval.acceptance=typical", "eval.temperatures=[0.7]", "eval.benchmarks=[mtbench]",
                      f"eval.mtbench_path={q}", *FAST))
    out = capsys.readouterr().out
    assert res["report"]["results"][0]["generations"] == 2
    assert f"eval [{LOSSY}]: mtbench T=0.7" in out
    table = [ln for ln in out.splitlines() if ln.startswith("| mtbench")]
    assert table and all(f"mtbench {LOSSY} |" in ln for ln in table)
    assert next(ln for ln in out.splitlines() if ln.startswith("# draftsmith eval")).endswith(f"[{LOSSY}]")
    assert json.loads(res["paths"]["json"].read_text())["lossy"] is True


def test_vocab_mismatch_reaches_the_user_as_one_line(cfg_for):
    from drafters.reference import NgramDrafter
    from drafters.target import load_target
    from eval.stage import make_decoder

    cfg = cfg_for("drafter=ngram")
    target = load_target(cfg.target, "cpu")
    with pytest.raises(DraftsmithError) as e:
        make_decoder(cfg, target, NgramDrafter(vocab_size=target.vocab_size + 7), 0.0)
    assert "\n" not in str(e.value) and f"has vocab {target.vocab_size + 7}" in str(e.value)


def test_trained_drafter_is_loaded_from_the_run_directory(cfg_for):
    """A (randomly initialised) EAGLE-3 saved where stage=train leaves it: eval loads it through the registry,
    and greedy speculative decoding still reproduces the target exactly."""
    from conf.schema import run_dir
    from drafters.eagle3 import Eagle3Drafter
    from drafters.target import load_target
    from eval.stage import run

    cfg = cfg_for("drafter=eagle3", "drafter.draft_vocab_size=null", *FAST)
    target = load_target(cfg.target, "cpu")
    Eagle3Drafter.from_target(cfg.drafter, target).save_pretrained(run_dir(cfg) / "train" / "final", target)
    r = run(cfg)["report"]["results"][0]
    assert r["identical_outputs"] == r["generations"] == 1 and r["tau"] >= 1.0
    assert r["peer"] is None  # a feature drafter has no HF model for transformers' assisted generation


def test_small_drafter_is_timed_against_transformers_assisted_generation(cfg_for):
    from conf.schema import run_dir
    from drafters.small_lm import SmallDrafter
    from drafters.target import load_target
    from eval.stage import run

    cfg = cfg_for("drafter=small", "eval.temperatures=[0,1]", *FAST)
    target = load_target(cfg.target, "cpu")
    SmallDrafter.from_target(cfg.drafter, target).save_pretrained(run_dir(cfg) / "train" / "final")
    res = run(cfg)
    greedy, sampled = res["report"]["results"]
    assert greedy["identical_outputs"] == greedy["generations"] == 1
    peer = greedy["peer"]
    assert peer["identical"] == peer["generations"] == 1 and peer["tok_s_assisted"] > 0
    assert sampled["peer"] is None  # transformers' assisted generation is timed greedy only
    assert "## transformers generate(assistant_model=...) (greedy)" in res["paths"]["md"].read_text()
