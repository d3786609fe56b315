"""What several drafter families share: metric floats, sequence shifts, the target's reference rows, the
per-depth token objective of head drafters, and the holder that keeps the frozen target out of a module
tree. Nothing here belongs to one family, so no family imports another for it."""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from drafters.base import TargetSignal, topk_to_logits
from drafters.losses import DISTRIBUTION_LOSSES, ce


class Shared:
    """Holds a piece of the frozen target (its embedding, its tokenizer) outside the module tree: not in
    the state dict, not partitioned by ZeRO, and shared rather than duplicated by copy.deepcopy."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


def floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d metric tensors -> floats with one device sync."""
    if not metrics:
        return {}
    values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def shifted(x: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """x[:, k:k+length] along dim 1, zero/False-padded on the right when the sequence runs out."""
    part = x[:, k:k + length]
    if part.shape[1] < length:
        pad = part.new_zeros((part.shape[0], length - part.shape[1], *part.shape[2:]))
        part = torch.cat([part, pad], dim=1)
    return part


def ratio(hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked positions that are hits (0 when nothing is masked), as a 0-d tensor."""
    return (hits & mask).sum() / mask.sum().clamp_min(1)


def require_last_hidden(signal: TargetSignal, family: str) -> torch.Tensor:
    if signal.last_hidden is None:
        raise DraftsmithError(
            f"{family} trains on the target's last hidden state, but this batch has none: use "
            "train.mode=online, or an offline cache written with the target's last hidden state")
    return signal.last_hidden


def target_positions(signal: TargetSignal, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) of every position whose drafter output predicts token t+shift and that token is a
    training target (assistant token, not padding)."""
    m = signal.loss_mask[:, shift:].bool() & signal.attention_mask[:, shift:].bool()
    return m.nonzero(as_tuple=True)


def reference_rows(signal: TargetSignal, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """The target's next-token logits [N, V] at positions (b, t), computing only those rows; None when
    the signal carries no target distribution."""
    if signal._logits is not None:
        return signal._logits[b, t]
    if signal.last_hidden is not None and signal.lm_head is not None:
        with torch.no_grad():
            return signal.lm_head(signal.last_hidden[b, t]).float()
    if signal.topk_values is not None:
        return topk_to_logits(signal.topk_values[b, t], signal.topk_indices[b, t], signal.vocab_size)
    return None


def token_objective(logits: torch.Tensor, signal: TargetSignal, b: torch.Tensor, t: torch.Tensor,
                    shift: int, losses: dict[str, float], reference: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Weighted sum of `losses` for drafter logits [N, V] made at positions (b, t) for token t+shift.

    `ce` compares with the data token x_{t+shift}; a distribution loss (drafters/losses.py) with the
    target's distribution for the same token, i.e. its logits at t+shift-1 (`reference` [N, V] when the
    caller has them, else from the signal). Returns (total, {name: term}, accuracy) where accuracy is the
    fraction of rows whose argmax equals the target's argmax (the data token when the signal has no
    target distribution). Vocabularies of different widths are compared over the shared prefix."""
    labels = signal.input_ids[b, t + shift]
    if reference is None:
        reference = reference_rows(signal, b, t + shift - 1)
    width = logits.shape[-1] if reference is None else min(logits.shape[-1], reference.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    for name, weight in losses.items():
        if name == "ce":
            value = ce(logits, labels)
        elif name in DISTRIBUTION_LOSSES:
            if reference is None:
                raise DraftsmithError(
                    f"loss {name!r} needs the target's distribution, but this batch has neither the last "
                    "hidden state nor cached top-k logits: use `ce`, or train.mode=online")
            value = DISTRIBUTION_LOSSES[name](logits[..., :width], reference[..., :width])
        else:
            raise DraftsmithError(
                f"unknown loss {name!r} in drafter.losses: use ce or one of {', '.join(DISTRIBUTION_LOSSES)}")
        terms[name] = value
        total = total + weight * value
    want = labels if reference is None else reference[..., :width].argmax(-1)
    pred = logits[..., :width].argmax(-1)
    acc = (pred == want).float().mean() if len(want) else logits.new_zeros(())
    return total, terms, acc.detach()


def set_hf_checkpointing(model, enabled: bool) -> None:
    """Layer-wise activation checkpointing of a transformers model (v5 name; v4's gradient_checkpointing_*
    otherwise), non-reentrant so that frozen embeddings (no input requiring grad) still work. transformers
    only checkpoints in train mode."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def logits_at_depth(per_depth: torch.Tensor, tree, frontier: torch.Tensor, too_deep: str) -> torch.Tensor:
    """Draft logits [B, F, V] for drafters whose depth-d distribution does not depend on the path (Medusa's
    heads, PARD's mask positions): row d of per_depth [B or 1, K, V] for a frontier node at depth d (the root,
    -1, is depth 0). A node at depth >= K raises `too_deep`, the one-line error naming the fix."""
    depth = (torch.where(frontier < 0, 0, tree.depths.gather(1, frontier.clamp_min(0))) if tree.num_nodes
             else torch.zeros_like(frontier))
    # frontier nodes are at most as deep as the tree: its host-side bound, no sync when the builder set it
    if (tree.depth_limit if tree.num_nodes else 0) >= per_depth.shape[1] and int(depth.max()) >= per_depth.shape[1]:
        raise DraftsmithError(too_deep)
    logits = per_depth.expand(frontier.shape[0], -1, -1)
    return logits.gather(1, depth[..., None].expand(-1, -1, per_depth.shape[-1]))
