"""DFlash: a block-diffusion drafter that drafts a whole block of tokens in one forward (Chen et al., 2026, z-lab).

    python train.py stages=[data_gen,train,eval] drafter=dflash run.name=df          # the demo target
    python train.py stage=train drafter=dflash drafter.block_size=8 drafter.loss=distill
    python -m pytest -q tests/drafters/test_dflash.py

Model (drafters/dflash_blocks.py has the layer; names = z-lab's DFlashDraftModel, so export is a dump):
    fc, hidden_norm    the tapped target features (TargetSignal.features, the layers drafter.target_layer_ids
                       picks from target.feature_layers) concatenated, projected to H and RMS-normed: the context
    layers.{i}         1-5 decoder layers; queries from the block only, keys/values = [context ; block]
    norm               final RMSNorm; the logits come from the target's own LM head, the block's inputs from
                       the target's own embedding: the drafter ships neither
    tap_mix            drafter.fusion=layerwise only (DFlare-style): layer i reads its own softmax mix of the
                       taps (scaled so that zeros = fusion=none's input), through the shared fc / hidden_norm

Block. The committed sequence is x_0..x_n; the target has read x_0..x_{n-1} (features f_0..f_{n-1} at
positions 0..n-1) and x_n (the anchor) not yet. The block is [x_n, m, ..., m] (B-1 copies of the mask token
m) at positions n..n+B-1; block position k >= 1 predicts x_{n+k}. Inside the block attention is
bidirectional; every block query also sees the whole context. One forward drafts B-1 tokens.

Training (`loss`): random anchors a on scored positions (x_{a+1} is an assistant token), drafter.anchors
per sequence, all blocks in one forward: the block of anchor a sees context rows < a and its own block,
never another block (drafters.dflash_blocks.block_visibility: a bool mask for sdpa, or a FlexAttention
BlockMask with drafter.attention=flex). Position k's loss is weighted w_k = exp(-(k-1)/gamma), counted
where x_{a+k} is a scored real token: `hard` = CE on the data token, `distill` = soft CE (-sum p log q)
against the target's distribution for that token (its logits at a+k-1). Total = the weighted mean.
Metrics: loss/<hard|distill>, acc/<k> (argmax == the target's argmax, or the data token offline without
target logits), dflash/blocks (kept blocks per sequence).

Objectives: token (this loss). HASS, GRIFFIN, CORAL and GTO train the unrolled steps of EAGLE drafters and
on_policy / adaspec distil drafters that generate alone; each refuses drafter=dflash with one line.

Decoding (`DFlashDecoding`): the context keys/values live in a cache (a context row's k/v depend on its own
feature and position only, so they are computed once, at start/commit, from the verification's features);
the root expand runs the one block forward and keeps the B-1 rows of logits; deeper expands return row d
for a node at depth d whatever the path (a chain, or a top-k tree from per-position top-k, like Medusa).
"""
from __future__ import annotations

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.base import Drafter, TargetSignal, TrainableDrafter
from drafters.common import Shared, floats, logits_at_depth, reference_rows
from drafters.dflash_blocks import (
    BlockLayer,
    block_visibility,
    choose_mask_token,
    flex_attend,
    position_weights,
    resolve_taps,
    sample_anchors,
    sdpa_attend,
)
from drafters.folder import HeldTargetCheckpoint
from drafters.layers import DrafterDims, Rotary, masked_attention


