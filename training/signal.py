"""The target's signal for a batch (drafters.base.TargetSignal), online or offline.

    signal = make_signal("online", target, batch)    # frozen target forward inside the step, no disk
    signal = make_signal("offline", target, batch)   # data_gen's cached features / top-k (batch from collate)

Both produce the same TargetSignal fields, so a drafter's loss is the same function either way: online
gives features, last_hidden (and logits = the target's LM head over it, exact); offline gives the cached
features and last_hidden (bf16 in data_gen's cache; cast to the target's dtype here) and, when cached, the
target's top-k logits, which TargetSignal densifies when there is no last_hidden.
"""
from __future__ import annotations

import torch

from drafters.base import TargetSignal


def online_signal(target, batch: dict[str, torch.Tensor]) -> TargetSignal:
    """Run the frozen target on the batch (no grad; logits are left to TargetSignal's lazy LM head so a
    drafter that never reads them never materialises [B, T, V])."""
    with torch.no_grad():
        out = target(batch["input_ids"], attention_mask=batch["attention_mask"], logits=False)
    return TargetSignal(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        loss_mask=batch["loss_mask"], features=out.features, last_hidden=out.last_hidden,
                        lm_head=target.lm_head, vocab_size=target.vocab_size)


def offline_signal(target, batch: dict[str, torch.Tensor]) -> TargetSignal:
    """The cached signal of a batch made by training.data.collate(..., with_cache=True)."""
    dev, dtype = target.device, target.dtype
    last = batch.get("last_hidden")
    feats = batch.get("features")
    return TargetSignal(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"],
        features=None if feats is None else feats.to(dev, dtype),
        last_hidden=None if last is None else last.to(dev, dtype),
        topk_values=batch.get("topk_values"), topk_indices=batch.get("topk_indices"),
        lm_head=target.lm_head if last is not None else None, vocab_size=target.vocab_size)


def make_signal(mode: str, target, batch: dict[str, torch.Tensor], run_target: bool = True) -> TargetSignal:
    """`run_target=False` for families that run the target inside their own loss (Medusa-2 trains it
    through LoRA): the signal then carries only the batch, and no frozen forward is wasted."""
    batch = {k: v.to(target.device) for k, v in batch.items()}
    if not run_target:
        return TargetSignal(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            loss_mask=batch["loss_mask"], vocab_size=target.vocab_size)
    return online_signal(target, batch) if mode == "online" else offline_signal(target, batch)
