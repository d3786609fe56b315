"""The frozen target: load any HF causal LM, tap its hidden states, expose its embeddings and LM head.

    from conf.schema import TargetConfig
    from drafters.target import load_target
    target = load_target(TargetConfig(path="assets/demo-target"))
    out = target(input_ids)          # TargetOutput: logits, tapped features, last hidden, KV cache
    out = target(ids, cache=DynamicCache(config=target.config), use_cache=True)   # on top of a KV cache

Feature taps follow EAGLE-3: the hidden states *entering* decoder layers 2, L//2 and L-3 (low, mid,
high), plus the last layer's normed output (the one the LM head reads, EAGLE-1's feature). In HF's
`hidden_states` tuple, index i is the input of layer i (index 0 = embeddings, index L = final normed
output), so the taps are plain indices into that tuple. This works unchanged for Llama-, Qwen2- and
GPT-2-shaped models.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from conf.errors import DraftsmithError
from conf.schema import TargetConfig, project_path
from runtime.device import resolve_device

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on GPU (what serving uses), fp32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise DraftsmithError(f"target.dtype={name!r} is not a dtype: use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low/mid/high taps: hidden states entering layers 2, L//2 and L-3. On shallow targets those
    collide (L=6 gives 2, 3, 3), which wastes a third of the fused input, so collisions are pushed to the
    next deeper layer: L=6 -> [2, 3, 4], L=4 -> [1, 2, 3]. Deep targets keep the published choice exactly."""
    want = sorted(min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3))
    taps: list[int] = []
    for i in want:
        taps.append(max(i, taps[-1] + 1) if taps else i)
    while taps[-1] > num_layers - 1 and taps[0] > 0:  # too shallow to push down: shift the block up
        taps = [t - 1 for t in taps]
    return [min(t, num_layers) for t in taps]


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, T, V]
    features: torch.Tensor  # [B, T, n_taps * H]: the tapped hidden states, concatenated low -> high
    last_hidden: torch.Tensor  # [B, T, H]: final normed hidden state (what the LM head reads)
    cache: object | None = None  # the KV cache, when the forward was given use_cache=True


