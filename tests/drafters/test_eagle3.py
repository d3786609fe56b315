"""EAGLE-3 drafter (drafters/eagle3.py): SGLang names, the TTT loss, decoding adapter == training forward."""
from __future__ import annotations

import json

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import Eagle1Config
from decoding.tree import DraftTree
from drafters import losses as L
from drafters.base import TargetSignal
from drafters.common import shifted
from drafters.eagle3 import Eagle3Drafter
from drafters.folder import CONFIG_NAME, WEIGHTS_NAME
from drafters.target import target_identity
from tests.eagle_util import eagle3_model, online_batch, pseudo_counts

SGLANG_NAMES = [
    "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
]


def test_sglang_names_and_shapes(peaked_llama):
    m = eagle3_model(peaked_llama)
    sd = m.state_dict()
    assert sorted(sd) == sorted(SGLANG_NAMES)  # no embed_tokens, no rotary tables
    H, V = 32, peaked_llama.vocab_size
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["fc.weight"] == (H, 3 * H)
    assert shapes["midlayer.self_attn.q_proj.weight"] == (4 * 8, 2 * H)
    assert shapes["midlayer.self_attn.k_proj.weight"] == (2 * 8, 2 * H)  # GQA from the target's config
    assert shapes["midlayer.mlp.gate_proj.weight"] == (64, H)
    assert shapes["lm_head.weight"] == (160, H)
    assert sd["d2t"].dtype == torch.long and shapes["d2t"] == (160,)
    assert sd["t2d"].dtype == torch.bool and shapes["t2d"] == (V,) and int(sd["t2d"].sum()) == 160
    ids = m.draft_ids
    assert torch.equal(ids, sd["t2d"].nonzero().flatten())
    # the kept tokens are the most frequent ones, and lm_head starts from the target's rows for them
    c = pseudo_counts(peaked_llama)
    assert c[sd["t2d"]].min() >= c[~sd["t2d"]].max()
    torch.testing.assert_close(m.lm_head.weight, peaked_llama.model.get_output_embeddings().weight[ids])
    assert all(p.requires_grad for p in m.parameters()) and not any(p.requires_grad for p in peaked_llama.parameters())


def test_golden_first_loss(peaked_llama):
    m = eagle3_model(peaked_llama)
    loss, met = m.loss(online_batch(peaked_llama))
    assert loss.item() == pytest.approx(GOLDEN_LOSS, abs=1e-4)
    assert met["loss/soft_ce"] == pytest.approx(GOLDEN_LOSS, abs=1e-4)
    assert [met[f"loss_step/{i}"] for i in (1, 2, 3)] == pytest.approx(GOLDEN_STEPS, abs=1e-4)
    assert met["loss/soft_ce"] == pytest.approx(sum(0.8**i * met[f"loss_step/{i + 1}"] for i in range(3)), abs=1e-5)
    assert sorted(k for k in met if k.startswith("acc/")) == ["acc/1", "acc/2", "acc/3"]


GOLDEN_LOSS = 39.334320  # seed 0 init, the batch above; changes only with a deliberate model change
GOLDEN_STEPS = [17.165272, 15.420236, 15.363842]


