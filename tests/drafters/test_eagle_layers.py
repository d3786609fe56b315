"""Shared drafter building blocks (drafters/layers.py): dims from targets, TTT attention, checkpoint folders."""
from __future__ import annotations

import json

import pytest
import torch

from conf.errors import DraftsmithError
from drafters.folder import CONFIG_NAME, read_checkpoint_config
from drafters.layers import DrafterDims, causal_attend, repeat_kv, ttt_attend, ttt_rows_attend


def _dense_ttt(q, ks, vs):
    """Brute force: one softmax over all steps' keys; step 0 causal, later steps only their own row."""
    T = q.shape[2]
    n = q.shape[1] // ks[0].shape[1]
    K = torch.cat([repeat_kv(k, n) for k in ks], 2)
    V = torch.cat([repeat_kv(v, n) for v in vs], 2)
    t = torch.arange(T)
    blocks = [t[None, :] <= t[:, None]] + [t[None, :] == t[:, None]] * (len(ks) - 1)
    mask = torch.cat(blocks, 1)
    s = (q @ K.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ V


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_ttt_attention_equals_dense_masked_attention(kv_heads):
    g = torch.Generator().manual_seed(0)
    B, h, T, d, steps = 2, 4, 7, 8, 4
    ks = [torch.randn(B, kv_heads, T, d, generator=g) for _ in range(steps)]
    vs = [torch.randn(B, kv_heads, T, d, generator=g) for _ in range(steps)]
    q = torch.randn(B, h, T, d, generator=g)
    torch.testing.assert_close(causal_attend(q, ks[0], vs[0]), _dense_ttt(q, ks[:1], vs[:1]), atol=1e-5, rtol=0)
    for i in range(1, steps):
        got = ttt_attend(ks[0], vs[0], ks[1:i], vs[1:i])(q, ks[i], vs[i])
        torch.testing.assert_close(got, _dense_ttt(q, ks[:i + 1], vs[:i + 1]), atol=1e-5, rtol=0)


def test_ttt_rows_attend_on_a_subset_equals_those_rows_of_the_full_pattern():
    """Training unrolls later steps only for rows some later loss scores: each row's output must be the
    one the full grid gives it (rows see step 0's causal prefix and their own later entries only).
    Tolerance: float32, the prefix block cut at the sequence's last kept row."""
    g = torch.Generator().manual_seed(2)
    B, h, kv, T, d, i = 3, 4, 2, 9, 8, 3
    ks = [torch.randn(B, kv, T, d, generator=g) for _ in range(i + 1)]
    vs = [torch.randn(B, kv, T, d, generator=g) for _ in range(i + 1)]
    q = torch.randn(B, h, T, d, generator=g)
    full = ttt_attend(ks[0], vs[0], ks[1:i], vs[1:i])(q, ks[i], vs[i])
    keep = torch.rand(B, T, generator=g) > 0.5
    keep[1] = False  # a sequence with no rows left
    idx = keep.flatten().nonzero().squeeze(1)
    batch, pos = idx // T, idx % T

    def rows(x):
        return x.transpose(0, 1).flatten(1, 2)[:, idx][None]  # [1, heads, N, d]
    got = ttt_rows_attend(ks[0], vs[0], [rows(k) for k in ks[1:i]], [rows(v) for v in vs[1:i]], batch, pos)(
        rows(q), rows(ks[i]), rows(vs[i]))
    torch.testing.assert_close(got, rows(full), atol=1e-5, rtol=0)
    empty = torch.zeros(0, dtype=torch.long)
    none = ttt_rows_attend(ks[0], vs[0], [], [], empty, empty)(q[:1, :, :0], ks[1][:1, :, :0], vs[1][:1, :, :0])
    assert none.shape == (1, h, 0, d)


def test_ttt_attend_snapshots_earlier_steps():
    # gradient checkpointing re-runs the closure in backward, after later steps were appended
    g = torch.Generator().manual_seed(1)
    k = [torch.randn(1, 2, 5, 4, generator=g) for _ in range(3)]
    q = torch.randn(1, 2, 5, 4, generator=g)
    prev_k, prev_v = [k[1]], [k[1]]
    attend = ttt_attend(k[0], k[0], prev_k, prev_v)
    before = attend(q, k[2], k[2])
    prev_k.append(k[2])
    prev_v.append(k[2])
    torch.testing.assert_close(attend(q, k[2], k[2]), before)


def test_dims_from_each_target_shape(tiny_target):
    d = DrafterDims.from_target(tiny_target)
    arch = tiny_target.config.model_type
    assert (d.hidden_size, d.num_attention_heads, d.head_dim, d.vocab_size, d.num_taps) == (
        32, 4, 8, tiny_target.vocab_size, 3)
    if arch == "gpt2":  # n_embd/n_head/n_inner(None -> 4H)/layer_norm_epsilon/n_positions, no GQA, default RoPE
        assert (d.num_key_value_heads, d.intermediate_size, d.rms_norm_eps, d.max_position_embeddings) == (
            4, 128, 1e-5, 512)
        assert d.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    else:
        assert (d.num_key_value_heads, d.intermediate_size, d.max_position_embeddings) == (2, 64, 512)
        assert d.rope_parameters["rope_theta"] == tiny_target.config.rope_parameters["rope_theta"]
    c = d.llama_config()
    assert (c.hidden_size, c.num_key_value_heads, c.intermediate_size, c.hidden_act) == (
        32, d.num_key_value_heads, d.intermediate_size, "silu")
    assert DrafterDims(**json.loads(json.dumps(d.to_dict()))) == d


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(DraftsmithError, match=f"is not a drafter checkpoint \\(no {CONFIG_NAME}\\)"):
        read_checkpoint_config(tmp_path)
