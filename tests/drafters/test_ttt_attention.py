"""train.attention: EAGLE's unrolled training attention as FlexAttention BlockMasks vs sdpa.

    python -m pytest -q tests/drafters/test_ttt_attention.py

On the CPU FlexAttention runs eagerly and forward only (torch 2.13 has no CPU backward), so the CPU tests
compare attention outputs and losses; the gradients are compared on a GPU (marked gpu). Tolerances: both
backends compute the same softmax in float32 but sum it in different orders (flex: one pass over all keys
with an online max; sdpa: a per-sequence matmul plus the diagonal columns), so they agree to float32
rounding over a few dozen keys, well inside 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from drafters.layers import (
    flex_causal_attend,
    resolve_attention,
    ttt_flex_attend,
    ttt_rows_attend,
)
from tests.eagle_util import eagle1_model, eagle3_model, online_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _kv(B, kv, n, d, g):
    return torch.randn(B, kv, n, d, generator=g), torch.randn(B, kv, n, d, generator=g)


@pytest.mark.parametrize("steps", [1, 3])
def test_flex_ttt_pattern_equals_the_rows_pattern(steps):
    """Grouped queries (4 heads over 2 key heads), two sequences, a subset of rows (as training unrolls only
    the rows a later step scores), `steps` earlier TTT steps: the one-call BlockMask gives ttt_rows_attend's
    output to 1e-5."""
    g = torch.Generator().manual_seed(0)
    B, h, kv, n, d = 2, 4, 2, 12, 16
    k0, v0 = _kv(B, kv, n, d, g)
    idx = torch.tensor([0, 3, 4, 7, 11, 12, 13, 18, 23])  # rows of the flattened [B, n] grid
    batch, pos = idx // n, idx % n
    N = len(idx)
    prev = [_kv(1, kv, N, d, g) for _ in range(steps - 1)]
    pk, pv = [p[0] for p in prev], [p[1] for p in prev]
    q = torch.randn(1, h, N, d, generator=g)
    k, v = _kv(1, kv, N, d, g)
    with torch.no_grad():
        want = ttt_rows_attend(k0, v0, pk, pv, batch, pos)(q, k, v)
        got = ttt_flex_attend(k0, v0, pk, pv, batch, pos)(q, k, v)
    assert got.shape == want.shape == (1, h, N, d)
    assert (got - want).abs().max().item() < 1e-5


def test_flex_causal_equals_sdpa_causal():
    """Step 0's causal window, grouped queries, no repeat_kv: sdpa's is_causal output to 1e-5."""
    from drafters.layers import causal_attend

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 10, 16, generator=g)
    k, v = _kv(2, 2, 10, 16, g)
    with torch.no_grad():
        diff = (flex_causal_attend(10, "cpu")(q, k, v) - causal_attend(q, k, v)).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("family", ["eagle3", "eagle1"])
def test_flex_gives_the_sdpa_loss(llama_target, family):
    """The whole unrolled loss (3 TTT steps, a right-padded row, rows skipped where no later step scores
    them) and every per-depth metric: the same under both backends, to 1e-5."""
    make = eagle3_model if family == "eagle3" else eagle1_model
    m = make(llama_target).eval()
    sig = online_batch(llama_target, B=2, T=16)
    with torch.no_grad():
        assert m.set_attention("sdpa") == "sdpa"
        a, ma = m.loss(sig)
        assert m.set_attention("flex") == "flex"
        b, mb = m.loss(sig)
    assert abs(a.item() - b.item()) < 1e-5
    assert ma.keys() == mb.keys() and all(abs(ma[key] - mb[key]) < 1e-5 for key in ma)


def test_flex_refuses_a_cpu_backward_and_auto_picks_sdpa_there(llama_target):
    """On the CPU, training with flex is one `error:`-style line (no CPU backward), and auto resolves to sdpa;
    on CUDA auto resolves to flex (this torch has FlexAttention). A misspelt choice names the three."""
    m = eagle3_model(llama_target).train()
    m.set_attention("flex")
    with pytest.raises(DraftsmithError, match="train.attention=flex cannot train on CPU"):
        m.loss(online_batch(llama_target))
    assert m.set_attention("auto") == "sdpa"
    assert resolve_attention("auto", "cuda") == "flex"
    with pytest.raises(DraftsmithError, match="train.attention='eager': use one of auto, flex, sdpa"):
        resolve_attention("eager", "cpu")


def test_config_key_reaches_the_drafter(cfg_for, llama_target):
    """train.attention goes through the typed config into build_drafter (the train stage's and the bench's)."""
    from training.stage import build_drafter

    assert build_drafter(cfg_for("drafter=eagle3"), llama_target, None).attention == "sdpa"  # auto on CPU
    assert build_drafter(cfg_for("drafter=eagle3", "train.attention=flex"), llama_target, None).attention == "flex"


@pytest.mark.gpu
@cuda
def test_flex_gives_the_sdpa_gradients_on_cuda(llama):
    """On a GPU (compiled FlexAttention, float32): loss and every parameter's gradient to 1e-4 of sdpa's
    (the backward adds a second reduction order on top of the forward's)."""
    import dataclasses

    m = eagle3_model(llama)
    sig = online_batch(llama)  # computed on the CPU, then everything moves to the GPU
    llama.model.cuda()
    m = m.cuda().train()
    sig = dataclasses.replace(sig, **{f.name: getattr(sig, f.name).cuda() for f in dataclasses.fields(sig)
                                      if torch.is_tensor(getattr(sig, f.name))})
    out = {}
    for backend in ("sdpa", "flex"):
        m.zero_grad(set_to_none=True)
        m.set_attention(backend)
        loss, _ = m.loss(sig)
        loss.backward()
        out[backend] = loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    (la, ga), (lb, gb) = out["sdpa"], out["flex"]
    assert abs(la - lb) < 1e-4 and ga and ga.keys() == gb.keys()
    assert max((ga[n] - gb[n]).abs().max().item() for n in ga) < 1e-4
