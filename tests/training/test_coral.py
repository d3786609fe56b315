"""CORAL (training/objectives/addons.py: objective=coral; drafters/head_groups.py: drafter.head_groups): the
alignment loss by hand, its place in the EAGLE losses, the grouped head's -inf pattern, losslessness at T=0,
save/load, one-line errors, and that training lowers the loss."""
from __future__ import annotations

import math

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import load_config
from decoding.decoder import SpeculativeDecoder
from decoding.tree import DraftTree
from drafters import losses as L
from drafters.eagle3 import Eagle3Drafter
from drafters.eagle_base import UnrollOptions
from drafters.head_groups import grouped_logits
from tests.eagle_util import eagle1_model, eagle3_model, online_batch
from training.objectives import build_objective


def test_cross_step_align_hand_built():
    """Two rows, temperature 0.5. Row 1: step 0 (1, 0), step j (1, 1): cosines to step 0's rows are 1/sqrt2
    and 1/sqrt2, so q = (1/2, 1/2) against p = softmax(2, 0); row 2 is the same in both steps (KL 0)."""
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    other = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    want = sum(x * math.log(x / 0.5) for x in p) / 2
    assert want == pytest.approx(0.16391, abs=1e-5)  # (log 2 - H(0.8808, 0.1192)) / 2
    assert L.cross_step_align(anchor, other, temperature=0.5).item() == pytest.approx(want, abs=1e-6)
    # mask: only row 1 takes part, as query and as key: one key, so q = p = (1) and nothing to align
    assert L.cross_step_align(anchor, other, torch.tensor([True, False]), 0.5).item() == 0.0
    # as the temperature falls, step 0's rows (orthogonal) give p -> one-hot: the paper's hard InfoNCE
    far = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    near = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    sims = torch.nn.functional.normalize(near, dim=-1) @ far.t() / 0.01
    infonce = -torch.log_softmax(sims, -1).diagonal().mean()
    assert L.cross_step_align(far, near, temperature=0.01).item() == pytest.approx(infonce.item(), rel=1e-4)


def test_cross_step_align_is_zero_for_identical_steps():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert L.cross_step_align(x, x.clone()).item() == 0.0
    assert L.cross_step_align(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert L.cross_step_align(x, x.flip(0)).item() > 0.1
    empty = torch.zeros(0, 5, requires_grad=True)
    assert L.cross_step_align(empty, empty).item() == 0.0


def test_align_term_in_the_eagle3_loss(peaked_llama):
    """loss/align = sum over steps i >= 1 of 0.8^i x weight x cross_step_align(step 0 at row t + i,
    step i at row t) over the rows whose predicted token x_{t+2+i} is an assistant token; the total grows by
    exactly that, and the token terms are untouched."""
    m = eagle3_model(peaked_llama, draft_vocab_size=40).eval()
    sig = online_batch(peaked_llama)
    with torch.no_grad():
        base, bmet = m.loss(sig)
        loss, met = m.loss(sig, UnrollOptions(align_weight=0.7, align_temperature=0.2))
        ids, T = sig.input_ids, sig.input_ids.shape[1]
        outs = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), 3))
    want = 0.0
    for i in (1, 2):
        pairs = [(outs[0][b, t + i], outs[i][b, t]) for b in range(ids.shape[0]) for t in range(T - 1)
                 if t + 2 + i < T and sig.loss_mask[b, t + 2 + i] and sig.attention_mask[b, t + 2 + i]]
        a, o = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        want += 0.8**i * L.cross_step_align(a, o, temperature=0.2).item()
    assert met["loss/align"] == pytest.approx(0.7 * want, abs=1e-5)
    assert met["loss/soft_ce"] == pytest.approx(bmet["loss/soft_ce"], abs=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.7 * want, abs=1e-5)


def test_step0_is_the_reference(peaked_llama):
    """The alignment moves later steps towards step 0, not step 0 towards them: with the token loss weighed
    ~0, every gradient equals that of the summed alignment terms written out with step 0's outputs as
    constants (step 0's weights still get gradient through the keys later steps attend to)."""
    m = eagle3_model(peaked_llama, draft_vocab_size=40, losses={"soft_ce": 1e-30}).eval()
    sig = online_batch(peaked_llama)
    loss, _ = m.loss(sig, UnrollOptions(align_weight=1.0))
    m.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    ids, T = sig.input_ids, sig.input_ids.shape[1]
    with torch.no_grad():
        fixed = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), 3))[0]
    m.zero_grad()
    outs = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), 3))
    total = 0.0
    for i in (1, 2):
        rows = [(b, t) for b in range(2) for t in range(T - 1)
                if t + 2 + i < T and sig.loss_mask[b, t + 2 + i] and sig.attention_mask[b, t + 2 + i]]
        a = torch.stack([fixed[b, t + i] for b, t in rows])
        o = torch.stack([outs[i][b, t] for b, t in rows])
        total = total + 0.8**i * L.cross_step_align(a, o)
    total.backward()
    for n, p in m.named_parameters():
        if n in got and p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["eagle3", "eagle1"])
