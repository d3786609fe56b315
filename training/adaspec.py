"""AdaSPEC: selective distillation of an independent small drafter (objective=adaspec; Hu et al., NeurIPS 2025).

    python train.py stage=train drafter=small objective=token run.name=ref                       # 1. reference
    python train.py stage=train drafter=small objective=adaspec objective.reference=runs/ref/train/final run.name=ada
    python -m pytest -q tests/training/test_adaspec.py

A small drafter cannot fit every token of a large target. AdaSPEC first distils a reference drafter with plain
forward KL (any `objective=token` run of drafter=small: its train/final folder), then trains the drafter only on
the tokens it can still learn. Per assistant token (slot t+1, predicted at t):

    dL = KL(p || q_draft) - KL(p || q_ref)

and only the keep_fraction of each micro-batch's tokens with the largest dL (exactly ceil(keep_fraction * N)
of its N tokens; ties go to the earlier token in row-major order) enter the loss: the mean forward KL over
them. The reference is frozen, loaded once in the target's dtype on the target's device, and kept out of the
DeepSpeed module (so it is neither trained, partitioned nor checkpointed). As in the paper, the drafter starts
from the same initialisation as the reference (drafter.init with the same run.seed), not from the reference.

Selection is per micro-batch, as the official trainer's per-device batch quantile; eval applies the same rule
and also reports `fkl_all`, the forward KL over every token, comparable with objective=token runs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from conf.errors import DraftsmithError
from conf.schema import project_path
from drafters.common import floats, reference_rows, target_positions


def token_forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row [N] (drafters.losses.forward_kl before its mean)."""
    logp = F.log_softmax(target_logits.float(), -1)
    logq = F.log_softmax(logits.float(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def select_learnable(delta: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Bool mask [N] of the ceil(keep_fraction * N) entries with the largest delta; among equal values the
    earlier index wins (a stable sort), so the choice is deterministic."""
    n = delta.numel()
    k = min(n, math.ceil(keep_fraction * n - 1e-9))
    order = torch.sort(-delta.detach().float(), stable=True).indices[:k]
    return torch.zeros(n, dtype=torch.bool, device=delta.device).index_fill_(0, order, True)


def load_reference(path: str | None, target):
    """The frozen reference LM from a small drafter folder, with one-line errors naming the fix."""
    from drafters.small_lm import SmallDrafter

    fix = ("train one first: python train.py stage=train drafter=small objective=token run.name=<ref>, then set "
           "objective.reference=runs/<ref>/train/final")
    if not path:
        raise DraftsmithError(f"objective=adaspec needs objective.reference (a trained small drafter folder): {fix}")
    folder = Path(project_path(path))
    if not folder.is_dir():
        raise DraftsmithError(f"objective.reference={path!r} does not exist: {fix}")
    ref = SmallDrafter.from_pretrained(folder, target).model
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class AdaSPECObjective:
    """objective(drafter, signal) -> (loss, metrics) with the reference LM held outside the module tree."""

    def __init__(self, cfg, target):
        o = cfg.objective
        o.check()  # AdaSPECConfig's keep_fraction range (conf/schema/objective.py), again for code changes
        if cfg.drafter.name != "small":
            raise DraftsmithError(f"objective=adaspec filters tokens for independent small drafters, but drafter="
                                  f"{cfg.drafter.name}: use drafter=small")
        self.keep_fraction = o.keep_fraction
        self.reference = load_reference(o.reference, target)

    def __call__(self, drafter, signal):
        logits = drafter.model(input_ids=signal.input_ids, attention_mask=signal.attention_mask).logits
        b, t = target_positions(signal, 1)
        with torch.no_grad():
            ref_logits = self.reference(input_ids=signal.input_ids, attention_mask=signal.attention_mask).logits[b, t]
        p = reference_rows(signal, b, t)
        q = logits[b, t]
        width = min(q.shape[-1], p.shape[-1], ref_logits.shape[-1])
        p = p[:, :width]
        kl_draft = token_forward_kl(q[:, :width], p)
        with torch.no_grad():
            kl_ref = token_forward_kl(ref_logits[:, :width], p)
            keep = select_learnable(kl_draft - kl_ref, self.keep_fraction)
        loss = kl_draft[keep].mean() if bool(keep.any()) else kl_draft.sum() * 0.0
        with torch.no_grad():
            acc = (q[:, :width].argmax(-1) == p.argmax(-1)).float().mean() if len(b) else loss.new_zeros(())
            metrics = {"loss/forward_kl": loss.detach(), "fkl_all": kl_draft.mean() if len(b) else loss.new_zeros(()),
                       "fkl_ref": kl_ref.mean() if len(b) else loss.new_zeros(()),
                       "kept": keep.float().mean() if len(b) else loss.new_zeros(()), "acc/1": acc}
        return loss, floats(metrics)


def build_adaspec(cfg, target):
    """OBJECTIVES builder: objective=adaspec."""
    return AdaSPECObjective(cfg, target)
