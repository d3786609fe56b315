"""Assistant loss masks, hand-checked on ChatML, a Llama-3-like and a default-system-prompt template."""
from __future__ import annotations

import pytest

from data_gen.render import NOT_PREFIX_STABLE, render_conversation

CHAT = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DEFAULT_SYSTEM = (  # Qwen2.5-style: a system turn is injected when the chat has none
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def tok(tiny_target_dir):
    """A fresh copy of the fixture tokenizer (tests add special tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_target_dir("llama"))


def spans(tok, ids, mask) -> list[str]:
    """The masked tokens, decoded per contiguous span."""
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


def test_chatml_mask_is_content_plus_end_of_turn(tok):
    row, reason = render_conversation(tok, CHAT, tok.chat_template, [tok.eos_token_id], max_length=512)
    assert reason is None and not row.truncated
    # the same ids as transformers' own rendering
    assert row.input_ids == list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    # generation prompt and the template's trailing newline are not trained on; <|im_end|> is
    assert spans(tok, row.input_ids, row.loss_mask) == ["Hi there<|im_end|>", "The capital of France is Paris.<|im_end|>"]
    unmasked = tok.decode([i for i, m in zip(row.input_ids, row.loss_mask) if not m])
    assert unmasked == ("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n\n"
                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n\n")


def test_llama3_like_template(tok):
    tok.add_special_tokens({"additional_special_tokens": [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    msgs = [{"role": "system", "content": "Be brief."}, *CHAT]
    row, reason = render_conversation(tok, msgs, LLAMA3, [eot], max_length=512)
    assert reason is None
    assert row.input_ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert spans(tok, row.input_ids, row.loss_mask) == ["Hi there<|eot_id|>", "The capital of France is Paris.<|eot_id|>"]


def test_default_system_prompt_is_never_trained_on(tok):
    for msgs in (CHAT, [{"role": "system", "content": "You speak French."}, *CHAT]):
        row, reason = render_conversation(tok, msgs, DEFAULT_SYSTEM, [tok.eos_token_id], max_length=512)
        assert reason is None
        assert spans(tok, row.input_ids, row.loss_mask) == ["Hi there<|im_end|>",
                                                            "The capital of France is Paris.<|im_end|>"]
    text = tok.decode(row.input_ids)
    assert "You speak French." in text and "You are a helpful assistant." not in text


def test_bpe_merge_across_the_boundary_falls_back_to_offsets(tok):
    # "assistant: " ends in token "Ġ", but "assistant: the" ends in "Ġthe": token prefixes break, characters don't
    from data_gen.render import encode

    tmpl = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "the dog sleeps"}]
    p, f = encode(tok, "user: Hello!<|im_end|>assistant: "), encode(tok, "user: Hello!<|im_end|>assistant: the")
    assert f[:len(p)] != p  # the premise: not token-level prefix-stable
    row, reason = render_conversation(tok, msgs, tmpl, [tok.eos_token_id], max_length=512)
    assert reason is None
    assert spans(tok, row.input_ids, row.loss_mask) == [" the dog sleeps<|im_end|>"]


def test_template_that_rewrites_history_is_a_counted_reason(tok):
    tmpl = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] + ':' + m['content'] + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    row, reason = render_conversation(tok, CHAT, tmpl, [tok.eos_token_id], max_length=512)
    assert row is None and reason == NOT_PREFIX_STABLE


def test_template_raising_is_a_counted_reason(tok):
    tmpl = "{{ raise_exception('roles must alternate') }}"
    row, reason = render_conversation(tok, CHAT, tmpl, [tok.eos_token_id], max_length=512)
    assert row is None and reason.startswith("chat template raised") and "roles must alternate" in reason


def test_truncation_and_trailing_user_turn(tok):
    full, _ = render_conversation(tok, CHAT, tok.chat_template, [tok.eos_token_id], max_length=512)
    # a trailing user turn without an answer is dropped, not rendered
    extra, _ = render_conversation(tok, [*CHAT, {"role": "user", "content": "Thanks"}], tok.chat_template,
                                   [tok.eos_token_id], max_length=512)
    assert extra.input_ids == full.input_ids
    cut = 20
    row, reason = render_conversation(tok, CHAT, tok.chat_template, [tok.eos_token_id], max_length=cut)
    assert row.truncated and row.input_ids == full.input_ids[:cut] and row.loss_mask == full.loss_mask[:cut]
    first_answer = full.loss_mask.index(1)
    row, reason = render_conversation(tok, CHAT, tok.chat_template, [tok.eos_token_id], max_length=first_answer)
    assert row is None and reason == "no assistant token within data.max_length"


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_early_cut_equals_plain_truncation(tok, template):
    # turns that start beyond max_length are never rendered; the row must still be the plain truncation
    eos = [tok.eos_token_id]
    tmpl = tok.chat_template
    if template == "llama3":
        tok.add_special_tokens({"additional_special_tokens": [
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tmpl, eos = LLAMA3, [tok.convert_tokens_to_ids("<|eot_id|>")]
    long_chat = CHAT * 4
    full, _ = render_conversation(tok, long_chat, tmpl, eos, max_length=10**6)
    assert not full.truncated
    for n in range(1, len(full.input_ids) + 3, 3):
        row, reason = render_conversation(tok, long_chat, tmpl, eos, max_length=n)
        if not any(full.loss_mask[:n]):
            assert row is None and reason == "no assistant token within data.max_length"
            continue
        assert row.input_ids == full.input_ids[:n] and row.loss_mask == full.loss_mask[:n], n
        assert row.truncated == (n < len(full.input_ids))
