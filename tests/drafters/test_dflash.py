"""DFlash block drafter: config ranges, the mask-token choice, the block mask (sdpa and FlexAttention), the
weighted block loss against an independent recomputation through the decoding path, training through the
stage (exact resume), refused objectives, lossless decoding at T=0 (chain, dynamic tree) and T=1.

    python -m pytest -q tests/drafters/test_dflash.py
"""
from __future__ import annotations

import math

import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import DFlashConfig
from conf.schema.eval import TreeConfig
from decoding.decoder import SpeculativeDecoder
from drafters.dflash import DFlashDrafter
from drafters.dflash_blocks import block_visibility, choose_mask_token, position_weights, sample_anchors
from drafters.target import Target
from tests.heads_util import make_batch, online_signal, train
from tests.train_fixtures import base_overrides, final_weights, write_data_gen


def fresh(target, seed: int = 0, **kw) -> DFlashDrafter:
    torch.manual_seed(seed)
    return DFlashDrafter.from_target(DFlashConfig(**kw), target)


def signal_of(target, seed: int = 0, T: int = 24):
    return online_signal(target, *make_batch(target.vocab_size, seed=seed, T=T))


# --- config, mask token, taps ----------------------------------------------------------------------------
def test_registry_and_yaml(cfg_for):
    from drafters.registry import drafter_class

    assert drafter_class("dflash") is DFlashDrafter
    c = cfg_for("drafter=dflash").drafter
    assert (c.block_size, c.num_layers, c.target_layer_ids, c.mask_token_id, c.anchors, c.gamma, c.loss, c.fusion,
            c.attention) == (16, 1, None, None, 64, None, "hard", "none", "sdpa")
    assert c.decay == 7.0 and cfg_for("drafter=dflash", "drafter.block_size=8").drafter.decay == 4.0


@pytest.mark.parametrize("override,message", [
    ("drafter.block_size=1", "drafter.block_size=1: use 2..64 (the anchor + at least one mask; z-lab uses 16, "
                             "Model-Optimizer 8)"),
    ("drafter.num_layers=6", "drafter.num_layers=6: dflash has 1 to 5 decoder layers"),
    ("drafter.target_layer_ids=[2,2]", "drafter.target_layer_ids=[2, 2]: give distinct layer indices >= 0 (a subset "
                                       "of target.feature_layers), or null for every tap"),
    ("drafter.mask_token_id=-3", "drafter.mask_token_id=-3 must be >= 0, or null to pick one from the tokenizer"),
    ("drafter.anchors=0", "drafter.anchors=0: sample at least 1 block per sequence"),
    ("drafter.gamma=-1", "drafter.gamma=-1.0 must be >= 0 (0 = no position decay), or null for the published value "
                         "(7 for B=16, 4 for B=8)"),
    ("drafter.loss=mse", "drafter.loss='mse': use one of hard, distill"),
    ("drafter.fusion=all", "drafter.fusion='all': use one of none, layerwise"),
    ("drafter.attention=eager", "drafter.attention='eager': use one of sdpa, flex"),
])
def test_bad_settings_are_one_line_errors(cfg_for, override, message):
    with pytest.raises(DraftsmithError) as e:
        cfg_for("drafter=dflash", override)
    assert str(e.value) == message


class _Tok:
    def __init__(self, n, mask=None, pad=None):
        self.n, self.mask_token_id, self.pad_token_id = n, mask, pad
        self.mask_token, self.pad_token = "<mask>", "<pad>"

    def __len__(self):
        return self.n


class _Target:
    def __init__(self, rows, tok, eos=(2,)):
        self.vocab_size, self.tokenizer, self.eos_token_ids, self.name = rows, tok, list(eos), "t"