def test_step_losses_match_a_hand_computation(peaked_llama):
    """Row t of step i predicts token t+2+i from the target's distribution at t+1+i; counted only where
    token t+2+i is an assistant token and the target's argmax there is a draft token."""
    m = eagle3_model(peaked_llama, draft_vocab_size=40)  # small: many target argmaxes fall outside the draft vocab
    sig = online_batch(peaked_llama)
    _, met = m.loss(sig)
    ids, T = sig.input_ids, sig.input_ids.shape[1]
    draft = m.draft_ids
    tl = sig.logits
    outs = list(m.unroll(ids, m.project(sig.features[:, :T - 1]), 3))
    skipped = 0
    for i, out in enumerate(outs):
        logq = torch.log_softmax(m.draft_logits(out), -1)
        terms, hits, scored = [], 0, 0
        for b in range(ids.shape[0]):
            for t in range(T - 1):
                s = t + 2 + i
                if s >= T or not sig.loss_mask[b, s]:
                    continue
                scored += 1
                arg = int(tl[b, s - 1].argmax())
                hits += int(draft[int(logq[b, t].argmax())]) == arg
                if not m.t2d[arg]:
                    skipped += 1
                    continue
                p = torch.softmax(tl[b, s - 1, draft], -1)
                terms.append(-(p * logq[b, t]).sum())
        assert met[f"loss_step/{i + 1}"] == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)
        assert met[f"acc/{i + 1}"] == pytest.approx(hits / scored)
    assert skipped > 0  # the test exercised the draft-vocab filter


def _dense_reference_loss(m, sig):
    """EAGLE-3's loss computed the plain way: every row through every step, the head over all rows, the
    masked drafters.losses.soft_ce per step (what loss() computed before it skipped rows and fused the head)."""
    ids, n = sig.input_ids, sig.input_ids.shape[1] - 1
    tl = sig.logits
    in_vocab = m.t2d[tl.argmax(-1)]
    assistant = (sig.loss_mask > 0) & (sig.attention_mask > 0)
    total = 0.0
    for i, out in enumerate(m.unroll(ids, m.project(sig.features[:, :n]), m.cfg.ttt_steps)):
        valid = shifted(assistant, 2 + i, n) & shifted(in_vocab, 1 + i, n)
        tgt = torch.where(valid[..., None], shifted(tl[..., m.draft_ids], 1 + i, n), torch.zeros(()))
        total = total + m.cfg.step_decay**i * L.soft_ce(m.draft_logits(out), tgt, valid)
    return total


@pytest.mark.parametrize("vocab", [40, None])  # many target argmaxes outside the draft vocab; the full vocab
def test_loss_and_gradients_equal_the_dense_reference(peaked_llama, vocab):
    """The optimised loss (scored rows only, later steps only where a later step scores, fused head +
    soft_ce) is the same function of the batch as the dense formulation, value and gradient of every
    parameter. Tolerance: float32 sums in another order (chunks, gathered rows), x50-scaled logits."""
    sig = online_batch(peaked_llama)
    results = []
    for fn in (lambda m: m.loss(sig)[0], lambda m: _dense_reference_loss(m, sig)):
        m = eagle3_model(peaked_llama, draft_vocab_size=vocab, ttt_steps=5)
        loss = fn(m)
        loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in m.named_parameters()}))
    (got, grads), (want, ref) = results
    assert got == pytest.approx(want, rel=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_padding_does_not_change_the_loss(peaked_llama):
    m = eagle3_model(peaked_llama)
    sig = online_batch(peaked_llama)
    loss, met = m.loss(sig)
    ids = sig.input_ids.clone()
    ids[1, 11:] = 7  # different padding content, same attention/loss masks
    out = peaked_llama(ids, attention_mask=sig.attention_mask)
    sig2 = TargetSignal(input_ids=ids, attention_mask=sig.attention_mask, loss_mask=sig.loss_mask,
                        features=out.features, last_hidden=out.last_hidden, lm_head=peaked_llama.lm_head)
    loss2, met2 = m.loss(sig2)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6) and met2 == pytest.approx(met, abs=1e-6)


def test_loss_falls(peaked_llama):
    m = eagle3_model(peaked_llama)
    sig = online_batch(peaked_llama)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses, accs = [], []
    for _ in range(8):
        loss, met = m.loss(sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(met["acc/1"])
    assert losses[-1] < 0.3 * losses[0], losses
    assert accs[-1] > accs[0], accs


def test_every_parameter_gets_the_same_gradient_with_checkpointing(peaked_llama):
    sig = online_batch(peaked_llama)
    grads = []
    for gc in (False, True):
        m = eagle3_model(peaked_llama)
        m.train()
        m.set_gradient_checkpointing(gc)
        loss, _ = m.loss(sig)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)
    assert len(grads[0]) == len(SGLANG_NAMES) - 2  # all but the d2t/t2d buffers