class Target(nn.Module):
    """A frozen causal LM with feature taps. All parameters have requires_grad=False."""

    def __init__(self, model, tokenizer, feature_layers: list[int] | None = None, name: str = "target",
                 chat_template: str | None = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.num_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
        self.hidden_size = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        layers = list(feature_layers) if feature_layers else default_feature_layers(self.num_layers)
        for i in layers:
            if not 0 <= i <= self.num_layers:
                raise DraftsmithError(
                    f"target.feature_layers has {i}, but {name} has {self.num_layers} layers: "
                    f"use indices in 0..{self.num_layers}")
        self.feature_layers = layers
        self._chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    # --- facts drafters are built from -------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def num_taps(self) -> int:
        return len(self.feature_layers)

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a turn: the generation config's eos ids plus the tokenizer's eos."""
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if src is None:
                continue
            for i in (src if isinstance(src, (list, tuple)) else [src]):
                if i not in ids:
                    ids.append(int(i))
        return ids

    @property
    def chat_template(self) -> str:
        if not self._chat_template:
            raise DraftsmithError(
                f"target {self.name} has no chat template: set target.chat_template to a Jinja string "
                "or a .jinja file")
        return self._chat_template

    # --- frozen pieces ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (GPT-2's position embeddings are not included: drafters add their own)."""
        return self.model.get_input_embeddings()(input_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final *normed* hidden states (TargetOutput.last_hidden or a drafter's prediction)."""
        return self.model.get_output_embeddings()(hidden)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's final norm (Llama/Qwen2 `model.norm`, GPT-2 `transformer.ln_f`)."""
        base = self.model.base_model
        norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
        if norm is None:
            raise DraftsmithError(f"cannot find the final norm of {type(self.model).__name__}")
        return norm(hidden)

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                logits: bool = True) -> TargetOutput:
        """One target forward. `attention_mask` may be [B, T] (padding) or a 4D [B, 1, T, T_kv] additive
        mask (tree verification); `position_ids` then gives each token's depth-correct position. `cache` is
        transformers' KV cache argument (it replaced `past_key_values`, which transformers 5.40 removes)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, output_hidden_states=True,
                         logits_to_keep=0 if logits else 1)
        hs = out.hidden_states
        last = hs[-1]
        feats = torch.cat([hs[i] for i in self.feature_layers], dim=-1)
        return TargetOutput(logits=out.logits, features=feats, last_hidden=last,
                            cache=out.cache if use_cache else None)


# config keys that say how a model was loaded, not what it is
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_hidden_states",
             "output_attentions", "return_dict", "attn_implementation"}


def target_identity(target) -> dict:
    """Path, sizes and a fingerprint of tokenizer (vocab, merges, specials, chat template) + model config:
    what data_gen records in meta.json and a drafter folder in drafter_config.json, so data and drafters
    both refuse another target, also one of the same shape (another tokenizer or config)."""
    h = hashlib.sha256()
    tok = target.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True).encode())
    try:
        template = target.chat_template
    except DraftsmithError:  # no template: identity is still defined (data_gen itself refuses such a target)
        template = ""
    h.update(template.encode())
    cfg = {k: v for k, v in target.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return {"path": str(target.name), "vocab_size": int(target.vocab_size), "hidden_size": int(target.hidden_size),
            "num_layers": int(target.num_layers), "feature_layers": list(target.feature_layers),
            "fingerprint": h.hexdigest()[:16]}


def _is_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1


def load_target(cfg: TargetConfig, device: str | torch.device = "auto") -> Target:
    """Load a causal LM from a local folder or a hub id, with clear errors for the usual mistakes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path = project_path(cfg.path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if _is_local(cfg.path) and not os.path.isdir(path):
        raise DraftsmithError(
            f"target.path {cfg.path!r} does not exist: give a local model folder or a hub id like org/name")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise DraftsmithError(f"target.path {path!r} has no config.json: it is not a Hugging Face model folder")
    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        hf_cfg = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise DraftsmithError(
            f"could not load the config of target {cfg.path!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check the hub id and your network or HF_TOKEN, or give a local folder") from None
    arch = list(getattr(hf_cfg, "architectures", None) or [])
    if arch:  # a saved checkpoint says what it is
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch) and not any(
            a.endswith(("ForMaskedLM", "ForSequenceClassification")) for a in arch)
    else:  # a bare config: encoder models (bert, roberta...) also have a *LMHeadModel class; reject them
        causal = (hf_cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  and hf_cfg.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if not causal or getattr(hf_cfg, "is_encoder_decoder", False):
        raise DraftsmithError(
            f"target {cfg.path!r} is a {hf_cfg.model_type} model ({', '.join(arch) or 'no architectures'}), "
            "not a causal LM: give a decoder-only language model")
    tokenizer = _load_tokenizer(AutoTokenizer, path, cfg, kw)
    dtype = resolve_dtype(cfg.dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                 **kw).to(dev)
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise DraftsmithError(
            f"target {cfg.path!r}: tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{n_embed} rows; resize the embedding or use the matching tokenizer")
    template = _read_template(cfg.chat_template)
    if template:
        tokenizer.chat_template = template
    return Target(model, tokenizer, cfg.feature_layers, name=cfg.path, chat_template=template)


# any of these makes a folder loadable by AutoTokenizer (fast, or slow ones transformers can convert)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def _load_tokenizer(auto, path: str, cfg: TargetConfig, kw: dict):
    """AutoTokenizer, with one line instead of transformers' advice about sentencepiece/tiktoken when the
    folder simply has no tokenizer."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise DraftsmithError(
            f"target.path {path!r} has no tokenizer files (none of tokenizer.json, tokenizer_config.json, "
            "tokenizer.model, vocab.json): copy the tokenizer of the model it was saved from into that folder")
    try:
        return auto.from_pretrained(path, **kw)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DraftsmithError(f"could not load the tokenizer of target {cfg.path!r} ({type(e).__name__}: {first}): "
                              "give a folder or hub id with a complete tokenizer") from None


def _read_template(value: str | None) -> str | None:
    """A chat template given as a Jinja string, a .jinja/.txt file, or a tokenizer_config.json."""
    if not value:
        return None
    p = Path(project_path(value))
    if p.suffix in (".jinja", ".j2", ".txt", ".json") or p.exists():
        if not p.exists():
            raise DraftsmithError(f"target.chat_template file {value!r} does not exist")
        text = p.read_text()
        return json.loads(text)["chat_template"] if p.suffix == ".json" else text
    return value