def test_mask_token_choice_in_order_and_errors(llama_target):
    assert choose_mask_token(_Target(100, _Tok(100, mask=7, pad=0)), None)[0] == 7  # the tokenizer's mask token
    mask, why = choose_mask_token(_Target(128, _Tok(100, pad=0)), None)
    assert (mask, why) == (100, "a reserved embedding row past the tokenizer's 100 tokens")
    assert choose_mask_token(_Target(100, _Tok(100, pad=0)), None)[0] == 0  # the pad token (the demo target's case)
    assert choose_mask_token(llama_target, None) == (0, "the pad token '<|endoftext|>' (no mask token, no reserved row)")
    assert choose_mask_token(_Target(100, _Tok(100, pad=2)), 5) == (5, "drafter.mask_token_id")
    with pytest.raises(DraftsmithError) as e:
        choose_mask_token(_Target(100, _Tok(100, pad=2)), None)  # the pad token is the EOS token
    assert str(e.value) == ("target t has no mask token, no reserved embedding row and no pad token apart from EOS: "
                            "set drafter.mask_token_id to an id below 100 that never appears in text (e.g. a reserved "
                            "special token)")
    with pytest.raises(DraftsmithError) as e:
        fresh(llama_target, mask_token_id=320)
    assert str(e.value) == ("drafter.mask_token_id=320 is outside the target's 320 embedding rows: give an id below "
                            "320 that never appears in text, or null to pick one from the tokenizer")


def test_target_layer_ids_pick_taps(llama_target):
    assert llama_target.feature_layers == [1, 2, 3]
    m = fresh(llama_target, target_layer_ids=[3, 1])
    assert m.taps == [2, 0] and m.target_layer_ids == [3, 1] and m.fc.weight.shape[1] == 2 * 32
    sig = signal_of(llama_target)
    assert torch.isfinite(torch.tensor(m.loss(sig)[1]["loss/hard"]))
    with pytest.raises(DraftsmithError) as e:
        fresh(llama_target, target_layer_ids=[0, 2])
    assert str(e.value) == ("drafter.target_layer_ids=[0, 2] asks for layer(s) [0], which the target does not tap "
                            "(target.feature_layers=[1, 2, 3]): set target.feature_layers=[0,1,2,3]")


# --- blocks and the mask ---------------------------------------------------------------------------------
def test_position_weights():
    w = position_weights(4, 2.0)
    assert w.tolist() == pytest.approx([0.0, 1.0, math.exp(-0.5), math.exp(-1.0)])
    assert position_weights(4, 0.0).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_anchors_sit_on_scored_positions_and_replay_from_the_generator():
    loss = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    a, keep = sample_anchors(loss, attn, 8, torch.Generator().manual_seed(0))
    assert a[0].tolist() == [1, 2, 3] and keep[0].tolist() == [True] * 3  # x_{a+1} scored: a in {1, 2, 3}
    assert a[1, keep[1]].tolist() == [3] and keep[1].tolist() == [True, False, False]  # x_5 is padding
    b, _ = sample_anchors(loss, attn, 2, torch.Generator().manual_seed(5))
    c, _ = sample_anchors(loss, attn, 2, torch.Generator().manual_seed(5))
    assert torch.equal(b, c) and set(b[0].tolist()) <= {1, 2, 3}


def test_block_visibility_by_hand():
    vis = block_visibility(torch.tensor([[2, 4]]), torch.tensor([[True, False]]), T=5, block=2)[0, 0].int()
    assert vis.tolist() == [
        # ctx 0..4       block 0  block 1
        [1, 1, 0, 0, 0, 1, 1, 0, 0],  # block 0 (anchor 2): context 0, 1 and its own block
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],  # block 1 dropped: itself only
        [0, 0, 0, 0, 0, 0, 0, 1, 1]]


