"""`drafter=` group: one dataclass per drafter family.

Dimensions are never set here: every drafter is built from the loaded target's config. `losses`
maps loss names (see drafters/losses.py) to weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from conf.errors import DraftsmithError

DRAFT_VOCAB_SOURCES = ("data", "generated")


@dataclass
class DrafterConfig:
    name: str = MISSING
    # Trained weights to load for eval/export; None = the run directory's latest train checkpoint.
    checkpoint: Optional[str] = None
    losses: Dict[str, float] = field(default_factory=dict)
    # python train.py stage=eval drafter=medusa drafter.draft_vocab=0.25 drafter.draft_vocab_source=data
    # Draft-time vocabulary (FR-Spec / VocabTrim; eval and export of a trained drafter, never training): the
    # draft LM head keeps the `draft_vocab` most frequent tokens, an int count or a float fraction in (0, 1]
    # of the target vocabulary; null = the full head. The target still verifies over its full vocabulary.
    draft_vocab: Any = None
    # where the frequencies come from: `data` = data_gen's assistant-token counts (FR-Spec), `generated` =
    # the same counts of a data_gen run with data.regenerate=true, i.e. of the target's own answers (VocabTrim)
    draft_vocab_source: str = "data"
    draft_vocab_counts: Optional[str] = None  # that data_gen folder (or its run directory); null = this run's

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The draft-vocabulary settings, each a one-line error (the size against the target's vocabulary
        is checked when the target is loaded: drafters.vocab_trim.draft_vocab_size)."""
        v = self.draft_vocab
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (isinstance(v, int) and v < 1) or (isinstance(v, float) and v > 1)):
            raise DraftsmithError(f"drafter.draft_vocab={v!r}: give a token count (an int >= 1), a fraction in "
                                  "(0, 1] of the target vocabulary, or null for the full vocabulary")
        if self.draft_vocab_source not in DRAFT_VOCAB_SOURCES:
            raise DraftsmithError(f"drafter.draft_vocab_source={self.draft_vocab_source!r}: use data (data_gen's "
                                  "token counts) or generated (counts over the target's regenerated answers)")


@dataclass
class NgramConfig(DrafterConfig):
    """Prompt-lookup drafter: continue the longest recent n-gram that occurred earlier in the context."""

    name: str = "ngram"
    max_ngram: int = 3
    min_ngram: int = 1
    # where the lookup runs: device = tensor code over a preallocated buffer (a fixed-shape step, part of the
    # draft graph on a GPU), host = a walk over the committed tokens (fewer, cheaper ops: faster on a CPU,
    # where no graph hides the launch count), auto = device on CUDA, host elsewhere
    lookup: str = "auto"

    def check(self) -> None:
        super().check()
        if self.lookup not in ("auto", "device", "host"):
            raise DraftsmithError(f"drafter.lookup={self.lookup!r}: use auto, device or host")


@dataclass
class TargetDrafterConfig(DrafterConfig):
    """The target drafting for itself: an upper bound (tau = depth + 1 at T=0), a correctness check."""

    name: str = "target"


@dataclass
class OracleConfig(DrafterConfig):
    """Replays the target's own autoregressive continuation (computed first, untimed): the decoder's ceiling."""

    name: str = "oracle"


@dataclass
class Eagle1Config(DrafterConfig):
    name: str = "eagle1"
    num_layers: int = 1
    feature_noise: float = 0.2  # training adds uniform noise U(-a/2, a/2), a = feature_noise, to input features
    # smooth_l1 (feature regression), soft_ce (-sum p log q vs the target's distribution: the official
    # EAGLE-1 "CE"), ce (hard CE vs the target's argmax) or any distribution loss in drafters/losses.py
    losses: Dict[str, float] = field(default_factory=lambda: {"smooth_l1": 1.0, "soft_ce": 0.1})

    def check(self) -> None:
        """One-line errors for shapes eagle1 cannot build (at construction and again when the drafter is built).
        The loss names are checked by the drafter, which owns the losses."""
        super().check()
        if self.num_layers < 1:
            raise DraftsmithError(f"drafter.num_layers={self.num_layers}: eagle1 needs at least 1 decoder layer")


@dataclass
class Eagle3Config(DrafterConfig):
    name: str = "eagle3"
    num_layers: int = 1
    # the most frequent assistant tokens (data_gen's counts); None = full target vocab; capped at the target's
    draft_vocab_size: Optional[int] = 32000
    ttt_steps: int = 7  # training-time test: unrolled steps
    step_decay: float = 0.8  # weight of step i is step_decay**i
    # CORAL's LM-head grouping (drafters/head_groups.py): G groups of draft ids and a router; 0 = off
    head_groups: int = 0
    active_groups: int = 1  # groups whose logits decoding computes (the rest are -inf)
    # per step: soft_ce (-sum p log q over the draft vocab), ce (vs the target's argmax) or any distribution loss
    losses: Dict[str, float] = field(default_factory=lambda: {"soft_ce": 1.0})

    def check(self) -> None:
        """One-line errors for shapes and unrolls eagle3 cannot train (at construction and again when the
        drafter is built). The draft vocabulary size is checked where the vocabulary is built (drafters/vocab.py)."""
        super().check()
        if self.num_layers != 1:
            raise DraftsmithError(f"drafter.num_layers={self.num_layers}: eagle3 has exactly one decoder layer "
                                  "(the SGLang LlamaForCausalLMEagle3 layout); set drafter.num_layers=1")
        if self.ttt_steps < 1:
            raise DraftsmithError(f"drafter.ttt_steps={self.ttt_steps}: unroll at least 1 step (official: 7)")
        if self.step_decay <= 0:
            raise DraftsmithError(f"drafter.step_decay={self.step_decay} must be > 0 (official: 0.8)")


