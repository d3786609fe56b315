"""The demo-target recipe (training/target_pretrain.py) and the committed assets/demo-target.

    python -m pytest -q tests/training/test_target_pretrain.py

A tiny run of the real stage (2 layers, 32 wide, 30 steps on 40 ShareGPT conversations) checks the folder
it writes; the degeneracy measures are checked against hand counts; the committed demo target is checked
against its own metrics.json and the README's claims.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import PROJECT_ROOT, TargetConfig, load_config
from drafters.target import load_target
from training.target_pretrain import (
    PackedStream,
    TokenCache,
    degeneracy,
    distinct_n,
    lr_at,
    repeated_ngram_rate,
    run,
    unigram_loss,
)
from training.tokenizer import IM_END, PAD

TINY = ["pretrain.vocab_size=320", "pretrain.num_layers=2", "pretrain.hidden_size=32",
        "pretrain.intermediate_size=64", "pretrain.num_heads=2", "pretrain.num_kv_heads=1", "pretrain.seq_len=64",
        "pretrain.batch_size=4", "pretrain.max_tokens=7680", "pretrain.max_conversations=40",
        "pretrain.tokenizer_conversations=40", "pretrain.heldout_prompts=4", "pretrain.gen_tokens=8",
        "pretrain.eval_every=10", "pretrain.eval_tokens=1024", "pretrain.warmup_steps=5", "pretrain.lr=1e-2",
        "pretrain.threads=1", "run.device=cpu"]
DEMO = PROJECT_ROOT / "assets" / "demo-target"
METRIC_FIELDS = {"parameters", "tokens_seen", "train_seconds", "tokens_per_s", "heldout_loss",
                 "heldout_nats_per_byte", "heldout_unigram_loss", "degeneracy", "machine", "architecture", "heldout_curve", "train_curve"}


def _tiny_cfg(tmp_path, *more):
    return load_config([f"run.root={tmp_path / 'runs'}", "stage=target_pretrain", *TINY, *more])


# --- degeneracy measures against hand counts --------------------------------------------------------
def test_distinct_2_hand_counts():
    assert distinct_n([[1, 2, 1, 2, 1]], 2) == 0.5  # 12 21 12 21 -> 2 different of 4
    # pooled over continuations, distinct counted within each: (2 + 1) / (2 + 3)
    assert distinct_n([[1, 2, 3], [4, 4, 4, 4]], 2) == pytest.approx(3 / 5)
    # the same bigram in two different continuations is not a repeat
    assert distinct_n([[1, 2], [1, 2]], 2) == 1.0
    assert distinct_n([[7], []], 2) is None  # no continuation has a bigram
    assert distinct_n([[7], [1, 2]], 2) == 1.0


def test_repeated_3gram_rate_hand_counts():
    assert repeated_ngram_rate([[5, 6, 7, 5, 6, 7, 5]], 3) == pytest.approx(2 / 5)  # 567 675 756 567 675
    assert repeated_ngram_rate([[1, 2, 3], [4, 4, 4, 4]], 3) == pytest.approx(1 / 3)  # (0 + 1) / (1 + 2)
    assert repeated_ngram_rate([[1, 2, 3, 4, 5, 6]], 3) == 0.0
    assert repeated_ngram_rate([[9, 9]], 3) is None
    assert repeated_ngram_rate([[3] * 10], 3) == pytest.approx(7 / 8)  # a loop: every 3-gram after the first


def test_degeneracy_summary():
    d = degeneracy([[1, 2, 1, 2], [3, 4]], [True, False])
    assert d == {"distinct_2": pytest.approx(3 / 4), "repeated_3gram_rate": pytest.approx(0.0),
                 "mean_new_tokens": 3.0, "eos_rate": 0.5}


def test_unigram_baseline_hand_counts():
    # counts 3,1,0,0 over 4 tokens, add-one smoothed: p = 4/8, 2/8, 1/8, 1/8; targets are positions 1..
    blocks = torch.tensor([[2, 0, 1]])
    assert unigram_loss(torch.tensor([3, 1, 0, 0]), blocks) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)


# --- pieces of the recipe --------------------------------------------------------------------------
def test_lr_warmup_then_cosine_to_floor():
    cfg = load_config(["pretrain.lr=1e-3", "pretrain.warmup_steps=10", "pretrain.min_lr_ratio=0.1"]).pretrain
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 10, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 10, 1.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 10, 3.0) == pytest.approx(1e-4)  # past the budget: stays at the floor


def test_packed_stream_joins_documents_with_endoftext(tiny_tokenizer):
    from data_gen.sources import Conversation

    convs = [Conversation(id=str(i), messages=[{"role": "user", "content": f"question {i}"},
                                               {"role": "assistant", "content": "answer " * (i + 1)}])
             for i in range(5)]
    cache = TokenCache(tiny_tokenizer, convs)
    docs = cache.get(range(5))
    sep = tiny_tokenizer.convert_tokens_to_ids(PAD)
    assert all(d[-1] == sep for d in docs)
    text = tiny_tokenizer.decode(docs[2].tolist())
    assert text == "<|im_start|>user\nquestion 2<|im_end|>\n<|im_start|>assistant\nanswer answer answer <|im_end|>\n<|endoftext|>"
    total = sum(len(d) for d in docs)
    stream = PackedStream(cache, seq_len=8, batch_size=2, seed=0, chunk=2)
    it = iter(stream)
    flat = torch.cat([next(it).flatten() for _ in range(total // 16)]).tolist()
    # the first epoch is the 5 documents back to back, in the seeded order
    import numpy as np

    order = np.random.default_rng(0).permutation(5).tolist()
    expected = sum((docs[i].tolist() for i in order), [])
    assert flat == expected[:len(flat)]


# --- a tiny run of the real stage ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    metrics = run(_tiny_cfg(tmp, f"pretrain.out_dir={tmp / 'target'}"))
    assert torch.get_num_threads() == threads  # pretrain.threads is restored afterwards
    return metrics, tmp / "target"


def test_tiny_run_folder_loads_as_a_chat_target(tiny_run):
    metrics, out = tiny_run
    target = load_target(TargetConfig(path=str(out)), device="cpu")
    tok = target.tokenizer
    assert len(tok) == 320 == target.vocab_size == target.config.vocab_size
    assert tok.eos_token == IM_END and tok.pad_token == PAD
    assert target.eos_token_ids == [tok.convert_tokens_to_ids(IM_END)]
    assert target.model.generation_config.pad_token_id == tok.convert_tokens_to_ids(PAD)
    assert target.config.tie_word_embeddings and target.num_layers == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert target.model.dtype == torch.float32  # small weights are stored in fp32
    n = sum(p.numel() for p in {id(p): p for p in target.model.parameters()}.values())
    assert metrics["parameters"] == n
    assert (out / "config.yaml").exists()  # the resolved config beside the output


def test_tiny_run_loss_went_down(tiny_run):
    metrics, _ = tiny_run
    curve = metrics["heldout_curve"]
    assert [c["step"] for c in curve] == [0, 10, 20, 30]
    assert curve[0]["loss"] == pytest.approx(math.log(320), abs=0.1)  # random init: ~uniform over the vocab
    assert metrics["heldout_loss"] < curve[0]["loss"] - 0.5
    assert metrics["train_curve"][-1]["loss"] < metrics["train_curve"][0]["loss"] - 0.3
    assert metrics["tokens_seen"] == 7680 and metrics["steps"] == 30 and metrics["stopped_by"] == "max_tokens"


def test_tiny_run_metrics_and_samples(tiny_run):
    metrics, out = tiny_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert METRIC_FIELDS <= set(on_disk) and on_disk["parameters"] == metrics["parameters"]
    deg = on_disk["degeneracy"]
    assert deg["prompts"] == 4 and deg["max_new_tokens"] == 8
    gens = json.loads((out / "continuations.json").read_text())
    for mode in ("greedy", "sampled"):
        assert len(gens[mode]) == 4 and all(len(g) <= 8 for g in gens[mode])
        assert deg[mode]["distinct_2"] == distinct_n(gens[mode], 2)
        assert deg[mode]["repeated_3gram_rate"] == repeated_ngram_rate(gens[mode], 3)
    samples = (out / "samples.md").read_text()
    assert samples.startswith("# Demo target samples") and samples.count("**greedy**") == 4


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("pretrain.max_minutes=0", "pretrain.max_minutes must be > 0 (got 0.0)"),
    ("pretrain.max_minutes=-5", "pretrain.max_minutes must be > 0 (got -5.0)"),
    ("pretrain.vocab_size=100", "pretrain.vocab_size=100 is below the 256 bytes + 3 special tokens"),
    ("pretrain.num_heads=3", "hidden_size must be a multiple of num_heads"),
    ("pretrain.gen_tokens=64", "pretrain.gen_tokens=64 leaves no room for a prompt in seq_len=64"),
    ("pretrain.save_dtype=fp8", "pretrain.save_dtype='fp8': use auto, float32 or bfloat16"),
])
def test_bad_settings_are_one_clear_error(tmp_path, override, message):
    with pytest.raises(DraftsmithError, match=re.escape(message)):
        run(_tiny_cfg(tmp_path, override))
    assert not (tmp_path / "runs").exists()  # rejected before anything was written


def test_unwritable_out_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DraftsmithError, match=r"pretrain.out_dir .*a-file/target is not writable .*"
                                              r"choose a folder you can write to"):
        run(_tiny_cfg(tmp_path, f"pretrain.out_dir={blocker / 'target'}"))


# --- the committed demo target --------------------------------------------------------------------
def test_committed_demo_target_matches_its_metrics():
    from safetensors import safe_open

    if not (DEMO / "config.json").exists():
        pytest.fail("assets/demo-target is missing: run `python train.py stage=target_pretrain pretrain=cpu "
                    "pretrain.out_dir=assets/demo-target`")
    metrics = json.loads((DEMO / "metrics.json").read_text())
    assert METRIC_FIELDS <= set(metrics)
    with safe_open(str(DEMO / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert n == metrics["parameters"]  # tied embeddings: the LM head is not stored twice
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"assets/demo-target is {size / 2**20:.1f} MB, over the 30 MB budget"
    target = load_target(TargetConfig(path="assets/demo-target"), device="cpu")
    arch = metrics["architecture"]
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (
        arch["num_layers"], arch["hidden_size"], arch["vocab_size"])
    assert len(target.tokenizer) == target.vocab_size and target.model.dtype == torch.float32
    assert target.eos_token_ids == [target.tokenizer.convert_tokens_to_ids(IM_END)]
    assert target.chat_template and target.num_layers >= 6
    gens = json.loads((DEMO / "continuations.json").read_text())
    for mode in ("greedy", "sampled"):
        assert len(gens[mode]) == metrics["degeneracy"]["prompts"] == 100
        assert metrics["degeneracy"][mode]["distinct_2"] == distinct_n(gens[mode], 2)
        assert metrics["degeneracy"][mode]["repeated_3gram_rate"] == repeated_ngram_rate(gens[mode], 3)


def test_readme_quotes_the_demo_target_metrics():
    """The README's demo-target section quotes metrics.json (same rounding as the section uses)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    m = re.search(r"^## The demo target\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    if not m:
        pytest.skip("README.md has no '## The demo target' section yet")
    section = m.group(1)
    metrics = json.loads((DEMO / "metrics.json").read_text())
    deg = metrics["degeneracy"]
    claims = [f"{metrics['parameters']:,}", f"{metrics['tokens_seen']:,}", f"{metrics['heldout_loss']:.2f}",
              f"{deg['greedy']['distinct_2']:.3f}", f"{deg['sampled']['distinct_2']:.3f}",
              f"{deg['greedy']['repeated_3gram_rate']:.3f}", f"{deg['sampled']['repeated_3gram_rate']:.3f}"]
    missing = [c for c in claims if c not in section]
    assert not missing, f"README's demo-target section does not quote {missing} from metrics.json"
