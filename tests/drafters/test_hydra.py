"""Hydra / Hydra++ heads: teacher forcing aligned to t+d+1, losses, gradients (prefix layer checkpointed
or not), decoding along tree paths with the prefix layer's KV cache, saving.

    python -m pytest -q tests/drafters/test_hydra.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import TargetConfig
from conf.schema.drafter import HydraConfig
from decoding.tree import DraftTree
from drafters.base import TargetSignal
from drafters.hydra_heads import HydraDecodeDrafter, HydraDrafter
from drafters.target import load_target
from tests.heads_util import grads, greedy_signal, signal_for, train


def hydra_pp(target, **kw) -> HydraDrafter:
    torch.manual_seed(0)
    cfg = HydraConfig(num_heads=3, mlp_layers=2, prefix_layer=True, teacher_loss=True, **kw)
    return HydraDrafter.from_target(cfg, target)


def test_structure_and_init(llama):
    H = llama.hidden_size
    m = HydraDrafter.from_target(HydraConfig(num_heads=3, mlp_layers=2), llama)
    for d in range(1, 4):  # head d reads h_t and d token embeddings
        first = m.hydra_mlp[d - 1][0]
        assert first.linear.weight.shape == (H, (d + 1) * H) and not first.linear.weight.any()
        assert torch.equal(first.res_connection.weight[:, :H], torch.eye(H))
        assert not first.res_connection.weight[:, H:].any()
        assert not hasattr(m.hydra_mlp[d - 1][1], "res_connection")
        assert torch.equal(m.hydra_lm_head[d - 1].weight, llama.model.get_output_embeddings().weight)
    assert m.prefix_layer is None
    # a fresh head is the target's LM head on h_t, whatever the path
    h, emb = torch.randn(4, H), torch.randn(4, 2, H)
    torch.testing.assert_close(m.head(2, h, emb), llama.lm_head(h))
    pp = hydra_pp(llama)
    assert pp.prefix_layer.self_attn.q_proj.weight.shape == (H, H)
    assert any(n.startswith("prefix_layer.") for n, _ in pp.named_parameters())
    assert not any("_embed" in n or n.startswith("model.") for n, _ in pp.named_parameters())  # target not inside
    import copy

    twin = copy.deepcopy(pp)  # e.g. a frozen reference copy: own weights, the target's embedding shared
    assert twin.embed.__self__ is not pp and twin._embed_ref.obj is llama.model.get_input_embeddings()
    assert twin.prefix_layer.mlp.up_proj.weight.data_ptr() != pp.prefix_layer.mlp.up_proj.weight.data_ptr()
    pp.to(torch.bfloat16)  # as DeepSpeed's bf16 mode does: RoPE frequencies must stay exact
    assert pp._rotary.inv_freq.dtype == torch.float32 and "_rotary.inv_freq" not in pp.state_dict()


def test_registry_and_yaml(cfg_for):
    from drafters.registry import drafter_class

    assert drafter_class("hydra") is HydraDrafter
    c = cfg_for("drafter=hydra_pp").drafter
    assert (c.name, c.mlp_layers, c.prefix_layer, c.teacher_loss) == ("hydra", 4, True, True)
    assert cfg_for("drafter=hydra").drafter.prefix_layer is False


def test_head_d_is_teacher_forced_with_tokens_t_plus_1_to_t_plus_d(llama):
    """Known answer: the target's embeddings of tokens 0..31 are one-hot, head d's residual picks the
    embedding of the LAST token on its path (x_{t+d}) and its LM head maps e_j to token j+1, so with
    x_s = s mod 32 every head is exact iff it reads x_{t+1..t+d} and is scored on x_{t+d+1}."""
    K, H, T = 3, llama.hidden_size, 40
    j = torch.arange(32)
    with torch.no_grad():
        llama.model.get_input_embeddings().weight[:32] = torch.eye(32)
        m = HydraDrafter.from_target(HydraConfig(num_heads=K, losses={"ce": 1.0, "soft_ce": 1.0}), llama)
        succ = torch.zeros(llama.vocab_size, H)
        succ[(j + 1) % 32, j] = 30.0
        for d in range(1, K + 1):
            w = m.hydra_mlp[d - 1][0].res_connection.weight
            w.zero_()
            w[:, d * H:] = torch.eye(H)
            m.hydra_lm_head[d - 1].weight.copy_(succ)
    ids = (torch.arange(T) % 32)[None]
    # the base's own prediction at t is x_{t+1}: its hidden state one-hot at x_t, through `succ`
    sig = TargetSignal(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids),
                       last_hidden=torch.eye(32)[ids], lm_head=lambda h: h @ succ.T)
    loss, metrics = m.loss(sig)
    assert loss.item() < 1e-6
    assert [metrics[f"acc/{d}"] for d in range(1, K + 1)] == [1.0, 1.0, 1.0]


def test_loss_falls_on_every_shape(tiny_target):
    torch.manual_seed(0)
    m = HydraDrafter.from_target(HydraConfig(num_heads=2), tiny_target)
    sig = signal_for(tiny_target)
    losses = train(m, lambda: sig, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 1.0, losses


def test_hydra_pp_teacher_loss_falls(llama):
    m = hydra_pp(llama, losses={"ce": 1.0})
    assert m.losses == {"soft_ce": 1.0}
    sig = signal_for(llama)
    loss, metrics = m.loss(sig)
    assert set(metrics) == {"loss/soft_ce", "acc/1", "acc/2", "acc/3"}
    same = hydra_pp(llama, losses={"soft_ce": 1.0})
    same.teacher_loss = False
    assert same.loss(sig)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    # soft CE is bounded below by the (random) target's entropy; the KL part must shrink
    from drafters.losses import soft_ce

    floor = sum(soft_ce(sig.logits[:, d:-1], sig.logits[:, d:-1], sig.loss_mask[:, d + 1:]).item() for d in (1, 2, 3))
    losses = train(m, lambda: sig, steps=6, lr=1e-2)
    assert losses[-1] - floor < 0.8 * (losses[0] - floor), (losses, floor)


def test_golden_first_losses(llama):
    sig = signal_for(llama)
    plain = HydraDrafter.from_target(HydraConfig(), llama)  # deterministic init
    assert plain.loss(sig)[0].item() == pytest.approx(GOLDEN_HYDRA, abs=1e-4)
    pp = hydra_pp(llama)  # seeded random prefix layer
    assert pp.loss(sig)[0].item() == pytest.approx(GOLDEN_HYDRA_PP, abs=1e-4)


GOLDEN_HYDRA = 23.090740  # = Medusa-1 at init: both start as the LM head on h_t
GOLDEN_HYDRA_PP = 17.314953


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_parameter_gets_a_gradient(llama, checkpointing):
    m = hydra_pp(llama).train()
    m.set_gradient_checkpointing(checkpointing)
    m.loss(signal_for(llama))[0].backward()
    g = grads(m)
    assert set(g) == {n for n, _ in m.named_parameters()}
    assert all(v.any() for v in g.values()), [n for n, v in g.items() if not v.any()]


def test_checkpointing_gives_the_same_gradients(llama):
    sig = signal_for(llama)
    runs = []
    for on in (False, True):
        m = hydra_pp(llama).train()
        m.set_gradient_checkpointing(on)
        m.loss(sig)[0].backward()
        runs.append(grads(m))
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prefix", [False, True])
def test_decode_matches_training_heads(llama, prefix):
    torch.manual_seed(0)
    m = HydraDrafter.from_target(HydraConfig(num_heads=3, mlp_layers=2, prefix_layer=prefix), llama)
    sig = signal_for(llama)
    train(m, lambda: sig, steps=2, lr=1e-2)
    m.eval()
    ids, hid = sig.input_ids[:1], sig.last_hidden[:1]
    n = 8
    with torch.no_grad():
        h = m.prefix(hid)[0, n - 1][None]
        emb = llama.embed(ids[0, n: n + 3])[None]

        def want(d, path):  # head d on the root x_n and a path of drafted tokens
            return m.head(d, h, llama.embed(torch.tensor([ids[0, n].item(), *path]))[None])[0]

    d = m.as_drafter(llama)
    assert isinstance(d, HydraDecodeDrafter) and d.feature_source == "last_hidden"
    d.start(ids[:, : n + 1], hid[:, :n])
    torch.testing.assert_close(d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0],
                               m.head(1, h, emb[:, :1])[0])
    # a tree: a(1) -> b(2) ; c(1). Expanding b reads [root, a, b]; c reads [root, c]; root reads [root]
    tree = DraftTree(tokens=torch.tensor([[11, 12, 13]]), parents=torch.tensor([[-1, 0, -1]]),
                     depths=torch.tensor([[1, 2, 1]]), logq=torch.zeros(1, 3))
    out = d.expand(tree, torch.tensor([[1, 2, -1, 0]]))
    for f, (depth, path) in enumerate([(3, [11, 12]), (2, [13]), (1, []), (2, [11])]):
        torch.testing.assert_close(out[0, f], want(depth, path))
    # teacher forcing == drafting the true tokens
    true_path = DraftTree(tokens=ids[:, n + 1: n + 3], parents=torch.tensor([[-1, 0]]),
                          depths=torch.tensor([[1, 2]]), logq=torch.zeros(1, 2))
    with torch.no_grad():
        trained = m.head(3, h, emb)[0]
    torch.testing.assert_close(d.expand(true_path, torch.tensor([[1]]))[0, 0], trained)
    with pytest.raises(DraftsmithError, match="hydra has 3 heads"):
        d.expand(DraftTree(tokens=torch.tensor([[1, 2, 3]]), parents=torch.tensor([[-1, 0, 1]]),
                           depths=torch.tensor([[1, 2, 3]]), logq=torch.zeros(1, 3)), torch.tensor([[2]]))
    # committing in pieces (the prefix layer's KV cache) == reading the whole sequence at once
    d.start(ids[:, :4], hid[:, :3])
    d.commit(ids[:, 4:7], hid[:, 3:6])
    d.commit(ids[:, 7: n + 1], hid[:, 6:n])
    torch.testing.assert_close(d.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0],
                               m.head(1, h, emb[:, :1])[0], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(llama, tmp_path):
    import json

    m = hydra_pp(llama)
    sig = signal_for(llama)
    train(m, lambda: sig, steps=2, lr=1e-2)
    m.save_pretrained(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "drafter_config.json").read_text())
    assert meta["family"] == "hydra" and meta["config"]["prefix_layer"] is True
    assert meta["dims"]["prefix_layer"]["hidden_size"] == 32
    loaded = HydraDrafter.from_pretrained(tmp_path / "h", llama)
    assert loaded.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    assert loaded.loss(sig)[0].item() == m.loss(sig)[0].item()


def test_speculative_decoding_accepts_and_is_lossless(tiny_target_dir):
    """End to end through decoding/decoder.py (which hands over last_hidden, as feature_source asks); heads
    trained on the target's greedy continuations (tau 3.2 of at most 4 when written)."""
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder

    target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    prompts, sig = greedy_signal(target)
    for prefix in (False, True):
        torch.manual_seed(0)
        m = HydraDrafter.from_target(HydraConfig(num_heads=3, prefix_layer=prefix), target)
        train(m, lambda: sig, steps=40, lr=1e-2)
        m.eval()
        for tree in (TreeConfig(kind="chain", depth=3), TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8)):
            dec = SpeculativeDecoder(target, m.as_drafter(target), tree)
            got, st = dec.generate(prompts[0], 30, eos_ids=[])
            want, _ = dec.generate_autoregressive(prompts[0], 30, eos_ids=[])
            assert got.tolist() == want.tolist()
            assert st.tau > 2.5, (prefix, st.as_dict())
