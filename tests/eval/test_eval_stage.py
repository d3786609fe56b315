"""The eval stage's pieces: config errors, multi-turn conversations, prompt selection, the transformers
assisted-generation peer.

    python -m pytest -q tests/eval/test_eval_stage.py
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import TargetConfig
from eval.benchmarks import BenchPrompt, render_prompt
from eval.metrics import GenRecord
from eval.stage import converse, prompt_limit, select_prompts, time_assisted, validate


@pytest.fixture(scope="module")
def llama(tiny_target_dir):
    from drafters.target import load_target

    return load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")


@pytest.mark.parametrize("override,msg", [
    ("eval.temperatures=[0,-0.5]", "eval.temperatures has -0.5: temperatures must be >= 0 (0 = greedy)"),
    ("eval.benchmarks=[nope]", "unknown benchmark 'nope' in eval.benchmarks: choose from sharegpt_heldout"),
    ("eval.acceptance=greedy", "eval.acceptance='greedy': choose lossless, traversal or typical"),
    ("eval.top_p=0", "eval.top_p=0.0: must be in (0, 1]"),
    ("eval.tree.kind=bush", "eval.tree.kind='bush' is not a tree kind: use one of chain, static, dynamic, opt"),
])
def test_bad_eval_settings_fail_before_loading(cfg_for, override, msg):
    with pytest.raises(DraftsmithError) as e:
        validate(cfg_for("drafter=ngram", override))
    assert str(e.value).startswith(msg)


def test_missing_trained_drafter_says_run_train_first(cfg_for, tmp_path):
    cfg = cfg_for("drafter=eagle3", "run.name=x")
    with pytest.raises(DraftsmithError) as e:
        validate(cfg)
    assert str(e.value) == (f"no trained drafter at {tmp_path / 'runs' / 'x' / 'train' / 'final'}: "
                            "run stage=train first (it writes <run>/train/final) or set "
                            "drafter.checkpoint=<a drafter folder>")
    with pytest.raises(DraftsmithError, match=r"no trained drafter at .*/nowhere: run stage=train first"):
        validate(cfg_for("drafter=medusa", f"drafter.checkpoint={tmp_path / 'nowhere'}"))


def test_second_turn_is_asked_on_the_models_own_first_answer(llama):
    tok = llama.tokenizer
    answers = ["Paris is the capital.", "The sea is blue."]
    eos = llama.eos_token_ids

    def fake_gen(ids, generator):  # a "model" that answers from a script, then ends its turn
        text = answers[len(seen)]
        seen.append(ids)
        return GenRecord(new_tokens=1, wall_s=0.0, forwards=1, forward_tokens=1, tokens=tok(text)["input_ids"] + [eos[0]])

    seen: list = []
    log: list = []
    p = BenchPrompt(id="1", turns=["What is the capital of France?", "Explain it simply."], benchmark="mtbench")
    recs = converse(fake_gen, p, llama, limit=500, seed=0, skipped=Counter(), prompt_log=log)
    assert len(recs) == 2 and log == seen
    second = tok.decode(seen[1])
    assert second == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\nParis is the capital.<|im_end|>\n"
                      "<|im_start|>user\nExplain it simply.<|im_end|>\n<|im_start|>assistant\n")
    # a follow-up over the context limit ends the conversation, counted
    seen.clear()
    skipped: Counter = Counter()
    first_len = len(render_prompt(tok, llama.chat_template, [{"role": "user", "content": p.turns[0]}]))
    recs = converse(fake_gen, p, llama, limit=first_len, seed=0, skipped=skipped)
    assert len(recs) == 1 and skipped == Counter({f"turn 2 over {first_len} context tokens": 1})


def test_select_prompts_skips_long_ones_and_counts_them(cfg_for, llama, tmp_path):
    q = tmp_path / "question.jsonl"
    rows = [{"question_id": 1, "turns": ["short question"]}, {"question_id": 2, "turns": ["long " * 200]},
            {"question_id": 3, "turns": ["another short one", "and a follow-up"]}, {"question_id": 4, "turns": ["x"]}]
    q.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = cfg_for("drafter=ngram", f"eval.mtbench_path={q}", "eval.num_prompts=2")
    chosen, skipped, report = select_prompts("mtbench", cfg, llama, limit=50)
    assert [p.id for p in chosen] == ["1", "3"] and skipped == Counter({"prompt over 50 tokens": 1})
    assert report.read == 3  # stopped once it had two


def test_prompt_limit_leaves_room_for_answer_and_tree(cfg_for, llama):
    # tiny llama: 512 positions; 16 new tokens (smoke) and a 60-node tree
    assert prompt_limit(cfg_for("drafter=ngram"), llama) == 512 - 16 - 60 - 1
    with pytest.raises(DraftsmithError, match="eval.max_new_tokens=500 plus the draft tree leaves no room"):
        prompt_limit(cfg_for("drafter=ngram", "eval.max_new_tokens=500"), llama)


def test_assisted_peer_matches_plain_greedy(llama, tiny_target_dir):
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(tiny_target_dir("llama", seed=1), dtype=torch.float32)
    tok = llama.tokenizer
    prompts = [render_prompt(tok, llama.chat_template, [{"role": "user", "content": q}])
               for q in ("Hello! How can I help?", "Write a poem about the sea.")]
    peer = time_assisted(llama, assistant, prompts, max_new_tokens=12)
    assert peer["generations"] == 2 and peer["identical"] == 2
    assert peer["new_tokens_assisted"] == peer["new_tokens_greedy"] > 0
    assert peer["tok_s_assisted"] > 0 and peer["tok_s_greedy"] > 0


def test_hf_assistant_is_found_for_independent_drafters_only(llama, tiny_target_dir, tmp_path):
    from transformers import PreTrainedModel

    from eval.stage import hf_assistant_model

    class Holder:  # a `small` drafter object holding its HF model
        def __init__(self, model=None):
            self.model = model

    assert hf_assistant_model(Holder(llama.model), tmp_path, llama) is llama.model
    (tmp_path / "drafter_config.json").write_text("{}")  # a feature drafter's folder: no HF config
    assert hf_assistant_model(Holder(), tmp_path, llama) is None
    folder = tiny_target_dir("llama", seed=1)  # an HF causal-LM folder
    m = hf_assistant_model(Holder(), Path(folder), llama)
    assert isinstance(m, PreTrainedModel) and m.device == llama.device


def test_heads_cap_a_deeper_tree_instead_of_failing(cfg_for, capsys):
    """4 Medusa heads under the default depth-5 dynamic tree: eval drafts 4 deep and says so, where the
    drafter itself would raise mid-decoding (after a whole training run)."""
    from types import SimpleNamespace

    from eval.stage import fit_tree

    cfg = cfg_for("drafter=medusa")
    assert cfg.eval.tree.depth == 5
    fit_tree(cfg, SimpleNamespace(max_depth=4))
    assert cfg.eval.tree.depth == 4
    assert "drafter medusa has 4 heads, so it drafts at most 4 tokens deep: eval.tree.depth 5 -> 4" in capsys.readouterr().out
    fit_tree(cfg, SimpleNamespace(max_depth=6))  # deeper heads: the tree is left alone
    fit_tree(cfg, SimpleNamespace())  # drafters without a depth limit
    assert cfg.eval.tree.depth == 4
    static = cfg_for("drafter=medusa", "eval.tree.kind=static", "eval.tree.paths=[[0],[0,0]]")
    fit_tree(static, SimpleNamespace(max_depth=1))  # static paths are the user's: the drafter's error stands
    assert static.eval.tree.depth == 5
