"""Losses against hand computations and their defining identities."""
from __future__ import annotations

import math

import pytest
import torch

from training import losses as L


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
