"""On-policy distillation, the parts: prompts, the drafter's own sampling, the divergence on exactly the
loss_mask slots, Draft-OPD's replay rows, speculative rollouts, seeds, and one-line config errors.

    python -m pytest -q tests/training/test_on_policy.py
"""
from __future__ import annotations

import pytest
import torch

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.target import load_target
from tests.on_policy_util import naive_sample, small
from training.on_policy import (
    Cycle,
    divergence_fn,
    divergence_loss,
    on_policy_draw,
    pack,
    prompt_of,
    replay_rows,
    rollout_seed,
    sample,
    speculative_rollout,
)
from training.signal import online_signal


def test_prompt_is_the_prefix_before_the_first_assistant_token():
    ids = torch.tensor([5, 6, 7, 8, 9, 0, 0])
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 0])
    att = torch.tensor([1, 1, 1, 1, 1, 0, 0])
    assert prompt_of(ids, mask, att) == [5, 6, 7]
    assert prompt_of(ids, torch.tensor([1, 1, 0, 0, 0, 0, 0]), att) == [5]  # never empty
    assert prompt_of(ids, torch.zeros(7, dtype=torch.long), att) == [5, 6, 7, 8, 9]  # no assistant token: all


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_rollouts_are_what_the_drafter_samples_with_that_seed(tiny_target, temperature):
    """Batched, left-padded generation gives each row exactly the drafter's own per-row samples: same seed ->
    same tokens, whatever else shares the batch; caps and EOS cut rows."""
    model = small(tiny_target).model
    prompts, caps, seeds = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]], [10, 10, 4], [11, 12, 13]
    got = sample(model, prompts, caps, seeds, temperature, eos_ids=[], pad_id=0)
    want = [naive_sample(model, p, c, temperature, s, []) for p, c, s in zip(prompts, caps, seeds)]
    assert got == want and [len(x) for x in got] == caps
    assert sample(model, prompts[1:2], caps[1:2], seeds[1:2], temperature, [], 0) == got[1:2]  # batch-independent
    eos = got[0][3]  # pretend the 4th token is EOS: the row stops right after it
    cut = sample(model, prompts[:1], caps[:1], seeds[:1], temperature, eos_ids=[eos], pad_id=0)[0]
    assert cut == got[0][:got[0].index(eos) + 1]
    if temperature > 0:
        assert sample(model, prompts, caps, [1, 2, 3], temperature, [], 0) != got  # other seeds, other text


