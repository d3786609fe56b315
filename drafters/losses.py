"""Losses as pure functions: (draft, target, mask) -> scalar, averaged over masked positions.

Conventions: `logits` are the drafter's [..., V]; `target_logits` the target's over the same vocabulary
[..., V] (entries of -inf mean "no mass", e.g. outside a cached top-k); `mask` is [...] bool/float and
selects the positions that count (assistant tokens). p = target distribution, q = drafter's.
A config picks terms by name with weights: `losses: {soft_ce: 1.0}` -> `LOSSES["soft_ce"]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drafters.base import topk_to_logits  # noqa: F401 - re-exported: losses over a cached top-k


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [...] over positions where mask is true (0 when none are)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _plogp_ratio(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p * (log p - log q), with 0 * anything = 0 where p has no mass."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the target's tokens (Medusa, Hydra, EAGLE-1's 0.1 x CE term)."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return masked_mean(nll, mask)


def soft_ce(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """-sum p log q: EAGLE-3's training-time-test loss (= forward KL up to the target's entropy)."""
    p = _logp(target_logits).exp()
    return masked_mean(-(torch.where(p > 0, p * _logp(logits), torch.zeros_like(p))).sum(-1), mask)


class _LinearSoftCE(torch.autograd.Function):
    """linear_soft_ce's work, chunk by chunk over rows. The gradients are made in the forward pass (the
    chunk's logits are at hand there) and kept until backward scales them by the incoming gradient: only
    [N, H] + [V, H] survive the call, never [N, V]. The same trade as Liger's fused linear cross-entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, target_logits, weights, k, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        top = torch.empty((N, k), dtype=torch.long, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        every = bool((weights > 0).all())  # every row counts (the usual case): no masking pass
        for s in range(0, N, chunk):
            h, w = hidden[s:s + chunk], weights[s:s + chunk]
            z = (h @ weight.t()).float()  # the drafter's logits over these rows
            zmax, arg = z.max(-1, keepdim=True)
            top[s:s + chunk] = arg if k == 1 else z.topk(k, dim=-1).indices
            p = torch.softmax(target_logits[s:s + chunk].float(), -1)
            if not every:
                p.masked_fill_(w[:, None] == 0, 0.0)  # unscored rows may be all -inf (no draft token): NaN
            q = torch.exp(z - zmax)  # in place from here on: every [rows, V] buffer costs page faults on CPU
            norm = q.sum(-1)
            lse = zmax.squeeze(-1) + norm.log()
            mass = p.sum(-1)
            loss += (w * (lse * mass - torch.linalg.vecdot(p, z))).sum()  # -sum p log q = sum p (lse - z)
            if want_h or want_w:
                g = q.mul_((w * mass / norm)[:, None]).sub_(p.mul_(w[:, None])).to(hidden.dtype)  # dloss/dz
                if want_h:
                    grad_h[s:s + chunk] = g @ weight
                if want_w:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(top)
        return loss, top

    @staticmethod
    def backward(ctx, grad_loss, _grad_top):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def linear_soft_ce(hidden: torch.Tensor, weight: torch.Tensor, target_logits: torch.Tensor,
                   mask: torch.Tensor, k: int = 1, chunk_elems: int = 2**22) -> tuple[torch.Tensor, torch.Tensor]:
    """soft_ce(hidden @ weight.T, target_logits, mask) without the [N, V] logits, their softmax or their
    gradient ever existing whole: rows go through in chunks of about chunk_elems logits. hidden [N, H],
    weight [V, H] (an LM head), target_logits [N, V], mask [N]. Also returns the drafter's top-k ids per
    row [N, k] (k = 1: the argmax), which callers need for accuracy and would otherwise recompute the
    logits for. Equal to the unfused soft_ce up to float rounding (tests/drafters/test_losses.py)."""
    m = mask.to(torch.float32)
    weights = m / m.sum().clamp_min(1.0)  # masked_mean as per-row weights
    chunk = max(1, chunk_elems // max(1, weight.shape[0]))
    return _LinearSoftCE.apply(hidden, weight, target_logits, weights, k, chunk)


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q): mean-seeking distillation (DistillSpec FKL; Hinton et al. soft targets)."""
    logp = _logp(target_logits)
    return masked_mean(_plogp_ratio(logp.exp(), logp, _logp(logits)), mask)


def reverse_kl(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p): mode-seeking distillation (DistillSpec RKL; MiniLLM). Needs p > 0 wherever q > 0."""
    logq = _logp(logits)
    return masked_mean(_plogp_ratio(logq.exp(), logq, _logp(target_logits)), mask)


