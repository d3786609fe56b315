"""The drafter interface every family implements, as the speculative decoder and tree training see it.

Decoding state. The decoder keeps the committed sequence x_0..x_n. The target has processed x_0..x_{n-1}
and produced a feature f_i for each of them (f_i = the target's tapped hidden states after reading x_i);
x_n (the last token: the target's own sample from the previous verification) has not been read by the
target yet. So there is always exactly one more committed token than committed features.

Calls, in order:
  prepare(room, cuda_graphs)                     optional hints: at most `room` more tokens follow the prompt
                                                 (size caches once); whether CUDA graphs are wanted
  start(ids [1, n+1], feats [1, n, D] | None)   after the target's prefill of the prompt and its first token
  expand(tree, frontier) -> logits [B, F, V]     repeatedly, while decoding/tree.py builds a draft tree
  commit(new_ids [1, k+1], new_feats [1, k+1, D] | None)
      after verification: new_ids = the k accepted draft tokens + the target's bonus token;
      new_feats = the target's features at [old last token, accepted tokens...], i.e. exactly the
      positions that now become "read by the target". Drafters drop all tree state here.

`expand` returns logits over the *target* vocabulary (drafters with a reduced vocabulary scatter theirs
back through d2t and fill the rest with -inf). The tree builder applies temperature and picks children.
The root of every tree is x_n; `frontier` holds node indices into the partial tree, -1 meaning the root.

Drafters that read target features set `uses_features = True`; the decoder then passes them, otherwise
None. `feature_source` says which target output they are: "features" (TargetOutput.features, the tapped
hidden states, [.., n_taps * H]: EAGLE-3) or "last_hidden" (TargetOutput.last_hidden, [.., H]: EAGLE-1).
`vocab_size` must equal the target's (checked by the decoder with a clear error).
Drafters that run a model of their own may count its forwards in an int attribute `forwards`; the decoder
then reports drafter forwards per cycle (an autoregressive LM drafter needs one per tree level, a parallel
drafter one per cycle).

Fixed-shape drafters (`fixed_shape = True`, decoding/cycle.py) also implement commit_fixed and may set
`keeps_programs = True`: every tensor their draft and commit read or write is a buffer that outlives one
sequence (start and begin_fixed write into it in place, a re-allocation changes `buffers_version`), so the
decoder's captured CUDA graphs stay valid from one generate to the next. Without it the decoder captures
them again for every sequence (correct, but each sequence then pays the eager warm-up and the capture).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from decoding.tree import DraftTree


class Drafter(ABC):
    """Proposes draft tokens; stateful across one generation, reset by `start`."""

    name: str = "drafter"
    keeps_programs: bool = False  # see the module docstring (fixed-shape drafters with persistent buffers)
    uses_features: bool = False
    feature_source: str = "features"  # "features" | "last_hidden": which TargetOutput field start/commit get
    vocab_size: int

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:  # noqa: B027 - optional hook
        """Before `start`: the sequence grows by at most `room` tokens after the prompt (drafters with a
        preallocated cache size it from this); `cuda_graphs`: the decoder's eval.cuda_graphs."""

    @abstractmethod
    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        """Begin a sequence: ids [1, n+1] (prompt + the target's first token), features [1, n, D]."""

    @abstractmethod
    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        """Draft logits [B, F, V] for the token after each frontier node ([B, F] indices, -1 = root).

        `tree` holds every node built so far (tokens, parents, depths), frontier nodes included; a
        drafter that keeps per-node state (hidden states, its own KV entries) computes it for the
        frontier nodes here, attending to each node's ancestors only."""

    @abstractmethod
    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None) -> None:
        """Accept new_ids [1, k+1] into the committed sequence; drop every rejected tree node's state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-sequence state (KV caches) after a generation."""


# --------------------------------------------------------------------------------------------------
# Training side
# --------------------------------------------------------------------------------------------------
@dataclass
class TargetSignal:
    """What the frozen target says about a batch: computed online by the training step, or read from
    data_gen's offline cache. Positions are aligned with input_ids.

    loss_mask[b, t] = 1 when token t is a training target (an assistant token). A drafter whose output
    at position t predicts token t+k uses loss_mask[:, t+k]."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 = real token, 0 = padding (right-padded)
    loss_mask: torch.Tensor  # [B, T]
    features: torch.Tensor | None = None  # [B, T, n_taps * H] tapped hidden states (low -> high)
    last_hidden: torch.Tensor | None = None  # [B, T, H] final normed hidden state
    topk_values: torch.Tensor | None = None  # [B, T, k] offline cache alternative to full logits
    topk_indices: torch.Tensor | None = None  # [B, T, k]
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # the target's frozen LM head
    vocab_size: int | None = None  # needed to densify a cached top-k
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """Target next-token logits [B, T, V]: the LM head over last_hidden (exact), else the cached
        top-k scattered into -inf (renormalised over k)."""
        if self._logits is None:
            if self.last_hidden is not None and self.lm_head is not None:
                with torch.no_grad():
                    self._logits = self.lm_head(self.last_hidden).float()
            elif self.topk_values is not None:
                self._logits = topk_to_logits(self.topk_values, self.topk_indices, self.vocab_size)
            else:
                raise ValueError("TargetSignal has neither last_hidden + lm_head nor cached top-k logits")
        return self._logits


class TrainableDrafter(nn.Module, ABC):
    """A drafter family as the train stage sees it. One file per family implements it.

    Built from the loaded target (dimensions come from target.config, never from YAML), trained on
    TargetSignal batches, saved as a folder (model.safetensors + drafter_config.json), and turned
    into a decoding `Drafter` for the speculative decoder."""

    family: str = ""

    @classmethod
    @abstractmethod
    def from_target(cls, cfg, target, token_counts=None) -> TrainableDrafter:
        """Build from the drafter config and the loaded target; `token_counts` (data_gen's assistant
        token frequencies, a [V] tensor) lets reduced-vocabulary drafters pick their vocabulary."""

    @abstractmethod
    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and logged metrics: every weighted loss term (`loss/<name>`) and per-depth
        training accuracy (`acc/<depth>`, fraction of masked positions where the drafter's argmax at
        that depth equals the target's argmax)."""

    @abstractmethod
    def as_drafter(self, target) -> Drafter:
        """A decoding-time Drafter sharing these weights."""

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; families with per-part learning rates (Medusa-2) override."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def set_gradient_checkpointing(self, enabled: bool) -> None:  # noqa: B027 - optional
        """Recompute activations in backward (families with decoder layers implement it, e.g. by setting
        `_gc` and running their layers through `_ckpt`)."""

    def _ckpt(self, fn, *args):
        """fn(*args), recomputed in backward when the family turned checkpointing on (`_gc`) and this is a
        training step; non-reentrant, so closures over earlier steps and the frozen target get their gradients."""
        if getattr(self, "_gc", False) and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """= loss(signal), so engines that call the module (DeepSpeed's engine(batch)) train it."""
        return self.loss(signal)


def topk_to_logits(values: torch.Tensor, indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense logits [..., V] from a cached top-k (values/indices [..., k]); -inf outside the top-k, so the
    target distribution is renormalised over the k kept tokens."""
    out = torch.full((*values.shape[:-1], vocab_size), float("-inf"), dtype=torch.float32, device=values.device)
    return out.scatter(-1, indices.long(), values.float())