def _generated_signal(target, seed=0):
    """Two rollout rows: prompt (loss 0) + generated tokens (loss 1), right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, n in ((4, 7), (2, 4)):
        ids = torch.randint(3, target.vocab_size, (p + n,), generator=g).tolist()
        rows.append((ids, [0] * p + [1] * n))
    return online_signal(target, pack(rows, pad_id=0, max_length=64)), rows


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9),
                                       ("tvd", 0.5)])
def test_loss_is_the_divergence_on_exactly_the_generated_slots(llama_target, name, beta):
    drafter = small(llama_target)
    signal, rows = _generated_signal(llama_target)
    loss, metrics = divergence_loss(drafter.model, signal, divergence_fn(name, beta), name)
    # by hand: the state ids[:t+1] predicts generated slot t+1; one row at a time, no padding anywhere
    qs, ps = [], []
    for ids, mask in rows:
        with torch.no_grad():
            q = drafter.model(torch.tensor([ids])).logits[0]
            p = llama_target.lm_head(llama_target(torch.tensor([ids]), logits=False).last_hidden)[0]
        slots = [t for t in range(len(ids) - 1) if mask[t + 1]]
        assert len(slots) == sum(mask) - (mask[0] == 1)
        qs.append(q[slots])
        ps.append(p[slots])
    fn = {"forward_kl": L.forward_kl, "reverse_kl": L.reverse_kl, "tvd": L.tvd,
          "jsd": lambda a, b: L.jsd(a, b, beta=beta)}[name]
    want = fn(torch.cat(qs), torch.cat(ps))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert metrics[f"loss/{name}"] == pytest.approx(loss.item(), rel=1e-6)
    assert {"acc/1", f"loss/{name}"} == set(metrics)
    if name == "jsd" and beta == 0.9:
        assert loss.item() != pytest.approx(L.jsd(torch.cat(qs), torch.cat(ps)).item(), rel=1e-3)  # beta is used
    loss.backward()
    assert all(p.grad is not None for p in drafter.parameters())


def test_replay_rows_hold_the_rejected_branches():
    prompt = [1, 2, 3]
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]  # slot 3 is the target's first token (the first root)
    cycles = [Cycle([11, 50, 51, 52], 1),  # 11 accepted, 50 rejected at slot 5 (the target wrote 12)
              Cycle([13, 14, 15, 60], 3),  # 3 accepted, 60 rejected as the last draft: no state after it
              Cycle([70, 71, 72, 73], 0)]  # rejected at once at slot 10 (the target wrote 17)
    rows = replay_rows(prompt, tokens, cycles, max_replays=8, seed=0)
    assert rows == [([1, 2, 3, 10, 11, 50, 51, 52], [0] * 6 + [1, 1]),
                    ([1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 70, 71, 72, 73], [0] * 11 + [1, 1, 1])]
    # the replayed prefix is committed text; the branch starts with the rejected draft
    (a, _), (b, _) = rows
    row = prompt + tokens
    assert a[:5] == row[:5] and a[5] == 50 != row[5] and b[:10] == row[:10] and b[10] == 70 != row[10]
    one = replay_rows(prompt, tokens, cycles, max_replays=1, seed=0)
    assert len(one) == 1 and one[0] in rows
    assert replay_rows(prompt, tokens, cycles, max_replays=1, seed=0) == one  # seeded
    assert replay_rows(prompt, tokens[:4], cycles, 8, 0) == rows[:1]  # text cut before slot 9: no replay there


def test_speculative_rollout_records_every_cycle(llama_target):
    """Greedy target-assisted rollout: the text is the target's own greedy text; each cycle's accepted drafts
    are the text's next tokens and a rejected draft differs from the token the target wrote there."""
    from decoding.decoder import autoregressive_generate

    lm = small(llama_target).as_drafter(llama_target)
    prompt = [5, 6, 7, 8]
    tokens, cycles = speculative_rollout(llama_target, lm, prompt, cap=20, depth=3, temperature=0.0, seed=1,
                                         eos_ids=[])
    want, _ = autoregressive_generate(llama_target, torch.tensor([prompt]), 20, eos_ids=[])
    assert tokens == want.tolist() and len(tokens) == 20
    row, r = prompt + tokens, len(prompt)
    assert cycles and all(len(c.drafts) == 3 for c in cycles)
    for c in cycles:
        k = c.accepted
        assert c.drafts[:k] == row[r + 1:r + 1 + k]
        if k < 3 and r + k + 1 < len(row):
            assert c.drafts[k] != row[r + k + 1]
        r += k + 1
    assert r >= len(row) - 1  # the cycles cover the text
    assert any(c.accepted < 2 for c in cycles)  # a random drafter gets rejected: replays exist
    assert speculative_rollout(llama_target, lm, prompt, 0, 3, 0.0, 1, []) == ([], [])


def test_seeds_and_on_policy_draws_are_pure_functions():
    assert rollout_seed(0, 5, 0, 1, 2) == rollout_seed(0, 5, 0, 1, 2) < 2**63
    assert len({rollout_seed(0, s, r, a, b) for s in range(3) for r in range(2) for a in range(2) for b in range(3)}) == 36
    draws = [on_policy_draw(3, step, a) for step in range(500) for a in range(2)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(u < 0.3 for u in draws) / len(draws) - 0.3) < 0.05  # lambda = 0.3 of the micro-batches


@pytest.mark.parametrize("overrides,message", [
    (["objective.divergence=kl"], r"objective.divergence='kl': use one of forward_kl, reverse_kl, jsd, tvd"),
    (["objective.divergence=jsd", "objective.beta=1.0"], r"objective.beta=1.0 must be in \(0, 1\) for jsd"),
    (["objective.rollout=target"], r"objective.rollout='target': use drafter .* or speculative"),
    (["objective.fraction=1.5"], r"objective.fraction=1.5 must be in \[0, 1\]"),
    (["objective.max_new_tokens=0"], r"need temperature >= 0, max_new_tokens >= 1"),
    (["drafter=eagle3"], r"drafter=eagle3: use drafter=small"),
    (["train.mode=offline"], r"no offline cache holds: use train.mode=online"),
    (["deepspeed=zero3", "drafter.lora_r=4"], r"ZeRO-3 .* LoRA-wrapped drafter .* use deepspeed=zero2 or drafter.lora_r=0"),
])
def test_config_errors_are_one_line(cfg_for, llama_target, overrides, message):
    from training.objectives import build_objective

    with pytest.raises(DraftsmithError, match=message) as e:  # the schema's checks fail while the config is built
        build_objective(cfg_for("drafter=small", "objective=on_policy", *overrides), llama_target)
    assert "\n" not in str(e.value)


def test_yaml_defaults(cfg_for):
    o = cfg_for("drafter=small", "objective=on_policy").objective
    assert (o.name, o.divergence, o.rollout, o.fraction, o.temperature) == ("on_policy", "forward_kl", "drafter", 1.0, 1.0)


def test_fixture_tokenizer_eos(tiny_target_dir):
    """The rollouts stop at the target's EOS ids: the fixture target has one."""
    from conf.schema import TargetConfig

    t = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    assert t.eos_token_ids
