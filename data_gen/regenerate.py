"""Regenerate assistant turns with the target itself (data.regenerate=true).

    from data_gen.regenerate import regenerate
    new_messages, stats = regenerate(target, [conv.messages, ...], [conv.id, ...], cfg.data)

Drafters accept more when trained on what the target actually says, so every assistant turn is
replaced by the target's own answer, turn by turn: turn k's prompt already holds the regenerated
answers of turns < k. Conversations are batched through `model.generate` with left padding.

Determinism: sampling draws from a torch.Generator seeded per (data.gen_seed, conversation id, turn),
inside a logits processor, so a conversation's answer does not depend on which other conversations
share its batch or rank (sharding and resume cannot change it). Greedy (gen_temperature=0) needs no
randomness at all. Each row is capped at the tokens that can still fit into data.max_length, a cap
that depends only on the row itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from conf.errors import DraftsmithError
from data_gen.render import prompt_ids, trim_trailing


def conversation_seed(seed: int, conv_id: str, turn: int) -> int:
    """A 63-bit seed that names one (run seed, conversation, turn)."""
    return int(hashlib.sha256(f"{seed}/{conv_id}/{turn}".encode()).hexdigest()[:15], 16)


class PerRowSampler:
    """A logits processor that samples each row with its own generator (temperature, top-p) and returns
    logits that make greedy decoding pick exactly that sample."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
            sp, si = probs.sort(dim=-1, descending=True)
            drop = (sp.cumsum(-1) - sp) >= self.top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        out = torch.full_like(scores, float("-inf"))
        for b, g in enumerate(self.generators):
            tok = torch.multinomial(probs[b], 1, generator=g)
            out[b, tok] = 0.0
        return out


@dataclass
class RegenStats:
    generated_tokens: int = 0
    turns: int = 0
    hit_max_new_tokens: int = 0  # answers cut by gen_max_new_tokens (or by data.max_length)


def _generate(target, prompts: list[list[int]], caps: list[int], seeds: list[int], data) -> list[list[int]]:
    """The target's answers to `prompts` at data_gen's sampling settings (generate_rows)."""
    eos = target.eos_token_ids
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos[0]
    return generate_rows(target.model, prompts, caps, seeds, data.gen_temperature, data.gen_top_p, eos, pad,
                         target.device)


@torch.no_grad()
def generate_rows(model, prompts: list[list[int]], caps: list[int], seeds: list[int], temperature: float,
                  top_p: float, eos_ids: list[int], pad_id: int, device) -> list[list[int]]:
    """Left-padded batched `generate`: row b is drawn with its own torch.Generator(seeds[b]) at `temperature`
    (0 = greedy) and nucleus `top_p`, then cut at caps[b] new tokens and after its first EOS (kept). A row's
    tokens depend only on (weights, prompt, seed), never on the batch it shares."""
    from transformers import GenerationConfig, LogitsProcessorList

    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        att[b, L - len(p):] = 1
    if max(caps) <= 0:
        return [[] for _ in prompts]
    # Explicit neutral values: transformers fills unset fields from the model's generation_config, whose
    # repetition penalty or n-gram bans would bend the samples away from the model's distribution (which is
    # what a drafter is trained to match). Sampling, when asked for, is PerRowSampler's job.
    gc = GenerationConfig(do_sample=False, max_new_tokens=max(caps), eos_token_id=list(eos_ids) or None,
                          pad_token_id=pad_id, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
                          no_repeat_ngram_size=0, min_new_tokens=0)
    procs = LogitsProcessorList()
    if temperature > 0:
        procs.append(PerRowSampler([torch.Generator(device=device).manual_seed(s) for s in seeds], temperature,
                                   top_p))
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gc,
                         logits_processor=procs)
    eos, result = set(eos_ids), []
    for b, cap in enumerate(caps):
        new = out[b, L:L + max(cap, 0)].tolist()
        stop = next((j for j, t in enumerate(new) if t in eos), None)
        result.append(new[:stop + 1] if stop is not None else new)
    return result


def regenerate(target, conversations: list[list[dict]], conv_ids: list[str], data
               ) -> tuple[list[list[dict]], RegenStats]:
    """Replace every assistant turn by the target's answer, turn by turn; returns new message lists."""
    template = target.chat_template
    if not target.eos_token_ids:
        raise DraftsmithError(f"target {target.name} has no eos token, so regenerated answers would never end: set "
                              "eos_token_id in its generation_config.json (or tokenizer), or use data.regenerate=false")
    eos = set(target.eos_token_ids)
    msgs = [[dict(m) for m in trim_trailing(c)] for c in conversations]
    turns = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in msgs]
    stats = RegenStats()
    for k in range(max((len(t) for t in turns), default=0)):
        todo, prompts, caps, seeds = [], [], [], []
        for c, t in enumerate(turns):
            if k >= len(t):
                continue
            p = prompt_ids(target.tokenizer, msgs[c][:t[k]], template)
            room = data.max_length - len(p)
            if room <= 0:  # this turn (and any later one) lies beyond max_length: it will be truncated away
                continue
            todo.append(c)
            prompts.append(p)
            caps.append(min(data.gen_max_new_tokens, room))
            seeds.append(conversation_seed(data.gen_seed, conv_ids[c], k))
        for s in range(0, len(todo), data.batch_size):
            sl = slice(s, s + data.batch_size)
            outs = _generate(target, prompts[sl], caps[sl], seeds[sl], data)
            for c, new in zip(todo[sl], outs):
                ended = bool(new) and new[-1] in eos
                stats.generated_tokens += len(new)
                stats.turns += 1
                stats.hit_max_new_tokens += not ended
                text = target.tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
                msgs[c][turns[c][k]]["content"] = text
    return msgs, stats
