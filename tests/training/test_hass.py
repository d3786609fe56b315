"""objective=hass (training/objectives/addons.py) and the add-on hooks of the EAGLE losses: off = bit-identical,
the top-K term by hand, context alignment = HASS's stop-gradient, training lowers the loss."""
from __future__ import annotations

import math

import pytest
import torch

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.eagle_base import UnrollOptions
from drafters.layers import causal_attend, ttt_attend
from tests.eagle_util import eagle1_model, eagle3_model, online_batch
from training.objectives import build_objective


def _loss_and_grads(m, sig, options=None):
    m.zero_grad()
    loss, met = m.loss(sig, options) if options is not None else m.loss(sig)
    loss.backward()
    return loss.detach(), met, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("family", ["eagle3", "eagle1"])
def test_addons_off_are_bit_identical(peaked_llama, family):
    """No options, all-off options, and a HASS config with every add-on zeroed run the same operations:
    equal loss, metrics and every gradient, bit for bit (the golden numbers in test_eagle*.py hold)."""
    make, batch = (eagle3_model, online_batch) if family == "eagle3" else (eagle1_model, online_batch)
    sig = batch(peaked_llama)
    m = make(peaked_llama).eval()  # eval: EAGLE-1's feature noise off
    base = _loss_and_grads(m, sig)
    from conf.schema.objective import HASSConfig
    from training.objectives.addons import unroll_options

    off = unroll_options(HASSConfig(topk_weight=0.0, context_alignment=False, align_steps=1))
    for opts in (UnrollOptions(), off):
        loss, met, grads = _loss_and_grads(m, sig, opts)
        assert torch.equal(loss, base[0]) and met == base[1]
        assert all(torch.equal(grads[n], g) for n, g in base[2].items())


def test_topk_term_hand_built():
    """-sum over the target's top-K tokens of p_i log q_i, on numbers small enough to check by hand."""
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    draft = torch.tensor([[0.5, 0.0, 1.0, 0.0, 0.0]])
    p = [math.exp(x) for x in target[0].tolist()]
    p = [x / sum(p) for x in p]
    zq = sum(math.exp(x) for x in draft[0].tolist())
    logq = [x - math.log(zq) for x in draft[0].tolist()]
    want = -(p[0] * logq[0] + p[1] * logq[1])  # K = 2: tokens 0 and 1
    assert L.topk_soft_ce(draft, target, None, k=2).item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(1.4308, abs=1e-4)  # 0.6411 * 1.4970 + 0.2359 * 1.9970


def test_hass_topk_term_in_the_eagle3_loss(peaked_llama):
    """loss/topk_distill = weight * sum_i 0.8^i * mean over valid rows of -sum_{top-10 of p} p log q, with p the
    target's distribution over the draft vocab at t+1+i; the total grows by exactly that."""
    m = eagle3_model(peaked_llama, draft_vocab_size=40).eval()
    sig = online_batch(peaked_llama)
    with torch.no_grad():
        base, _ = m.loss(sig)
        loss, met = m.loss(sig, UnrollOptions(topk_weight=0.7, topk_k=10))
        ids, T = sig.input_ids, sig.input_ids.shape[1]
        outs = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), 3))
    draft, tl = m.draft_ids, sig.logits
    want = 0.0
    for i, out in enumerate(outs):
        logq = torch.log_softmax(m.draft_logits(out), -1)
        terms = []
        for b in range(ids.shape[0]):
            for t in range(T - 1):
                s = t + 2 + i
                if s >= T or not sig.loss_mask[b, s] or not m.t2d[int(tl[b, s - 1].argmax())]:
                    continue
                p = torch.softmax(tl[b, s - 1, draft], -1)
                top = p.topk(10).indices
                terms.append(-(p[top] * logq[b, t, top]).sum().item())
        want += 0.8**i * sum(terms) / len(terms)
    assert met["loss/topk_distill"] == pytest.approx(0.7 * want, abs=1e-5)
    assert loss.item() == pytest.approx(base.item() + 0.7 * want, abs=1e-4)


def _hand_detached_grads(m, sig):
    """HASS's training, written out independently: the features fed into step i are precomputed
    constants; every step is recomputed with gradient from them and the losses summed."""
    ids, T = sig.input_ids, sig.input_ids.shape[1]
    n, steps = T - 1, m.cfg.ttt_steps
    with torch.no_grad():
        fed = [o.clone() for o in m.unroll(ids, m.project(sig.features[:, :n]), steps)]
    m.zero_grad()
    positions = torch.arange(n).expand(ids.shape[0], n)
    hidden = m.project(sig.features[:, :n])
    first, pk, pv = None, [], []
    total = 0.0
    target_draft = sig.logits[..., m.draft_ids]
    assistant = (sig.loss_mask > 0) & (sig.attention_mask > 0)
    in_vocab = m.t2d[sig.logits.argmax(-1)]
    for i in range(steps):
        attend = causal_attend if i == 0 else ttt_attend(first[0], first[1], pk, pv)
        embeds = m.embed(torch.cat([ids[:, 1 + i:1 + i + n], ids.new_zeros(ids.shape[0], max(0, i))], 1)[:, :n])
        out, kvs = m.core(hidden if i == 0 else fed[i - 1], embeds, positions + i, [attend])
        if i == 0:
            first = kvs[0]
        else:
            pk.append(kvs[0][0])
            pv.append(kvs[0][1])
        pad = lambda x, k: torch.cat([x[:, k:k + n], x.new_zeros((x.shape[0], max(0, k + n - T), *x.shape[2:]))], 1)  # noqa: E731
        valid = pad(assistant, 2 + i) & pad(in_vocab, 1 + i)
        tgt = torch.where(valid[..., None], pad(target_draft, 1 + i), torch.zeros(()))
        total = total + 0.8**i * L.soft_ce(m.draft_logits(out), tgt, valid)
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


