"""The data_gen stage in-process on tiny targets: rows, accounting, token counts, target identity,
the feature/logit cache against a fresh forward, regeneration turn by turn, and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conf.errors import DraftsmithError
from data_gen.output import check_same_target, load_dataset_dir, load_token_counts, read_meta
from data_gen.render import render_conversation
from data_gen.stage import run
from tests.data_util import CONVS, write_jsonl


@pytest.fixture
def chats(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl")


def messages(k):
    return [{"role": r, "content": t} for r, t in CONVS[k]]


def load(path):
    from conf.schema import TargetConfig
    from drafters.target import load_target

    return load_target(TargetConfig(path=path), device="cpu")


def test_rows_accounting_counts_and_identity(cfg_for, chats, tiny_target_dir):
    cfg = cfg_for("data=jsonl", f"data.path={chats}", "data.max_length=64", "data.shard_rows=2", "data.batch_size=2")
    res = run(cfg)
    ds = load_dataset_dir(res.data_dir)
    target = load(tiny_target_dir("llama"))
    tok = target.tokenizer
    kept = [0, 1, 3, 4, 5]
    assert ds["conv_index"] == list(range(5)) and ds["conv_id"] == [f"c{k}" for k in kept]
    for row, k in zip(ds, kept):
        want, _ = render_conversation(tok, messages(k), tok.chat_template, [tok.eos_token_id], 64)
        assert row["input_ids"] == want.input_ids and row["loss_mask"] == want.loss_mask
        assert row["truncated"] == want.truncated and row["source"] == "jsonl" and not row["regenerated"]
    assert ds["num_turns"] == [1, 2, 2, 1, 1]
    acc = res.accounting
    assert acc["read"] == 6 == acc["written"] + sum(acc["skipped"].values())
    assert acc["skipped"] == {"no assistant turn": 1} and acc["truncated_rows"] == sum(ds["truncated"]) > 0
    # token counts over assistant tokens only
    counts = load_token_counts(res.data_dir)
    want = np.zeros(target.vocab_size, dtype=np.int64)
    for row in ds:
        for i, m in zip(row["input_ids"], row["loss_mask"]):
            want[i] += m
    assert counts.dtype == torch.int64 and counts.tolist() == want.tolist()
    assert res.assistant_tokens == int(want.sum()) and res.tokens == sum(len(x) for x in ds["input_ids"])
    assert (res.rows, res.tokens_per_s > 0) == (5, True)
    # the target's identity guards the train stage
    check_same_target(res.data_dir, target)
    check_same_target(res.data_dir, load(tiny_target_dir("llama")))  # a reload is the same target
    from conf.schema import TargetConfig
    from drafters.target import load_target

    check_same_target(res.data_dir, load_target(TargetConfig(path=tiny_target_dir("llama"), dtype="bfloat16"),
                                                device="cpu"))  # so is another load dtype
    with pytest.raises(DraftsmithError, match=r"was made with target .*tiny-llama.* not .*tiny-qwen2.*: rerun data_gen"):
        check_same_target(res.data_dir, load(tiny_target_dir("qwen2")))
    meta = read_meta(res.data_dir)
    assert meta["target"]["vocab_size"] == target.vocab_size and meta["cache"] is None
    from pathlib import Path

    assert (Path(res.data_dir) / "config.yaml").exists()
    # a rerun of a finished run does nothing; other row settings are refused
    again = run(cfg)
    assert (again.rows, again.tokens) == (res.rows, res.tokens)
    with pytest.raises(DraftsmithError, match=r"made with other settings \(data.max_length: 64 -> 32\)"):
        run(cfg_for("data=jsonl", f"data.path={chats}", "data.max_length=32", "data.shard_rows=2"))
    with pytest.raises(DraftsmithError, match=r"made with other settings \(target.fingerprint: .*; target.path: "):
        run(cfg_for("data=jsonl", f"data.path={chats}", "data.max_length=64", arch="qwen2"))


# data_gen's cache comes from its batched, padded forwards; the tests compare it with an unbatched forward.
# Their float32 logits differ in the last bits (other kernels and blockings: AVX-512 vs AVX2 CPUs), so two
# tokens within that distance may swap ranks. Rankings are therefore compared by value: the token ranked j-th
# must hold the j-th largest fresh logit up to TIE (1e-3: a hundred times the float32 differences seen here).
TIE = 1e-3


def assert_ranked_like(indices: torch.Tensor, logits: torch.Tensor, tol: float = TIE) -> None:
    """indices [n, k] rank the tokens of logits [n, V] as its top-k does, ties within `tol` either way."""
    k = indices.shape[-1]
    assert all(len(set(row)) == k for row in indices.tolist())  # k different tokens per row
    want = logits.topk(k, dim=-1).values
    got = logits.gather(-1, indices.long())
    assert (got - want).abs().max() <= tol, (got - want).abs().max()


def test_cache_equals_a_fresh_target_forward(cfg_for, chats, tiny_target_dir):
    from data_gen.cache import CachedFeatures, dense_topk
    from drafters.base import topk_to_logits

    res = run(cfg_for("data=jsonl", f"data.path={chats}", "data.max_length=96", "data.batch_size=3",
                      "data.cache_features=true", "data.cache_topk=5", "data.shard_rows=4", arch="qwen2"))
    target = load(tiny_target_dir("qwen2"))
    ds = load_dataset_dir(res.data_dir)
    cache = CachedFeatures(res.data_dir)
    assert len(cache) == len(ds) == 5
    for r in range(len(ds)):
        ids, mask = ds[r]["input_ids"], ds[r]["loss_mask"]
        item = cache[r]
        fresh = target(torch.tensor([ids]))
        assert item["features"].dtype == torch.bfloat16 and item["features"].shape == (len(ids), 3 * target.hidden_size)
        torch.testing.assert_close(item["features"].float(), fresh.features[0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(item["last_hidden"].float(), fresh.last_hidden[0], rtol=1e-2, atol=1e-2)
        pos = [t for t in range(len(ids) - 1) if mask[t + 1]]
        assert item["topk_positions"].tolist() == pos
        v = fresh.logits[0, pos].topk(5, dim=-1).values
        assert item["topk_indices"].dtype == torch.int32
        assert_ranked_like(item["topk_indices"], fresh.logits[0, pos])
        torch.testing.assert_close(item["topk_values"].float(), v, rtol=1e-2, atol=1e-2)
        values, indices = dense_topk(item, len(ids))
        dense = topk_to_logits(values, indices, target.vocab_size)
        assert torch.isfinite(dense.logsumexp(-1)).all()  # every position is a valid distribution
        # the cached values are bf16: two top logits closer than its rounding (2^-8 relative each) may tie there
        bf16_tie = 2 ** -7 * float(v.abs().max()) + TIE
        assert_ranked_like(dense[pos].argmax(-1, keepdim=True), fresh.logits[0, pos], bf16_tie)
    meta = read_meta(res.data_dir)
    assert meta["cache"]["bytes_per_token"] == res.cache_bytes_per_token > 2 * 4 * target.hidden_size
    check_same_target(res.data_dir, target)
    from conf.schema import TargetConfig
    from drafters.target import load_target

    other_taps = load_target(TargetConfig(path=tiny_target_dir("qwen2"), feature_layers=[1, 3]), device="cpu")
    with pytest.raises(DraftsmithError, match=r"tapped at layers \[1, 2, 3\], but target.feature_layers gives "
                                              r"\[1, 3\]: set target.feature_layers=\[1,2,3\] or rerun data_gen"):
        check_same_target(res.data_dir, other_taps)
    with pytest.raises(IndexError):
        cache[len(ds)]


def _greedy(target, ids, n):
    out = target.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=target.eos_token_ids, pad_token_id=target.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    eos = set(target.eos_token_ids)
    stop = next((j for j, t in enumerate(new) if t in eos), None)
    return target.tokenizer.decode(new[:stop] if stop is not None else new)


def test_regeneration_is_turn_by_turn(cfg_for, chats, tiny_target_dir):
    res = run(cfg_for("data=jsonl", f"data.path={chats}", "data.max_length=512", "data.regenerate=true",
                      "data.gen_max_new_tokens=6", "data.batch_size=3"))
    ds = load_dataset_dir(res.data_dir)
    assert all(ds["regenerated"]) and res.accounting["this_run"]["generated_tokens"] > 0
    target = load(tiny_target_dir("llama"))
    tok = target.tokenizer
    for r, k in ((1, 1), (2, 3)):  # the two-turn conversations, redone by hand with batch-1 generate
        msgs = messages(k)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":  # turn i's prompt holds the regenerated earlier answers
                prompt = tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True)["input_ids"]
                msgs[i] = {"role": "assistant", "content": _greedy(target, list(prompt), 6)}
        want, _ = render_conversation(tok, msgs, tok.chat_template, target.eos_token_ids, 512)
        assert ds[r]["input_ids"] == want.input_ids and ds[r]["loss_mask"] == want.loss_mask
        assert msgs[-1]["content"] != messages(k)[-1]["content"]


def test_sampled_regeneration_does_not_depend_on_batching(cfg_for, chats):
    common = ["data=jsonl", f"data.path={chats}", "data.max_length=256", "data.regenerate=true",
              "data.gen_max_new_tokens=5", "data.gen_temperature=1.0", "data.gen_top_p=0.9"]
    a = load_dataset_dir(run(cfg_for(*common, "run.name=a", "data.batch_size=1", "data.shard_rows=1")).data_dir)
    b = load_dataset_dir(run(cfg_for(*common, "run.name=b", "data.batch_size=4")).data_dir)
    c = load_dataset_dir(run(cfg_for(*common, "run.name=c", "data.batch_size=4", "data.gen_seed=1")).data_dir)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]


def test_all_bad_rows_is_an_error(cfg_for, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n{"text": "x"}\n')
    with pytest.raises(DraftsmithError, match=r"no usable conversation in data.source=jsonl \(read 3, kept 0, "
                                              r"skipped 1 \(bad JSON line\)"):
        run(cfg_for("data=jsonl", f"data.path={bad}"))


def test_template_that_is_not_prefix_stable_is_an_error(cfg_for, chats, tmp_path):
    tmpl = tmp_path / "last.jinja"
    tmpl.write_text("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] + ':' + m['content'] }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    with pytest.raises(DraftsmithError, match="is not prefix-stable .* give a prefix-stable template with target.chat_template"):
        run(cfg_for("data=jsonl", f"data.path={chats}", f"target.chat_template={tmpl}"))


@pytest.mark.parametrize("override,message", [
    ("data.max_length=0", "data.max_length=0 must be a positive number"),
    ("data.cache_topk=-1", "data.cache_topk=-1: use 0"),
    ("data.gen_top_p=0", "temperature must be >= 0 (0 = greedy) and top_p in (0, 1]"),
    ("data.source=parquet", "data.source='parquet' is not a prompt source"),
])
def test_bad_settings(cfg_for, override, message):
    with pytest.raises(DraftsmithError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run(cfg_for(override))


def test_generation_ignores_the_models_decoding_defaults(tiny_target_dir):
    # a hub model's generation_config may carry sampling, a repetition penalty or n-gram bans; regeneration
    # must still follow the target's distribution (greedy here) - what the decoder later verifies against
    from types import SimpleNamespace

    from data_gen.regenerate import _generate

    target = load(tiny_target_dir("llama"))
    gc = target.model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty, gc.no_repeat_ngram_size = True, 0.6, 0.9, 50.0, 1
    prompt = [98, 7, 117, 244, 165, 184, 223, 14, 23, 233, 113, 36] * 3
    out = _generate(target, [prompt], [12], [0], SimpleNamespace(gen_temperature=0.0, gen_top_p=1.0))[0]
    # greedy by the plain forward: each token holds its step's largest logit (up to TIE: generate's cached
    # forwards round differently from this full one), and the text ends at EOS or after 12 tokens
    ids = list(prompt)
    with torch.no_grad():
        for tok in out:
            logits = target.model(torch.tensor([ids])).logits[0, -1]
            assert float(logits[tok]) >= float(logits.max()) - TIE
            ids.append(tok)
    ended = [k for k, t in enumerate(out) if t in target.eos_token_ids]
    assert ended == [len(out) - 1] if ended else len(out) == 12
