"""An independent small causal LM distilled from the target (DistillSpec-style; FastDraft).

    python train.py stages=[data_gen,train,eval] drafter=small run.name=s1                  # fresh, half width
    python train.py stage=train drafter=small drafter.init=Qwen/Qwen2.5-0.5B-Instruct drafter.lora_r=16
    python -m pytest -q tests/drafters/test_small.py

`init: fresh` builds a config of the target's own family (same class, vocab, rope, norms) with
`num_layers` layers and `hidden_size` (default half the target's) at the target's head size, randomly
initialised; anything else is a checkpoint path or hub id of a causal LM that must share the target's
tokenizer (checked: same token -> id map when it ships a tokenizer, and at least as many embedding rows as
the target's tokenizer has tokens; models padded to a different number of rows are fine, their logits are
compared over the shared id range). `lora_r > 0` trains a peft LoRA adapter on such a checkpoint instead
of all its weights.

Loss: `losses` (default forward_kl; any name of drafters/losses.py DISTRIBUTION_LOSSES, or `ce` on the data
tokens) between the drafter's and the target's next-token distributions on assistant positions;
`acc/1` = next-token argmax agreement.

The saved folder is at once a draftsmith folder (drafter_config.json) and a plain Hugging Face causal-LM
folder (config.json, model.safetensors with any LoRA merged, the target's tokenizer), so it loads as
`transformers`' `assistant_model` or a vLLM/SGLang draft model as it is.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from conf.errors import DraftsmithError
from conf.schema import project_path
from conf.schema.drafter import SmallConfig
from drafters.base import TargetSignal, TrainableDrafter
from drafters.common import (
    Shared,
    floats,
    set_hf_checkpointing,
    target_positions,
    token_objective,
)
from drafters.folder import FolderCheckpoint
from drafters.target import target_identity


def _key(cfg, name: str) -> str:
    """The config's own attribute for a generic name (GPT-2 spells hidden_size `n_embd`)."""
    return {v: k for k, v in getattr(cfg, "attribute_map", {}).items()}.get(name, name)