def _root_logits(drafter):
    return drafter.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0]


def test_commit_path_equals_training_step0(peaked_llama):
    """start + commit over a sequence gives, at every committed length, the root logits that the
    training forward (step 0) gives at that row; rejected tree nodes leave no trace."""
    m = eagle3_model(peaked_llama).eval()
    ids = torch.randint(3, peaked_llama.vocab_size, (1, 14), generator=torch.Generator().manual_seed(5))
    feats = peaked_llama(ids).features
    with torch.no_grad():
        rows = m.target_vocab_logits(next(m.unroll(ids, m.project(feats[:, :13]), 1)))[0]
    d = m.as_drafter()
    assert (d.name, d.uses_features, d.feature_source, d.vocab_size) == ("eagle3", True, "features", peaked_llama.vocab_size)
    d.start(ids[:, :3], feats[:, :2])
    got = _root_logits(d)
    torch.testing.assert_close(got, rows[1], atol=3e-5, rtol=0)  # float32 rounding of x50-scaled logits
    assert torch.isinf(got[~m.t2d]).all() and torch.isfinite(got[m.t2d]).all()
    n = 2
    for k in (1, 3, 2, 4):  # a wrong 2-node tree is drafted and rejected before each commit
        tree = DraftTree(tokens=torch.tensor([[9, 10]]), parents=torch.tensor([[-1, 0]]),
                         depths=torch.tensor([[1, 2]]), logq=torch.zeros(1, 2))
        d.expand(tree, torch.tensor([[0, 1]]))
        d.commit(ids[:, n + 1:n + 1 + k], feats[:, n:n + k])
        n += k
        torch.testing.assert_close(_root_logits(d), rows[n - 1], atol=3e-5, rtol=0)


def _chain(tokens):
    k = len(tokens)
    return DraftTree(tokens=torch.tensor([tokens]), parents=torch.arange(-1, k - 1)[None],
                     depths=torch.arange(1, k + 1)[None], logq=torch.zeros(1, k))


