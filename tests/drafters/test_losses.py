"""Losses against hand computations and their defining identities."""
from __future__ import annotations

import math

import pytest
import torch

from drafters import losses as L


def _pq():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.2, 0.6]])
    return p, q, p.log(), q.log()


def test_hand_values():
    p, q, lp, lq = _pq()
    fkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist()))
    rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p[0].tolist(), q[0].tolist()))
    assert L.forward_kl(lq, lp).item() == pytest.approx(fkl, abs=1e-6)
    assert L.reverse_kl(lq, lp).item() == pytest.approx(rkl, abs=1e-6)
    assert L.tvd(lq, lp).item() == pytest.approx(0.4, abs=1e-6)  # 0.5 * (0.3 + 0.1 + 0.4)
    ent = -sum(pi * math.log(pi) for pi in p[0].tolist())
    assert L.soft_ce(lq, lp).item() == pytest.approx(fkl + ent, abs=1e-6)
    m = 0.5 * (p + q)
    js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert L.jsd(lq, lp).item() == pytest.approx(js.item(), abs=1e-6)
    assert L.ce(lq, torch.tensor([2])).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    # HASS top-2 of p = tokens 0 and 1
    assert L.topk_soft_ce(lq, lp, k=2).item() == pytest.approx(-(0.5 * math.log(0.2) + 0.3 * math.log(0.2)), abs=1e-6)


def test_zero_when_equal_and_mask_selects():
    logits = torch.randn(2, 5, 11)
    for name, fn in L.DISTRIBUTION_LOSSES.items():
        if name in ("soft_ce", "topk"):
            continue
        assert fn(logits, logits).abs().item() < 1e-5, name
    tgt = torch.randn(2, 5, 11)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3] = True
    assert L.forward_kl(logits, tgt, mask).item() == pytest.approx(L.forward_kl(logits[1, 3], tgt[1, 3]).item(), abs=1e-6)
    assert L.forward_kl(logits, tgt, torch.zeros(2, 5)).item() == 0.0


def test_tvd_is_one_minus_acceptance():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    alpha = torch.minimum(a.softmax(-1), b.softmax(-1)).sum(-1).mean()
    assert L.tvd(a, b).item() == pytest.approx(1 - alpha.item(), abs=1e-6)


def test_topk_cache_renormalises_and_gradients_flow():
    tl = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    top = tl.topk(2)
    dense = L.topk_to_logits(top.values, top.indices, 4)
    assert torch.isinf(dense[0, 2:]).all()
    logits = torch.zeros(1, 4, requires_grad=True)
    loss = L.forward_kl(logits, dense)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_smooth_l1_and_step_weights():
    assert L.smooth_l1(torch.zeros(1, 2, 4), torch.full((1, 2, 4), 3.0)).item() == pytest.approx(2.5)
    assert L.step_weights(3, 0.8) == [1.0, 0.8, pytest.approx(0.64)]


@pytest.mark.parametrize("chunk_elems", [2**22, 40])  # one chunk; chunks of 4 rows (the last one short)
def test_linear_soft_ce_equals_soft_ce_of_the_logits(chunk_elems):
    """The fused head + loss is soft_ce(h W^T, target, mask): the same value, gradients for h and W and
    argmax/top-k, including masked-out rows whose target is all -inf (no draft token: NaN if used).
    Tolerance: float32, summed in another order (chunks, and the gradient formed as q - p)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 18, 8, 10
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    tgt = torch.randn(N, V, generator=g) * 3
    tgt[2, 4:] = float("-inf")  # a cached top-k row: no mass outside it
    mask = torch.rand(N, generator=g) > 0.3
    mask[2] = True
    tgt[5] = float("-inf")
    mask[5] = False
    ref = L.soft_ce(h @ w.t(), torch.where(mask[:, None], tgt, 0.0), mask)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got, top = L.linear_soft_ce(h, w, tgt, mask, k=3, chunk_elems=chunk_elems)
    (2.5 * got).backward()  # an outer weight reaches both gradients
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, 2.5 * ref_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 2.5 * ref_grads[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(top, (h @ w.t()).topk(3, dim=-1).indices)
    _, arg = L.linear_soft_ce(h.detach(), w.detach(), tgt, mask)
    assert torch.equal(arg[:, 0], (h @ w.t()).argmax(-1))
    none, _ = L.linear_soft_ce(h, w, tgt, torch.zeros(N, dtype=torch.bool))
    assert none.item() == 0.0