def fresh_config(target_cfg, num_layers: int, hidden_size: int | None):
    """A config of the target's family: `num_layers` layers, `hidden_size` (None = half the target's
    heads, rounded up) wide at the target's head size, MLP width and KV-head ratio scaled alike, same vocab."""
    H_t = int(target_cfg.hidden_size)
    heads_t = int(target_cfg.num_attention_heads)
    head_dim = int(getattr(target_cfg, "head_dim", None) or H_t // heads_t)
    # default: half the target's heads, rounded up (a 3-head target gets 2 heads, not a 1.5-head width)
    H = int(hidden_size or max(1, (heads_t + 1) // 2) * head_dim)
    heads = H // head_dim
    if H % head_dim or not heads or num_layers < 1:
        raise DraftsmithError(
            f"drafter.hidden_size={H} with num_layers={num_layers} does not fit the target's head size "
            f"{head_dim}: use num_layers >= 1 and a multiple of {head_dim}")
    kv_t = int(getattr(target_cfg, "num_key_value_heads", None) or heads_t)
    kv = max(1, heads * kv_t // heads_t)
    while heads % kv:
        kv -= 1
    d = target_cfg.to_dict()
    for drop in ("layer_types", "_name_or_path", "transformers_version"):
        d.pop(drop, None)
    d[_key(target_cfg, "hidden_size")] = H
    d[_key(target_cfg, "num_hidden_layers")] = num_layers
    d[_key(target_cfg, "num_attention_heads")] = heads
    if "num_key_value_heads" in d:
        d["num_key_value_heads"] = kv
    if "head_dim" in d:
        d["head_dim"] = H // heads
    if d.get("intermediate_size"):
        d["intermediate_size"] = int(d["intermediate_size"]) * H // H_t
    if d.get("n_inner"):
        d["n_inner"] = int(d["n_inner"]) * H // H_t
    return type(target_cfg).from_dict(d)


def check_vocab(model, tokenizer, target, source: str) -> None:
    """The drafter must speak the target's tokenizer (same token -> id map, enough embedding rows)."""
    rows = model.get_input_embeddings().weight.shape[0]
    n_tok = len(target.tokenizer)
    if tokenizer is not None and tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise DraftsmithError(
            f"drafter.init {source!r} uses a different tokenizer from target {target.name} "
            f"({len(tokenizer)} vs {n_tok} tokens): pick a drafter from the target's model family")
    if rows < n_tok:
        raise DraftsmithError(
            f"drafter.init {source!r} has a vocabulary of {rows} tokens but target {target.name}'s tokenizer has "
            f"{n_tok}: pick a drafter that shares the target's tokenizer")


class SmallDrafter(FolderCheckpoint, TrainableDrafter):
    """A Hugging Face causal LM (optionally LoRA-wrapped) trained to imitate the target."""

    family = "small"

    def __init__(self, cfg: SmallConfig, model, target):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.vocab_size = int(target.vocab_size)
        self._target_fp = target_identity(target)
        self._tokenizer = Shared(target.tokenizer)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, cfg: SmallConfig, target, token_counts=None) -> SmallDrafter:
        """Fresh (target-shaped) or from a checkpoint whose tokenizer matches the target's."""
        return cls(cfg, cls.build_model(cfg, target), target)

    @classmethod
    def build_model(cls, cfg: SmallConfig, target):
        """The HF causal LM to train: fresh or loaded, `adapt`ed by the family, LoRA-wrapped when asked."""
        from transformers import AutoModelForCausalLM

        if cfg.init == "fresh":
            # checked here, not in the schema: the on-policy and FastDraft preflights name the conflict of
            # LoRA with their own settings first, which is the more useful line for those runs
            if cfg.lora_r > 0:
                raise DraftsmithError(
                    "drafter.lora_r > 0 adapts a pretrained drafter, but drafter.init=fresh is random: set "
                    "drafter.lora_r=0 or drafter.init=<checkpoint path or hub id>")
            config = fresh_config(target.config, cfg.num_layers, cfg.hidden_size)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model, tokenizer = _load_checkpoint(cfg.init)
            check_vocab(model, tokenizer, target, cfg.init)
        model = cls.adapt(model.to(target.device), cfg, target)
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = cfg.lora_target_modules
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                target_modules=targets if targets == "all-linear" else targets.split(","),
                **cls.lora_extra(model)))
        return model

    @classmethod
    def adapt(cls, model, cfg: SmallConfig, target):
        """Family hook before LoRA wrapping (PARD adds its mask token here); the plain small LM is as built."""
        return model

    @classmethod
    def lora_extra(cls, model) -> dict:
        """Family hook: further peft LoraConfig arguments (PARD trains its mask token's embedding row)."""
        return {}

    # --- forward -------------------------------------------------------------------------------------
    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """Distillation on the positions whose next token is an assistant token."""
        logits = self.model(input_ids=signal.input_ids, attention_mask=signal.attention_mask).logits
        b, t = target_positions(signal, 1)
        total, terms, acc = token_objective(logits[b, t], signal, b, t, 1, self.cfg.losses)
        metrics = {f"loss/{n}": self.cfg.losses[n] * v.detach() for n, v in terms.items()}
        metrics["acc/1"] = acc
        return total, floats(metrics)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """transformers' own layer checkpointing (active in train mode)."""
        set_hf_checkpointing(self.model, enabled)

    # --- decoding, saving ------------------------------------------------------------------------------
    def as_drafter(self, target):
        """A tree drafter over this LM with its own KV cache (drafters/lm_drafter.py)."""
        from drafters.lm_drafter import LMTreeDrafter

        return LMTreeDrafter(self.plain_model(), vocab_size=self.vocab_size)

    def plain_model(self):
        """The bare HF causal LM, a LoRA adapter merged into a copy (the training model stays wrapped)."""
        if hasattr(self.model, "merge_and_unload"):
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model

    # --- checkpoint folder (drafters/folder.py) -----------------------------------------------------------
    # The folder is a Hugging Face causal-LM folder (+ the target's tokenizer) with drafter_config.json beside;
    # any LoRA is merged on save, and a load reads it in the target's dtype.
    weights_file = False  # the HF folder holds the weights

    def write_files(self, folder: Path) -> None:
        self.plain_model().save_pretrained(folder)
        self._tokenizer.obj.save_pretrained(folder)

    def checkpoint_dims(self) -> dict:
        cfg = self.model.config  # a LoRA-wrapped model shows its base model's config and embeddings
        return {"vocab_size": int(self.model.get_input_embeddings().weight.shape[0]), "model_type": cfg.model_type,
                "hidden_size": int(cfg.hidden_size), "num_layers": int(cfg.num_hidden_layers)}

    @classmethod
    def from_meta(cls, cfg, target, dims, meta, folder=None) -> SmallDrafter:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=target.dtype).to(target.device)
        return cls(cfg, model, target)


def _load_checkpoint(source: str):
    """(model, tokenizer or None) from a local folder or hub id, with a clear error when it fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = project_path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise DraftsmithError(
            f"could not load drafter.init {source!r} ({type(e).__name__}: {str(e).splitlines()[0]}): give "
            "fresh, a local causal-LM folder or a hub id") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # weights without a tokenizer: only the embedding size can be checked
    return model, tokenizer
