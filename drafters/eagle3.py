"""EAGLE-3: fused low/mid/high target features, a reduced draft vocabulary, training-time test (Li et al., 2025).

    python train.py drafter=eagle3                       # train it (stage=train) on the demo target
    python -m pytest -q tests/test_eagle3.py             # its tests (CPU, seconds)

Model (parameter names = SGLang's LlamaForCausalLMEagle3 checkpoint, so export is a plain dump):
    fc                 num_taps*H -> H (no bias): fuses the tapped features (TargetSignal.features)
    midlayer           one Llama decoder layer; q/k/v read concat(input_layernorm(embed(x)),
                       hidden_norm(hidden)) (2H); residual = hidden
    norm, lm_head      final RMSNorm and a trainable head over the V_d draft tokens
    d2t, t2d           buffers: draft id -> target id offsets, and the draft-vocab mask (drafters/vocab.py)
The embeddings are the target's (frozen, not in the state dict). lm_head starts from the target's LM
head rows of the draft tokens (a warm start; the official code trains it from its own init).

Rows and steps. Row t pairs hidden h_t with token x_{t+1+i} at unrolled step i (position t + i):
step 0 uses h_t = fc(features_t); step i >= 1 feeds back the drafter's own step i-1 output (the
pre-norm residual stream, what SGLang passes between draft steps). Step i at row t predicts x_{t+2+i}
against the target's distribution at t+1+i. Attention across steps is the official training-time test
pattern (drafters.layers.ttt_attend): a step-i query at row t sees step 0's keys at rows 0..t and
the keys of steps 1..i at row t only - the same keys a depth-i tree node sees at decode time, so
TTT step i equals drafting a chain of depth i (tests/test_eagle3.py checks this).

Loss: for each step i, every cfg.losses term (soft_ce by default: -sum p log q over the draft vocab, p the
target's distribution renormalised over the draft vocab) on rows whose predicted token is an assistant
token AND whose target argmax is in the draft vocab; total = sum_i step_decay**i * terms_i. No feature
regression. Metrics: loss/<name> (decayed sum), loss_step/<depth> (undecayed), acc/<depth>: drafter argmax
(mapped to target ids) == target argmax over all assistant rows (argmax outside the draft vocab = a miss).
"""
from __future__ import annotations

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters.base import TargetSignal
from drafters.eagle1 import EagleBase, floats, ratio, shifted
from drafters.layers import DecoderLayer, DrafterDims
from drafters.vocab import DraftVocab, build_draft_vocab
from training import losses as L


