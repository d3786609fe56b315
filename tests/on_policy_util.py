"""Helpers shared by the on-policy tests (test_on_policy, test_on_policy_train): the small drafter and a
reference sampler that runs the LM one full forward per token; not a test module."""
from __future__ import annotations

import torch

from conf.schema.drafter import SmallConfig
from drafters.small_lm import SmallDrafter


def small(target, seed: int = 0) -> SmallDrafter:
    torch.manual_seed(seed)
    return SmallDrafter.from_target(SmallConfig(), target).eval()


def naive_sample(model, prompt, n, temperature, seed, eos):
    """What the drafter LM samples by itself: full forward each token, softmax(logits / T), one multinomial
    draw from torch.Generator(seed) per token (argmax at T = 0), stop after EOS."""
    g = torch.Generator().manual_seed(seed)
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax()) if temperature == 0 else int(
            torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            break
    return out
