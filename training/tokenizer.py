"""Byte-level BPE tokenizer with a ChatML chat template: the demo target's tokenizer (and the tests')."""
from __future__ import annotations

from collections.abc import Iterable

PAD = "<|endoftext|>"  # padding and document separator in pretraining
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # IM_END ends a turn: it is the chat model's eos
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# ChatML. Every turn ends with <|im_end|>\n; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE (GPT-2 style, no unknown tokens) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for, to turn nats/token into nats/byte (comparable across vocabularies).

    A byte-level BPE token is spelt with one printable symbol per byte, so its length is its byte count;
    a special token counts the bytes of its literal text (`<|im_end|>` = 10)."""
    special = set(tokenizer.all_special_tokens) | set(SPECIAL_TOKENS)
    lengths = [0] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        lengths[i] = len(token.encode()) if token in special else len(token)
    return lengths