class Eagle3Drafter(EagleBase):
    """EAGLE-3 drafter: the TrainableDrafter; `as_drafter()` gives the decoding adapter."""

    family = "eagle3"
    feature_source = "features"

    def __init__(self, cfg, dims: DrafterDims, target, vocab: DraftVocab):
        super().__init__(cfg, dims, target)
        if cfg.num_layers != 1:
            raise DraftsmithError(f"drafter.num_layers={cfg.num_layers}: eagle3 has exactly one decoder layer "
                                  "(the SGLang LlamaForCausalLMEagle3 layout); set drafter.num_layers=1")
        if cfg.ttt_steps < 1:
            raise DraftsmithError(f"drafter.ttt_steps={cfg.ttt_steps}: unroll at least 1 step (official: 7)")
        if cfg.step_decay <= 0:
            raise DraftsmithError(f"drafter.step_decay={cfg.step_decay} must be > 0 (official: 0.8)")
        self._check_losses({"ce", *L.DISTRIBUTION_LOSSES})
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        H = dims.hidden_size
        self.vocab_source = vocab.source
        self.fc = nn.Linear(dims.num_taps * H, H, bias=False)
        self.midlayer = DecoderLayer(dims, 2 * H, input_layernorm=True, hidden_norm=True)
        self.norm = LlamaRMSNorm(H, dims.rms_norm_eps)
        self.lm_head = nn.Linear(H, vocab.size, bias=False)
        self.register_buffer("d2t", vocab.d2t.clone())
        self.register_buffer("t2d", vocab.t2d.clone())

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, cfg, target, token_counts=None) -> Eagle3Drafter:
        """Dimensions from target.config; the draft vocabulary from data_gen's assistant token counts
        (drafters.vocab.build_draft_vocab: full vocab when draft_vocab_size is null or >= V)."""
        dims = DrafterDims.from_target(target)
        vocab = build_draft_vocab(dims.vocab_size, cfg.draft_vocab_size, token_counts)
        model = cls(cfg, dims, target, vocab).to(target.device)
        with torch.no_grad():
            head = target.model.get_output_embeddings().weight
            model.lm_head.weight.copy_(head[model.draft_ids.to(head.device)].to(model.lm_head.weight))
        return model

    @classmethod
    def from_meta(cls, cfg, target, dims, meta):
        v_d = int(meta["draft_vocab_size"])  # the maps themselves load with the weights
        vocab = DraftVocab(d2t=torch.zeros(v_d, dtype=torch.long), t2d=torch.zeros(dims.vocab_size, dtype=torch.bool),
                           source=meta.get("vocab_source", "token_counts"))
        return cls(cfg, dims, target, vocab).to(target.device)

    def checkpoint_meta(self) -> dict:
        return {"draft_vocab_size": self.draft_vocab_size, "vocab_source": self.vocab_source}

    # --- pieces -------------------------------------------------------------------------------------
    @property
    def draft_vocab_size(self) -> int:
        return self.d2t.shape[0]

    @property
    def draft_ids(self) -> torch.Tensor:
        """[V_d] target id of each draft id."""
        return self.d2t + torch.arange(self.draft_vocab_size, device=self.d2t.device)

    @property
    def feature_width(self) -> int:
        return self.dims.num_taps * self.dims.hidden_size

    @property
    def num_kv_layers(self) -> int:
        return 1

    def project(self, features):
        return self.fc(features.to(self.param_dtype))

    def core(self, hidden, embeds, positions, attends):
        layer = self.midlayer
        hidden = hidden.to(self.param_dtype)
        cos, sin = self._rope(hidden, positions)
        a_in = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        out, k, v = layer(a_in, hidden, cos, sin, attends[0])
        return out, [(k, v)]

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary [.., V_d]."""
        return self.lm_head(self.norm(out)).float()

    def target_vocab_logits(self, out):
        d = self.draft_logits(out)
        full = d.new_full((*d.shape[:-1], self.dims.vocab_size), float("-inf"))
        full[..., self.draft_ids] = d
        return full

    # --- training -----------------------------------------------------------------------------------
    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        if signal.features is None:
            raise DraftsmithError("eagle3 trains on the target's tapped features, but this batch has none: "
                                  "run online (train.mode=online) or cache features in data_gen")
        if signal.features.shape[-1] != self.feature_width:
            raise DraftsmithError(
                f"eagle3 was built for {self.dims.num_taps} feature taps ({self.feature_width} wide) but the batch "
                f"has features {signal.features.shape[-1]} wide: use the same target.feature_layers as data_gen")
        ids = signal.input_ids
        B, T = ids.shape
        n, steps = max(T - 1, 1), self.cfg.ttt_steps
        target_logits = signal.logits
        target_arg = target_logits.argmax(-1)  # [B, T] over the full target vocab
        in_vocab = self.t2d[target_arg]
        target_draft = target_logits[..., self.draft_ids.to(target_logits.device)]  # [B, T, V_d]
        t2d_index = torch.cumsum(self.t2d.long(), 0) - 1  # target id -> draft id where t2d
        assistant = (signal.loss_mask > 0) & (signal.attention_mask > 0)
        total = target_draft.new_zeros(())
        metrics: dict[str, torch.Tensor] = {f"loss/{name}": total for name in self.cfg.losses}
        hidden = self.project(shifted(signal.features, 0, n))
        for i, out in enumerate(self.unroll(ids, hidden, steps)):
            # step i, row t predicts x_{t+2+i}: target distribution at t+1+i, loss mask at t+2+i
            scored = shifted(assistant, 2 + i, n)
            valid = scored & shifted(in_vocab, 1 + i, n)
            tgt = shifted(target_draft, 1 + i, n)
            tgt = torch.where(valid[..., None], tgt, torch.zeros_like(tgt))  # rows of -inf would give NaN
            labels = t2d_index[shifted(target_arg, 1 + i, n)].clamp_min(0)
            step_loss, draft_arg = self._ckpt(self._step_loss, out, tgt, labels, valid)
            w = self.cfg.step_decay ** i
            total = total + w * sum(step_loss.values())
            for name, term in step_loss.items():
                metrics[f"loss/{name}"] = metrics[f"loss/{name}"] + w * term.detach()
            metrics[f"loss_step/{i + 1}"] = sum(step_loss.values()).detach()
            metrics[f"acc/{i + 1}"] = ratio(draft_arg + self.d2t[draft_arg] == shifted(target_arg, 1 + i, n), scored)
        return total, floats(metrics)

    def _step_loss(self, out, tgt, labels, valid):
        """Weighted loss terms of one unrolled step and the drafter's argmax (draft ids)."""
        logits = self.draft_logits(out)
        terms = {}
        for name, w in self.cfg.losses.items():
            fn = L.ce(logits, labels, valid) if name == "ce" else L.DISTRIBUTION_LOSSES[name](logits, tgt, valid)
            terms[name] = w * fn
        return terms, logits.argmax(-1)