@dataclass
class MedusaConfig(DrafterConfig):
    name: str = "medusa"
    num_heads: int = 4
    num_layers: int = 1  # ResBlocks per head
    joint: bool = False  # Medusa-2: train the target jointly through a LoRA adapter
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    head_lr_scale: float = 4.0  # Medusa-2: heads at this multiple of the base lr
    head_weight: float = 0.2  # Medusa-2: L_LM + sum_k head_weight * head_decay**k * CE_k
    head_decay: float = 0.8
    self_distill: bool = True  # Medusa-2: KL to the adapter-off logits instead of CE on data
    losses: Dict[str, float] = field(default_factory=lambda: {"ce": 1.0})

    def check(self) -> None:
        super().check()
        if self.num_heads < 1 or self.num_layers < 0:
            raise DraftsmithError(
                f"medusa needs num_heads >= 1 and num_layers >= 0, got {self.num_heads} and {self.num_layers}")


@dataclass
class HydraConfig(DrafterConfig):
    name: str = "hydra"
    num_heads: int = 4
    mlp_layers: int = 1  # Hydra++: 4
    prefix_layer: bool = False  # Hydra++: one extra decoder layer over the base hidden states
    teacher_loss: bool = False  # Hydra++: soft CE to the base distribution instead of CE on data
    losses: Dict[str, float] = field(default_factory=lambda: {"ce": 1.0})

    def check(self) -> None:
        super().check()
        if self.num_heads < 1 or self.mlp_layers < 1:
            raise DraftsmithError(
                f"hydra needs num_heads >= 1 and mlp_layers >= 1, got {self.num_heads} and {self.mlp_layers}")


@dataclass
class SmallConfig(DrafterConfig):
    """An independent small causal LM sharing the target's tokenizer."""

    name: str = "small"
    init: str = "fresh"  # "fresh" (a small config shaped like the target) or a checkpoint path / hub id
    num_layers: int = 2
    hidden_size: Optional[int] = None  # None = half the target's heads (rounded up) x its head size
    lora_r: int = 0  # >0: train a LoRA adapter instead of all weights (checkpoint init only)
    lora_alpha: int = 16
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    losses: Dict[str, float] = field(default_factory=lambda: {"forward_kl": 1.0})


@dataclass
class KangarooConfig(DrafterConfig):
    """Kangaroo: the target's first `exit_layer` layers (shared, frozen) + a trained adapter + its LM head."""

    name: str = "kangaroo"
    exit_layer: int = 2  # the shallow sub-network: the target's layers 0..exit_layer-1 (checked against the target)
    threshold: float = 0.6  # second early exit: a chain stops after a draft whose top-1 probability is below it
    # soft_ce (-sum p log q vs the target's distribution: the official training loss), cosine (1 - cos between the
    # adapter's normed output and the target's last hidden state), ce, or any distribution loss
    losses: Dict[str, float] = field(default_factory=lambda: {"soft_ce": 1.0})

    def check(self) -> None:
        super().check()
        if self.exit_layer < 1:
            raise DraftsmithError(f"drafter.exit_layer={self.exit_layer} must be >= 1 (the target layers the "
                                  "drafter shares): use 1 up to the target's layer count - 1")
        if not 0 <= self.threshold < 1:
            raise DraftsmithError(f"drafter.threshold={self.threshold} must be in [0, 1) (0 = no early exit; "
                                  "the paper uses 0.6)")


@dataclass
class PardConfig(SmallConfig):
    """PARD: a small causal LM that drafts k tokens in one forward (the context, then k-1 mask tokens)."""

    name: str = "pard"
    k: int = 5  # tokens drafted per forward (the deepest draft-tree level it serves)
    # None = one extra embedding row for the mask token (id = the drafter's old vocabulary size); an int =
    # an existing id the tokenizer never produces in text (e.g. a reserved special token)
    mask_token_id: Optional[int] = None
    # conditional drop-token: the depth-j mask of an anchor is kept with probability max(retain**j, retain_min),
    # nested (kept at j => kept at every shallower depth), so a kept mask always sees all its predecessors
    retain: float = 0.7
    retain_min: float = 0.2

    def check(self) -> None:
        super().check()  # the small drafter's own settings too
        if self.k < 1:
            raise DraftsmithError(f"drafter.k={self.k} must be >= 1 (tokens drafted per forward)")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise DraftsmithError(f"drafter.mask_token_id={self.mask_token_id} must be >= 0, or null to add a "
                                  "mask row to the drafter's embeddings")
        for name in ("retain", "retain_min"):
            if not 0 < getattr(self, name) <= 1:
                raise DraftsmithError(f"drafter.{name}={getattr(self, name)} must be in (0, 1] (1 = keep every "
                                      "mask position in training)")


