"""Any Hugging Face causal LM as a tree drafter with its own KV cache (independent small drafters, and
the target drafting for itself).

    from drafters.lm_drafter import LMTreeDrafter
    drafter = LMTreeDrafter(small_model, vocab_size=target.vocab_size)
    tokens, stats = SpeculativeDecoder(target, drafter, TreeConfig(kind="chain", depth=4)).generate(ids, 64)

Cache layout (a preallocated static cache, decoding/kvcache.py): [committed tokens already read | tree entries
of the current cycle]. `expand` on the root drops the tree entries and reads the committed tokens not read
yet (the accepted drafts and the target's bonus token) causally, so the cache holds exactly what a plain
left-to-right reading would; `expand` on tree nodes reads the frontier nodes with a tree mask (each node sees
the committed tokens and its own ancestors). Re-reading the k accepted drafts costs one (k+1)-token forward
instead of a walk over the tree on the host, and keeps every step free of host syncs. The only assumption
about the target is a shared tokenizer: logits are cut or padded with -inf to `vocab_size` (models of one
family often pad their embeddings to different sizes).

Fixed shapes (the decoder's graph regions, decoding/cycle.py): `commit_fixed` stores the accepted tokens + bonus
in a padded buffer with their count on the device, and the next root expansion reads the whole padded buffer,
commits its first `count` entries (the device-side length moves by the count) and takes the root's logits at
row count - 1 (`logits_to_keep` given as a device index). Every step then has the same shapes each cycle and
none synchronises; the host learns the count from the decoder (`synced`) to keep its capacity checks.
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from decoding.kvcache import StaticRunner, model_forward
from decoding.tree import DraftTree, check_tree_attention
from drafters.base import Drafter

HEADROOM = 512  # cache entries beyond the prompt when the decoder gave no `prepare` hint; the cache grows if needed


class LMTreeDrafter(Drafter):
    """A causal LM proposing draft trees for one sequence (B = 1)."""

    uses_features = False
    fixed_shape = True

    def __init__(self, model, vocab_size: int | None = None, name: str | None = None):
        self.model = model.eval()
        self.model_vocab = int(model.get_input_embeddings().weight.shape[0])
        self.vocab_size = int(vocab_size or self.model_vocab)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        check_tree_attention(model, f"drafter {self.name}")
        self.cuda_graphs = True
        self.room = HEADROOM
        self.run: StaticRunner | None = None
        self.pending: torch.Tensor | None = None
        self.forwards = 0  # model forwards so far: the decoder reports them per cycle
        self.fixed = None  # (padded ids [1, P], count []) from commit_fixed, read by the next root expansion
        self.at = None  # the logits row the next read keeps (a device index, set inside the program)
        self.fixed_shape = self.model_vocab >= self.vocab_size  # else a commit must check ids (a host sync)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def buffers_version(self) -> tuple:
        """Changes whenever a buffer a captured program reads is re-allocated."""
        return (self.run.version if self.run is not None else 0, id(self.fixed[0]) if self.fixed else 0)

    @property
    def past(self) -> int:
        """Committed tokens whose KV entries are in the cache."""
        return self.run.length if self.run is not None else 0

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:
        self.room = room
        if bool(cuda_graphs) != self.cuda_graphs:  # CUDA only: replay this model's fixed-shape steps as graphs
            self.cuda_graphs, self.run = bool(cuda_graphs), None

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and int(ids.max()) >= self.model_vocab:
            raise DraftsmithError(
                f"drafter {self.name} has {self.model_vocab} embedding rows but got token {int(ids.max())}: "
                "use a drafter with the target's tokenizer")

    def _forwards(self) -> dict[str, int]:
        """The runner's forwards by name -> the logits rows each keeps (0 = all): reading the committed
        tokens needs the last row only, a tree level every row."""
        return {"read": 1, "tree": 0, "read_at": None}

    def _runner(self) -> StaticRunner:
        def fn(keep):
            def forward(ids, mask, pos, cache):
                rows = self.at if keep is None else keep  # None: the rows in self.at (a device index)
                return model_forward(self.model, cache, input_ids=ids, attention_mask=mask, position_ids=pos,
                                     logits_to_keep=rows).logits
            return forward
        return StaticRunner({name: fn(keep) for name, keep in self._forwards().items()}, self.model.config,
                            self.device, self.model.dtype, graphs=self.cuda_graphs)

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"LMTreeDrafter drafts for one sequence: start got {input_ids.shape[0]} rows")
        self._check_ids(input_ids)
        if self.run is None:
            self.run = self._runner()
        # room for the tokens still to come, plus the fixed cycle's slack: its padded commit buffer and the next
        # tree sit past the committed entries, so the cache never re-allocates inside the loop
        self.run.reset(input_ids.shape[1] + 2 * self.room)
        self.pending = input_ids.to(self.device)  # committed tokens not read yet (always holds the root)
        self.first = True  # the first read is the prompt: a one-off shape, never graphed
        self.slots = torch.zeros(1, 0, dtype=torch.long, device=self.device)  # node held by each tree entry
        self.root_logits = None
        self.fixed = None

    def _to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        if logits.shape[-1] > V:
            return logits[..., :V]
        if logits.shape[-1] < V:
            pad = logits.new_full((*logits.shape[:-1], V - logits.shape[-1]), float("-inf"))
            return torch.cat([logits, pad], -1)
        return logits

    def _room(self, n: int) -> None:
        if self.run.room() < n:
            self.run.grow(self.run.capacity + max(n, self.room))

    @torch.no_grad()
    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        if self.run is None or self.pending is None:
            raise RuntimeError("LMTreeDrafter.expand called before start")
        frontier = frontier.to(self.device)
        if tree.num_nodes == 0:  # every builder expands the root first, on an empty tree, and only then
            return self._root().expand(-1, frontier.shape[1], -1)
        B, F = frontier.shape
        if B != 1:
            raise ValueError(f"LMTreeDrafter drafts for one sequence: got a frontier of {B} rows")
        N = tree.num_nodes
        anc = tree.ancestor_mask().gather(1, frontier.unsqueeze(-1).expand(B, F, N))[0]  # [F, N]
        # an earlier tree entry is visible when the node it holds is an ancestor; a new one only to itself
        vis = torch.cat([anc.gather(1, self.slots.expand(F, -1)), torch.eye(F, dtype=torch.bool, device=self.device)], 1)
        self._room(F)
        pos = tree.depths.gather(1, frontier) - 1  # the root sits at position past - 1
        logits = self.run(tree.tokens.gather(1, frontier), pos, vis, "tree")
        self.forwards += 1
        self.slots = torch.cat([self.slots, frontier], 1)
        return self._to_vocab(logits.float())

    def _root(self) -> torch.Tensor:
        self.run.discard()  # the previous tree's entries
        self.slots = self.slots[:, :0]
        if self.fixed is not None:
            return self._root_fixed()
        n = self.pending.shape[1]
        if n:
            self._room(n)
            pos = torch.arange(n, device=self.device)[None]
            vis = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            logits = self.run(self.pending, pos, vis, "read", graph=not self.first)
            self.forwards += 1
            self.run.keep(list(range(n)))
            self.root_logits = self._to_vocab(logits[:, -1:].float()).clone()  # kept past later (graph) calls
            self.pending, self.first = self.pending[:, :0], False
        return self.root_logits

    def _root_fixed(self) -> torch.Tensor:
        """Read the padded committed buffer, commit its first `count` entries, root logits at row count - 1."""
        ids, count = self.fixed
        P = ids.shape[1]
        self._room(P)
        self.at = (count - 1).clamp(min=0).view(1)
        logits = self.run(ids, torch.arange(P, device=self.device)[None],
                          torch.ones(P, P, dtype=torch.bool, device=self.device).tril(), "read_at", graph=False)
        self.forwards += 1
        self.run.keep_fixed(None, count)  # a prefix: the rows stay in place
        self.root_logits.copy_(self._to_vocab(logits.float()))
        return self.root_logits

    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor | None, count: torch.Tensor) -> None:
        """commit() for the decoder's graph regions: new_ids [1, P] of which the first `count` are real."""
        if self.fixed is None or self.fixed[0].shape != new_ids.shape:
            self.fixed = (torch.zeros_like(new_ids, device=self.device),
                          torch.zeros((), dtype=torch.long, device=self.device))
        self.fixed[0].copy_(new_ids)
        self.fixed[1].copy_(count)

    def synced(self, count: int) -> None:
        """The host learnt the last commit's count: keep the capacity mirror and room for the next cycle."""
        self.run.advance(count)
        if self.fixed is not None:
            self._room(self.fixed[0].shape[1] + self.run.pending + 1)

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None = None) -> None:
        if new_ids.shape[0] != 1:
            raise ValueError("LMTreeDrafter.commit supports one sequence (B = 1)")
        if self.model_vocab < self.vocab_size:  # only then can the target's tokens fall outside (a host sync)
            self._check_ids(new_ids)
        self.pending = torch.cat([self.pending, new_ids.to(self.device)], 1)

    def close(self) -> None:
        self.pending = None
        self.fixed = None