def test_context_alignment_is_hass_stop_gradient(peaked_llama):
    """Same forward (TTT's attention already is HASS's aligned context), different gradient: exactly the
    gradient of the summed step losses with the fed-back features held constant."""
    m = eagle3_model(peaked_llama).eval()
    sig = online_batch(peaked_llama)
    ttt = _loss_and_grads(m, sig)
    hass = _loss_and_grads(m, sig, UnrollOptions(detach_context=True))
    assert hass[0].item() == pytest.approx(ttt[0].item(), abs=1e-6) and hass[1] == pytest.approx(ttt[1], abs=1e-6)
    assert not torch.allclose(hass[2]["fc.weight"], ttt[2]["fc.weight"])
    hand_loss, hand = _hand_detached_grads(m, sig)
    assert hand_loss.item() == pytest.approx(hass[0].item(), abs=1e-5)
    for name, g in hand.items():
        torch.testing.assert_close(hass[2][name], g, atol=1e-6, rtol=1e-5)


def test_eagle1_unrolls_aligned_steps(peaked_llama):
    """EAGLE-1 under HASS unrolls align_steps steps: step i regresses f_{t+1+i} from the fed-back feature
    and reports acc/1..3; step 0 alone is the plain EAGLE-1 loss."""
    m = eagle1_model(peaked_llama).eval()
    sig = online_batch(peaked_llama)
    with torch.no_grad():
        plain, pmet = m.loss(sig)
        loss, met = m.loss(sig, UnrollOptions(steps=3, detach_context=True))
        ids, f, T = sig.input_ids, sig.last_hidden, sig.input_ids.shape[1]
        outs = list(m.unroll(ids, f[:, :T - 1], 3))
    assert sorted(k for k in met if k.startswith("acc/")) == ["acc/1", "acc/2", "acc/3"]
    assert met["acc/1"] == pmet["acc/1"]
    reg = []
    for i, out in enumerate(outs):
        for b in range(2):
            for t in range(T - 1):
                if t + 2 + i < T and sig.loss_mask[b, t + 2 + i]:
                    reg.append((i, torch.nn.functional.smooth_l1_loss(out[b, t], f[b, t + 1 + i]).item()))
    per_step = [sum(v for j, v in reg if j == i) / sum(1 for j, _ in reg if j == i) for i in range(3)]
    assert met["loss/smooth_l1"] == pytest.approx(sum(per_step), abs=1e-5)
    assert per_step[0] == pytest.approx(pmet["loss/smooth_l1"], abs=1e-6)
    assert loss.item() > plain.item()


@pytest.mark.parametrize("family", ["eagle3", "eagle1"])
def test_hass_objective_trains(cfg_for, peaked_llama, family):
    cfg = cfg_for(f"drafter={family}", "objective=hass", *(["drafter.draft_vocab_size=64"] if family == "eagle3" else []))
    objective = build_objective(cfg, peaked_llama)
    assert objective.options == UnrollOptions(topk_weight=1.0, topk_k=10, detach_context=True, steps=3)
    make, batch = (eagle3_model, online_batch) if family == "eagle3" else (eagle1_model, online_batch)
    m = make(peaked_llama, **({"draft_vocab_size": 64} if family == "eagle3" else {"feature_noise": 0.0}))
    sig = batch(peaked_llama)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss, met = objective(m, sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert "loss/topk_distill" in met and met["loss/topk_distill"] > 0
    assert losses[-1] < 0.6 * losses[0], losses


def test_hass_config_errors(cfg_for, peaked_llama):
    with pytest.raises(DraftsmithError, match="objective=hass trains the unrolled steps of EAGLE drafters, not "
                                              "drafter=medusa: use drafter=eagle3 or drafter=eagle1"):
        build_objective(cfg_for("drafter=medusa", "objective=hass"), peaked_llama)
    with pytest.raises(DraftsmithError, match=r"objective.topk_k=0 must be >= 1"):
        build_objective(cfg_for("objective=hass", "objective.topk_k=0"), peaked_llama)
    with pytest.raises(DraftsmithError, match=r"objective.align_steps=0 must be >= 1"):
        build_objective(cfg_for("objective=hass", "objective.align_steps=0"), peaked_llama)
    with pytest.raises(DraftsmithError, match="objective='nope' is not implemented: choose from token, .*hass, griffin, gto"):
        cfg = cfg_for("objective=hass")
        cfg.objective.name = "nope"
        build_objective(cfg, peaked_llama)
