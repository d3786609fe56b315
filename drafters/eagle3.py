"""EAGLE-3: fused low/mid/high target features, a reduced draft vocabulary, training-time test (Li et al., 2025).

    python train.py drafter=eagle3                       # train it (stage=train) on the demo target
    python -m pytest -q tests/drafters/test_eagle3.py             # its tests (CPU, seconds)

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
TTT step i equals drafting a chain of depth i (tests/drafters/test_eagle3.py checks this).

Loss: for each step i, every cfg.losses term (soft_ce by default: -sum p log q over the draft vocab, p the
target's distribution renormalised over the draft vocab) on rows whose predicted token is an assistant
token AND whose target argmax is in the draft vocab; total = sum_i step_decay**i * terms_i. No feature
regression. Metrics: loss/<name> (decayed sum), loss_step/<depth> (undecayed), acc/<depth>: drafter argmax
(mapped to target ids) == target argmax over all assistant rows (argmax outside the draft vocab = a miss).
How it is computed (the same function, cheaper: bench/bench_train_throughput.py): steps >= 1 unroll only
rows that a later step scores, only scored rows reach the LM head, and soft_ce alone runs fused with the
head (drafters.losses.linear_soft_ce), so no [rows x V_d] logits are kept for backward.

Add-ons (`loss(signal, UnrollOptions(...))`, used by objective=hass / objective=griffin): a top-K
distillation term per step, GRIFFIN's cumulative top-k row mask (metrics keep/<depth>), and HASS's
stop-gradient at the fed-back features (EagleBase.unroll explains how that relates to TTT's attention).
With no options the loss runs exactly the operations it runs without them. CORAL (objective=coral) adds its
cross-step alignment term (metric loss/align). drafter.head_groups > 0 adds CORAL's LM-head router
(drafters/head_groups.py: router.*, loss/router, router_hit/<depth>); decoding then computes only the
router's top drafter.active_groups groups of the head.
"""
from __future__ import annotations

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.base import TargetSignal
from drafters.common import floats, ratio, shifted
from drafters.eagle_base import EagleBase, UnrollOptions, topk_keep
from drafters.head_groups import HeadRouter, group_size, grouped_logits
from drafters.layers import DecoderLayer, DrafterDims
from drafters.vocab import DraftVocab, build_draft_vocab, on_target_vocab


