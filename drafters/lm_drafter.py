"""Any Hugging Face causal LM as a tree drafter with its own KV cache (independent small drafters, and
the target drafting for itself).

    from drafters.lm_drafter import LMTreeDrafter
    drafter = LMTreeDrafter(small_model, vocab_size=target.vocab_size)
    tokens, stats = SpeculativeDecoder(target, drafter, TreeConfig(kind="chain", depth=4)).generate(ids, 64)

Cache layout: [committed tokens already read | tree entries of the current cycle]. `expand` on the root
reads the committed tokens not read yet (the target's bonus token, and accepted drafts this model never
saw) causally; `expand` on tree nodes reads the frontier nodes with a 4D mask (each node sees the
committed tokens and its own ancestors). `commit` keeps the tree entries on the accepted path and drops
the rest. The only assumption about the target is a shared tokenizer: logits are cut or padded with -inf
to `vocab_size` (models of one family often pad their embeddings to different sizes).
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from drafters.base import Drafter
from drafters.tree import DraftTree, check_tree_attention, keep_cache_entries, tree_attention_mask


class LMTreeDrafter(Drafter):
    """A causal LM proposing draft trees; batched over B roots of equal length, commit for B = 1."""

    uses_features = False

    def __init__(self, model, vocab_size: int | None = None, name: str | None = None):
        self.model = model.eval()
        self.model_vocab = int(model.get_input_embeddings().weight.shape[0])
        self.vocab_size = int(vocab_size or self.model_vocab)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        check_tree_attention(model, f"drafter {self.name}")
        self.cache = None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and int(ids.max()) >= self.model_vocab:
            raise DraftsmithError(
                f"drafter {self.name} has {self.model_vocab} embedding rows but got token {int(ids.max())}: "
                "use a drafter with the target's tokenizer")

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> None:
        from transformers import DynamicCache

        self._check_ids(input_ids)
        self.cache = DynamicCache(config=self.model.config)
        self.past = 0  # committed tokens whose KV entries are in the cache
        self.pending = input_ids.to(self.device)  # committed tokens not read yet (always holds the root)
        B = input_ids.shape[0]
        self.slots = torch.zeros(B, 0, dtype=torch.long, device=self.device)  # node held by each tree entry
        self.tree: DraftTree | None = None
        self.root_logits = None

    def _to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        if logits.shape[-1] > V:
            return logits[..., :V]
        if logits.shape[-1] < V:
            pad = logits.new_full((*logits.shape[:-1], V - logits.shape[-1]), float("-inf"))
            return torch.cat([logits, pad], -1)
        return logits

    @torch.no_grad()
    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("LMTreeDrafter.expand called before start")
        self.tree = tree
        frontier = frontier.to(self.device)
        is_root = frontier < 0
        if bool(is_root.all()):
            return self._root().expand(-1, frontier.shape[1], -1)
        if bool(is_root.any()):
            raise ValueError("LMTreeDrafter: a frontier may not mix the root with tree nodes")
        B, F = frontier.shape
        N = tree.num_nodes
        anc = tree.ancestor_mask().gather(1, frontier.unsqueeze(-1).expand(B, F, N))  # [B, F, N]
        S = self.slots.shape[1]
        # an earlier tree entry is visible when the node it holds is an ancestor; a new one only to itself
        vis_old = anc.gather(2, self.slots.unsqueeze(1).expand(B, F, S))
        vis_new = torch.eye(F, dtype=torch.bool, device=self.device).expand(B, F, F)
        mask = tree_attention_mask(torch.cat([vis_old, vis_new], 2), self.past, self.model.dtype)
        pos = self.past - 1 + tree.depths.gather(1, frontier)  # the root sits at position past - 1
        out = self.model(input_ids=tree.tokens.gather(1, frontier), attention_mask=mask, position_ids=pos,
                         cache=self.cache, use_cache=True)
        self.slots = torch.cat([self.slots, frontier], 1)
        return self._to_vocab(out.logits.float())

    def _root(self) -> torch.Tensor:
        if self.slots.shape[1]:  # a tree that was never committed: drop its entries
            keep_cache_entries(self.cache, self.past, [])
            self.slots = self.slots[:, :0]
        if self.pending.shape[1]:
            n = self.pending.shape[1]
            pos = self.past + torch.arange(n, device=self.device).expand(self.pending.shape[0], n)
            out = self.model(input_ids=self.pending, position_ids=pos, cache=self.cache, use_cache=True)
            self.root_logits = self._to_vocab(out.logits[:, -1:].float())
            self.past += n
            self.pending = self.pending[:, :0]
        return self.root_logits

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None = None) -> None:
        if new_ids.shape[0] != 1:
            raise ValueError("LMTreeDrafter.commit supports one sequence (B = 1)")
        self._check_ids(new_ids)
        toks = new_ids[0].tolist()
        keep: list[int] = []
        if self.tree is not None and self.slots.shape[1]:
            # Walk the accepted tokens down the entries read this cycle. A node's entry depends only on its
            # token and its ancestors, so any read node spelling the accepted prefix is the right one. The
            # last token stays pending: reading it gives the next root's logits.
            slot_of = {n: s for s, n in enumerate(self.slots[0].tolist())}
            parents, tokens = self.tree.parents[0].tolist(), self.tree.tokens[0].tolist()
            node = -1
            for t in toks[:-1]:
                nxt = next((c for c in slot_of if parents[c] == node and tokens[c] == t), None)
                if nxt is None:
                    break
                keep.append(slot_of[nxt])
                node = nxt
        keep_cache_entries(self.cache, self.past, keep)
        self.past += len(keep)
        self.pending = torch.cat([self.pending, new_ids[:, len(keep):].to(self.device)], 1)
        self.slots = self.slots[:, :0]
        self.tree = None

    def close(self) -> None:
        self.cache = None
        self.tree = None
