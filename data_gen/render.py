"""Chat templating and the assistant-only loss mask, for ANY chat template.

    from data_gen.render import render_conversation
    row, reason = render_conversation(tokenizer, messages, template, eos_ids=[2], max_length=2048)
    row.input_ids, row.loss_mask, row.truncated     # or (None, "why this conversation was skipped")

No template-specific markers are parsed. The assistant span of turn i is found by *incremental prefix
rendering*: render messages[:i] with the generation prompt (P) and messages[:i+1] (F); the tokens F adds
to P are what the model produced in that turn: its content and its end-of-turn token(s). The
generation-prompt tokens (`<|im_start|>assistant\\n`) belong to P, so they are never trained on; the
end-of-turn token is, so drafters learn to end turns. Glue the template writes after the end-of-turn
token (ChatML's trailing newline) is not: the mask stops at the first of the target's eos tokens.

This needs the template to be prefix-stable: rendering more messages only appends text. We check it at
the token level first (P's tokens are a prefix of F's, F's of the whole conversation's); where BPE merges
across a boundary break that, we fall back to character offsets of the text (fast tokenizers); a
template that rewrites earlier text (e.g. one that drops past reasoning) gives a counted skip reason.
"""
from __future__ import annotations

from dataclasses import dataclass

NOT_PREFIX_STABLE = "chat template is not prefix-stable"


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant content + end-of-turn tokens
    truncated: bool  # cut to max_length


def render_text(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool) -> str:
    """The template's text for `messages` (no tokenization, so offsets can be compared)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text. The template writes BOS itself where it wants one, so no special
    tokens are added (the same as transformers' apply_chat_template(tokenize=True))."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Tokens of `messages` followed by the generation prompt: what the target answers (regeneration)."""
    return encode(tokenizer, render_text(tokenizer, messages, template, add_generation_prompt=True))


def trim_trailing(messages: list[dict]) -> list[dict]:
    """Drop messages after the last assistant turn: they would be rendered but never trained on."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[:last + 1]


def _cap_at_eos(ids: list[int], start: int, end: int, eos: set[int]) -> int:
    """End of the trained span: just after the first eos token in ids[start:end], else `end`."""
    for j in range(start, end):
        if ids[j] in eos:
            return j + 1
    return end


def assistant_spans(tokenizer, messages: list[dict], template: str, eos_ids, max_length: int | None = None
                    ) -> tuple[list[int], list, bool, str | None]:
    """(ids of the conversation, [(start, end) token spans of assistant turns], cut, reason or None).

    Turns whose prompt alone already fills max_length are not rendered at all (`cut` = True): they would
    be truncated away, and rendering every prefix of a 30-turn ShareGPT chat costs turns x length."""
    eos = set(int(i) for i in eos_ids)
    char_spans, prefixes, tok_spans, token_stable = [], [], [], True
    cut_at = None  # (text, ids) of the first prompt that fills max_length
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        p_text = render_text(tokenizer, messages[:i], template, add_generation_prompt=True)
        p = encode(tokenizer, p_text)
        if max_length is not None and len(p) >= max_length:
            cut_at = (p_text, p)
            break
        f_text = render_text(tokenizer, messages[:i + 1], template, add_generation_prompt=False)
        if not f_text.startswith(p_text):
            return [], [], False, NOT_PREFIX_STABLE
        char_spans.append((len(p_text), len(f_text)))
        if token_stable:
            f = encode(tokenizer, f_text)
            if f[:len(p)] == p:
                tok_spans.append((len(p), len(f)))
                prefixes.append((f_text, f))
            else:  # a BPE merge across the boundary: use character offsets for every turn instead
                token_stable = False
        if not token_stable:
            prefixes.append((f_text, None))
    cut = cut_at is not None
    if cut:  # that prompt, cut to max_length later, is exactly the head of the whole conversation
        full_text, full = cut_at
    else:
        full_text = render_text(tokenizer, messages, template, add_generation_prompt=False)
        full = encode(tokenizer, full_text)
    for f_text, f in prefixes:  # every rendered prefix must reappear unchanged in the whole conversation
        if not full_text.startswith(f_text):
            return full, [], cut, NOT_PREFIX_STABLE
        if f is not None and full[:len(f)] != f:
            token_stable = False
    if not token_stable:
        if not getattr(tokenizer, "is_fast", False):
            return full, [], cut, NOT_PREFIX_STABLE + " at the token level (and the tokenizer has no offsets)"
        offsets = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        tok_spans = []
        for a, b in char_spans:  # tokens overlapping the assistant's characters
            inside = [j for j, (s, e) in enumerate(offsets) if e > a and s < b]
            if inside:
                tok_spans.append((inside[0], inside[-1] + 1))
    spans = [(s, _cap_at_eos(full, s, e, eos)) for s, e in tok_spans]
    return full, spans, cut, None


def render_conversation(tokenizer, messages: list[dict], template: str, eos_ids, max_length: int
                        ) -> tuple[Rendered | None, str | None]:
    """Token ids + assistant loss mask of one conversation, truncated to max_length; (None, reason) to skip."""
    messages = trim_trailing(messages)
    try:
        ids, spans, cut, reason = assistant_spans(tokenizer, messages, template, eos_ids, max_length)
    except Exception as e:  # a Jinja template that raises on this conversation (e.g. strict role order)
        return None, f"chat template raised {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if reason:
        return None, reason
    mask = [0] * len(ids)
    for s, e in spans:
        mask[s:e] = [1] * (e - s)
    truncated = cut or len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None, "no assistant token within data.max_length" if truncated else "empty assistant turns"
    return Rendered(ids, mask, truncated), None
