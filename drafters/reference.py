"""Reference drafters that need no training: the target drafting for itself, and prompt lookup (n-grams).

    python train.py stage=eval drafter=target eval.tree.kind=chain eval.tree.depth=4   # tau = 5 at T=0
    python train.py stage=eval drafter=ngram drafter.max_ngram=3

    python bench/bench_cycle.py --families oracle                                       # the cycle's own cost

The oracle (`drafter=oracle`) replays the target's own greedy continuation, computed by an autoregressive pass
first, at no model cost: tau = depth + 1 at T = 0, so its speedup is the decoder's mechanics alone.

All three build from (cfg, target) through `from_config`, so `drafters.registry.drafter_class(name)` can
construct them like any other family.
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from decoding.tree import DraftTree, tree_nodes
from drafters.base import Drafter
from drafters.lm_drafter import LMTreeDrafter


class TargetDrafter(LMTreeDrafter):
    """The target as its own drafter (own KV cache, shared weights): an exactness check and an upper bound,
    tau = depth + 1 at T = 0 with a chain."""

    def __init__(self, target):
        super().__init__(target.model, vocab_size=target.vocab_size, name=f"target:{target.name}")

    @classmethod
    def from_config(cls, cfg, target) -> TargetDrafter:
        return cls(target)


class NgramDrafter(Drafter):
    """Prompt lookup: find the longest recent n-gram (max_ngram down to min_ngram) ending the context that
    also occurred earlier, and propose the tokens that followed it, most recent and longest match first.

    Proposals are logits (rank r gets PROPOSAL_LOGIT - r, every other token 0), so every tree builder works
    and sampled drafts get a proper q for lossless verification. With no match every token scores 0 (the
    builder's pick is arbitrary and simply gets rejected).

    Two lookups give the same proposals (`lookup`):
    - device: tensor code over a preallocated context buffer, a fixed-shape drafter whose draft phase is one
      graph on a GPU (no token list crosses to the host). Every follower position gets the length of the
      match between the tokens before it and the context's last tokens, all lengths in one compare; its
      score is that length * (W + 1) + its position, so "longest n first, then most recent" is a max over a
      token's occurrences, and the top `max_candidates` scores rank distinct tokens exactly as the host walk
      does;
    - host: `candidates`, a walk over the matches (a handful of small ops per n-gram length instead of ~50
      per step: cheaper on a CPU, where nothing is graphed and every op costs its dispatch). It reads the
      draft tree on the host, so the decoder takes its step-by-step loop.
    auto (the default): device on CUDA, host elsewhere."""

    name = "ngram"
    uses_features = False
    PROPOSAL_LOGIT = 20.0

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, max_candidates: int = 8,
                 device: torch.device | str = "cpu", lookup: str = "auto"):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftsmithError(f"drafter.min_ngram={min_ngram} and max_ngram={max_ngram}: need "
                                  "1 <= min_ngram <= max_ngram")
        if lookup not in ("auto", "device", "host"):
            raise DraftsmithError(f"drafter.lookup={lookup!r}: use auto, device or host")
        self.vocab_size = int(vocab_size)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_candidates = max_candidates
        self.device = torch.device(device)
        self.lookup = lookup if lookup != "auto" else ("device" if self.device.type == "cuda" else "host")
        self.fixed_shape = self.lookup == "device"  # the decoder's fixed cycle needs the device lookup
        self.keeps_programs = self.fixed_shape  # ctx and length are written in place; growth bumps the version
        self.room = 512
        self.ctx = torch.zeros(0, dtype=torch.long, device=self.device)  # committed tokens, then stale
        self.length = torch.zeros((), dtype=torch.long, device=self.device)  # committed tokens (device)
        self.buffers_version = 0

    @classmethod
    def from_config(cls, cfg, target) -> NgramDrafter:
        return cls(target.vocab_size, cfg.max_ngram, cfg.min_ngram, device=target.device,
                   lookup=getattr(cfg, "lookup", "auto"))

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:
        self.room = room

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"NgramDrafter drafts for one sequence: start got {input_ids.shape[0]} rows")
        n = input_ids.shape[1]
        cap = n + 2 * self.room  # committed tokens plus a padded commit's worth of slack
        if self.ctx.shape[0] < cap:
            self.ctx = torch.zeros(-(-cap // 256) * 256, dtype=torch.long, device=self.device)
            self.buffers_version += 1
        self.ctx[:n] = input_ids[0].to(self.device)
        self.length.fill_(n)
        self.used = n  # host mirror

    @property
    def context(self) -> list[torch.Tensor]:
        """The committed tokens (a host copy: for tests and inspection, not for the hot loop)."""
        return [self.ctx[:int(self.length)].cpu()]

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None = None) -> None:
        self.commit_fixed(new_ids, None, torch.tensor(new_ids.shape[1], device=self.device))
        self.synced(new_ids.shape[1])

    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor | None, count: torch.Tensor) -> None:
        P = new_ids.shape[1]
        self.ctx.index_copy_(0, self.length + torch.arange(P, device=self.device), new_ids[0].to(self.device))
        self.length += count
        self._width = P

    def synced(self, count: int) -> None:
        self.used += count
        need = self.used + 2 * getattr(self, "_width", 1)
        if need > self.ctx.shape[0]:  # keep room for the next padded commit (a rare re-allocation)
            grown = torch.zeros(-(-2 * need // 256) * 256, dtype=torch.long, device=self.device)
            grown[:self.ctx.shape[0]] = self.ctx
            self.ctx = grown
            self.buffers_version += 1

    def candidates(self, seq: torch.Tensor) -> list[int]:
        """Distinct next tokens after earlier occurrences of the context's final n-gram, best first (the host
        walk the device lookup reproduces)."""
        L = seq.shape[0]
        out: list[int] = []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = seq[:L - 1].unfold(0, n, 1)  # window i = seq[i:i+n], followed by seq[i+n]
            hits = (windows == seq[L - n:]).all(1).nonzero().flatten().tolist()
            for i in reversed(hits):  # most recent first
                t = int(seq[i + n])
                if t not in out:
                    out.append(t)
                    if len(out) == self.max_candidates:
                        return out
        return out

    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        B, F = frontier.shape
        if B != 1:
            raise ValueError(f"NgramDrafter drafts for one sequence: got a frontier of {B} rows")
        return self._expand_device(tree, frontier) if self.lookup == "device" else self._expand_host(tree, frontier)

    def _expand_host(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, frontier.shape[1], self.vocab_size)
        context = self.ctx[:self.used].cpu()
        anc = tree.ancestor_mask()[0].cpu() if tree.num_nodes else None
        tokens = tree.tokens[0].cpu()
        for f, node in enumerate(frontier[0].tolist()):
            path = tokens[anc[node]] if node >= 0 else tokens[:0]  # index order = depth order
            cands = self.candidates(torch.cat([context, path]))
            if cands:
                logits[0, f, cands] = self.PROPOSAL_LOGIT - torch.arange(len(cands), dtype=torch.float)
        return logits.to(self.device)

    def _expand_device(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        F = frontier.shape[1]
        dev, C = self.device, self.ctx.shape[0]
        frontier = frontier.to(dev)
        D = tree.depth_limit if tree.num_nodes else 0
        # seq[f] = the committed tokens, then the path root -> frontier node f (D + 1 columns of room)
        col = torch.arange(C + D, device=dev)
        seq = self.ctx[col.clamp(max=C - 1)].expand(F, -1)
        if D:
            node = frontier.clamp(min=0)[0]
            path = tree.path_nodes(tree.ancestor_mask(), D)[0].index_select(0, node)  # [F, D], -1 padded
            depth = torch.where(frontier[0] >= 0, tree.depths[0].index_select(0, node), 0)  # [F]
            toks = tree.tokens[0][path.clamp(min=0)]  # [F, D]
            j = (col - self.length).clamp(0, D - 1)  # path slot of each column past the committed ones
            seq = torch.where(col >= self.length, toks.gather(1, j.expand(F, -1)), seq)
        else:
            depth = torch.zeros(F, dtype=torch.long, device=dev)
        L = self.length + depth  # [F] tokens in each sequence
        seq = torch.where(col < L[:, None], seq, -1)
        # all n-gram lengths in one pass: for a follower at column j, m(j) = how many tokens before it match the
        # sequence's last tokens (seq[j-1-k] == seq[L-1-k] for k < m, at most max_ngram); its score is the
        # longest n it follows, then recency, n * (W + 1) + (j - n) with n = m(j), as the walk ranks them
        K, W = self.max_ngram, C + D
        back = (L[:, None] - 1 - torch.arange(K, device=dev))  # [F, K] the last K columns, newest first
        query = torch.where(back >= 0, seq.gather(1, back.clamp(min=0)), -3)  # -3: no token there
        padded = torch.cat([seq.new_full((F, K), -2), seq], 1)  # -2: before the first token
        before = padded.unfold(1, K, 1)[:, :W].flip(-1)  # [F, W, K]: seq[j-1-k] for the follower at column j
        m = (before == query[:, None, :]).long().cumprod(-1).sum(-1)  # [F, W]
        ok = (m >= self.min_ngram) & (col < L[:, None])  # a real follower after a long enough match
        score = torch.where(ok, m * (W + 1) + col - m, -1)
        best = torch.full((F, self.vocab_size), -1, dtype=torch.long, device=dev)
        best.scatter_reduce_(1, seq.clamp(min=0), score, reduce="amax")
        k = min(self.max_candidates, self.vocab_size)
        top = best.topk(k, dim=1)  # distinct tokens, best first
        rank = torch.arange(k, device=dev, dtype=torch.float)
        logits = torch.zeros(F, self.vocab_size, device=dev)
        logits.scatter_(1, top.indices, torch.where(top.values >= 0, self.PROPOSAL_LOGIT - rank, 0.0))
        return logits[None]


class OracleDrafter(Drafter):
    """Proposes the target's own autoregressive continuation (given with `set_future`, or computed with
    `replay_autoregressive`): an upper bound of the decoder's speed, since drafting costs almost nothing and
    every draft is accepted at T = 0 (exact mode). A fixed-shape drafter: the committed length lives on the
    device and every proposal is a gather, so its whole draft phase is one graph on a GPU.

    Proposals are logits like the n-gram drafter's: PROPOSAL_LOGIT on the future token, 0 elsewhere; past the
    end of the known future every token scores 0."""

    name = "oracle"
    uses_features = False
    fixed_shape = True
    keeps_programs = True  # the future and the length are buffers written in place
    PROPOSAL_LOGIT = NgramDrafter.PROPOSAL_LOGIT

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.future = torch.full((1,), -1, dtype=torch.long, device=self.device)  # -1: nothing known there
        self.length = torch.zeros((), dtype=torch.long, device=self.device)  # committed tokens, root included
        self.buffers_version = 0  # bumped when `future` is re-allocated (a longer sequence)

    @classmethod
    def from_config(cls, cfg, target) -> OracleDrafter:
        return cls(target.vocab_size, device=target.device)

    def set_future(self, ids) -> None:
        """The whole expected sequence, prompt first (host ints or a tensor)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().to(self.device)
        if self.future.shape[0] < ids.shape[0] + 1:  # at least one -1 past the end
            self.future = torch.full((-(-(ids.shape[0] + 1) // 256) * 256,), -1, dtype=torch.long, device=self.device)
            self.buffers_version += 1
        self.future.fill_(-1)
        self.future[:ids.shape[0]] = ids

    def replay_autoregressive(self, decoder, prompt_ids, max_new_tokens: int) -> None:
        """Learn the continuation from `decoder`'s own autoregressive baseline (greedy, no EOS stop), a tree's
        worth past `max_new_tokens`: the last cycle drafts beyond the end too, and should still be right."""
        extra = tree_nodes(decoder.tree_cfg) if getattr(decoder, "tree_cfg", None) is not None else 0
        tokens, _ = decoder.generate_autoregressive(prompt_ids, max_new_tokens + extra, eos_ids=[])
        self.set_future(torch.cat([torch.as_tensor(prompt_ids).flatten(), tokens]))

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> None:
        self.length.fill_(input_ids.shape[1])

    def expand(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        B, F = frontier.shape
        frontier = frontier.to(self.device)
        if tree.num_nodes:
            depth = torch.where(frontier >= 0, tree.depths.to(self.device).gather(1, frontier.clamp(min=0)), 0)
        else:
            depth = torch.zeros_like(frontier)
        at = (self.length + depth).clamp(max=self.future.shape[0] - 1)  # the token after the frontier node
        tok = self.future[at]  # [B, F]
        logits = torch.zeros(B, F, self.vocab_size, device=self.device)
        hit = (tok >= 0).float() * self.PROPOSAL_LOGIT
        return logits.scatter_(-1, tok.clamp(min=0).unsqueeze(-1), hit.unsqueeze(-1))

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None = None) -> None:
        self.length += new_ids.shape[1]

    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor | None, count: torch.Tensor) -> None:
        self.length += count
