"""Medusa-1 / Medusa-2: K parallel heads on the target's last hidden state (Cai et al., 2024).

    python train.py stages=[data_gen,train,eval] drafter=medusa run.name=m1     # Medusa-1: frozen target
    python train.py stages=[data_gen,train,eval] drafter=medusa2 run.name=m2    # Medusa-2: + LoRA on the target
    python -m pytest -q tests/drafters/test_medusa.py

Head k (1-based) reads the target's final normed hidden state h_t and predicts token t+k+1 (the target's
own LM head predicts t+1): `num_layers` ResBlocks (x + SiLU(Wx + b), W and b zero-initialised so a fresh
block is the identity) and its own Linear(H -> V) initialised from the target's LM head, so a fresh head k
starts as "the target's next-token guess" instead of noise. Unlike the reference code (which repeats one
ResBlock object `num_layers` times, sharing its weights) every block has its own weights.

Parameter names follow the Medusa checkpoint format, so export is a dump of `medusa_head.*`:
    medusa_head.{k}.{j}.linear.weight / .bias      ResBlock j of head k (0-based)
    medusa_head.{k}.{num_layers}.weight            the head's final Linear(H -> V), no bias

Medusa-1 (`joint: false`): frozen target, loss = sum_k CE_k with `losses` (`ce` on the data tokens, or any
distribution loss of drafters/losses.py against the target's distribution for the same token).
Medusa-2 (`joint: true`): the target is trained jointly through a peft LoRA adapter, wrapped *in place*
around `target.model` (so the Target wrapper, and the speculative decoder verifying with it, sees the
adapted model); this family runs the target forward itself inside `loss` (online mode only).
loss = L_LM + sum_k head_weight * head_decay**k * CE_k; L_LM = KL(adapter-off || adapter-on) next-token
distributions when `self_distill` (zero at init: LoRA B starts at zero), else CE on the data tokens.
Heads train at `head_lr_scale` x the base lr (`param_groups`). A saved Medusa-2 folder holds the heads in
model.safetensors and the LoRA adapter as a standard peft folder under `adapter/`; `from_pretrained`
merges the adapter into `target.model` (the model Medusa-2 serves) unless asked to keep it trainable.

Decoding (`MedusaDecodeDrafter`) reads the target's *last hidden state* at the last committed feature
position (`feature_source = "last_hidden"`, not the EAGLE-3 taps); head k's distribution is the depth-k
distribution whatever the parent token is.

ResBlock is shared with drafters/hydra_heads.py; the per-depth token objective and the other pieces
several families use are in drafters/common.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from conf.errors import DraftsmithError
from conf.schema.drafter import MedusaConfig
from drafters.base import Drafter, TargetSignal, TrainableDrafter
from drafters.common import (
    floats,
    logits_at_depth,
    require_last_hidden,
    set_hf_checkpointing,
    target_positions,
    token_objective,
)
from drafters.folder import FolderCheckpoint
from drafters.losses import ce, forward_kl
from drafters.target import target_identity

# ---------------------------------------------------------------------------------------------------
# ResBlock (Hydra builds its heads from it too)
# ---------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + SiLU(linear(x)) with a zero-initialised linear (weight and bias): the identity at init.

    With `in_features > hidden` (Hydra's first block, which reads concat(hidden, embeddings)) the residual
    goes through `res_connection`, a plain Linear(in -> hidden)."""

    def __init__(self, hidden: int, in_features: int | None = None):
        super().__init__()
        in_features = in_features or hidden
        self.linear = nn.Linear(in_features, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()
        if in_features != hidden:
            self.res_connection = nn.Linear(in_features, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.res_connection(x) if hasattr(self, "res_connection") else x
        return res + self.act(self.linear(x))


# ---------------------------------------------------------------------------------------------------
# Medusa
# ---------------------------------------------------------------------------------------------------
class MedusaDrafter(FolderCheckpoint, TrainableDrafter):
    """K Medusa heads (+ a LoRA adapter on the target for Medusa-2)."""

    family = "medusa"

    def __init__(self, cfg: MedusaConfig, hidden_size: int, vocab_size: int):
        super().__init__()
        cfg.check()  # the schema's ranges, again for a config changed in code
        self.cfg = cfg
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.medusa_head = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(cfg.num_layers)],
                          nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(cfg.num_heads))
        self.base = None  # Medusa-2: the peft-wrapped target model (a submodule, so DeepSpeed sees LoRA)
        self._target_fp: dict = {}

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, cfg: MedusaConfig, target, token_counts=None) -> MedusaDrafter:
        """Heads sized from target.config; final linears copied from the target's LM head."""
        model = cls(cfg, target.hidden_size, target.vocab_size).to(target.device)
        with torch.no_grad():
            w = target.model.get_output_embeddings().weight
            for head in model.medusa_head:
                head[-1].weight.copy_(w.float())
        model._target_fp = target_identity(target)
        if cfg.joint:
            model._attach_lora(target)
        return model

    def _attach_lora(self, target, adapter_dir: str | None = None, trainable: bool = True) -> None:
        """Wrap target.model with a LoRA adapter in place (new, or loaded from `adapter_dir`)."""
        from peft import LoraConfig, PeftModel, get_peft_model

        if hasattr(target.model, "peft_config"):
            raise DraftsmithError("the target already carries a peft adapter: load a fresh target for Medusa-2")
        if adapter_dir is not None:
            self.base = PeftModel.from_pretrained(target.model, adapter_dir, is_trainable=trainable)
            return
        targets = self.cfg.lora_target_modules
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=targets if targets == "all-linear" else targets.split(","))
        self.base = get_peft_model(target.model, lora)

    def check_train_mode(self, mode: str) -> None:
        """Medusa-2 runs the (adapted) target itself, so it cannot train from an offline feature cache."""
        if self.cfg.joint and mode != "online":
            raise DraftsmithError(
                "Medusa-2 (drafter.joint=true) trains the target through LoRA and needs it in the step: "
                "set train.mode=online")

    @property
    def runs_target(self) -> bool:
        """True when `loss` runs the target forward itself (the engine may skip its own)."""
        return bool(self.cfg.joint)

    # --- forward -------------------------------------------------------------------------------------
    def head_logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Logits [..., V] of every head (depth 1..K) from last hidden states [..., H]."""
        x = hidden.to(self.medusa_head[0][-1].weight.dtype)
        return [head(x) for head in self.medusa_head]

    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """Medusa-1: sum_k losses_k. Medusa-2: L_LM + sum_k head_weight * head_decay**k * losses_k."""
        if self.cfg.joint:
            return self._joint_loss(signal)
        hidden = require_last_hidden(signal, "medusa")
        return self._heads_loss(hidden, signal, [1.0] * self.cfg.num_heads, {})

    def _heads_loss(self, hidden, signal, weights, metrics, teacher=None):
        total = hidden.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        for k, head in enumerate(self.medusa_head, start=1):
            b, t = target_positions(signal, k + 1)  # head k at t predicts token t+k+1
            ref = None if teacher is None else teacher[b, t + k]
            logits = head(hidden[b, t].to(head[-1].weight.dtype))
            loss_k, terms, acc = token_objective(logits, signal, b, t, k + 1, self.cfg.losses, reference=ref)
            total = total + weights[k - 1] * loss_k
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + weights[k - 1] * self.cfg.losses[name] * v.detach()
            metrics[f"acc/{k}"] = acc
        metrics.update({f"loss/{n}": v for n, v in sums.items()})
        return total, floats(metrics)

    def _joint_loss(self, signal: TargetSignal):
        """Medusa-2: the adapted target's forward, its LM loss, and the heads on its last hidden state."""
        if self.base is None:
            raise DraftsmithError("Medusa-2 drafter has no LoRA adapter attached: build it with from_target")
        ids, am = signal.input_ids, signal.attention_mask
        out = self.base(input_ids=ids, attention_mask=am, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        b, t = target_positions(signal, 1)
        teacher = None
        if self.cfg.self_distill:
            # the frozen original model's distribution (adapter off, dropout off) is the LM target
            was_training = self.base.training
            self.base.eval()
            with torch.no_grad(), self.base.disable_adapter():
                teacher = self.base(input_ids=ids, attention_mask=am).logits.float()
            self.base.train(was_training)
            lm = forward_kl(out.logits[b, t], teacher[b, t])
        else:
            lm = ce(out.logits[b, t], ids[b, t + 1])
        weights = [self.cfg.head_weight * self.cfg.head_decay**k for k in range(1, self.cfg.num_heads + 1)]
        heads, metrics = self._heads_loss(hidden, signal, weights, {"loss/lm": lm.detach()}, teacher=teacher)
        return lm + heads, metrics

    # --- optimisation ----------------------------------------------------------------------------------
    def param_groups(self, lr: float) -> list[dict]:
        """Heads at lr (Medusa-1) or head_lr_scale x lr next to the LoRA parameters at lr (Medusa-2)."""
        heads = [p for p in self.medusa_head.parameters() if p.requires_grad]
        if not self.cfg.joint:
            return [{"params": heads, "lr": lr}]
        lora = [p for p in self.base.parameters() if p.requires_grad]
        return [{"params": lora, "lr": lr}, {"params": heads, "lr": lr * self.cfg.head_lr_scale}]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Only Medusa-2 runs decoder layers with gradients (the target's, through LoRA)."""
        if self.base is not None:
            set_hf_checkpointing(self.base, enabled)

    # --- decoding, saving ------------------------------------------------------------------------------
    def as_drafter(self, target) -> MedusaDecodeDrafter:
        return MedusaDecodeDrafter(self)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The heads only, in Medusa's names (`medusa_head.{k}.{j}.linear.weight`, ...)."""
        return {f"medusa_head.{k}": v for k, v in self.medusa_head.state_dict().items()}

    # --- checkpoint folder (drafters/folder.py) -----------------------------------------------------------
    def checkpoint_dims(self) -> dict:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_heads": self.cfg.num_heads, "num_layers": self.cfg.num_layers}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.heads_state_dict()  # model.safetensors holds the heads; Medusa-2's adapter goes to adapter/

    def write_files(self, folder: Path) -> None:
        if self.base is not None:
            self.base.save_pretrained(str(folder / "adapter"))

    @classmethod
    def from_meta(cls, cfg, target, dims, meta, folder=None) -> MedusaDrafter:
        return cls(cfg, target.hidden_size, target.vocab_size).to(target.device)

    def loaded(self, target, meta, folder, trainable: bool = False) -> MedusaDrafter:
        """A Medusa-2 adapter is merged into target.model in place (the fine-tuned model Medusa-2 serves), or
        kept as a trainable adapter with from_pretrained(..., trainable=True)."""
        if self.cfg.joint:
            adapter = Path(folder) / "adapter"
            if not adapter.exists():
                raise DraftsmithError(f"Medusa-2 checkpoint {folder} has no adapter/ folder: it is incomplete")
            self._attach_lora(target, str(adapter), trainable=trainable)
            if not trainable:  # fold LoRA into target.model's own linears; the plain module tree returns
                self.base.merge_and_unload()
                self.base = None
        if not trainable:
            self.to(target.dtype)
        return self


class MedusaDecodeDrafter(Drafter):
    """Decoding adapter: head k's distribution at depth k, from the last committed last-hidden feature."""

    name = "medusa"
    uses_features = True
    feature_source = "last_hidden"  # the decoder passes TargetOutput.last_hidden, not the EAGLE-3 taps
    fixed_shape = True  # commit_fixed updates the heads' logits in place (decoding/cycle.py)
    keeps_programs = True  # and start writes into the same buffer

    def __init__(self, model: MedusaDrafter):
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_depth = model.cfg.num_heads
        self._logits: torch.Tensor | None = None  # [B, K, V] for the current root: one buffer, written in place
        self.buffers_version = 0  # bumped when that buffer is re-allocated

    def _set_feature(self, feat: torch.Tensor) -> None:
        with torch.no_grad():
            logits = torch.stack(self.model.head_logits(feat[:, -1]), dim=1).float()
        if self._logits is None or self._logits.shape != logits.shape:
            self._logits = logits
            self.buffers_version += 1
        else:
            self._logits.copy_(logits)

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        if features is None or features.shape[1] == 0:
            raise DraftsmithError("medusa drafts from the target's last hidden state: the decoder passed none")
        self._set_feature(features)

    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        return logits_at_depth(self._logits, tree, frontier,
                               f"medusa has {self.max_depth} heads, so it drafts at most {self.max_depth} tokens "
                               f"deep: set the eval tree depth to <= {self.max_depth} or train more heads "
                               "(drafter.num_heads)")

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None) -> None:
        self._set_feature(new_features)

    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor, count: torch.Tensor) -> None:
        """commit() with padded features [1, P, H] of which the first `count` are real: the heads read row
        count - 1, and their logits are written into the same buffer (a graph region reads it)."""
        last = new_features.index_select(1, (count - 1).view(1))
        with torch.no_grad():
            self._logits.copy_(torch.stack(self.model.head_logits(last[:, -1]), dim=1).float())