@pytest.mark.parametrize("incremental", [False, True])
def test_ttt_step_i_equals_drafting_a_chain_of_depth_i(peaked_llama, incremental):
    m = eagle3_model(peaked_llama, ttt_steps=4).eval()
    ids = torch.randint(3, peaked_llama.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    feats = peaked_llama(ids).features
    with torch.no_grad():
        steps = [m.target_vocab_logits(o)[0] for o in m.unroll(ids, m.project(feats[:, :11]), 4)]
    d = m.as_drafter()
    for t in (0, 4, 7):
        d.start(ids[:, :t + 2], feats[:, :t + 1])
        chain = ids[0, t + 2:t + 5].tolist()  # the true continuation, as TTT feeds it
        if incremental:  # grow the tree one node per call, as a depth-by-depth builder does
            got = [_root_logits(d)] + [d.expand(_chain(chain[:j + 1]), torch.tensor([[j]]))[0, 0]
                                       for j in range(len(chain))]
        else:
            got = list(d.expand(_chain(chain), torch.tensor([[-1, 0, 1, 2]]))[0])
        for i, g in enumerate(got):
            torch.testing.assert_close(g, steps[i][t], atol=1e-5, rtol=0)


def test_branches_see_only_their_ancestors(peaked_llama):
    m = eagle3_model(peaked_llama).eval()
    ids = torch.randint(3, peaked_llama.vocab_size, (1, 8), generator=torch.Generator().manual_seed(7))
    feats = peaked_llama(ids).features
    d = m.as_drafter()
    d.start(ids, feats[:, :7])
    alone = d.expand(_chain([11, 12]), torch.tensor([[0, 1]]))
    # the same branch hanging beside two siblings (one with a child), batched with a second tree
    tree = DraftTree(tokens=torch.tensor([[20, 11, 21, 12], [11, 12, 30, 31]]),
                     parents=torch.tensor([[-1, -1, 0, 1], [-1, 0, -1, 2]]),
                     depths=torch.tensor([[1, 1, 2, 2], [1, 2, 1, 2]]), logq=torch.zeros(2, 4))
    got = d.expand(tree, torch.tensor([[1, 3], [0, 1]]))
    torch.testing.assert_close(got[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], alone[0], atol=1e-5, rtol=0)
    # changing a node's token invalidates its cached state (and its descendants')
    tree.tokens[0, 1] = 13
    changed = d.expand(tree, torch.tensor([[1, 3], [0, 1]]))
    assert not torch.allclose(changed[0], alone[0])
    torch.testing.assert_close(changed[1], alone[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="frontier has 1 rows but the tree has 2"):
        d.expand(tree, torch.tensor([[0]]))


def test_save_load_round_trip(peaked_llama, tmp_path):
    m = eagle3_model(peaked_llama)
    m.save_pretrained(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert meta["family"] == "eagle3" and meta["draft_vocab_size"] == 160 and meta["vocab_source"] == "token_counts"
    assert meta["target"] == target_identity(peaked_llama)  # the fingerprint data_gen records too
    assert meta["target"]["feature_layers"] == peaked_llama.feature_layers and meta["target"]["hidden_size"] == 32
    assert meta["config"]["ttt_steps"] == 3 and meta["dims"]["num_key_value_heads"] == 2
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "ck" / WEIGHTS_NAME))) == sorted(SGLANG_NAMES)
    torch.manual_seed(123)  # a different init: everything must come from the folder
    r = Eagle3Drafter.from_pretrained(tmp_path / "ck", peaked_llama)
    sig = online_batch(peaked_llama)
    assert r.loss(sig)[0].item() == m.loss(sig)[0].item()
    assert torch.equal(r.d2t, m.d2t) and torch.equal(r.t2d, m.t2d)
    peaked_llama.feature_layers = [0, 1, 2]  # a target tapped elsewhere must not silently feed this drafter
    try:
        with pytest.raises(DraftsmithError, match=r"trained on target features of layers \[.*\], but the loaded "
                                                   r"target taps \[0, 1, 2\]: set target.feature_layers="):
            Eagle3Drafter.from_pretrained(tmp_path / "ck", peaked_llama)
    finally:
        peaked_llama.feature_layers = meta["target"]["feature_layers"]
    feats = sig.features[:1, :10]
    a, b = m.as_drafter(), r.as_drafter()
    a.start(sig.input_ids[:1, :11], feats)
    b.start(sig.input_ids[:1, :11], feats)
    assert torch.equal(_root_logits(a), _root_logits(b))


def test_load_checks_family_and_target(peaked_llama, tmp_path, tiny_target_dir):
    from conf.schema import TargetConfig
    from drafters.eagle1 import Eagle1Drafter
    from drafters.target import load_target
    from tests.conftest import build_tiny_model

    eagle3_model(peaked_llama).save_pretrained(tmp_path / "ck")
    with pytest.raises(DraftsmithError, match="holds a 'eagle3' drafter, not 'eagle1': set drafter=eagle3"):
        Eagle1Drafter.from_pretrained(tmp_path / "ck", peaked_llama)
    build_tiny_model("llama", vocab_size=peaked_llama.vocab_size + 5).save_pretrained(tmp_path / "big")
    peaked_llama.tokenizer.save_pretrained(tmp_path / "big")
    other = load_target(TargetConfig(path=str(tmp_path / "big")), device="cpu")
    with pytest.raises(DraftsmithError, match=f"has vocab_size {peaked_llama.vocab_size + 5}: load the matching target"):
        Eagle3Drafter.from_pretrained(tmp_path / "ck", other)
    (tmp_path / "ck" / WEIGHTS_NAME).unlink()
    with pytest.raises(DraftsmithError, match="no model.safetensors: the save was interrupted"):
        Eagle3Drafter.from_pretrained(tmp_path / "ck", peaked_llama)
    assert Eagle1Config().name == "eagle1"


