"""What EAGLE-1 and EAGLE-3 share: `EagleBase` (the frozen target reference, RoPE, the checkpointing
switch, the per-row core and the training-time-test unroll), `UnrollOptions` (the HASS / GRIFFIN add-ons
to the unrolled loss) and `EagleDecoding`, the decoding adapter.

Decoding (`EagleDecoding`): the drafter keeps its own KV cache over committed pairs (f_i, x_{i+1}),
i < n. The root's draft distribution is the output of the last pair; a tree node at depth d sits at
position n - 1 + d, pairs its parent's *predicted* feature with its own token, and attends to the
committed pairs plus its ancestors (a 4D mask). `commit` re-runs the accepted pairs with the target's
true features and drops all tree state.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from conf.errors import DraftsmithError
from drafters.base import Drafter, TrainableDrafter
from drafters.common import Shared, shifted
from drafters.folder import HeldTargetCheckpoint
from drafters.layers import (
    DrafterDims,
    Rotary,
    causal_attend,
    flex_causal_attend,
    masked_attention,
    resolve_attention,
    ttt_flex_attend,
    ttt_rows_attend,
)


@dataclass(frozen=True)
class UnrollOptions:
    """Optional changes to the EAGLE families' unrolled training loss, switched on by the HASS and GRIFFIN
    objectives (training/objectives/addons.py). The defaults change nothing: `loss(signal)` and
    `loss(signal, UnrollOptions())` run the same operations.

    topk_weight, topk_k  add topk_weight * (-sum over the target's top-k tokens of p log q) to every step's
                         terms (HASS "harmonized objective distillation", K = 10; GRIFFIN adds it at 0.5)
    keep_topk            GRIFFIN: row t is trained at step i+1 only while the true token that step i
                         predicts is among step i's top keep_topk drafts, cumulatively over steps (0 = off)
    detach_context       HASS context alignment as its training code does it: the drafter's own output fed
                         back into the next step is a constant there (no gradient through earlier steps);
                         the attention pattern is unchanged (see EagleBase.unroll)
    steps                EAGLE-1 only: unrolled steps (EAGLE-1 trains 1; HASS aligns 3). EAGLE-3 keeps
                         drafter.ttt_steps.
    align_weight,        CORAL: add align_weight * drafters.losses.cross_step_align(step 0's hidden state at
    align_temperature    position t + i (detached), step i's at row t) to every step i >= 1: both predict
                         the same token, step 0 from the target's features (objective=coral)."""

    topk_weight: float = 0.0
    topk_k: int = 10
    keep_topk: int = 0
    detach_context: bool = False
    steps: int = 1
    align_weight: float = 0.0
    align_temperature: float = 0.1


def topk_keep(top_ids: torch.Tensor, true_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """GRIFFIN's mask for the next unrolled step: rows [...] whose true token is among the drafter's top
    drafts `top_ids` [..., k] (target ids), AND the rows kept so far (None = all)."""
    hit = (top_ids == true_ids.unsqueeze(-1)).any(-1)
    return hit if keep is None else hit & keep


class EagleBase(HeldTargetCheckpoint, TrainableDrafter):
    """What EAGLE-1 and EAGLE-3 share: the frozen target reference, RoPE, checkpointing switch,
    the per-row core `core(hidden, embeds, positions, attends)` and the decoding adapter."""

    feature_source = "features"  # which target output the decoder feeds start/commit (see base.Drafter)

    def __init__(self, cfg, dims: DrafterDims, target):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        self._target = Shared(target)  # the frozen target must not become a submodule (state dict, ZeRO)
        self._rope = Rotary(dims)
        self._gc = False
        self.attention = "sdpa"  # the training attention backend (set_attention; decoding always uses sdpa)

    @property
    def target(self):
        return self._target.obj


    @property
    def param_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def feature_width(self) -> int:
        """Width of the per-position target features `project` reads."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed(ids).to(self.param_dtype)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Committed pairs' hidden input from target features [.., feature_width] -> [.., H]."""
        raise NotImplementedError

    def core(self, hidden, embeds, positions, attends: list[Callable]):
        """Run the decoder layer(s) over rows (hidden, embedded token) -> (out [B,T,H], [(k, v)] per layer)."""
        raise NotImplementedError

    def target_vocab_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target vocabulary [.., V] from core outputs."""
        raise NotImplementedError

    @property
    def num_kv_layers(self) -> int:
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each unrolled step's layers (and head + loss) in backward; non-reentrant, so
        closures over earlier steps' keys and the frozen target still get their gradients right."""
        self._gc = bool(enabled)

    def set_attention(self, choice: str, device=None) -> str:
        """train.attention (auto | flex | sdpa) for the unrolled training steps, resolved for `device` (default:
        the drafter's) by drafters.layers.resolve_attention; returns the backend used. Both backends compute
        the same attention (tests/drafters/test_ttt_attention.py); flex skips masked tiles and never
        repeats grouped key/value heads."""
        self.attention = resolve_attention(choice, device if device is not None else self.fc.weight.device)
        return self.attention

    def as_drafter(self, target=None) -> EagleDecoding:
        return EagleDecoding(self, target if target is not None else self.target)

    def unroll(self, input_ids: torch.Tensor, hidden: torch.Tensor, steps: int, detach_context: bool = False,
               rows: list[torch.Tensor] | None = None):
        """Yield the core output of unrolled steps i = 0..steps-1 over rows t = 0..n-1: [B, n, H] each.

        `hidden` is step 0's hidden input (row t: from the target's feature f_t, see `project`); row t of
        step i reads token x_{t+1+i} at position t + i, and step i >= 1 reads step i-1's output as its
        hidden input, attending with the training-time-test pattern (drafters.layers.ttt_rows_attend).

        `rows` (training): rows[i - 1] lists the rows step i >= 1 computes, as ascending indices into the
        flattened [B, n] grid, each list inside the previous one (a row's step i needs its step i-1). Step
        0 always computes every row (all of them are keys for later steps); a row's later steps are read by
        nothing but that row's own later steps and loss, so rows that no later loss scores can be left
        out. With `rows`, step 0 yields [B * n, H] and step i yields [len(rows[i - 1]), H].

        That pattern already is HASS's "harmonized context alignment": a step-i query sees the target's
        features up to its chain's committed position and the drafter's own features at the i most recent
        positions, as a depth-i tree node does at decode time. What HASS's training code does differently
        is the gradient: `detach_context=True` feeds step i-1's output back as a constant, so step i's
        keys/values are still computed by the current weights (they get gradient) but no loss reaches back
        into earlier steps' computation. EAGLE-3's official TTT backpropagates through the whole chain."""
        B, n = hidden.shape[:2]
        dev = hidden.device
        flex = self.attention == "flex"
        causal = flex_causal_attend(n, dev) if flex else causal_attend
        ttt = ttt_flex_attend if flex else ttt_rows_attend
        out, first = self._ckpt(self.core, hidden, self.embed(shifted(input_ids, 1, n)),
                                torch.arange(n, device=dev).expand(B, n), [causal] * self.num_kv_layers)
        yield out if rows is None else out.flatten(0, 1)
        out, idx = out.flatten(0, 1), torch.arange(B * n, device=dev)
        prev = [([], []) for _ in range(self.num_kv_layers)]
        for i in range(1, steps):
            if rows is not None:  # keep this step's rows of everything carried along
                sel = torch.searchsorted(idx, rows[i - 1])
                idx, out = rows[i - 1], out[sel]
                prev = [([k[:, :, sel] for k in pk], [v[:, :, sel] for v in pv]) for pk, pv in prev]
            batch, pos = idx // n, idx % n
            attends = [ttt(k0, v0, pk, pv, batch, pos) for (k0, v0), (pk, pv) in zip(first, prev)]
            hidden = out.detach() if detach_context else out
            embeds = self.embed(shifted(input_ids, 1 + i, n).flatten()[idx])
            out, kvs = self._ckpt(self.core, hidden[None], embeds[None], (pos + i)[None], attends)
            out = out[0]
            for (pk, pv), (k, v) in zip(prev, kvs):
                pk.append(k)
                pv.append(v)
            yield out.view(B, n, -1) if rows is None else out

    def _check_losses(self, allowed: set[str]) -> None:
        bad = [k for k in self.cfg.losses if k not in allowed]
        if bad or not self.cfg.losses:
            raise DraftsmithError(
                f"drafter.losses={dict(self.cfg.losses)} for {self.family}: use one or more of "
                f"{', '.join(sorted(allowed))} (name: weight)")


# --------------------------------------------------------------------------------------------------
# Decoding adapter (EAGLE-1 and EAGLE-3)
# --------------------------------------------------------------------------------------------------
class EagleDecoding(Drafter):
    """drafters.base.Drafter over an EAGLE model: own KV cache for committed pairs, per-node tree state.

    Committed pairs i = 0..n-1 (feature f_i, token x_{i+1}) sit at positions i. A tree node at depth d
    sits at position n - 1 + d; its hidden input is its parent's output (the root's parent is the last
    committed pair), its token is its own, and it attends to every committed pair plus its ancestors.
    Node states are computed lazily: expand computes the frontier nodes and any ancestors not yet
    computed, depth by depth, and caches hidden and k/v by node index; nodes whose token or parent
    changed since are recomputed. All trees of a batch share the committed sequence."""

    uses_features = True

    def __init__(self, model: EagleBase, target):
        self.model = model
        self.name = model.family
        self.feature_source = model.feature_source
        self.vocab_size = int(target.vocab_size)
        # CORAL's grouped head picks its row groups by value (data-dependent shapes): step by step then
        self.fixed_shape = getattr(model, "router", None) is None
        self.keeps_programs = self.fixed_shape  # the buffers below outlive a sequence (drafters.base)
        # buffers kept from one sequence to the next (captured graphs read them): committed k/v, per-node
        # state, the device-side length and the root's hidden state; re-allocations count in buffers_version
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv_heads, cap, head_dim]
        self.nodes: dict | None = None
        self.n_t: torch.Tensor | None = None
        self._root_buf: torch.Tensor | None = None
        self._versions = [0, 0]  # re-allocations of (the committed k/v or the root buffer, the per-node state)
        self.close()

    # --- committed sequence -------------------------------------------------------------------------
    def close(self) -> None:
        """End a sequence; the buffers stay for the next one (their content past n_pairs is never read)."""
        self.n_pairs = 0
        self.root_hidden: torch.Tensor | None = None
        self._tree: dict | None = None
        self.fixed_mode = False  # set by the decoder's fixed-shape cycle (begin_fixed)

    def _check_features(self, features, n: int) -> torch.Tensor:
        want = self.model.feature_width
        if features is None:
            raise DraftsmithError(f"{self.name} drafts from target features: pass them to start/commit "
                                  f"(uses_features=True, feature_source={self.feature_source!r})")
        if features.shape[-1] != want or features.shape[1] != n:
            raise ValueError(f"{self.name} expects features [1, {n}, {want}] (target {self.feature_source}), "
                             f"got {list(features.shape)}")
        return features

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:
        self.room = room

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        n = input_ids.shape[1] - 1
        if input_ids.shape[0] != 1 or n < 1:
            raise ValueError(f"start expects ids [1, n+1] with n >= 1, got {list(input_ids.shape)}")
        self.close()
        self._reserve(n + getattr(self, "room", 256))
        self._append(self._check_features(features, n), input_ids[:, 1:])

    def _reserve(self, capacity: int) -> None:
        """Committed keys/values live in preallocated buffers (grown by doubling, copied once), so a commit
        writes in place instead of concatenating the whole history every cycle."""
        if self.kv is not None and self.kv[0][0].shape[2] >= capacity:
            return
        if self.kv is not None:
            capacity = max(capacity, 2 * self.kv[0][0].shape[2])
        dev, d = self.model.fc.weight.device, self.model.dims
        shape = (1, d.num_key_value_heads, capacity, d.head_dim)
        new = [(torch.zeros(shape, dtype=self.model.param_dtype, device=dev),
                torch.zeros(shape, dtype=self.model.param_dtype, device=dev)) for _ in range(self.model.num_kv_layers)]
        for (k, v), (k0, v0) in zip(new, self.kv or []):
            k[:, :, :self.n_pairs] = k0[:, :, :self.n_pairs]
            v[:, :, :self.n_pairs] = v0[:, :, :self.n_pairs]
        self.kv = new
        self._versions[0] += 1

    def _committed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv[layer]
        return k[:, :, :self.n_pairs], v[:, :, :self.n_pairs]

    @torch.no_grad()
    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None) -> None:
        if self.kv is None:
            raise ValueError("commit before start")
        self._append(self._check_features(new_features, new_ids.shape[1]), new_ids)

    def _append(self, features: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Run new committed pairs (features[:, j], next_ids[:, j]) causally over the cached ones."""
        m, n0 = next_ids.shape[1], self.n_pairs
        self._reserve(n0 + m)
        dev = self.model.fc.weight.device
        hidden = self.model.project(features.to(dev))
        positions = torch.arange(n0, n0 + m, device=dev)[None]
        vis = torch.cat([torch.ones(m, n0, dtype=torch.bool, device=dev),
                         torch.ones(m, m, dtype=torch.bool, device=dev).tril()], dim=1)[None, None]
        attends = [self._cached_attend(layer, vis) for layer in range(self.model.num_kv_layers)]
        out, _ = self.model.core(hidden, self.model.embed(next_ids.to(dev)), positions, attends)
        self.n_pairs += m
        self.root_hidden = out[:, -1]  # [1, H]
        self._tree = None  # every tree node state is stale now

    def _cached_attend(self, layer: int, vis: torch.Tensor):
        def attend(q, k, v):  # write the new pairs in place, attend over everything committed up to them
            K, V = self.kv[layer]
            n0, m = self.n_pairs, k.shape[2]
            K[:, :, n0:n0 + m] = k
            V[:, :, n0:n0 + m] = v
            return masked_attention(q, K[:, :, :n0 + m], V[:, :, :n0 + m], vis)
        return attend

    # --- draft tree ---------------------------------------------------------------------------------
    def _sync_tree(self, tree) -> dict:
        """Per-node state buffers for `tree`, grown as it grows; state of changed nodes is dropped."""
        B, N = tree.tokens.shape
        st = self._tree
        if st is None or st["B"] != B:
            st = self._tree = {"B": B, "cap": 0}
        if st["cap"] < N or "hidden" not in st:
            cap = max(N, 2 * st["cap"], 16)
            d, dev, dt = self.model.dims, self.model.fc.weight.device, self.model.param_dtype

            def grow(old, shape, dim, dtype=dt, fill=0):
                new = torch.full(shape, fill, dtype=dtype, device=dev)
                if old is not None:
                    new.narrow(dim, 0, old.shape[dim]).copy_(old)
                return new
            kv_shape = (B, d.num_key_value_heads, cap, d.head_dim)
            st["hidden"] = grow(st.get("hidden"), (B, cap, d.hidden_size), 1)
            st["k"] = [grow(k, kv_shape, 2) for k in st.get("k", [None] * self.model.num_kv_layers)]
            st["v"] = [grow(v, kv_shape, 2) for v in st.get("v", [None] * self.model.num_kv_layers)]
            st["done"] = grow(st.get("done"), (B, cap), 1, torch.bool, False)
            st["tokens"] = grow(st.get("tokens"), (B, cap), 1, torch.long, -1)
            st["parents"] = grow(st.get("parents"), (B, cap), 1, torch.long, -2)
            st["cap"] = cap
        same = (st["tokens"][:, :N] == tree.tokens.to(st["tokens"].device)) & (
            st["parents"][:, :N] == tree.parents.to(st["parents"].device))
        changed = ~same & st["done"][:, :N]
        if changed.any():  # a node changed: it and everything after it (its descendants) are stale
            first = changed.float().argmax(1)
            for b in changed.any(1).nonzero().flatten().tolist():
                st["done"][b, int(first[b]):] = False
        st["done"][:, N:] = False
        return st

    @torch.no_grad()
    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        if self.root_hidden is None:
            raise ValueError("expand before start")
        if self.fixed_mode:
            return self._expand_fixed(tree, frontier)
        B, N = tree.tokens.shape
        if frontier.dim() != 2 or frontier.shape[0] != B:
            raise ValueError(f"frontier has {frontier.shape[0]} rows but the tree has {B}: pass [B, F] node indices")
        st = self._sync_tree(tree)
        dev = self.model.fc.weight.device
        frontier = frontier.to(dev)
        if N and (frontier >= 0).any():
            anc = tree.ancestor_mask().to(dev)
            depths = tree.depths.to(dev)
            for b in range(B):
                nodes = frontier[b][frontier[b] >= 0]
                if nodes.numel() == 0:
                    continue
                need = anc[b, nodes].any(0) & ~st["done"][b, :N]
                for d in depths[b][need].unique().tolist():  # ancestors first
                    self._compute(st, tree, anc, b, (need & (depths[b] == d)).nonzero().flatten())
        H = st["hidden"].shape[-1]
        hidden = self.root_hidden[:, None].expand(B, frontier.shape[1], H)
        if N:
            nodes = st["hidden"].gather(1, frontier.clamp_min(0)[..., None].expand(-1, -1, H))
            hidden = torch.where((frontier < 0)[..., None], hidden, nodes)
        return self.model.target_vocab_logits(hidden)

    def _compute(self, st: dict, tree, anc: torch.Tensor, b: int, idx: torch.Tensor) -> None:
        """Hidden state and k/v of nodes `idx` of tree b (all of one depth; ancestors already done)."""
        dev = idx.device
        N = tree.num_nodes
        par = tree.parents[b].to(dev)[idx]
        hidden_in = torch.where((par < 0)[:, None], self.root_hidden, st["hidden"][b, par.clamp_min(0)])
        tokens = tree.tokens[b].to(dev)[idx]
        positions = (self.n_pairs - 1 + tree.depths[b].to(dev)[idx])[None]
        vis = torch.cat([torch.ones(idx.numel(), self.n_pairs, dtype=torch.bool, device=dev),
                         anc[b, idx, :N]], dim=1)[None, None]

        def attend_for(layer):
            def attend(q, k, v):
                st["k"][layer][b].index_copy_(1, idx, k[0])
                st["v"][layer][b].index_copy_(1, idx, v[0])
                k0, v0 = self._committed(layer)
                keys = torch.cat([k0, st["k"][layer][b:b + 1, :, :N]], 2)
                vals = torch.cat([v0, st["v"][layer][b:b + 1, :, :N]], 2)
                return masked_attention(q, keys, vals, vis)
            return attend
        out, _ = self.model.core(hidden_in[None], self.model.embed(tokens[None]), positions,
                                 [attend_for(layer) for layer in range(self.model.num_kv_layers)])
        st["hidden"][b].index_copy_(0, idx, out[0])
        st["done"][b, idx] = True
        st["tokens"][b, idx] = tokens
        st["parents"][b, idx] = par

    # --- fixed shapes (decoding/cycle.py) ----------------------------------------------------------------
    # The decoder's fixed-shape cycle drafts one tree (B = 1) whose frontier nodes are always new: each
    # expansion computes exactly the frontier nodes from their parents (computed one expansion earlier). The
    # committed length lives on the device (n_t); attention runs over the whole committed buffer with a
    # length mask, commits write a padded block of P pairs and move n_t by the real count. No step reads a
    # device value on the host, so the draft phase and the commit are parts of graph regions on a GPU.
    @property
    def buffers_version(self) -> tuple:
        return tuple(self._versions)

    def begin_fixed(self) -> None:
        """The decoder switches to fixed-shape steps after start (until close): the length and the root's
        hidden state move into the buffers the captured programs read."""
        dev = self.model.fc.weight.device
        self.fixed_mode = True
        self._reserve(self.n_pairs + 2 * getattr(self, "room", 256))  # padded commits need slack: grow now, once
        if self.n_t is None:
            self.n_t = torch.zeros((), dtype=torch.long, device=dev)
        self.n_t.fill_(self.n_pairs)
        if self._root_buf is None or self._root_buf.shape != self.root_hidden.shape:
            self._root_buf = torch.empty_like(self.root_hidden)
            self._versions[0] += 1
        self.root_hidden = self._root_buf.copy_(self.root_hidden)  # written in place from now on

    def synced(self, count: int) -> None:
        """The host learnt the last commit's count: keep the host mirror and room for the next commit."""
        self.n_pairs += count
        self._reserve(self.n_pairs + 2 * getattr(self, "_width", 1) + 1)

    def _node_state(self, n: int) -> dict:
        """Per-node hidden and k/v buffers for n nodes plus a scratch row (root rows of a frontier write there).
        Sized for the whole tree from the first expansion on (`room` bounds a tree's nodes); a larger tree
        grows them keeping the nodes computed so far."""
        if self.nodes is None or self.nodes["hidden"].shape[0] < n + 1:
            d, dev, dt = self.model.dims, self.model.fc.weight.device, self.model.param_dtype
            cap = max(n + 1, 16, getattr(self, "room", 0) + 1)
            kv = (1, d.num_key_value_heads, cap, d.head_dim)
            old = self.nodes
            self.nodes = {"hidden": torch.zeros(cap, d.hidden_size, dtype=dt, device=dev),
                          "k": [torch.zeros(kv, dtype=dt, device=dev) for _ in range(self.model.num_kv_layers)],
                          "v": [torch.zeros(kv, dtype=dt, device=dev) for _ in range(self.model.num_kv_layers)]}
            if old is not None:
                m = old["hidden"].shape[0]
                self.nodes["hidden"][:m] = old["hidden"]
                for new_t, old_t in zip(self.nodes["k"] + self.nodes["v"], old["k"] + old["v"]):
                    new_t[:, :, :m] = old_t
            self._versions[1] += 1
        return self.nodes

    @torch.no_grad()
    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor, count: torch.Tensor) -> None:
        """commit() with P padded pairs of which the first `count` are real."""
        P, dev = new_ids.shape[1], self.model.fc.weight.device
        self._width = P
        hidden = self.model.project(self._check_features(new_features, P).to(dev))
        steps = torch.arange(P, device=dev)
        dst = self.n_t + steps
        cap = self.kv[0][0].shape[2]
        see = ((torch.arange(cap, device=dev) - self.n_t)[None, :] <= steps[:, None])[None, None]  # [1,1,P,cap]

        def attend_for(layer):
            def attend(q, k, v):
                K, V = self.kv[layer]
                K.index_copy_(2, dst, k)
                V.index_copy_(2, dst, v)
                return masked_attention(q, K, V, see)
            return attend
        out, _ = self.model.core(hidden, self.model.embed(new_ids.to(dev)), (self.n_t + steps)[None],
                                 [attend_for(layer) for layer in range(self.model.num_kv_layers)])
        self.root_hidden.copy_(out.index_select(1, (count - 1).view(1))[:, 0])
        self.n_t += count

    def _expand_fixed(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        dev = self.model.fc.weight.device
        frontier = frontier.to(dev)
        F, H = frontier.shape[1], self.root_hidden.shape[-1]
        root = self.root_hidden[:, None].expand(1, F, H)
        if tree.num_nodes == 0:
            return self.model.target_vocab_logits(root)
        N = tree.num_nodes
        st = self._node_state(N)
        fr = frontier[0]
        slot = torch.where(fr >= 0, fr, N)  # root rows compute into the scratch row
        nodes = fr.clamp(min=0)
        par = tree.parents[0].index_select(0, nodes)
        hidden_in = torch.where((par < 0)[:, None], self.root_hidden, st["hidden"].index_select(0, par.clamp(min=0)))
        depth = tree.depths[0].index_select(0, nodes)
        anc = tree.ancestor_mask()[0].index_select(0, nodes)  # [F, N]: ancestors and the node itself
        cap = self.kv[0][0].shape[2]
        committed = (torch.arange(cap, device=dev) < self.n_t).expand(F, cap)
        see = torch.cat([committed, anc], 1)[None, None]  # [1, 1, F, cap + N]

        def attend_for(layer):
            def attend(q, k, v):
                NK, NV = st["k"][layer], st["v"][layer]
                NK.index_copy_(2, slot, k)
                NV.index_copy_(2, slot, v)
                K, V = self.kv[layer]
                keys, vals = torch.cat([K, NK[:, :, :N]], 2), torch.cat([V, NV[:, :, :N]], 2)
                return masked_attention(q, keys, vals, see)
            return attend
        out, _ = self.model.core(hidden_in[None], self.model.embed(tree.tokens[0].index_select(0, nodes)[None]),
                                 (self.n_t - 1 + depth)[None],
                                 [attend_for(layer) for layer in range(self.model.num_kv_layers)])
        st["hidden"].index_copy_(0, slot, out[0])
        return self.model.target_vocab_logits(torch.where((fr < 0)[None, :, None], root, out))