def test_coral_objective_trains(cfg_for, peaked_llama, family):
    cfg = cfg_for(f"drafter={family}", "objective=coral", *(["drafter.draft_vocab_size=64"] if family == "eagle3" else []))
    objective = build_objective(cfg, peaked_llama)
    assert objective.options == UnrollOptions(steps=3, align_weight=0.5, align_temperature=0.1)
    kw = {"draft_vocab_size": 64, "head_groups": 4, "active_groups": 1} if family == "eagle3" else {"feature_noise": 0.0}
    m = (eagle3_model if family == "eagle3" else eagle1_model)(peaked_llama, **kw)
    sig = online_batch(peaked_llama)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses, mets = [], []
    for _ in range(8):
        loss, met = objective(m, sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mets.append(met)
    assert mets[0]["loss/align"] > 0
    assert losses[-1] < 0.6 * losses[0], losses
    if family == "eagle3":  # the router learns the target token's group alongside
        assert mets[-1]["loss/router"] < 0.7 * mets[0]["loss/router"]
        assert mets[-1]["router_hit/1"] > mets[0]["router_hit/1"]


def test_grouped_logits_mask_outside_active_groups():
    """V = 10 in G = 4 groups of 3 (the last holds 1): each row keeps its top-2 groups' logits, exactly
    h @ W.T there (a product over one group's rows of W), and -inf everywhere else."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 2, 6, generator=g), torch.randn(10, 6, generator=g)
    router = torch.tensor([[[5.0, 0, 4, 0], [0, 0, 1, 2]], [[0, 9, 0, 8], [1, 2, 3, 4]]])
    out = grouped_logits(h, w, router, active=2)
    groups = {(0, 0): {0, 2}, (0, 1): {2, 3}, (1, 0): {1, 3}, (1, 1): {2, 3}}
    full = h @ w.t()
    for (b, r), keep in groups.items():
        on = torch.tensor([i // 3 in keep for i in range(10)])
        assert torch.isinf(out[b, r][~on]).all() and (out[b, r][~on] < 0).all()
        torch.testing.assert_close(out[b, r][on], full[b, r][on], atol=1e-5, rtol=1e-5)  # one product vs another
    assert torch.isfinite(out[1, 0, 9]) and torch.isinf(out[0, 0, 9])  # the short last group


@pytest.mark.parametrize("kind", ["chain", "dynamic"])
def test_grouped_eagle3_greedy_equals_target_greedy(tiny_target, kind):
    """Only 1 of 8 head groups is computed per draft: fewer tokens can be drafted, but the target verifies
    over its whole vocabulary, so greedy output is the target's own."""
    cfg = load_config(["drafter=eagle3", "drafter.head_groups=8", "drafter.active_groups=1",
                       f"eval.tree.kind={kind}", "eval.tree.depth=3", "eval.tree.top_k=3", "eval.tree.total_tokens=8"])
    torch.manual_seed(0)
    model = Eagle3Drafter.from_target(cfg.drafter, tiny_target)
    drafter = model.as_drafter(tiny_target)
    dec = SpeculativeDecoder.from_config(tiny_target, drafter, cfg.eval, 0.0)
    ids = torch.randint(0, tiny_target.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    out, stats = dec.generate(ids, 24, eos_ids=[], generator=None)
    ref, _ = dec.generate_autoregressive(ids, 24, eos_ids=[], generator=None)
    assert out.tolist() == ref.tolist() and stats.new_tokens == 24
    with torch.no_grad():
        root = model.target_vocab_logits(torch.randn(3, model.dims.hidden_size))
    finite = torch.isfinite(root).sum(-1)
    assert (finite > 0).all() and (finite <= -(-model.draft_vocab_size // 8)).all()  # one group's draft tokens at most


def test_grouped_save_load_round_trip(peaked_llama, tmp_path):
    m = eagle3_model(peaked_llama, head_groups=4, active_groups=2)
    with torch.no_grad():
        for p in m.router.parameters():
            p.add_(torch.randn_like(p))
    m.save_pretrained(tmp_path / "ck")
    from safetensors.torch import load_file

    assert {"router.w1.weight", "router.w2.weight"} <= set(load_file(str(tmp_path / "ck" / "model.safetensors")))
    torch.manual_seed(123)
    r = Eagle3Drafter.from_pretrained(tmp_path / "ck", peaked_llama)
    assert r.cfg.head_groups == 4 and r.cfg.active_groups == 2
    sig = online_batch(peaked_llama)
    assert r.loss(sig)[0].item() == m.loss(sig)[0].item()
    a, b = m.as_drafter(), r.as_drafter()
    for d in (a, b):
        d.start(sig.input_ids[:1, :11], sig.features[:1, :10])
    ra, rb = (d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0] for d in (a, b))
    assert torch.equal(ra, rb) and torch.isinf(ra).any()
    from export.formats import ExportContext, write_export

    write_export(r, peaked_llama, "sglang", tmp_path / "ex", ExportContext(dtype=torch.float32, target_ref="t"))
    assert not any(k.startswith("router.") for k in load_file(str(tmp_path / "ex" / "model.safetensors")))


def test_coral_errors(cfg_for, peaked_llama):
    with pytest.raises(DraftsmithError, match=r"objective.align_weight=0.0 must be > 0 \(coral: 0.5; "):
        load_config(["objective=coral", "objective.align_weight=0"])
    with pytest.raises(DraftsmithError, match=r"objective.temperature=-1.0 must be > 0"):
        load_config(["objective=coral", "objective.temperature=-1"])
    with pytest.raises(DraftsmithError, match="objective=coral trains the unrolled steps of EAGLE drafters, not "
                                              "drafter=medusa: use drafter=eagle3"):
        build_objective(cfg_for("drafter=medusa", "objective=coral"), peaked_llama)
    with pytest.raises(DraftsmithError, match=r"drafter.head_groups=4, drafter.active_groups=5: need 1 <= "
                                              r"active_groups <= head_groups <= the draft vocabulary \(160\)"):
        eagle3_model(peaked_llama, head_groups=4, active_groups=5)
    with pytest.raises(DraftsmithError, match=r"head_groups=200, .*the draft vocabulary \(160\), or head_groups=0"):
        eagle3_model(peaked_llama, head_groups=200, active_groups=1)