def test_each_target_shape(tiny_target):
    """from_target on Llama-, Qwen2- and GPT-2-shaped targets: trains a step and drafts."""
    m = eagle3_model(tiny_target)
    assert m.fc.in_features == 3 * 32 and m.midlayer.self_attn.k_proj.out_features == (
        m.dims.num_key_value_heads * 8)
    loss, met = m.loss(online_batch(tiny_target))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())
    ids = torch.randint(3, tiny_target.vocab_size, (1, 6))
    d = m.as_drafter()
    d.start(ids, tiny_target(ids[:, :5]).features)
    assert d.expand(_chain([5, 6]), torch.tensor([[-1, 0, 1]])).shape == (1, 3, tiny_target.vocab_size)


def test_bad_configs_and_batches(peaked_llama):
    with pytest.raises(DraftsmithError, match="drafter.num_layers=2: eagle3 has exactly one decoder layer"):
        eagle3_model(peaked_llama, num_layers=2)
    with pytest.raises(DraftsmithError, match=r"drafter.losses=\{'smooth_l1': 1.0\} for eagle3: use one or more of"):
        eagle3_model(peaked_llama, losses={"smooth_l1": 1.0})
    with pytest.raises(DraftsmithError, match="drafter.ttt_steps=0"):
        eagle3_model(peaked_llama, ttt_steps=0)
    sig = online_batch(peaked_llama)
    sig.features = None
    with pytest.raises(DraftsmithError, match="eagle3 trains on the target's tapped features, but this batch has none"):
        eagle3_model(peaked_llama).loss(sig)
    sig.features = torch.zeros(2, 16, 64)
    with pytest.raises(DraftsmithError, match="built for 3 feature taps \\(96 wide\\) but the batch has features 64"):
        eagle3_model(peaked_llama).loss(sig)
    with pytest.raises(DraftsmithError, match="eagle3 drafts from target features: pass them"):
        eagle3_model(peaked_llama).as_drafter().start(torch.tensor([[1, 2]]), None)


def test_full_vocab_and_offline_topk_signal(peaked_llama):
    """draft_vocab_size=null keeps every token; a cached top-k target (offline data) trains without NaNs."""
    m = eagle3_model(peaked_llama, draft_vocab_size=None)
    assert m.draft_vocab_size == peaked_llama.vocab_size and m.d2t.abs().sum() == 0
    sig = online_batch(peaked_llama)
    top = sig.logits.topk(5, dim=-1)
    off = TargetSignal(input_ids=sig.input_ids, attention_mask=sig.attention_mask, loss_mask=sig.loss_mask,
                       features=sig.features, topk_values=top.values, topk_indices=top.indices,
                       vocab_size=peaked_llama.vocab_size)
    small = eagle3_model(peaked_llama, draft_vocab_size=40)
    loss, met = small.loss(off)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()


@pytest.mark.parametrize("name", ["eagle1", "eagle3"])
def test_registry_and_composed_config(cfg_for, peaked_llama, name):
    """The names in conf/drafter/*.yaml reach these classes, and Hydra-composed configs build them."""
    from drafters.registry import drafter_class

    cfg = cfg_for(f"drafter={name}", "drafter.draft_vocab_size=64" if name == "eagle3" else "drafter.num_layers=2")
    cls = drafter_class(name)
    assert cls.family == name
    m = cls.from_target(cfg.drafter, peaked_llama, token_counts=pseudo_counts(peaked_llama))
    assert (m.draft_vocab_size == 64) if name == "eagle3" else (len(m.layers) == 2)
    loss, _ = m.loss(online_batch(peaked_llama))
    assert torch.isfinite(loss)
