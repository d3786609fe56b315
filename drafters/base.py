"""The drafter interface every family implements, as the speculative decoder and tree training see it.

Decoding state. The decoder keeps the committed sequence x_0..x_n. The target has processed x_0..x_{n-1}
and produced a feature f_i for each of them (f_i = the target's tapped hidden states after reading x_i);
x_n (the last token: the target's own sample from the previous verification) has not been read by the
target yet. So there is always exactly one more committed token than committed features.

Calls, in order:
  start(ids [1, n+1], feats [1, n, D] | None)   after the target's prefill of the prompt and its first token
  expand(tree, frontier) -> logits [B, F, V]     repeatedly, while drafters/tree.py builds a draft tree
  commit(new_ids [1, k+1], new_feats [1, k+1, D] | None)
      after verification: new_ids = the k accepted draft tokens + the target's bonus token;
      new_feats = the target's features at [old last token, accepted tokens...], i.e. exactly the
      positions that now become "read by the target". Drafters drop all tree state here.

`expand` returns logits over the *target* vocabulary (drafters with a reduced vocabulary scatter theirs
back through d2t and fill the rest with -inf). The tree builder applies temperature and picks children.
The root of every tree is x_n; `frontier` holds node indices into the partial tree, -1 meaning the root.

Drafters that read target features set `uses_features = True`; the decoder then passes them, otherwise
None. `vocab_size` must equal the target's (checked by the decoder with a clear error).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from drafters.tree import DraftTree


class Drafter(ABC):
    """Proposes draft tokens; stateful across one generation, reset by `start`."""

    name: str = "drafter"
    uses_features: bool = False
    vocab_size: int

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