def test_flex_block_mask_gives_the_sdpa_loss(llama_target):
    """FlexAttention (eager on CPU, forward only) and the materialised mask: the same loss to 1e-5 (float32;
    the two kernels sum the softmax in different orders)."""
    m = fresh(llama_target, block_size=4, anchors=6).eval()
    sig = signal_of(llama_target, T=32)
    with torch.no_grad():
        a, _ = m.loss(sig)
        m.cfg.attention = "flex"
        b, _ = m.loss(sig)
    assert abs(a.item() - b.item()) < 1e-5
    m.train()
    with pytest.raises(DraftsmithError, match="drafter.attention=flex cannot train on CPU"):
        m.loss(sig)


# --- the loss ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hard", "distill"])
@pytest.mark.parametrize("fusion", ["none", "layerwise"])
def test_block_loss_equals_drafting_from_each_anchor(llama_target, kind, fusion):
    """Every training block equals what the decoder drafts from that anchor (start on x_0..x_a with the
    features f_0..f_{a-1}), and the loss is the w_k-weighted mean of CE / soft CE over the scored positions,
    recomputed here from those decoding logits (tolerance 1e-5: the batched and the cached forwards differ
    in summation order)."""
    m = fresh(llama_target, block_size=4, anchors=5, gamma=2.0, loss=kind, fusion=fusion, num_layers=2).eval()
    if m.tap_mix is not None:
        torch.nn.init.normal_(m.tap_mix)  # a mix that is not the fusion=none one
    sig = signal_of(llama_target, T=20)
    with torch.no_grad():
        loss, metrics = m.loss(sig)
    anchors, keep = sample_anchors(sig.loss_mask, sig.attention_mask, 5, torch.Generator().manual_seed(0))
    d = m.as_drafter(llama_target)
    w, num, den = position_weights(4, 2.0), 0.0, 0.0
    for b in range(2):
        for a in anchors[b, keep[b]].tolist():
            d.start(sig.input_ids[b:b + 1, :a + 1], sig.features[b:b + 1, :a])
            d._draft()
            for k in range(1, 4):
                t = a + k
                if t >= 20 or not (sig.loss_mask[b, t] and sig.attention_mask[b, t]):
                    continue
                q = torch.log_softmax(d.depth_logits[0, k - 1], -1)
                if kind == "hard":
                    term = -q[sig.input_ids[b, t]]
                else:
                    term = -(torch.softmax(sig.logits[b, t - 1], -1) * q).sum()
                num, den = num + w[k] * term, den + w[k]
    assert loss.detach().item() == pytest.approx(float(num / den), abs=1e-5)
    assert metrics["dflash/blocks"] == keep.sum().item() / 2


@pytest.mark.parametrize("kind", ["hard", "distill"])
def test_loss_falls_and_padding_changes_nothing(peaked_llama, kind):
    llama_target = peaked_llama  # a random tiny target is nearly uniform; a peaked one is a real teacher
    m = fresh(llama_target, block_size=4, anchors=8, loss=kind)
    sig = signal_of(llama_target, T=24)
    losses = train(m, lambda: sig, steps=15, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    m.eval()
    m.cfg.anchors = 100  # every eligible anchor (the random draw depends on the padded length, the set then not)
    wide = online_signal(llama_target, *[torch.cat([x, torch.zeros(2, 6, dtype=x.dtype)], 1)
                                         for x in (sig.input_ids, sig.attention_mask, sig.loss_mask)])
    with torch.no_grad():
        assert m.loss(sig)[0].item() == pytest.approx(m.loss(wide)[0].item(), abs=1e-5)


# --- training through the stage, objectives --------------------------------------------------------------
def _train(tmp_path, tiny_target_dir, target, name, *overrides):
    from conf.schema import load_config
    from training.stage import train as train_stage

    root = tmp_path / "runs"
    if not (root / name / "data_gen" / "meta.json").exists():
        write_data_gen(root / name, target, n_rows=12)
    cfg = load_config(base_overrides(tiny_target_dir("llama"), root, name)
                      + ["drafter=dflash", "drafter.block_size=4", "drafter.anchors=4", *overrides])
    return train_stage(cfg, target=target)


def test_resume_is_exact_and_the_folder_reloads(tmp_path, tiny_target_dir, llama_target):
    """4 steps in one go == 2 steps, then the same command to 4 (anchors come from the checkpointed
    generator state, so the resumed run draws the same blocks)."""
    args = ["train.save_every=2", "train.eval_every=0"]
    ref = _train(tmp_path, tiny_target_dir, llama_target, "ref", *args, "train.max_steps=4")
    _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=2")
    second = _train(tmp_path, tiny_target_dir, llama_target, "res", *args, "train.max_steps=4")
    assert second["resumed_from"].endswith("step_00000002") and second["steps_this_run"] == 2
    a, b = final_weights(ref), final_weights(second)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded = DFlashDrafter.from_pretrained(ref["final_dir"], llama_target)
    assert loaded.mask_id == 0 and loaded.target_layer_ids == [1, 2, 3] and loaded.cfg.block_size == 4
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)


