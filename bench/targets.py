"""Random-weight Llama targets for the GPU benches, built directly on the device, and the hardware facts
their figures are judged against (memory bandwidth for the decoding floor, bf16 peak for MFU).

    from bench.targets import random_llama_target, peak_for
    target = random_llama_target("8b", "assets/demo-target", "cuda")   # seconds: no CPU copy first

Building the model under a `torch.device(dev)` context makes every parameter (and its random init) live on
the GPU from the start: an 8B model initialised on the CPU and then copied took over 150 s; on the device
it takes seconds. Random weights say nothing about acceptance, only about speed.
"""
from __future__ import annotations

from pathlib import Path

# Llama shapes: (layers, hidden, intermediate, heads, kv heads); vocab comes from the tokenizer unless given
SHAPES = {"tiny": (2, 64, 128, 4, 2), "demo": (6, 384, 1024, 6, 6), "1b": (16, 2048, 8192, 32, 8),
          "3b": (28, 3072, 8192, 24, 8), "8b": (32, 4096, 14336, 32, 8)}
LLAMA3_VOCAB = 128256  # Llama-3.x's vocabulary: --vocab 128256 gives the 8B shape its real LM head

# NVIDIA datasheet figures (dense bf16, no sparsity). Matched on torch.cuda.get_device_name, first hit wins.
GPUS = [("H200 NVL", 4.8e12, 835e12), ("H200", 4.8e12, 989e12), ("H100 NVL", 3.9e12, 835e12),
        ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12), ("A100", 2.0e12, 312e12)]


def peak_for(device_name: str) -> tuple[float | None, float | None]:
    """(memory bytes/s, bf16 FLOP/s) from the datasheet for a GPU name, (None, None) when unknown."""
    for key, bw, flops in GPUS:
        if key.lower() in device_name.lower():
            return bw, flops
    return None, None


def bench_tokenizer(path: str):
    """The tokenizer of a target folder, else the demo recipe's BPE trained on ShareGPT conversations."""
    from transformers import AutoTokenizer

    from conf.schema import project_path

    if Path(project_path(path)).is_dir():
        return AutoTokenizer.from_pretrained(project_path(path))
    import itertools

    from conf.schema.pretrain import PretrainConfig
    from data_gen.sources import iter_sharegpt
    from training.tokenizer import train_tokenizer

    texts = [m["content"] for c in itertools.islice(iter_sharegpt(split="train"), 2000) for m in c.messages]
    return train_tokenizer(texts, vocab_size=PretrainConfig().vocab_size)


def random_llama(shape: str, vocab: int, device, dtype, eos_token_id=None, pad_token_id=None, seed: int = 0):
    """An HF LlamaForCausalLM of `shape` with random weights, allocated and initialised on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers, hidden, inter, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # allocate and initialise there: no CPU copy of billions of weights
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def random_llama_target(shape: str, tokenizer_path: str, device: str, vocab: int | None = None,
                        dtype: str = "auto"):
    """A drafters.target.Target around random_llama (bf16 on GPU, fp32 on CPU, unless `dtype`), with the
    tokenizer and chat template of tokenizer_path. `vocab` > the tokenizer's pads the embedding and LM head
    to a real model's size (ids past the tokenizer decode to nothing)."""
    from drafters.target import Target, resolve_dtype
    from runtime.device import resolve_device

    tok = bench_tokenizer(tokenizer_path)
    dev = resolve_device(device)
    model = random_llama(shape, max(vocab or 0, len(tok)), dev, resolve_dtype(dtype, dev), tok.eos_token_id,
                         tok.pad_token_id)
    return Target(model, tok, name=f"random-llama-{shape}")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token must read: every parameter except the input embedding, of which
    a token reads one row (unless it is tied to the LM head, which reads all of it). The KV cache is left
    out: at these prompt lengths it is under 1 % of an 8B model's weights."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()
