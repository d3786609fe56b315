"""Draft-time vocabulary trimming (FR-Spec, VocabTrim) for any trained drafter: the drafter's LM head keeps
only the rows of the K most frequent tokens, so each draft step computes K logits instead of V, and the
logits are scattered back into a [.., V] row of -inf (the Drafter protocol: logits over the target vocab).

    from drafters.vocab_trim import draft_vocab_size, trim_draft_vocab
    k = draft_vocab_size(cfg.drafter.draft_vocab, target.vocab_size)     # None = keep the full head
    small = trim_draft_vocab(trained, counts, k)      # a view sharing every weight; `trained` is untouched
    drafter = small.as_drafter(target)

Only the draft changes. The target still verifies over its full vocabulary, so every verification rule's
output distribution is the one it had (greedy output equals the target's; sampling stays lossless): a token
outside the kept set is simply never proposed, and the target's own bonus token can still be any token.

Which rows each family drafts through:
  eagle1   the target's (frozen) LM head: the view carries a reduced copy of its rows (`draft_head`)
  eagle3   its own trained head over V_d draft ids: the view keeps the K most frequent of those V_d ids (a
           smaller d2t / t2d), i.e. it is an EAGLE-3 drafter with a smaller draft vocabulary, exported as such.
           A larger K than V_d cannot add tokens (there are no trained rows for them), so K >= V_d keeps V_d.
  medusa   the final Linear(H -> V) of each head
  hydra    hydra_lm_head.<d>
  small    the HF model's output embedding (a tied one is copied: the input embedding stays whole)
  pard     the same as small (its mask token's row lies above the target vocabulary, so it is never kept)
  kangaroo the target's (frozen) LM head, which its shallow view drafts through: a reduced copy of its rows
           (`draft_head`), swapped into the decoding view by KangarooDrafter.as_drafter
The view is a shallow copy of the module tree along the replaced paths, so nothing is duplicated but the
kept rows (K x H per head) and the trained drafter can still be saved or exported whole.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters.vocab import on_target_vocab


def draft_vocab_size(spec, vocab_size: int) -> int | None:
    """Tokens to keep for `drafter.draft_vocab` (an int count, or a float fraction in (0, 1] of the target
    vocabulary, rounded up; its type and range are conf.schema.drafter's checks); None when the full head
    stays (null, or a size equal to the vocabulary)."""
    if spec is None:
        return None
    k = math.ceil(spec * vocab_size) if isinstance(spec, float) else int(spec)
    if k > vocab_size:
        raise DraftsmithError(f"drafter.draft_vocab={spec} is larger than the target vocabulary ({vocab_size} "
                              f"tokens): give at most {vocab_size}, or null for the full vocabulary")
    return None if k == vocab_size else k


def most_frequent(counts: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """The k most frequent ids (ascending), over all ids or only those in `among`; ties go to the lower id,
    so the choice is deterministic (drafters.vocab.build_draft_vocab's rule)."""
    counts = torch.as_tensor(counts).flatten().to(torch.float64)
    ids = torch.arange(counts.numel()) if among is None else torch.as_tensor(among).cpu().long().sort().values
    order = torch.sort(counts[ids], descending=True, stable=True).indices
    return ids[order[:k]].sort().values


class ScatterHead(nn.Module):
    """A Linear(H -> out_features) computed for the rows `ids` only, scattered into -inf elsewhere."""

    def __init__(self, linear: nn.Module, ids: torch.Tensor, out_features: int):
        super().__init__()
        ids = ids.to(linear.weight.device)
        self.weight = nn.Parameter(linear.weight.detach()[ids].clone(), requires_grad=False)
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[ids].clone(), requires_grad=False)
        self.register_buffer("ids", ids.clone())
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return on_target_vocab(kept, self.ids, self.out_features)


def view(module: nn.Module, replace: dict[str, object]) -> nn.Module:
    """A shallow copy of `module` sharing every parameter, with the submodules or buffers at the dotted paths
    of `replace` swapped for new ones. The copies along those paths get their own child dicts, so the original
    module tree (its state dict, what save_pretrained writes) is unchanged."""
    clone = copy.copy(module)
    clone._modules, clone._buffers = dict(module._modules), dict(module._buffers)
    deeper: dict[str, dict] = {}
    for path, new in replace.items():
        head, _, rest = path.partition(".")
        if rest:
            deeper.setdefault(head, {})[rest] = new
        elif isinstance(new, nn.Module):
            clone._modules[head] = new
        elif head in module._buffers:
            clone._buffers[head] = new
        else:
            object.__setattr__(clone, head, new)
    for head, sub in deeper.items():
        clone._modules[head] = view(module._modules[head], sub)
    return clone


def trimmed_lm(lm: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A view of a Hugging Face causal LM whose output embedding computes the rows `keep` only (-inf elsewhere);
    a tied output embedding is copied for the kept rows, so the input embedding stays whole."""
    out = lm.get_output_embeddings()
    rows = out.weight.shape[0]  # a model padded to fewer rows than the target vocabulary keeps the ids it has
    name = next(n for n, m in lm.named_modules() if m is out)
    return view(lm, {name: ScatterHead(out, keep[keep < rows], rows)})


def trim_draft_vocab(model, counts: torch.Tensor | None, k: int | None):
    """A view of the trained drafter `model` whose draft LM head keeps the k most frequent tokens of `counts`
    ([<= V] token frequencies); `model` itself when k is None. See the module docstring per family."""
    if k is None:
        return model
    if counts is None:
        raise DraftsmithError("drafter.draft_vocab needs token counts to pick the kept tokens: run data_gen "
                              "(it writes token_counts.npy) or set drafter.draft_vocab=null")
    family = model.family
    if family == "eagle3":
        keep = most_frequent(counts, k, among=model.draft_ids)
        rows = torch.searchsorted(model.draft_ids.cpu(), keep)  # draft ids ascend with target ids
        head = nn.Linear(model.lm_head.in_features, len(keep), bias=False).to(model.lm_head.weight)
        head.weight.data.copy_(model.lm_head.weight.detach()[rows.to(head.weight.device)])
        t2d = torch.zeros_like(model.t2d)
        t2d[keep.to(t2d.device)] = True
        d2t = (keep - torch.arange(len(keep))).to(model.d2t)
        return view(model, {"lm_head": head, "d2t": d2t, "t2d": t2d})
    keep = most_frequent(counts, k)
    if family in ("eagle1", "kangaroo"):  # both draft through the target's own LM head: a reduced copy of its rows
        out = model.target.model.get_output_embeddings()
        return view(model, {"draft_head": ScatterHead(out, keep, model.target.vocab_size)})
    if family == "medusa":
        heads = {f"medusa_head.{i}.{len(h) - 1}": h[-1] for i, h in enumerate(model.medusa_head)}
    elif family == "hydra":
        heads = {f"hydra_lm_head.{d}": h for d, h in enumerate(model.hydra_lm_head)}
    elif family in ("small", "pard"):  # PARD's mask row is above the target vocabulary: never a kept id
        return view(model, {"model": trimmed_lm(model.model, keep)})
    else:
        raise DraftsmithError(f"drafter.draft_vocab is not implemented for drafter family {family!r}: "
                              "set drafter.draft_vocab=null")
    return view(model, {path: ScatterHead(lin, keep, lin.weight.shape[0]) for path, lin in heads.items()})