def jsd(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None,
        beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon JSD[beta] = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
    (DistillSpec; GKD)."""
    logp, logq = _logp(target_logits), _logp(logits)
    p, q = logp.exp(), logq.exp()
    logm = torch.log((beta * p + (1 - beta) * q).clamp_min(1e-30))
    return masked_mean(beta * _plogp_ratio(p, logp, logm) + (1 - beta) * _plogp_ratio(q, logq, logm), mask)


def tvd(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Total variation 0.5 sum |p - q| = 1 - acceptance rate (DistillSpec TVD; Leviathan et al.)."""
    diff = (_logp(target_logits).exp() - _logp(logits).exp()).abs().sum(-1)
    return masked_mean(0.5 * diff, mask)


def topk_soft_ce(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None,
                 k: int = 10) -> torch.Tensor:
    """-sum over the target's top-k tokens of p_i log q_i (HASS harmonized distillation, K = 10)."""
    logp = _logp(target_logits)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    logq = _logp(logits).gather(-1, top.indices)
    return masked_mean(-(top.values.exp() * logq).sum(-1), mask)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothL1 feature regression, averaged over the hidden dimension (EAGLE-1)."""
    return masked_mean(F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1), mask)


def cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cos(pred, target) over the hidden dimension: direction-only feature matching (Kangaroo's adapter)."""
    return masked_mean(1 - F.cosine_similarity(pred.float(), target.float(), dim=-1), mask)


def cross_step_align(anchor: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None,
                     temperature: float = 0.1) -> torch.Tensor:
    """CORAL's cross-step representation alignment, in its soft-label InfoNCE form (objective=coral).

    anchor [N, H]: step 0's hidden states (made from the target's true features), other [N, H]: a later
    unrolled step's hidden states at the same positions (made from the drafter's own fed-back features);
    `mask` [N] picks the rows that take part, as queries and as each other's negatives. With cosine
    similarities s(a, b) over those rows, p_r = softmax_k(s(anchor_r, anchor_k) / temperature) and
    q_r = softmax_k(s(other_r, anchor_k) / temperature); the loss is the mean over rows of KL(p_r || q_r).

    Why this form: the paper's InfoNCE -log q_r[r] scores the later step's row against the same position
    of step 0 (positive) and the other positions (negatives). Its floor is not 0 but
    -log p_r[r], which depends on how far apart step 0's own rows are, so a loss that should say "aligned"
    keeps a size set by the batch. Using step 0's own similarity profile p_r as the label keeps the
    contrastive shape (q_r is pushed up at r and down at the other rows, and p_r -> one-hot at r as the
    temperature falls, which is the hard InfoNCE) and is 0 exactly when the later step reproduces step 0.
    Callers pass `anchor` detached: step 0 is the reference the later steps move towards."""
    if mask is not None:
        keep = mask.bool()
        anchor, other = anchor[keep], other[keep]
    if anchor.shape[0] == 0:
        return other.sum() * 0.0  # no rows: a zero that keeps the graph (every rank runs backward)
    a = F.normalize(anchor.float(), dim=-1)
    o = F.normalize(other.float(), dim=-1)
    logp = _logp(a @ a.t() / temperature)
    logq = _logp(o @ a.t() / temperature)
    return _plogp_ratio(logp.exp(), logp, logq).mean()


def step_weights(steps: int, decay: float) -> list[float]:
    """Per-step weights decay**i for unrolled drafting (EAGLE-3's 0.8**i; Medusa-2's 0.8**k)."""
    return [decay**i for i in range(steps)]


# Distribution-matching losses by name: fn(logits, target_logits, mask) -> scalar.
DISTRIBUTION_LOSSES = {
    "soft_ce": soft_ce,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "topk": topk_soft_ce,
}
# Every loss name a config may use, with what it compares.
LOSSES = {**DISTRIBUTION_LOSSES, "ce": ce, "smooth_l1": smooth_l1, "cosine": cosine}
