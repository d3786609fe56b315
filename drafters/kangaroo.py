"""Kangaroo: self-speculative decoding by double early exit (Liu et al., 2024), on the target's own layers.

    python train.py drafter=kangaroo                                  # train the adapter (stage=train)
    python train.py stage=eval drafter=kangaroo eval.tree.kind=chain  # the paper's drafting: a chain, early exit
    python -m pytest -q tests/drafters/test_kangaroo.py                        # its tests (CPU, seconds)

Model (l = cfg.exit_layer). The drafter is the target cut after its first l decoder layers, plus an adapter:
    s_t = target layers 0..l-1 over embed(x_<=t)      the *target's own modules*, frozen, never copied
    a_t = s_t + Attn(norm_1(s_t))                     one attention layer of the target's own class (RoPE, GQA)
    q(. | x_<=t) = softmax(lm_head(norm_2(a_t)))      the target's frozen LM head
Only norm_1, the attention and norm_2 are trained: the paper's "one multi-head attention and two normalization
layers", no MLP. Start: norm_1 = the target's layer-l input norm, norm_2 = its final norm, and a zero output
projection, so an untrained adapter is exactly the plain early exit lm_head(final_norm(s_t)) (the first early
exit) and training moves it from there. State dict: layer.input_layernorm.*, layer.self_attn.*, norm.* only.

Loss (cfg.losses, name -> weight), row t predicting x_{t+1}, over assistant tokens (the target stays frozen):
    soft_ce    -sum p log q, p = the target's next-token distribution at t: the official training code's only
               term, and what acceptance is decided on (default, weight 1)
    cosine     1 - cos(norm_2(a_t), h_t), h_t the target's last normed hidden state (the representation-gap view
               of the paper; off by default: the LM head maps direction and length, so matching p already pins
               what matters, and a direction term on a 150-step budget only competes with it)
    ce         hard CE against the target's argmax; any other drafters.losses distribution loss against p.

Decoding (`as_drafter`). The shallow layers + adapter form an HF causal LM of l + 1 layers (`view`): the target's
module objects for embedding, layers 0..l-1, rotary table and LM head, the adapter for layer l and the final
norm. It drafts through drafters.lm_drafter.LMTreeDrafter with its *own* static KV cache of those l + 1 layers.
Why not the target's cache prefix: the decoder keeps the target's cache in its runner (compacted in place after
each verification, a float32 copy of the target in exact mode, replayed as CUDA graphs), and the Drafter
protocol hands drafters ids and features only, so writing draft-tree entries into it would couple the drafter
to that runner's invariants. The price is recomputing layers 0..l-1 over the accepted tokens once per cycle
(one (k+1)-token forward of l/L of the target) and l/L of the target's KV memory. The paper's other saving,
verification running only layers l..L-1 over the drafts' shallow states, needs the same coupling and is not
done: verification is the ordinary full forward.

Second early exit: the decoding drafter exposes `stop_below` = cfg.threshold; decoding/tree.py's chain builder
stops after a draft whose top-1 draft probability is below it (0 = never). Dynamic and static trees ignore it.
It is a decoding choice (`decode_options`): the eval stage sets it from its own command, not the folder's.
Any drafter is lossless under verification; the early exit only changes which tree is proposed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.base import TargetSignal, TrainableDrafter
from drafters.common import Shared, floats, ratio, require_last_hidden, shifted
from drafters.folder import HeldTargetCheckpoint
from drafters.layers import DrafterDims
from drafters.lm_drafter import LMTreeDrafter


def _base_layers(target):
    """(the target's base model, its decoder layers), or a one-line error for shapes without Llama-style layers."""
    base = target.model.base_model
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layers[0], a) for a in ("self_attn", "input_layernorm")) or not hasattr(
            base, "norm"):
        raise DraftsmithError(
            f"drafter=kangaroo shares the target's decoder layers, but {type(target.model).__name__} has no "
            "Llama-style model.layers (self_attn + input_layernorm) and model.norm: use a Llama/Qwen2-style target "
            "or another drafter (eagle1, medusa)")
    return base, layers


