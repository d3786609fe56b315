"""Helpers shared by the decoder tests (test_decoder, test_decoder_exact): tiny in-memory targets, draft
trees, drafters of known agreement, the transformers greedy reference; not a test module."""
from __future__ import annotations

import torch

from conf.schema.eval import TreeConfig
from drafters.reference import NgramDrafter, TargetDrafter

TREES = {
    "chain": TreeConfig(kind="chain", depth=4),
    "static": TreeConfig(kind="static", paths=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]),
    "dynamic": TreeConfig(kind="dynamic", depth=4, top_k=3, total_tokens=12),
}


def small_target(arch: str, vocab_size: int = 320, seed: int = 0):
    """A 2-layer random target in memory (no tokenizer: EOS ids are passed explicitly)."""
    from drafters.target import Target
    from tests.conftest import build_tiny_model

    return Target(build_tiny_model(arch, vocab_size, seed=seed, num_layers=2), None, name=f"tiny-{arch}")


class NoisyTargetDrafter(TargetDrafter):
    """The target drafting for itself, except that with probability 1 - agree (independently per expanded
    node) its best token is demoted to second place, so its top-1 is wrong there."""

    def __init__(self, target, agree: float, seed: int = 0):
        super().__init__(target)
        # on the target's device: its draws mix with the target's logits there (a CPU generator cannot
        # feed CUDA tensors)
        self.agree, self.g = agree, torch.Generator(device=target.device).manual_seed(seed)

    def expand(self, tree, frontier):
        logits = super().expand(tree, frontier)
        flip = torch.rand(frontier.shape, generator=self.g, device=logits.device) >= self.agree
        top2 = logits.topk(2, dim=-1)
        swapped = logits.scatter(-1, top2.indices, top2.values.flip(-1))
        return torch.where(flip.unsqueeze(-1), swapped, logits)


def make_drafter(kind, target, seed=0):
    if kind == "ngram":
        return NgramDrafter(target.vocab_size, max_ngram=3, min_ngram=1)
    return NoisyTargetDrafter(target, {"never": 0.0, "always": 1.0, "sometimes": 0.6}[kind], seed)


def hf_greedy(target, prompt, n, eos):
    out = target.model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                attention_mask=torch.ones_like(prompt))
    return out[0, prompt.shape[1]:]


def random_prompt(target, seed, n=10):
    return torch.randint(3, target.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