@pytest.mark.parametrize("objective", ["hass", "griffin", "coral", "gto", "on_policy", "adaspec"])
def test_objectives_other_than_token_refuse_dflash(cfg_for, llama_target, objective):
    from training.objectives import build_objective

    with pytest.raises(DraftsmithError) as e:
        build_objective(cfg_for("drafter=dflash", f"objective={objective}"), llama_target)
    assert "drafter=dflash" in str(e.value) and "\n" not in str(e.value)


# --- decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tree", [TreeConfig(kind="chain", depth=3),
                                  TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8)])
def test_greedy_equals_autoregressive_with_one_forward_per_cycle(tiny_target, tree):
    m = fresh(tiny_target, block_size=4, anchors=8)
    train(m, lambda: signal_of(tiny_target), steps=4, lr=1e-2)  # not a random drafter: drafts get accepted
    d = m.eval().as_drafter(tiny_target)
    dec = SpeculativeDecoder(tiny_target, d, tree)
    ids = torch.randint(0, tiny_target.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    out, st = dec.generate(ids, 24, eos_ids=[])
    assert out.tolist() == dec.generate_autoregressive(ids, 24, eos_ids=[])[0].tolist()
    assert st.drafter_forwards == st.cycles  # one block forward per cycle, none to read the prompt


def test_too_deep_a_tree_is_a_one_line_error(llama_target):
    d = fresh(llama_target, block_size=3).eval().as_drafter(llama_target)
    dec = SpeculativeDecoder(llama_target, d, TreeConfig(kind="chain", depth=3))
    with pytest.raises(DraftsmithError) as e:
        dec.generate(torch.tensor([[5, 6, 7]]), 8, eos_ids=[])
    assert str(e.value) == ("dflash drafts 2 tokens per forward, so at most 2 deep: set the eval tree depth to <= 2 "
                            "or train a larger drafter.block_size")


@pytest.mark.parametrize("case", ["chain", "specinfer"])
def test_sampling_is_lossless(case):
    """T = 1: the 2nd and 3rd tokens follow the target's own distribution (test_decoder_sampling's chi-square
    on a 5-token Llama), drafting with a DFlash chain or a sampled static tree (mask id 4: the tiny target
    has no tokenizer, so it is given)."""
    from decoding.verify import SamplingRule
    from tests.sampling_util import PROMPT, exact_pairs, pvalue, sample_pairs, tiny_llama

    target = Target(tiny_llama(0, 14.0), None, name="tiny-v5")
    d = fresh(target, seed=3, block_size=3, mask_token_id=4).eval().as_drafter(target)
    rule = SamplingRule(temperature=1.0, top_k=4)
    tree = (TreeConfig(kind="chain", depth=2) if case == "chain"
            else TreeConfig(kind="static", paths=[[0], [1], [0, 0], [1, 0]]))
    dec = SpeculativeDecoder(target, d, tree, rule.temperature, rule.top_p, rule.top_k, sample=True)
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), 200)
    assert pvalue(counts, exact_pairs(target, rule)) > 1e-3
