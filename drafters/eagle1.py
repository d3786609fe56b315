"""EAGLE-1: a feature-level drafter (Li et al., 2024), on the EAGLE base it shares with EAGLE-3
(drafters/eagle_base.py).

    python train.py drafter=eagle1                       # train it (stage=train) on the demo target
    python -m pytest -q tests/drafters/test_eagle1.py             # its tests (CPU, seconds)

Model. Row t pairs the target's top-layer feature f_t (TargetSignal.last_hidden: the final *normed*
hidden state, what the LM head reads) with the next token x_{t+1}:
    x = fc(concat(embed(x_{t+1}), f_t))        2H -> H, with bias (the official / SGLang layout)
    f_hat_t = decoder layers(x)                 Llama layers; the first has no input norm (official)
    logits = target.lm_head(f_hat_t)            frozen; predicts x_{t+2}
f_hat_t regresses f_{t+1}. Embeddings and LM head are the target's, frozen and outside the state dict,
whose names are SGLang's LlamaForCausalLMEagle ones: fc.{weight,bias}, layers.<i>.*.

Loss (cfg.losses, name -> weight), over rows whose predicted token x_{t+2} is an assistant token:
    smooth_l1   SmoothL1(f_hat_t, f_{t+1})
    soft_ce     -sum p log q, p = the target's distribution at t+1 (the official EAGLE-1 "CE(p, q)")
    ce          hard CE against the target's argmax token (what T=0 acceptance checks)
    any other drafters.losses distribution loss (forward_kl, tvd, ...) against p.
Default 1.0 * smooth_l1 + 0.1 * soft_ce. Training adds uniform noise U(-a/2, a/2), a = cfg.feature_noise,
to the input features (official EAGLE-1: a = 0.2). `loss(signal, UnrollOptions(...))` (objective=hass /
griffin / coral) unrolls several steps, feeding f_hat back, with the add-ons UnrollOptions lists; without options
the loss runs exactly the operations above.

"""
from __future__ import annotations

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.base import TargetSignal
from drafters.common import floats, ratio, shifted
from drafters.eagle_base import EagleBase, UnrollOptions, topk_keep
from drafters.layers import DecoderLayer, DrafterDims


class Eagle1Drafter(EagleBase):
    """EAGLE-1: predicts the target's next top-layer feature; the target's LM head reads it."""

    family = "eagle1"
    feature_source = "last_hidden"

    def __init__(self, cfg, dims: DrafterDims, target):
        super().__init__(cfg, dims, target)
        cfg.check()  # Eagle1Config's ranges (conf/schema/drafter.py), again for a config changed in code
        self._check_losses({"smooth_l1", "ce", *L.DISTRIBUTION_LOSSES})
        H = dims.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.layers = nn.ModuleList(DecoderLayer(dims, H, input_layernorm=i > 0) for i in range(cfg.num_layers))

    @classmethod
    def from_target(cls, cfg, target, token_counts=None) -> Eagle1Drafter:
        """Dimensions from target.config; token_counts is unused (EAGLE-1 keeps the full vocabulary)."""
        return cls(cfg, DrafterDims.from_target(target), target).to(target.device)

    @property
    def feature_width(self) -> int:
        return self.dims.hidden_size

    @property
    def num_kv_layers(self) -> int:
        return len(self.layers)

    def project(self, features):
        return features.to(self.param_dtype)

    def core(self, hidden, embeds, positions, attends):
        x = self.fc(torch.cat([embeds, hidden.to(self.param_dtype)], dim=-1))
        cos, sin = self._rope(x, positions)
        kvs = []
        for layer, attend in zip(self.layers, attends):
            a_in = layer.input_layernorm(x) if layer.input_layernorm is not None else x
            x, k, v = layer(a_in, x, cos, sin, attend)
            kvs.append((k, v))
        return x, kvs

    def target_vocab_logits(self, out):
        head = getattr(self, "draft_head", None) or self.target.lm_head  # a reduced head: drafters/vocab_trim.py
        return head(out.to(self.target.dtype)).float()

    def loss(self, signal: TargetSignal, options: UnrollOptions | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted cfg.losses terms (see the module docstring). `options` (HASS/GRIFFIN) may unroll
        several steps: step i, row t reads (f_hat, x_{t+1+i}) at position t+i, regresses f_{t+1+i} and
        matches the target's distribution at t+1+i; steps are summed with equal weights, as HASS's training
        code does. Metrics: loss/<name> (summed over steps), acc/<depth>, keep/<depth> (GRIFFIN)."""
        if signal.last_hidden is None:
            raise DraftsmithError("eagle1 trains on the target's last hidden state, but this batch has none: "
                                  "run online (train.mode=online) or cache last_hidden in data_gen")
        opts = options or UnrollOptions()
        ids = signal.input_ids
        B, T = ids.shape
        n = max(T - 1, 1)  # rows t = 0..T-2 pair (f_t, x_{t+1})
        f = signal.last_hidden
        feats = shifted(f, 0, n).to(self.param_dtype)
        if self.training and self.cfg.feature_noise > 0:
            feats = feats + (torch.rand_like(feats) - 0.5) * self.cfg.feature_noise
        assistant = (signal.loss_mask > 0) & (signal.attention_mask > 0)
        total = feats.new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}
        keep = None  # GRIFFIN: rows still trained at this step
        steps = max(1, opts.steps)
        for i, out in enumerate(self.unroll(ids, feats, steps, opts.detach_context)):
            if i == 0:
                first = out
            # step i, row t predicts x_{t+2+i}: the target's distribution at t+1+i, the loss mask at t+2+i
            scored = shifted(assistant, 2 + i, n)
            valid = scored if keep is None else scored & keep
            if keep is not None:
                metrics[f"keep/{i + 1}"] = ratio(keep, scored)
            target_logits = shifted(signal.logits, 1 + i, n)
            target_arg = target_logits.argmax(-1)
            logits = self.target_vocab_logits(out)
            terms = {}
            for name, w in self.cfg.losses.items():
                if name == "smooth_l1":
                    term = L.smooth_l1(out, shifted(f, 1 + i, n), valid)
                elif name == "ce":
                    term = L.ce(logits, target_arg, valid)
                else:
                    term = L.DISTRIBUTION_LOSSES[name](logits, target_logits, valid)
                terms[name] = w * term
            if i and opts.align_weight:  # CORAL: step i's row t against step 0's row t + i (the same token)
                terms["align"] = opts.align_weight * L.cross_step_align(
                    shifted(first, i, n).flatten(0, 1).detach(), out.flatten(0, 1), scored.flatten(),
                    opts.align_temperature)
            if opts.topk_weight:
                terms["topk_distill"] = opts.topk_weight * L.topk_soft_ce(logits, target_logits, valid, opts.topk_k)
            for name, term in terms.items():
                total = total + term
                key = f"loss/{name}"
                metrics[key] = metrics[key] + term.detach() if key in metrics else term.detach()
            metrics[f"acc/{i + 1}"] = ratio(logits.argmax(-1) == target_arg, scored)
            if opts.keep_topk and i + 1 < steps:
                with torch.no_grad():
                    keep = topk_keep(logits.topk(opts.keep_topk, dim=-1).indices, shifted(ids, 2 + i, n), keep)
        return total, floats(metrics)