def shallow_config(config, exit_layer: int):
    """The target's HF config for a model of exit_layer + 1 layers (per-layer lists cut to match): what the
    view's forward, its masks and its static KV cache are sized by."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = exit_layer + 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:exit_layer + 1]
    return cfg


class AdapterLayer(nn.Module):
    """norm_1 -> attention -> residual, called like a decoder layer of the target's model (same signature), so
    it sits at index l of the view and owns KV-cache slot l."""

    def __init__(self, target, exit_layer: int, config):
        super().__init__()
        _, layers = _base_layers(target)
        src = layers[exit_layer]
        self.input_layernorm = copy.deepcopy(src.input_layernorm)
        self.self_attn = type(src.self_attn)(config, layer_idx=exit_layer)
        nn.init.zeros_(self.self_attn.o_proj.weight)  # a fresh adapter is the identity on s_t
        if getattr(self.self_attn.o_proj, "bias", None) is not None:
            nn.init.zeros_(self.self_attn.o_proj.bias)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        x = hidden_states.to(self.input_layernorm.weight.dtype)  # a bf16 target under an fp32 adapter
        a, _ = self.self_attn(hidden_states=self.input_layernorm(x), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        return x + a


class Adapter(nn.Module):
    """The trained part: the adapter layer and norm_2 (started from the target's final norm)."""

    def __init__(self, target, exit_layer: int, config):
        super().__init__()
        base, _ = _base_layers(target)
        self.layer = AdapterLayer(target, exit_layer, config)
        self.norm = copy.deepcopy(base.norm)
        self.float()  # one dtype for the trained part (the norms were copied from a possibly bf16 target)
        for p in self.parameters():  # ... and from frozen modules
            p.requires_grad_(True)


def shallow_view(target, adapter: Adapter, config, exit_layer: int):
    """An HF causal LM over the target's modules: embedding, layers 0..exit_layer-1, rotary table and LM head
    shared (shallow copies of the two wrapper objects, no tensor copied), the adapter as layer exit_layer and
    norm_2 as the final norm."""
    full = target.model
    base, layers = _base_layers(target)
    view_base = copy.copy(base)
    view_base._modules = dict(base._modules)  # own child table: the target's stays untouched
    view_base.config = config
    view_base.layers = nn.ModuleList([*layers[:exit_layer], adapter.layer])
    view_base.norm = adapter.norm
    view = copy.copy(full)
    view._modules = dict(full._modules)
    view.config = config
    setattr(view, full.base_model_prefix, view_base)
    return view


class KangarooDrafter(HeldTargetCheckpoint, TrainableDrafter):
    """The adapter on top of the target's first exit_layer layers (see the module docstring)."""

    family = "kangaroo"
    feature_source = "last_hidden"  # trained against the last hidden state; decoding reads no features
    decode_options = ("threshold",)  # the eval stage sets these from its own drafter config, not the folder's

    def __init__(self, cfg, dims: DrafterDims, target):
        super().__init__()
        n = target.num_layers
        if not 1 <= cfg.exit_layer < n:
            raise DraftsmithError(
                f"drafter.exit_layer={cfg.exit_layer} but target {target.name} has {n} layers: use 1..{n - 1} "
                "(the drafter runs the target's first exit_layer layers)")
        allowed = {"ce", "cosine", *L.DISTRIBUTION_LOSSES}
        bad = [k for k in cfg.losses if k not in allowed]
        if bad or not cfg.losses:
            raise DraftsmithError(f"drafter.losses={dict(cfg.losses)} for kangaroo: use one or more of "
                                  f"{', '.join(sorted(allowed))} (name: weight)")
        self.cfg, self.dims = cfg, dims
        self._target = Shared(target)  # the frozen target must not become a submodule (state dict, ZeRO)
        self.hf_config = shallow_config(target.config, cfg.exit_layer)
        self.adapter = Adapter(target, cfg.exit_layer, self.hf_config)
        self._view_of: Shared | None = None

    @property
    def target(self):
        return self._target.obj

    @classmethod
    def from_target(cls, cfg, target, token_counts=None) -> KangarooDrafter:
        """Built from the loaded target; token_counts is unused (the full vocabulary, the target's LM head)."""
        return cls(cfg, DrafterDims.from_target(target), target).to(target.device)


    def view(self, adapter: Adapter | None = None):
        """The shallow causal LM over `adapter` (default: this drafter's own), rebuilt when the adapter object
        changed (a deep copy of this drafter gets a view over its own adapter, never the original's)."""
        adapter = self.adapter if adapter is None else adapter
        # held in a Shared (deep copies share it, and so never copy the target's modules); keyed by the adapter
        if self._view_of is None or self._view_of.obj[0] is not adapter:
            self._view_of = Shared((adapter, shallow_view(self.target, adapter, self.hf_config, self.cfg.exit_layer)))
        return self._view_of.obj[1]

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """norm_2(a_t) [B, T, H] for every position (what the LM head reads)."""
        return self.view().base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.lm_head(hidden.to(self.target.dtype)).float()

    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted cfg.losses terms (module docstring); metrics loss/<name>, acc/1."""
        if "cosine" in self.cfg.losses:  # before anything is computed
            require_last_hidden(signal, "kangaroo's cosine loss")
        ids = signal.input_ids
        T = ids.shape[1]
        h = self.hidden(ids, signal.attention_mask)
        logits = self.logits(h)
        valid = shifted((signal.loss_mask > 0) & (signal.attention_mask > 0), 1, T)  # row t scores token t+1
        target_logits = signal.logits
        target_arg = target_logits.argmax(-1)
        total = logits.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        for name, w in self.cfg.losses.items():
            if name == "cosine":
                term = L.cosine(h, signal.last_hidden, valid)
            elif name == "ce":
                term = L.ce(logits, target_arg, valid)
            else:
                term = L.DISTRIBUTION_LOSSES[name](logits, target_logits, valid)
            total = total + w * term
            metrics[f"loss/{name}"] = (w * term).detach()
        metrics["acc/1"] = ratio(logits.argmax(-1) == target_arg, valid)
        return total, floats(metrics)

    def as_drafter(self, target=None) -> KangarooDecoding:
        """The decoding drafter over this adapter (a copy in the target's dtype when they differ)."""
        target = self.target if target is None else target
        adapter = self.adapter
        if adapter.norm.weight.dtype != target.dtype:
            adapter = copy.deepcopy(adapter).to(target.dtype)
        lm = self.view(adapter)
        head = self._modules.get("draft_head")  # drafter.draft_vocab: the kept rows of the target's LM head
        if head is not None:  # (drafters/vocab_trim.py); a view of the view, so the shared one stays whole
            from drafters.vocab_trim import view

            out = lm.get_output_embeddings()
            lm = view(lm, {next(n for n, m in lm.named_modules() if m is out): head})
        return KangarooDecoding(lm, target.vocab_size, self.cfg.threshold)


class KangarooDecoding(LMTreeDrafter):
    """The shallow view drafting with its own static KV cache (drafters.lm_drafter), plus the second early exit:
    `stop_below`, which decoding/tree.py's chain builder reads (None = no early exit)."""

    def __init__(self, view, vocab_size: int, threshold: float):
        super().__init__(view, vocab_size=vocab_size, name="kangaroo")
        self.stop_below = float(threshold) if threshold > 0 else None
