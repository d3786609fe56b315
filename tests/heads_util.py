"""Helpers shared by the head and small-LM drafter tests (test_medusa, test_hydra, test_small): batches,
the online target signal, a few training steps, gradients; not a test module."""
from __future__ import annotations

import torch

from drafters.base import TargetSignal


def make_batch(vocab: int, seed: int = 0, T: int = 16):
    """Two right-padded rows; the first 4 positions are the 'prompt' (not trained on)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=g)
    attn = torch.ones_like(ids)
    attn[1, T - 4:] = 0
    ids[1, T - 4:] = 0
    loss_mask = attn.clone()
    loss_mask[:, :4] = 0
    return ids, attn, loss_mask


def online_signal(target, ids, attn, loss_mask) -> TargetSignal:
    """What the train stage's online mode hands a drafter: the frozen target's outputs for the batch."""
    with torch.no_grad():
        out = target(ids, attention_mask=attn)
    return TargetSignal(input_ids=ids, attention_mask=attn, loss_mask=loss_mask, features=out.features,
                        last_hidden=out.last_hidden, lm_head=target.lm_head, vocab_size=target.vocab_size)


def train(drafter, signal_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(drafter.param_groups(lr), betas=(0.9, 0.95))
    losses = []
    for _ in range(steps):
        loss, _ = drafter.loss(signal_fn())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def grads(drafter) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in drafter.named_parameters() if p.requires_grad and p.grad is not None}


def checkpointing_on(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)


def signal_for(target, seed=0):
    return online_signal(target, *make_batch(target.vocab_size, seed))


def greedy_signal(target, n_prompts: int = 4, new_tokens: int = 40):
    """Self-distillation data: the target's own greedy continuations of random 5-token prompts."""
    from decoding.decoder import autoregressive_generate

    prompts = [torch.randint(3, target.vocab_size, (5,), generator=torch.Generator().manual_seed(s))
               for s in range(n_prompts)]
    ids = torch.stack([torch.cat([p, autoregressive_generate(target, p, new_tokens, eos_ids=[])[0]]) for p in prompts])
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    return prompts, online_signal(target, ids, torch.ones_like(ids), mask)
