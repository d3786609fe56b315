"""The exact-distribution check behind the statistical losslessness tests: a tiny Llama over V = 5 tokens,
the exact law of the 2nd and 3rd generated tokens, sampled counts and a chi-square p-value."""
from __future__ import annotations

import torch
from scipy import stats

from decoding.verify import SamplingRule

V = 5
PROMPT = torch.tensor([[1, 3, 0, 2, 3]])


def tiny_llama(seed: int, scale: float):
    """A 1-layer Llama over V tokens; lm_head scaled up so its distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def exact_pairs(target, rule: SamplingRule) -> torch.Tensor:
    """P(token 2, token 3) [V, V] under the warped target: sum over token 1 of p(t1) p(t2|t1) p(t3|t1,t2)."""
    P = PROMPT.shape[1]
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (t1, t2)
    seqs = torch.cat([PROMPT.expand(V * V, P), pairs], 1)
    with torch.no_grad():
        probs = rule.probs(target.model(seqs).logits.float())
    p1 = probs[0, P - 1]
    p2 = probs[:, P].view(V, V, V)[:, 0]  # [t1, t2]
    p3 = probs[:, P + 1].view(V, V, V)  # [t1, t2, t3]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)


def sample_pairs(generate, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(n):
        toks = generate(g)
        counts[toks[1] * V + toks[2]] += 1
    return counts


def pvalue(counts, probs) -> float:
    expected = probs.flatten().double() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token outside the warped support was produced"
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(stats.chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue)
