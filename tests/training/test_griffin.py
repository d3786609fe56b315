"""objective=griffin (training/objectives/addons.py): the cumulative top-k row mask by hand, in the EAGLE-3
and EAGLE-1 losses, and a short training run."""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from drafters.eagle_base import UnrollOptions, topk_keep
from tests.eagle_util import eagle1_model, eagle3_model, online_batch, signal_for
from training.objectives import build_objective


def _greedy_batch(target, B=2, T=16):
    """Like test_eagle3's batch, but tokens after the first 5 are the target's greedy continuation (what
    data_gen's regeneration gives): true tokens a good drafter has in its top-3."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, target.vocab_size, (B, 5), generator=g)
    with torch.no_grad():
        for _ in range(T - 5):
            ids = torch.cat([ids, target(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return signal_for(target, ids)


def test_mask_hand_built():
    """Row kept at step j+1 <=> the true token is among step j's top-3 AND the row was kept before."""
    top = torch.tensor([[[5, 9, 2], [7, 1, 3], [4, 4, 4], [8, 6, 0]]])  # [1 row-batch, 4 rows, top-3]
    true = torch.tensor([[2, 3, 5, 8]])
    step1 = topk_keep(top, true, None)
    assert step1.tolist() == [[True, True, False, True]]  # 2 in row 0, 3 in row 1, 5 not in row 2, 8 in row 3
    true2 = torch.tensor([[9, 0, 4, 1]])
    step2 = topk_keep(top, true2, step1)
    assert step2.tolist() == [[True, False, False, False]]  # row 2 hits but was dropped; rows 1, 3 miss


def _hand_masked_losses(m, sig, k):
    """Per-step soft-CE means over the rows GRIFFIN keeps, computed row by row."""
    ids, T = sig.input_ids, sig.input_ids.shape[1]
    with torch.no_grad():
        outs = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), m.cfg.ttt_steps))
    draft, tl = m.draft_ids, sig.logits
    kept = {(b, t) for b in range(ids.shape[0]) for t in range(T - 1)}
    per_step, kept_frac = [], []
    for i, out in enumerate(outs):
        logq = torch.log_softmax(m.draft_logits(out), -1)
        terms, scored, alive = [], 0, 0
        for b in range(ids.shape[0]):
            for t in range(T - 1):
                s = t + 2 + i
                if s >= T or not sig.loss_mask[b, s]:
                    continue
                scored += 1
                alive += (b, t) in kept
                if (b, t) in kept and m.t2d[int(tl[b, s - 1].argmax())]:
                    p = torch.softmax(tl[b, s - 1, draft], -1)
                    terms.append(-(p * logq[b, t]).sum().item())
        per_step.append(sum(terms) / max(len(terms), 1))
        kept_frac.append(alive / scored)
        # GRIFFIN: keep row t for step i+1 only if x_{t+2+i} is among step i's top-k (cumulative)
        kept = {(b, t) for (b, t) in kept if t + 2 + i < T
                and int(ids[b, t + 2 + i]) in draft[logq[b, t].topk(k).indices].tolist()}
    return per_step, kept_frac