class DFlashDrafter(HeldTargetCheckpoint, TrainableDrafter):
    """The DFlash drafter as the train stage sees it; `as_drafter()` gives the decoding adapter."""

    family = "dflash"
    feature_source = "features"

    def __init__(self, cfg, dims: DrafterDims, target, mask_id: int, taps: list[int]):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        cfg.check()  # DFlashConfig's ranges (conf/schema/drafter.py), again for a config changed in code
        self.cfg, self.dims = cfg, dims
        self._target = Shared(target)  # the frozen target must not become a submodule (state dict, ZeRO)
        self._rope = Rotary(dims)
        self._gc = False
        self.mask_id, self.taps = int(mask_id), list(taps)
        H = dims.hidden_size
        self.fc = nn.Linear(len(self.taps) * H, H, bias=False)
        self.hidden_norm = LlamaRMSNorm(H, dims.rms_norm_eps)
        self.layers = nn.ModuleList([BlockLayer(dims) for _ in range(cfg.num_layers)])
        self.norm = LlamaRMSNorm(H, dims.rms_norm_eps)
        self.tap_mix = nn.Parameter(torch.zeros(cfg.num_layers, len(self.taps))) if cfg.fusion == "layerwise" else None
        self.register_buffer("position_weight", position_weights(cfg.block_size, cfg.decay), persistent=False)

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, cfg, target, token_counts=None) -> DFlashDrafter:
        """Sizes from target.config; the mask token from the tokenizer (printed, with why); the taps from
        target.feature_layers."""
        mask, why = choose_mask_token(target, cfg.mask_token_id)
        print(f"dflash: mask token id {mask} ({why})", flush=True)
        taps = resolve_taps(target.feature_layers, cfg.target_layer_ids)
        return cls(cfg, DrafterDims.from_target(target), target, mask, taps).to(target.device)

    @classmethod
    def from_meta(cls, cfg, target, dims, meta, folder=None):
        mask, _ = choose_mask_token(target, int(meta["mask_token_id"]))  # still a row of this target's embedding
        return cls(cfg, dims, target, mask, resolve_taps(target.feature_layers, meta["target_layer_ids"])).to(target.device)

    def checkpoint_meta(self) -> dict:
        return {"mask_token_id": self.mask_id, "target_layer_ids": self.target_layer_ids}

    @property
    def target(self):
        return self._target.obj

    @property
    def target_layer_ids(self) -> list[int]:
        """The fused taps in target.feature_layers numbering (hidden state entering layer i)."""
        return [self.target.feature_layers[i] for i in self.taps]

    @property
    def param_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def feature_width(self) -> int:
        return self.dims.num_taps * self.dims.hidden_size

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self._gc = bool(enabled)

    def as_drafter(self, target=None) -> DFlashDecoding:
        return DFlashDecoding(self, target if target is not None else self.target)

    # --- the model ------------------------------------------------------------------------------------
    def check_features(self, features: torch.Tensor | None) -> torch.Tensor:
        if features is None:
            raise DraftsmithError("dflash drafts from the target's tapped features, but none were given: train "
                                  "online (train.mode=online) or cache features in data_gen")
        if features.shape[-1] != self.feature_width:
            raise DraftsmithError(
                f"dflash was built for {self.dims.num_taps} feature taps ({self.feature_width} wide) but got features "
                f"{features.shape[-1]} wide: use the same target.feature_layers as data_gen")
        return features

    def context(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per drafter layer, the context rows [B, T, H] from tapped features [B, T, num_taps * H]."""
        H = self.dims.hidden_size
        f = features.to(self.param_dtype).unflatten(-1, (self.dims.num_taps, H))[..., self.taps, :]
        if self.tap_mix is None:
            return [self.hidden_norm(self.fc(f.flatten(-2)))] * len(self.layers)
        mix = torch.softmax(self.tap_mix, -1) * len(self.taps)  # zeros -> ones: fusion=none's input
        return [self.hidden_norm(self.fc((f * m[:, None].to(f.dtype)).flatten(-2))) for m in mix]

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the context keys/values [B, kv, T, d] of features at positions [B, T]. A row's k/v depend
        on its own feature and position only, so the decoder caches them and appends rows as they commit."""
        ctx = self.context(self.check_features(features))
        cos, sin = self._rope(ctx[0], positions)
        return [layer.self_attn.kv_of(c, cos, sin) for layer, c in zip(self.layers, ctx)]

    def block(self, kvs, block_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Final-normed outputs [B, Q, H] of block rows (token ids and positions [B, Q]) over the context kvs."""
        h = self.target.embed(block_ids).to(self.param_dtype)
        cos, sin = self._rope(h, positions)
        for layer, (k, v) in zip(self.layers, kvs):
            h = self._ckpt(layer, h, cos, sin, k, v, attend)
        return self.norm(h)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary from block outputs, through the target's LM head."""
        return self.target.lm_head(out.to(self.target.dtype)).float()

    # --- training -------------------------------------------------------------------------------------
    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """The module docstring's loss over random blocks of the batch (one forward)."""
        ids = signal.input_ids
        Bt, T = ids.shape
        K = self.cfg.block_size
        # training draws anchors from torch's generator (checkpointed); held-out evaluation from its own fixed one
        gen = None if self.training else torch.Generator().manual_seed(0)
        anchors, keep = sample_anchors(signal.loss_mask, signal.attention_mask, self.cfg.anchors, gen)
        N = anchors.shape[1]
        if N == 0:  # no scored token in the batch: a zero that still reaches every parameter
            return sum(p.sum() for p in self.parameters()) * 0.0, {f"loss/{self.cfg.loss}": 0.0}
        offs = torch.arange(K, device=ids.device)
        pos = anchors[..., None] + offs  # [Bt, N, K] position of every block row
        block_ids = torch.full_like(pos, self.mask_id)
        block_ids[..., 0] = ids.gather(1, anchors)
        kvs = self.context_kv(signal.features, torch.arange(T, device=ids.device).expand(Bt, T))
        attend = (flex_attend(anchors, keep, T, K) if self.cfg.attention == "flex"
                  else sdpa_attend(block_visibility(anchors, keep, T, K)))
        out = self.block(kvs, block_ids.flatten(1), pos.flatten(1), attend).view(Bt, N, K, -1)
        at = pos.clamp(max=T - 1).flatten(1)
        scored = (keep[..., None] & (pos < T) & (offs > 0)
                  & (signal.loss_mask.gather(1, at) > 0).view_as(pos) & (signal.attention_mask.gather(1, at) > 0).view_as(pos))
        b, n, k = scored.nonzero(as_tuple=True)
        t = pos[b, n, k]  # the predicted token x_t
        logits = self.logits(out[b, n, k])
        ref = reference_rows(signal, b, t - 1)  # the target's distribution for x_t (None offline without logits)
        w = self.position_weight[k]
        if self.cfg.loss == "hard":
            value = L.ce(logits, ids[b, t], w)
        elif ref is None:
            raise DraftsmithError("drafter.loss=distill needs the target's distribution, but this batch has neither "
                                  "the last hidden state nor cached top-k logits: use drafter.loss=hard, or train online")
        else:
            value = L.soft_ce(logits, ref.float(), w)
        want = ids[b, t] if ref is None else ref.argmax(-1)
        hits = (logits.argmax(-1) == want).float()
        metrics = {f"loss/{self.cfg.loss}": value.detach(), "dflash/blocks": keep.float().sum(1).mean()}
        for d in range(1, K):
            at_d = k == d
            if at_d.any():
                metrics[f"acc/{d}"] = hits[at_d].mean()
        return value, floats(metrics)


# --------------------------------------------------------------------------------------------------
# Decoding adapter
# --------------------------------------------------------------------------------------------------
class DFlashDecoding(Drafter):
    """drafters.base.Drafter over a DFlash model: cached context keys/values, one block forward per cycle.

    A fixed-shape drafter (decoding/cycle.py): the context k/v live in preallocated buffers, the committed
    row count on the device (`n_t`), and the block attends to every buffer column under a mask that hides
    the ones not yet written, so its draft is one graph on a GPU. A commit writes its padded rows at
    n_t.. and moves n_t by the real count; the next commit overwrites the padding."""

    uses_features = True
    feature_source = "features"
    name = "dflash"
    fixed_shape = True
    keeps_programs = True  # the k/v buffers, n_t and the anchor outlive a sequence (drafters.base)

    def __init__(self, model: DFlashDrafter, target):
        self.model = model
        self.vocab_size = int(target.vocab_size)
        self.block_size = int(model.cfg.block_size)
        self.max_depth = self.block_size - 1  # eval cuts a deeper chain / dynamic tree to this (decoding.tree.fit_depth)
        self.depth_why = f"drafts {self.max_depth} tokens per forward (drafter.block_size={self.block_size})"
        self.forwards = 0
        self.room = 256
        self.buffers_version = 0  # bumped when the k/v buffers are re-allocated (graphs reading them are stale)
        # buffers kept from one sequence to the next (captured graphs read them)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, kv, capacity, d]
        dev = model.fc.weight.device
        self.n_t = torch.zeros((), dtype=torch.long, device=dev)  # context rows cached, on the device
        self.anchor = torch.zeros(1, 1, dtype=torch.long, device=dev)  # the last committed token
        self.close()

    def close(self) -> None:
        """End a sequence; the buffers stay for the next one (rows past n_t are never read)."""
        self.n = 0  # context rows cached = committed tokens the target has read (the host's mirror of n_t)
        self.started = False
        self.depth_logits: torch.Tensor | None = None  # [1, B-1, V] for the current root
        self.width = 1  # rows of the last commit, padding included

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:
        self.room = room

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        n = input_ids.shape[1] - 1
        if input_ids.shape[0] != 1 or n < 1:
            raise ValueError(f"start expects ids [1, n+1] with n >= 1, got {list(input_ids.shape)}")
        self.close()
        dev = self.model.fc.weight.device
        self.n_t.zero_()
        self._check(features, n)
        self._reserve(n + self.room + self.block_size)
        self._write(features, torch.full((), n, dtype=torch.long, device=dev))
        self.n = n
        self.anchor.copy_(input_ids[:, -1:])
        self.started = True

    @torch.no_grad()
    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None) -> None:
        if not self.started:
            raise ValueError("commit before start")
        self._check(new_features, new_ids.shape[1])
        m = new_ids.shape[1]
        self.commit_fixed(new_ids, new_features, torch.full((), m, dtype=torch.long, device=self.n_t.device))
        self.synced(m)

    @torch.no_grad()
    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor | None, count: torch.Tensor) -> None:
        """commit() for the decoder's graph regions: rows [1, P] of which the first `count` are real."""
        self._write(new_features, count)
        self.anchor.copy_(new_ids.to(self.anchor.device).gather(1, (count - 1).view(1, 1)))
        self.width = new_ids.shape[1]
        self.depth_logits = None

    def synced(self, count: int) -> None:
        """The host learnt the last commit's count: keep the mirror, and room for the next padded commit."""
        self.n += count
        self._reserve(self.n + self.width + self.block_size)

    def _check(self, features: torch.Tensor | None, m: int) -> None:
        if features is None or features.shape[1] != m:
            raise ValueError(f"dflash expects features [1, {m}, {self.model.feature_width}] (target features), got "
                             f"{None if features is None else list(features.shape)}")

    def _reserve(self, capacity: int) -> None:
        """Buffers of at least `capacity` rows, keeping the written ones (a rare re-allocation: doubling)."""
        have = self.kv[0][0].shape[2] if self.kv is not None else 0
        if have >= capacity:
            return
        cap = max(capacity, 2 * have)
        m, dev = self.model, self.model.fc.weight.device
        kv_heads, head_dim = m.layers[0].self_attn.kv, m.layers[0].self_attn.hd
        grown = []
        for i in range(len(m.layers)):
            K = torch.zeros(1, kv_heads, cap, head_dim, dtype=m.param_dtype, device=dev)
            V = torch.zeros_like(K)
            if self.kv is not None:
                K[:, :, :have], V[:, :, :have] = self.kv[i]
            grown.append((K, V))
        self.kv = grown
        self.buffers_version += 1

    def _write(self, features: torch.Tensor, count: torch.Tensor) -> None:
        """Cache the context k/v of the feature rows [1, P, F] at positions n_t.., then count them."""
        dev = self.n_t.device
        at = self.n_t + torch.arange(features.shape[1], device=dev)
        for (K, V), (k, v) in zip(self.kv, self.model.context_kv(features.to(dev), at[None])):
            K.index_copy_(2, at, k.to(K.dtype))
            V.index_copy_(2, at, v.to(V.dtype))
        self.n_t += count

    @torch.no_grad()
    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        if not self.started:
            raise ValueError("expand before start")
        frontier = frontier.to(self.anchor.device)
        if tree.num_nodes == 0 or self.depth_logits is None:  # every builder expands the root first
            self._draft()
        return logits_at_depth(self.depth_logits.to(frontier.device), tree, frontier,
                               f"dflash drafts {self.max_depth} tokens per forward, so at most {self.max_depth} deep: "
                               f"set the eval tree depth to <= {self.max_depth} or train a larger drafter.block_size")

    def _draft(self) -> None:
        """The cycle's one forward: block [anchor, mask...] at positions n..n+B-1 over the cached context rows
        (every buffer column, the unwritten ones masked out)."""
        dev, B = self.model.fc.weight.device, self.block_size
        C = self.kv[0][0].shape[2]
        ids = torch.cat([self.anchor, torch.full((1, B - 1), self.model.mask_id, dtype=torch.long, device=dev)], 1)
        pos = (self.n_t + torch.arange(B, device=dev))[None]
        written = torch.arange(C, device=dev) < self.n_t
        see = torch.cat([written, torch.ones(B, dtype=torch.bool, device=dev)]).expand(1, 1, B, C + B)
        out = self.model.block(self.kv, ids, pos, lambda q, k, v: masked_attention(q, k, v, see))
        self.depth_logits = self.model.logits(out[:, 1:])
        self.forwards += 1