DFLASH_LOSSES = ("hard", "distill")
DFLASH_FUSIONS = ("none", "layerwise")
DFLASH_ATTENTION = ("sdpa", "flex")


@dataclass
class DFlashConfig(DrafterConfig):
    """DFlash (block diffusion drafter): a few decoder layers draft a whole block of tokens in one forward,
    reading the target's tapped features as extra keys/values and the target's own embedding and LM head."""

    name: str = "dflash"
    block_size: int = 16  # B: the block is [anchor, mask x (B-1)], so one forward drafts B-1 tokens
    num_layers: int = 1  # drafter decoder layers (z-lab ships 1 to 5)
    # which tapped target layers the drafter fuses, as indices into the target's hidden states (the same
    # numbering as target.feature_layers: i = the hidden state entering layer i); null = every tap the target
    # has. A list must be a subset of target.feature_layers (the taps data_gen and the decoder produce).
    target_layer_ids: Optional[List[int]] = None
    # the id fed at masked block positions; null = auto: the tokenizer's mask token, else a reserved embedding
    # row past the tokenizer's vocabulary, else the pad token when it is not an EOS token
    mask_token_id: Optional[int] = None
    anchors: int = 64  # blocks (random anchors on scored positions) per training sequence, all in one forward
    # position decay of the loss: w_k = exp(-(k-1)/gamma) for block position k >= 1; null = the published
    # value for the block size (7 for B=16, 4 for B=8, linear between and beyond); 0 = off (uniform weights)
    gamma: Optional[float] = None
    loss: str = "hard"  # hard: CE on the data tokens; distill: soft CE to the target's distribution
    fusion: str = "none"  # none: one fc over the taps (z-lab); layerwise: each layer its own learned tap mix (DFlare)
    attention: str = "sdpa"  # the training block mask: sdpa (a materialised bool mask) or flex (a FlexAttention BlockMask)

    def check(self) -> None:
        """One-line errors for settings DFlash cannot train (the mask token and the taps are checked against
        the target when the drafter is built: drafters/dflash.py)."""
        super().check()
        if not 2 <= self.block_size <= 64:
            raise DraftsmithError(f"drafter.block_size={self.block_size}: use 2..64 (the anchor + at least one "
                                  "mask; z-lab uses 16, Model-Optimizer 8)")
        if not 1 <= self.num_layers <= 5:
            raise DraftsmithError(f"drafter.num_layers={self.num_layers}: dflash has 1 to 5 decoder layers")
        if self.target_layer_ids is not None and (len(self.target_layer_ids) == 0 or min(self.target_layer_ids) < 0
                                                  or len(set(self.target_layer_ids)) != len(self.target_layer_ids)):
            raise DraftsmithError(f"drafter.target_layer_ids={list(self.target_layer_ids)}: give distinct layer "
                                  "indices >= 0 (a subset of target.feature_layers), or null for every tap")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise DraftsmithError(f"drafter.mask_token_id={self.mask_token_id} must be >= 0, or null to pick one "
                                  "from the tokenizer")
        if self.anchors < 1:
            raise DraftsmithError(f"drafter.anchors={self.anchors}: sample at least 1 block per sequence")
        if self.gamma is not None and self.gamma < 0:
            raise DraftsmithError(f"drafter.gamma={self.gamma} must be >= 0 (0 = no position decay), or null for "
                                  "the published value (7 for B=16, 4 for B=8)")
        for field_name, allowed in (("loss", DFLASH_LOSSES), ("fusion", DFLASH_FUSIONS),
                                    ("attention", DFLASH_ATTENTION)):
            if getattr(self, field_name) not in allowed:
                raise DraftsmithError(f"drafter.{field_name}={getattr(self, field_name)!r}: use one of "
                                      f"{', '.join(allowed)}")

    @property
    def decay(self) -> float:
        """The gamma in effect (0 = uniform weights)."""
        if self.gamma is not None:
            return float(self.gamma)
        return 4.0 + 3.0 * (self.block_size - 8) / 8.0  # 7 at B=16, 4 at B=8; 1.75 at the smallest B=2


# name used in conf/drafter/<name>.yaml -> schema
DRAFTER_SCHEMAS = {
    "ngram": NgramConfig,
    "target": TargetDrafterConfig,
    "oracle": OracleConfig,
    "eagle1": Eagle1Config,
    "eagle3": Eagle3Config,
    "medusa": MedusaConfig,
    "hydra": HydraConfig,
    "small": SmallConfig,
    "kangaroo": KangarooConfig,
    "pard": PardConfig,
    "dflash": DFlashConfig,
}
