"""The decode cycle as two fixed-shape device programs and one transfer to the host, for drafters that keep
their state on the device (`Drafter.fixed_shape`).

    draft   (graph region "draft")   the drafter's whole draft phase: build_tree over the drafter's steps
    verify  (graph region "verify")  the target reads [root, nodes] (tree mask, positions and the cache's
                                     write offset from the device-side length), the acceptance rule picks the
                                     path and the bonus token, the cache keeps the root and the accepted
                                     entries (fixed D + 1 rows, the count on the device), the drafter commits
                                     the accepted tokens + bonus with their target features (padded, count on
                                     the device), and the bonus becomes the next root
    host    one transfer             [bonus, next depth tried, accepted n, tree depth, path (D), tokens (D)]

Every shape is set by (drafter family, tree config, acceptance rule), never by what was accepted, so on a GPU
each region is captured once as a CUDA graph and replayed every cycle (decoding/regions.py), and the host
learns what happened in one device-to-host copy. Off CUDA (or with eval.cuda_graphs=false) the same programs
run eagerly; decoding/counting.py counts what each cycle would cost a GPU.

Host bookkeeping (EOS, max_new_tokens, stats, the runners' host-side length mirrors, capacity) happens after
the transfer, in plain Python.
"""
from __future__ import annotations

import torch

from decoding.regions import GraphRegion
from decoding.tree import build_tree
from decoding.verify import Accepted, accept_paths, cycle_summary, tree_block


def _defined_by(cls, name: str):
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def supports(drafter, tree_cfg, acceptance: str = "lossless") -> bool:
    """Whether this decoder setup runs as fixed-shape programs: a drafter that says so (and whose commit_fixed
    is not older than its commit: a subclass that overrides only commit keeps the step-by-step path), and a
    tree whose shape is set by its config. OPT-Tree picks its node budget on the host each cycle. Kangaroo's
    early exit on a chain is a device-side cut (build_tree's cut_on_device) for every rule but traversal,
    which walks whole paths and has no notion of a dead node; on a delayed tree's trunk it would change the
    tree's shape below the cut, so that stays on the host."""
    if not getattr(drafter, "fixed_shape", False) or tree_cfg.kind == "opt":
        return False
    if getattr(drafter, "stop_below", None) and (tree_cfg.delay or (tree_cfg.kind == "chain"
                                                                     and acceptance == "traversal")):
        return False
    commit, fixed = _defined_by(type(drafter), "commit"), _defined_by(type(drafter), "commit_fixed")
    return fixed is not None and issubclass(fixed, commit)


class FixedCycle:
    """The draft and verify programs of one decoder (one sequence at a time), captured per key: the target's
    and the drafter's buffers (re-allocated buffers mean new programs)."""

    def __init__(self, decoder, graphs: bool):
        self.dec = decoder
        self.graphs = graphs
        self.draft = GraphRegion("draft", graphs)
        self.verify = GraphRegion("verify", graphs)
        self.root = None
        self.key = None
        self.gen: torch.Generator | None = None

    def _key(self, run, drafter, generator):
        return run.version, getattr(drafter, "buffers_version", 0), generator is None

    def begin(self, run, root: torch.Tensor, generator) -> None:
        """Before the first cycle of a generate (outside the loop the counting harness measures): the drafter in
        its fixed-shape mode, the root in its buffer, the caller's generator state in the programs' own
        generator (a graph draws from the generator it was captured with; the caller's gets the state back)."""
        drafter = self.dec.drafter
        begin = getattr(drafter, "begin_fixed", None)
        if begin is not None:  # drafters with a step-by-step mode switch to their fixed-shape steps
            begin()
        if generator is not None:
            if self.gen is None or self.gen.device != generator.device:
                self.gen = torch.Generator(device=generator.device)
            self.gen.set_state(generator.get_state())
        if not getattr(drafter, "keeps_programs", False):
            self.key = None  # its state tensors are new objects each sequence: programs captured for the last
            # sequence would read freed memory (drafters.base: keeps_programs)
        self._programs(run, generator)
        if self.root is None:
            self.root = root.clone()
        self.root.copy_(root)

    def _programs(self, run, generator) -> None:
        drafter = self.dec.drafter
        key = self._key(run, drafter, generator)
        if key != self.key:  # new buffers: programs captured for the old ones are stale
            gens = [self.gen if generator is not None else None, *getattr(drafter, "generators", ())]
            self.draft = GraphRegion("draft", self.graphs, generators=gens)
            self.verify = GraphRegion("verify", self.graphs, generators=gens)
            self.key = key

    def loop(self, run, st, tokens: list[int], eos: set[int], max_new_tokens: int, generator, clock, on_cycle,
             count) -> list:
        """Cycles until EOS or max_new_tokens; appends to `tokens`, counts into `st` with `count`; returns the
        phase marks. `generator`: the caller's (its state moves as if it had drawn every sample)."""
        drafter = self.dec.drafter
        gen = self.gen if generator is not None else None
        effects = ((drafter, "forwards"),) if hasattr(drafter, "forwards") else ()
        marks, done = [], False
        while not done:
            t0 = clock.mark()
            tree = self.draft(lambda: self._draft(gen), host_effects=effects)
            t1 = clock.mark()
            summary = self.verify(lambda t=tree: self._verify(run, t, gen), host_effects=effects)
            host = summary.tolist()  # the cycle's one device-to-host transfer
            D = (len(host) - 4) // 2
            t2 = clock.mark()
            n, attempted, depth = host[2], host[1], host[3]
            produced = host[4 + D:4 + D + n] + [host[0]]
            run.advance(1 + n)
            synced = getattr(drafter, "synced", None)
            if synced is not None:
                synced(1 + n)
            if on_cycle is not None:
                on_cycle(tree, Accepted(host[4:4 + n], host[0]))
            count(st, depth, n, attempted, len(produced))
            for t in produced:
                tokens.append(t)
                if t in eos or len(tokens) >= max_new_tokens:
                    done = True
                    break
            marks.append((t0, t1, t2, clock.mark()))
            if not done:  # a buffer that grew (a longer sequence than planned for) means new programs
                self._programs(run, generator)
        if generator is not None:
            generator.set_state(self.gen.get_state())
        return marks

    def _draft(self, generator):
        dec = self.dec
        rule = dec.rule
        return build_tree(dec.drafter, dec.tree_cfg, 1, rule.temperature, rule.top_p, rule.top_k, generator,
                          dec.sample, device=self.root.device, checked=True, cut_on_device=True)

    def _verify(self, run, tree, generator) -> torch.Tensor:
        dec = self.dec
        in_ids, pos, vis, anc = tree_block(tree, self.root)
        logits, feats = run(in_ids, pos, vis[0], "verify", graph=False)
        path, bonus = accept_paths(tree, logits.float(), dec.rule, generator, anc)
        path = path[0]
        D = path.shape[0]  # the tree's depth bound, known on the host
        n = (path >= 0).sum()
        rows = torch.cat([path.new_zeros(1), path.clamp(min=0) + 1])  # [D + 1] rows of [root, nodes]
        run.keep_fixed(rows, n + 1)
        toks = tree.tokens[0].gather(0, path.clamp(min=0))
        step = torch.arange(D + 1, device=path.device)
        new_ids = torch.where(step < n, torch.cat([toks, toks[:1]]), bonus)[None]  # accepted, then the bonus
        new_feats = dec._for_drafter(feats.index_select(1, rows)) if feats is not None else None
        dec.drafter.commit_fixed(new_ids, new_feats, n + 1)
        self.root.copy_(bonus)
        return cycle_summary(tree, path, bonus, toks)
