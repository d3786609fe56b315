"""experiment=gpu_demo and pretrain=gpu_demo: the chain that makes its own target, at toy size on the CPU.

    python -m pytest -q tests/training/test_gpu_demo.py

The real chain (train.py's run_stages, in this process) with every budget shrunk: target_pretrain reusing the
demo tokenizer, data_gen regenerating answers with that fresh target, EAGLE-3 training (whose memory plan
waits for the target's folder), eval in exact mode, export. Then the suite's report turns it into the demo
block. About 30 s on one CPU thread.
"""
from __future__ import annotations

import json

import pytest

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT, load_config

TOY = ["run.device=cpu", "pretrain.num_layers=4", "pretrain.hidden_size=64", "pretrain.intermediate_size=128",
       "pretrain.num_heads=4", "pretrain.num_kv_heads=2", "pretrain.seq_len=128", "pretrain.batch_size=4",
       "pretrain.max_tokens=2048", "pretrain.max_conversations=100", "pretrain.eval_tokens=2048",
       "pretrain.heldout_prompts=2", "pretrain.gen_tokens=8", "pretrain.threads=1", "data.max_conversations=6",
       "data.max_length=96", "data.gen_max_new_tokens=8", "data.batch_size=3", "train.max_steps=2",
       "train.micro_batch_size=2", "train.eval_every=0", "train.save_every=2", "train.eval_rows=2",
       "eval.num_prompts=1", "eval.max_new_tokens=8", "eval.tree.depth=3", "eval.tree.top_k=2",
       "eval.tree.total_tokens=6", "export.check_prompts=1"]


def test_presets_say_what_the_gpu_demo_is():
    """The experiment chains target_pretrain first and points target.path at its folder; the target preset is
    >= 300M parameters (deep, GQA), reuses the demo tokenizer and stops its loop within 3 minutes; regenerated
    answers, exact eval. pretrain=cpu (the committed demo target's recipe) is untouched."""
    cfg = load_config(["experiment=gpu_demo", "run.root=/r"])
    assert cfg.stages == ["target_pretrain", "data_gen", "train", "eval", "export"]
    assert cfg.target.path == "/r/gpu-demo/target_pretrain" and cfg.data.regenerate and cfg.eval.exact
    p = cfg.pretrain
    vocab = 4096  # the demo tokenizer's
    layer = 2 * p.hidden_size ** 2 + 2 * p.hidden_size * p.hidden_size // p.num_heads * p.num_kv_heads + \
        3 * p.hidden_size * p.intermediate_size
    assert p.num_layers * layer + vocab * p.hidden_size >= 300e6 and p.num_kv_heads < p.num_heads
    assert p.tokenizer == "assets/demo-target" and p.max_minutes <= 2.5
    assert load_config(["pretrain=cpu"]).pretrain.hidden_size == 192 and load_config([]).pretrain.tokenizer is None


def test_a_tokenizer_without_the_chat_format_is_one_line(tmp_path):
    from training.target_pretrain import reuse_tokenizer

    assert len(reuse_tokenizer("assets/demo-target")) == 4096
    with pytest.raises(DraftsmithError, match=r"^pretrain.tokenizer=.*: no tokenizer loads from there"):
        reuse_tokenizer(str(tmp_path))


def test_toy_chain_trains_its_own_target_then_the_drafter(tmp_path):
    from bench.gpu_report import build
    from eval.report import machine_info
    from train import run_stages

    root = tmp_path / "runs"
    out = run_stages(load_config(["experiment=gpu_demo", f"run.root={root}", *TOY]))
    assert list(out) == ["target_pretrain", "data_gen", "train", "eval", "export"]
    run = root / "gpu-demo"
    meta = json.loads((run / "target_pretrain" / "metrics.json").read_text())
    assert meta["architecture"]["vocab_size"] == 4096 and meta["corpus"]["tokenizer_conversations"] == 0
    tok = (run / "target_pretrain" / "tokenizer.json").read_text()
    assert tok == (PROJECT_ROOT / "assets" / "demo-target" / "tokenizer.json").read_text()
    report = json.loads((run / "eval" / "eagle3" / "report.json").read_text())
    assert report["exact"] and report["results"][0]["identical_outputs"] == report["results"][0]["prompts"]
    assert out["train"]["steps"] == 2 and (run / "export").is_dir()
    # the suite's report: the demo block under its own key, the target's line and the eval table
    (tmp_path / "steps.tsv").write_text("demo\t0\t30\t480\tbash -c python3 train.py experiment=gpu_demo\n")
    key, md = build(tmp_path, machine_info("cpu"), "bash bench/gpu_suite.sh --demo", 30)
    assert key.endswith(" --demo") and "#### experiment=gpu_demo" in md and "| demo | ok | 30 |" in md
    assert "M parameters (4 layers x 64" in md and "| eagle3 | dynamic:3:2:6 | 0 |" in md
    assert "Default pipeline" not in md