class Eagle3Drafter(EagleBase):
    """EAGLE-3 drafter: the TrainableDrafter; `as_drafter()` gives the decoding adapter."""

    family = "eagle3"
    feature_source = "features"

    def __init__(self, cfg, dims: DrafterDims, target, vocab: DraftVocab):
        super().__init__(cfg, dims, target)
        cfg.check()  # Eagle3Config's ranges (conf/schema/drafter.py), again for a config changed in code
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
        self.router = None  # CORAL's head grouping (drafters/head_groups.py): off unless head_groups > 0
        if cfg.head_groups:
            if not 1 <= cfg.active_groups <= cfg.head_groups <= vocab.size:
                raise DraftsmithError(
                    f"drafter.head_groups={cfg.head_groups}, drafter.active_groups={cfg.active_groups}: need "
                    f"1 <= active_groups <= head_groups <= the draft vocabulary ({vocab.size}), or head_groups=0 (off)")
            self.router = HeadRouter(H, cfg.head_groups)

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
    def from_meta(cls, cfg, target, dims, meta, folder=None):
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
        if self.router is None:
            d = self.draft_logits(out)
        else:  # CORAL: only the router's top active_groups groups of the head (-inf elsewhere)
            h = self.norm(out)
            d = grouped_logits(h, self.lm_head.weight, self.router(h), self.cfg.active_groups)
        return on_target_vocab(d, self.draft_ids, self.dims.vocab_size)

    # --- training -----------------------------------------------------------------------------------
    def loss(self, signal: TargetSignal, options: UnrollOptions | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if signal.features is None:
            raise DraftsmithError("eagle3 trains on the target's tapped features, but this batch has none: "
                                  "run online (train.mode=online) or cache features in data_gen")
        if signal.features.shape[-1] != self.feature_width:
            raise DraftsmithError(
                f"eagle3 was built for {self.dims.num_taps} feature taps ({self.feature_width} wide) but the batch "
                f"has features {signal.features.shape[-1]} wide: use the same target.feature_layers as data_gen")
        opts = options or UnrollOptions()
        ids = signal.input_ids
        B, T = ids.shape
        n, steps = max(T - 1, 1), self.cfg.ttt_steps
        target_logits = signal.logits.flatten(0, 1)  # [B*T, V]; rows are gathered from it, step by step
        target_arg = target_logits.argmax(-1)  # [B*T] over the full target vocab
        in_vocab = self.t2d[target_arg]
        draft_ids = self.draft_ids.to(target_logits.device)
        full_vocab = self.draft_vocab_size == target_logits.shape[-1]  # draft ids are then 0..V-1
        t2d_index = torch.cumsum(self.t2d.long(), 0) - 1  # target id -> draft id where t2d
        assistant = (signal.loss_mask > 0) & (signal.attention_mask > 0)
        # step i, row t predicts x_{t+2+i}: scored when that is an assistant token. A row's step i is needed
        # while some step >= i scores it; only those rows are unrolled (EagleBase.unroll) and only scored
        # rows (GRIFFIN: every unrolled row, its top-k picks the next step's rows) reach the LM head.
        scored = torch.stack([shifted(assistant, 2 + i, n).flatten() for i in range(steps)])  # [steps, B*n]
        needed = scored.flip(0).cummax(0).values.flip(0)
        rows = [needed[i].nonzero().squeeze(1) for i in range(1, steps)]
        total = target_logits.new_zeros(())
        metrics: dict[str, torch.Tensor] = {f"loss/{name}": total for name in self.cfg.losses}
        if opts.topk_weight:
            metrics["loss/topk_distill"] = total
        if opts.align_weight:
            metrics["loss/align"] = total
        keep = None  # GRIFFIN: rows still trained at this step (over the unrolled rows)
        idx = torch.arange(B * n, device=ids.device)
        hidden = self.project(shifted(signal.features, 0, n))
        for i, out in enumerate(self.unroll(ids, hidden, steps, opts.detach_context, rows)):
            if i == 0:
                first = out  # [B*n, H]: CORAL aligns step i's row t with step 0's row t + i
            if i:
                if keep is not None:
                    keep = keep[torch.searchsorted(idx, rows[i - 1])]
                idx = rows[i - 1]
            want_top = opts.keep_topk if i + 1 < steps else 0
            at = scored[i][idx] if not want_top else torch.ones_like(idx, dtype=torch.bool)
            pick = at.nonzero().squeeze(1)  # positions in `out` of the rows that reach the head
            r = idx[pick]
            tpos = (r // n) * T + r % n + 1 + i  # the target's distribution for row t: position t+1+i
            sc = scored[i][r]
            valid = sc & in_vocab[tpos]
            if keep is not None:
                metrics[f"keep/{i + 1}"] = ratio(keep[pick], sc)
                valid = valid & keep[pick]
            tgt = target_logits[tpos] if full_vocab else target_logits[tpos[:, None], draft_ids[None]]
            labels = t2d_index[target_arg[tpos]].clamp_min(0)
            step_loss, draft_arg, top = self._ckpt(self._step_loss, out[pick], tgt, labels, valid, opts, want_top)
            w = self.cfg.step_decay ** i
            if i and opts.align_weight:  # a scored row's t + i < n: its step-0 partner is in the same sequence
                step_loss["align"] = opts.align_weight * L.cross_step_align(
                    first[(r + i).clamp_max(B * n - 1)].detach(), out[pick], sc, opts.align_temperature)
            total = total + w * sum(step_loss.values())
            for name, term in step_loss.items():
                metrics[f"loss/{name}"] = metrics[f"loss/{name}"] + w * term.detach()
            metrics[f"loss_step/{i + 1}"] = sum(step_loss.values()).detach()
            hits = draft_ids[draft_arg] == target_arg[tpos]
            metrics[f"acc/{i + 1}"] = (hits & sc).sum() / scored[i].sum().clamp_min(1)
            if self.router is not None:
                total = total + self._router_loss(out[pick], labels, valid, metrics, i + 1)
            if top is not None:
                keep = topk_keep(draft_ids[top], shifted(ids, 2 + i, n).flatten()[r], keep)
        return total, floats(metrics)

    def _router_loss(self, out, labels, valid, metrics: dict, depth: int) -> torch.Tensor:
        """CE of the head router to the group of the target's argmax (draft id `labels`), on a detached h
        (drafters/head_groups.py says why); metrics: loss/router, router_hit/<depth> = the share of rows
        whose group is among the router's top active_groups."""
        scores = self.router(self.norm(out).detach())
        group = labels // group_size(self.draft_vocab_size, self.cfg.head_groups)
        loss = L.ce(scores, group, valid)
        metrics["loss/router"] = metrics.get("loss/router", 0) + loss.detach()
        hit = (scores.detach().topk(self.cfg.active_groups, dim=-1).indices == group[:, None]).any(-1)
        metrics[f"router_hit/{depth}"] = ratio(hit, valid)
        return loss

    def _step_loss(self, out, tgt, labels, valid, opts: UnrollOptions | None = None, want_top: int = 0):
        """Weighted loss terms of one unrolled step over the rows given (out [N, H], the target's logits
        over the draft vocab tgt [N, V_d], its argmax's draft id `labels`, the rows that count `valid`),
        the drafter's argmax (draft ids) and, when asked (GRIFFIN), its top `want_top` draft ids.
        The default soft_ce alone runs fused (drafters.losses.linear_soft_ce: no [N, V_d] logits kept for
        backward); other terms need the logits themselves."""
        topk_term = opts is not None and opts.topk_weight
        if set(self.cfg.losses) == {"soft_ce"} and not topk_term:
            loss, top = L.linear_soft_ce(self.norm(out), self.lm_head.weight, tgt, valid, k=max(1, want_top))
            return {"soft_ce": self.cfg.losses["soft_ce"] * loss}, top[:, 0], top if want_top else None
        logits = self.draft_logits(out)
        tgt = torch.where(valid[..., None], tgt, torch.zeros_like(tgt))  # rows of -inf would give NaN
        terms = {}
        for name, w in self.cfg.losses.items():
            fn = L.ce(logits, labels, valid) if name == "ce" else L.DISTRIBUTION_LOSSES[name](logits, tgt, valid)
            terms[name] = w * fn
        if topk_term:
            terms["topk_distill"] = opts.topk_weight * L.topk_soft_ce(logits, tgt, valid, opts.topk_k)
        top = logits.detach().topk(want_top, dim=-1).indices if want_top else None
        return terms, logits.argmax(-1), top