def test_mask_in_the_eagle3_loss(peaked_llama):
    m = eagle3_model(peaked_llama, draft_vocab_size=60).eval()
    sig = _greedy_batch(peaked_llama)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    for _ in range(10):  # train a little so the mask keeps some rows and drops others
        loss, _ = m.loss(sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, met = m.loss(sig, UnrollOptions(keep_topk=3))
    per_step, kept = _hand_masked_losses(m, sig, 3)
    for i in range(3):
        assert met[f"loss_step/{i + 1}"] == pytest.approx(per_step[i], abs=1e-5)
    assert [met[f"keep/{d}"] for d in (2, 3)] == pytest.approx(kept[1:])
    assert 0 < kept[2] < 1  # the test saw both kept and dropped rows
    whole = eagle3_model(peaked_llama, draft_vocab_size=None).eval()
    with torch.no_grad():  # top-V of the whole vocabulary holds every true token: the plain loss
        full, fmet = whole.loss(sig, UnrollOptions(keep_topk=whole.draft_vocab_size))
        plain, pmet = whole.loss(sig)
    assert full.item() == pytest.approx(plain.item(), abs=1e-6) and fmet["keep/3"] == 1.0


def test_mask_in_the_eagle1_loss(peaked_llama):
    """EAGLE-1 under GRIFFIN: step 2 counts only rows whose true token x_{t+2} is in step 1's top-3."""
    m = eagle1_model(peaked_llama, feature_noise=0.0, losses={"soft_ce": 1.0}).eval()
    sig = online_batch(peaked_llama)
    with torch.no_grad():
        _, met = m.loss(sig, UnrollOptions(keep_topk=3, steps=2))
        ids, T = sig.input_ids, sig.input_ids.shape[1]
        outs = list(m.unroll(ids, sig.last_hidden[:, :T - 1], 2))
    logq = [torch.log_softmax(m.target_vocab_logits(o), -1) for o in outs]
    terms, scored = [], 0
    for b in range(2):
        for t in range(T - 3):
            if not sig.loss_mask[b, t + 3]:
                continue
            scored += 1
            if int(ids[b, t + 2]) in logq[0][b, t].topk(3).indices.tolist():
                p = torch.softmax(sig.logits[b, t + 2], -1)
                terms.append(-(p * logq[1][b, t]).sum().item())
    assert met["keep/2"] == pytest.approx(len(terms) / scored)
    step0 = m.loss(sig)[1]["loss/soft_ce"]
    want = step0 + (sum(terms) / len(terms) if terms else 0.0)
    assert met["loss/soft_ce"] == pytest.approx(want, abs=1e-5)


def test_griffin_objective_trains(cfg_for, peaked_llama):
    cfg = cfg_for("drafter=eagle3", "objective=griffin", "drafter.draft_vocab_size=64")
    objective = build_objective(cfg, peaked_llama)
    assert objective.options == UnrollOptions(topk_weight=0.5, topk_k=10, keep_topk=3, detach_context=True, steps=3)
    m = eagle3_model(peaked_llama, draft_vocab_size=64)
    sig = _greedy_batch(peaked_llama)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses, kept = [], []
    for _ in range(6):
        loss, met = objective(m, sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        kept.append(met["keep/2"])
    assert losses[-1] < 0.6 * losses[0], losses
    assert kept[-1] > kept[0], kept  # a better drafter keeps more rows in its top-3


def test_griffin_config_errors(cfg_for, peaked_llama):
    with pytest.raises(DraftsmithError, match=r"objective.keep_topk=0: GRIFFIN keeps rows whose true token is in"):
        build_objective(cfg_for("objective=griffin", "objective.keep_topk=0"), peaked_llama)
    with pytest.raises(DraftsmithError, match="not drafter=hydra: use drafter=eagle3 or drafter=eagle1"):
        build_objective(cfg_for("drafter=hydra", "objective=griffin"), peaked_llama)


def test_addons_under_gradient_checkpointing(peaked_llama):
    """The add-ons pass through the checkpointed per-step loss: same loss, metrics and gradients."""
    sig = _greedy_batch(peaked_llama)
    opts = UnrollOptions(topk_weight=0.5, keep_topk=3, detach_context=True)
    grads = []
    for gc in (False, True):
        m = eagle3_model(peaked_llama, draft_vocab_size=64)
        m.train()
        m.set_gradient_checkpointing(gc)
        loss, met = m.loss(sig, opts)
        loss.backward()
        grads.append((loss.item(), met, {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert grads[1][0] == pytest.approx(grads[0][0], abs=1e-6) and grads[1][1] == pytest.approx(grads[0][1], abs=1e-6)
    for name, g in grads[0][2].items():
        torch.testing.assert_close(grads[1][2][name], g, atol=1e-6, rtol=1e-5)
