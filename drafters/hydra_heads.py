"""Hydra / Hydra++: sequentially dependent draft heads (Ankner et al., 2024).

    python train.py stages=[data_gen,train,eval] drafter=hydra run.name=h1
    python train.py stages=[data_gen,train,eval] drafter=hydra_pp run.name=hpp   # Hydra++
    python -m pytest -q tests/drafters/test_hydra.py

Medusa's heads guess token t+d+1 blind to the tokens drafted before it; Hydra's head d also reads them.
With h_t the target's final normed hidden state at t (it has already predicted x_{t+1}), head d (1-based)
reads concat(h_t, E(x_{t+1}), ..., E(x_{t+d})) and predicts x_{t+d+1}; E is the target's frozen input
embedding. Training teacher-forces the true tokens; decoding feeds the tokens on the tree path (x_{t+1} is
the tree's root, the last committed token).

Head d = `mlp_layers` ResBlocks (the first maps (d+1)H -> H; its residual projection starts as "take
h_t", so a fresh head is the target's LM head on h_t) + its own Linear(H -> V) copied from the target's LM
head (no bias). Hydra++ (`prefix_layer`): one Llama-style decoder layer (the target's width, heads and
rope) runs causally over the sequence of base hidden states first and the heads read its output instead
of h_t; at decode time it keeps its own KV cache over the committed positions. Hydra++'s teacher loss
(`teacher_loss`) swaps the `ce` term for `soft_ce` (cross-entropy to the target's distribution for the
same token) at the same weight.

Decoding (`HydraDecodeDrafter`) reads the target's *last hidden state* (`feature_source = "last_hidden"`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conf.errors import DraftsmithError
from conf.schema.drafter import HydraConfig
from drafters.base import Drafter, TargetSignal, TrainableDrafter
from drafters.common import (
    Shared,
    floats,
    require_last_hidden,
    target_positions,
    token_objective,
)
from drafters.folder import FolderCheckpoint
from drafters.medusa import ResBlock
from drafters.target import target_identity


def prefix_layer_config(target_cfg):
    """A LlamaConfig for one decoder layer shaped like the target (width, heads, MLP width, rope)."""
    from transformers import LlamaConfig

    H = int(getattr(target_cfg, "hidden_size", None) or target_cfg.n_embd)
    heads = int(getattr(target_cfg, "num_attention_heads", None) or target_cfg.n_head)
    kv = int(getattr(target_cfg, "num_key_value_heads", None) or heads)
    inter = getattr(target_cfg, "intermediate_size", None) or getattr(target_cfg, "n_inner", None) or 4 * H
    rope = getattr(target_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_type" not in rope:  # per-layer-type settings: the full-attention one
        rope = rope.get("full_attention") or next((v for v in rope.values() if isinstance(v, dict)), None)
    if not isinstance(rope, dict) or "rope_type" not in rope:  # GPT-2 (learned positions), older configs
        rope = {"rope_type": "default", "rope_theta": float(getattr(target_cfg, "rope_theta", None) or 10000.0)}
    cfg = LlamaConfig(hidden_size=H, intermediate_size=int(inter), num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=H // heads, num_hidden_layers=1,
                      max_position_embeddings=int(getattr(target_cfg, "max_position_embeddings", 4096)),
                      rms_norm_eps=float(getattr(target_cfg, "rms_norm_eps", 1e-6)), rope_parameters=dict(rope),
                      initializer_range=float(getattr(target_cfg, "initializer_range", 0.02)))
    cfg._attn_implementation = "sdpa"
    return cfg


class HydraDrafter(FolderCheckpoint, TrainableDrafter):
    """K sequentially dependent heads (+ Hydra++'s prefix decoder layer)."""

    family = "hydra"

    def __init__(self, cfg: HydraConfig, hidden_size: int, vocab_size: int, layer_config=None):
        super().__init__()
        cfg.check()  # the schema's ranges, again for a config changed in code
        self.cfg = cfg
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        H = hidden_size
        self.hydra_mlp = nn.ModuleList(
            nn.Sequential(ResBlock(H, (d + 1) * H), *[ResBlock(H) for _ in range(cfg.mlp_layers - 1)])
            for d in range(1, cfg.num_heads + 1))
        with torch.no_grad():  # the residual starts as "take h_t"; the embedding columns learn from zero
            for mlp in self.hydra_mlp:
                w = mlp[0].res_connection.weight
                w.zero_()
                w[:, :H].copy_(torch.eye(H))
        self.hydra_lm_head = nn.ModuleList(nn.Linear(H, vocab_size, bias=False) for _ in range(cfg.num_heads))
        self.prefix_layer = None
        if cfg.prefix_layer:
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

            self.prefix_layer = LlamaDecoderLayer(layer_config, layer_idx=0)
            std = layer_config.initializer_range
            for mod in self.prefix_layer.modules():  # HF's init (N(0, 0.02)): near-identity residual layer
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=std)
            # not a submodule: casting the drafter to bf16 (DeepSpeed, from_pretrained) would round inv_freq
            object.__setattr__(self, "_rotary", LlamaRotaryEmbedding(layer_config))
        self._checkpointing = False
        self._target_fp: dict = {}
        self._embed_ref = None  # Shared(the target's frozen input embedding), not a submodule

    @property
    def losses(self) -> dict[str, float]:
        """cfg.losses, with `ce` swapped for `soft_ce` under Hydra++'s teacher loss."""
        if not self.cfg.teacher_loss:
            return dict(self.cfg.losses)
        return {("soft_ce" if k == "ce" else k): v for k, v in self.cfg.losses.items()}

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, cfg: HydraConfig, target, token_counts=None) -> HydraDrafter:
        """Heads sized from target.config; LM heads copied from the target's LM head."""
        layer_cfg = prefix_layer_config(target.config) if cfg.prefix_layer else None
        model = cls(cfg, target.hidden_size, target.vocab_size, layer_cfg).to(target.device)
        with torch.no_grad():
            w = target.model.get_output_embeddings().weight
            for head in model.hydra_lm_head:
                head.weight.copy_(w.float())
        model._bind(target)
        return model

    def _bind(self, target) -> None:
        self._target_fp = target_identity(target)
        self._embed_ref = Shared(target.model.get_input_embeddings())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's frozen token embeddings."""
        return self._embed_ref.obj(ids)

    # --- forward -------------------------------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        return self.hydra_lm_head[0].weight.dtype

    def prefix(self, hidden: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """The heads' view of the base hidden states [B, T, H]: Hydra++'s prefix layer (causal over the
        sequence; positions start..start+T-1 on top of `cache`) or the states themselves."""
        x = hidden.to(self._dtype)
        if self.prefix_layer is None:
            return x
        T = x.shape[1]
        pos = torch.arange(start, start + T, device=x.device)[None].expand(x.shape[0], -1)
        mask = None
        if cache is not None:  # explicit mask: sdpa's is_causal is wrong once queries sit after a cache
            keys = torch.arange(start + T, device=x.device)
            allowed = keys[None, :] <= pos[0, :, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
            mask = mask[None, None]

        if self._rotary.inv_freq.device != x.device:
            self._rotary.to(x.device)
        rope = self._rotary(x, pos)  # cos/sin computed in fp32, returned in x's dtype

        def run(x):
            return self.prefix_layer(x, attention_mask=mask, position_ids=pos, cache=cache,
                                     use_cache=cache is not None, position_embeddings=rope)

        if self._checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, x, use_reentrant=False)
        return run(x)

    def prefix_at(self, hidden: torch.Tensor, cache, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prefix() at given positions [1, T] with an explicit additive mask over a static cache (the decoder's
        fixed-shape steps: positions and mask come from a device-side length)."""
        x = hidden.to(self._dtype)
        if self.prefix_layer is None:
            return x
        if self._rotary.inv_freq.device != x.device:
            self._rotary.to(x.device)
        return self.prefix_layer(x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                                 position_embeddings=self._rotary(x, pos))

    def head(self, d: int, h: torch.Tensor, path_embeds: torch.Tensor) -> torch.Tensor:
        """Head d (1-based) on h [N, H] and the embeddings of the d tokens after it [N, d, H] -> [N, V]."""
        x = torch.cat([h, path_embeds.to(h.dtype).flatten(-2)], dim=-1)
        return self.hydra_lm_head[d - 1](self.hydra_mlp[d - 1](x))

    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """sum_d losses_d, head d teacher-forced with the true tokens x_{t+1..t+d}."""
        h = self.prefix(require_last_hidden(signal, "hydra"))
        with torch.no_grad():
            emb = self.embed(signal.input_ids)
        losses = self.losses
        total = h.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for d in range(1, self.cfg.num_heads + 1):
            b, t = target_positions(signal, d + 1)
            offsets = torch.arange(1, d + 1, device=t.device)
            logits = self.head(d, h[b, t], emb[b[:, None], t[:, None] + offsets])
            loss_d, terms, acc = token_objective(logits, signal, b, t, d + 1, losses)
            total = total + loss_d
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + losses[name] * v.detach()
            metrics[f"acc/{d}"] = acc
        metrics.update({f"loss/{n}": v for n, v in sums.items()})
        return total, floats(metrics)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the prefix layer in backward (the heads are single matmuls: nothing to save)."""
        self._checkpointing = bool(enabled)

    # --- decoding, saving ------------------------------------------------------------------------------
    def as_drafter(self, target) -> HydraDecodeDrafter:
        return HydraDecodeDrafter(self)

    # --- checkpoint folder (drafters/folder.py) -----------------------------------------------------------
    def checkpoint_dims(self) -> dict:
        dims = {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "num_heads": self.cfg.num_heads}
        if self.prefix_layer is not None:
            dims["prefix_layer"] = self.prefix_layer.self_attn.config.to_diff_dict()
        return dims

    @classmethod
    def from_meta(cls, cfg, target, dims, meta, folder=None) -> HydraDrafter:
        layer_cfg = prefix_layer_config(target.config) if cfg.prefix_layer else None
        model = cls(cfg, target.hidden_size, target.vocab_size, layer_cfg).to(target.device)
        model._bind(target)
        return model

    def loaded(self, target, meta, folder) -> HydraDrafter:
        return self.to(target.dtype)


class HydraDecodeDrafter(Drafter):
    """Decoding adapter: head d reads the prefix state of the last committed position and the embeddings
    of the root token and the path's drafted tokens."""

    name = "hydra"
    uses_features = True
    feature_source = "last_hidden"  # the decoder passes TargetOutput.last_hidden, not the EAGLE-3 taps

    def __init__(self, model: HydraDrafter):
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_depth = model.cfg.num_heads
        self._h = self._root = self._cache = None
        self._pos = 0

    def _read(self, feats: torch.Tensor) -> None:
        """Advance the prefix layer over newly committed features; keep the last position's state."""
        if feats is None or feats.shape[1] == 0:
            raise DraftsmithError("hydra drafts from the target's last hidden state: the decoder passed none")
        with torch.no_grad():
            out = self.model.prefix(feats, cache=self._cache, start=self._pos)
        self._pos += feats.shape[1]
        self._h = out[:, -1]

    def start(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        from transformers import DynamicCache

        self.fixed_mode = False
        self._prompt_feats = features
        self._cache = DynamicCache() if self.model.prefix_layer is not None else None
        self._pos = 0
        self._root = input_ids[:, -1]
        self._read(features)

    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        if getattr(self, "fixed_mode", False):
            return self._expand_fixed(tree, frontier)
        B, F = frontier.shape
        nodes = frontier.clamp_min(0)
        depth = torch.where(frontier < 0, 0, tree.depths.gather(1, nodes)) if tree.num_nodes \
            else torch.zeros_like(frontier)
        if int(depth.max()) >= self.max_depth:
            raise DraftsmithError(
                f"hydra has {self.max_depth} heads, so it drafts at most {self.max_depth} tokens deep: "
                f"set the eval tree depth to <= {self.max_depth} or train more heads (drafter.num_heads)")
        Dmax = int(depth.max())
        # path[b, f, j] = token at depth j+1 on the way to the frontier node (walk up through parents)
        path = torch.zeros(B, F, max(Dmax, 1), dtype=torch.long, device=frontier.device)
        cur = frontier
        for _ in range(Dmax):
            live = cur >= 0
            c = cur.clamp_min(0)
            b, f = live.nonzero(as_tuple=True)
            path[b, f, tree.depths.gather(1, c)[b, f] - 1] = tree.tokens.gather(1, c)[b, f]
            cur = torch.where(live, tree.parents.gather(1, c), cur)
        tokens = torch.cat([self._root[:, None, None].expand(B, F, 1).to(path), path[..., :Dmax]], dim=-1)
        out = torch.empty(B, F, self.vocab_size, device=frontier.device)
        h = self._h.expand(B, -1) if self._h.shape[0] == 1 else self._h
        with torch.no_grad():
            emb = self.model.embed(tokens)  # [B, F, Dmax+1, H]
            for dd in depth.unique().tolist():
                b, f = (depth == dd).nonzero(as_tuple=True)
                out[b, f] = self.model.head(dd + 1, h[b], emb[b, f, : dd + 1]).float()
        return out

    def commit(self, new_ids: torch.Tensor, new_features: torch.Tensor | None) -> None:
        self._root = new_ids[:, -1]
        self._read(new_features)

    # --- fixed shapes (decoding/cycle.py) ----------------------------------------------------------------
    # In the decoder's fixed-shape cycle every frontier of one expansion sits at the tree's current depth (the
    # builders grow trees level by level), a host-known number: one head runs on every frontier node, with the
    # path tokens from path_nodes (no per-depth host loop). Hydra++'s prefix layer reads committed features
    # over a static cache whose length lives on the device; commits are padded, the count moves the length.
    fixed_shape = True

    @property
    def buffers_version(self) -> int:
        return id(self._static) if getattr(self, "_static", None) is not None else 0

    def begin_fixed(self) -> None:
        from decoding.kvcache import static_cache

        self.fixed_mode = True
        dev = self._h.device
        self._h, self._root = self._h.clone(), self._root.clone()
        self.n_t = torch.zeros((), dtype=torch.long, device=dev)
        self._static = None
        if self.model.prefix_layer is not None:  # re-read the prompt into a static cache (once per generate)
            cap = self._pos + 2 * getattr(self, "room", 256) + 1
            self._static = static_cache(self.model.prefix_layer.self_attn.config, cap)
            self._cap = cap
            self._prefix_fixed(self._prompt_feats, None)
        self.n_t.fill_(self._pos)

    def prepare(self, room: int, cuda_graphs: bool = False) -> None:
        self.room = room
        self.fixed_mode = False

    def _prefix_fixed(self, feats: torch.Tensor, count: torch.Tensor | None) -> None:
        """Read P committed features at the device-side length; keep the state of row count - 1 (the last
        row when count is None)."""
        P, dev = feats.shape[1], feats.device
        steps = torch.arange(P, device=dev)
        cap = self._cap if self._static is not None else 0
        if self._static is not None:
            layer = self._static.layers[0]
            if layer.is_initialized:  # (the first read initialises it at 0)
                layer.cumulative_length.copy_(self.n_t)
            see = (torch.arange(cap, device=dev) - self.n_t)[None, :] <= steps[:, None]
            mask = torch.where(see, 0.0, float("-inf")).to(self.model._dtype)[None, None]
            with torch.no_grad():
                out = self.model.prefix_at(feats, self._static, (self.n_t + steps)[None], mask)
        else:
            out = feats.to(self.model._dtype)
        row = (count - 1).view(1) if count is not None else steps[-1:]
        self._h.copy_(out.index_select(1, row)[:, 0])

    def commit_fixed(self, new_ids: torch.Tensor, new_features: torch.Tensor, count: torch.Tensor) -> None:
        self._prefix_fixed(new_features, count)
        self._root.copy_(new_ids.index_select(1, (count - 1).view(1))[:, 0])
        self.n_t += count

    def synced(self, count: int) -> None:
        self._pos += count

    def _expand_fixed(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        F = frontier.shape[1]
        dd = tree.depth_limit if tree.num_nodes else 0  # every frontier node's depth (see above)
        if dd >= self.max_depth:
            raise DraftsmithError(
                f"hydra has {self.max_depth} heads, so it drafts at most {self.max_depth} tokens deep: "
                f"set the eval tree depth to <= {self.max_depth} or train more heads (drafter.num_heads)")
        tokens = self._root[:, None].expand(F, 1)
        if dd:
            path = tree.path_nodes(tree.ancestor_mask(), dd)[0].index_select(0, frontier[0].clamp(min=0))  # [F, dd]
            tokens = torch.cat([tokens, tree.tokens[0][path.clamp(min=0)]], 1)
        with torch.no_grad():
            out = self.model.head(dd + 1, self._h.expand(F, -1), self.model.embed(tokens)).float()
        return out[None]
