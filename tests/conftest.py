"""Shared fixtures: tiny random Llama / Qwen2 / GPT-2 targets with a real BPE tokenizer and chat template.

    tiny_target_dir("llama")   -> a saved HF folder (config, weights, tokenizer) under a session temp dir
    tiny_target                -> a loaded drafters.target.Target, parametrised over the three shapes
    cfg_for(tmp_path, ...)     -> a composed Config pointing at a tiny target and a temp run root
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # the suite runs many tiny models: more threads only thrash on 2 cores

ARCHS = ("llama", "qwen2", "gpt2")

# A small fixed corpus so the fixture tokenizer is identical on every machine.
_CORPUS = [
    "Hello! How can I help you today? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "Please write a short poem about the sea, the sky and the wind.",
    "Sure, here is a list:\n1. apples\n2. oranges\n3. bananas",
    "What is the capital of France? The capital of France is Paris.",
    "Explain how a transformer works in simple terms, with an example.",
]


def _tiny_tokenizer():
    from training.tokenizer import train_tokenizer

    return train_tokenizer(_CORPUS * 20, vocab_size=320)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, num_layers: int = 4, hidden: int = 32):
    """A random tiny causal LM of the given shape family."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=512, bos_token_id=0,
                         eos_token_id=2, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: tiny_target_dir(arch, seed=0) -> path of a saved tiny HF model with tokenizer."""
    made: dict = {}

    def make(arch: str = "llama", seed: int = 0) -> str:
        key = (arch, seed)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            model = build_tiny_model(arch, len(tiny_tokenizer), seed=seed)
            model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
            model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
            model.save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[key] = str(path)
        return made[key]

    return make


@pytest.fixture(params=ARCHS)
def tiny_target(request, tiny_target_dir):
    from conf.schema import TargetConfig
    from drafters.target import load_target

    return load_target(TargetConfig(path=tiny_target_dir(request.param)), device="cpu")


@pytest.fixture
def cfg_for(tmp_path, tiny_target_dir):
    """cfg_for(*overrides, arch="llama") -> Config on a tiny target, writing under tmp_path/runs."""
    from conf.schema import load_config

    def make(*overrides: str, arch: str = "llama"):
        return load_config([f"target.path={tiny_target_dir(arch)}", f"run.root={tmp_path / 'runs'}",
                            "run.device=cpu", "experiment=smoke", *overrides])

    return make


@pytest.fixture(scope="module")
def llama_target(tiny_target_dir):
    """The tiny Llama as a Target, loaded once per test module (a test may change it in place, e.g. wrap
    LoRA around it, so modules do not share one)."""
    from conf.schema import TargetConfig
    from drafters.target import load_target

    return load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")


@pytest.fixture
def llama(tiny_target_dir):
    """The tiny Llama as a Target, fresh for every test (the head and small-LM tests wrap LoRA around it or
    train against it in place)."""
    from conf.schema import TargetConfig
    from drafters.target import load_target

    return load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")


@pytest.fixture
def peaked_llama(tiny_target_dir):
    """The tiny Llama with its LM head scaled x50: a random tiny target is nearly uniform, a peaked one is a
    real teacher (the EAGLE-family tests train against it)."""
    from conf.schema import TargetConfig
    from drafters.target import load_target

    t = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    with torch.no_grad():
        t.model.lm_head.weight.mul_(50)
    return t


from tests.train_fixtures import trainer  # noqa: E402,F401 - a fixture: train() on the tiny Llama, in this process
