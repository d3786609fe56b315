"""`objective=` group: what the train stage optimises beyond each drafter's own token losses.

    python train.py stage=train objective=token      # imitation (default)
    python train.py stage=train objective=hass       # + top-K distillation, HASS context alignment
    python train.py stage=train objective=griffin    # + GRIFFIN's top-3 row mask, 0.5 x top-K
    python train.py stage=train objective=gto drafter.checkpoint=runs/demo/train/final run.name=demo-gto
    python train.py stage=train drafter=eagle3 objective=coral   # + CORAL's cross-step representation alignment
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from conf.errors import DraftsmithError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")  # objective=on_policy: DistillSpec's divergences
ROLLOUTS = ("drafter", "speculative")  # objective=on_policy: who generates the rollouts


@dataclass
class ObjectiveConfig:
    name: str = MISSING

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The objective's ranges and choices, each a one-line error. Runs when the config is built; the
        objective's builder runs it again for a config changed in code after that."""


def _check_unroll(o) -> None:
    """The top-K term and the aligned steps that HASS and GRIFFIN share."""
    if o.topk_k < 1:
        raise DraftsmithError(f"objective.topk_k={o.topk_k} must be >= 1 ({o.name}: K of the top-K term, paper: 10)")
    if o.topk_weight < 0:
        raise DraftsmithError(f"objective.topk_weight={o.topk_weight} must be >= 0 (0 = no top-K term)")
    if o.align_steps < 1:
        raise DraftsmithError(f"objective.align_steps={o.align_steps} must be >= 1 (HASS aligns 3 steps)")


@dataclass
class TokenObjectiveConfig(ObjectiveConfig):
    """Plain imitation of the target's tokens/distributions with the drafter's `losses`."""

    name: str = "token"


@dataclass
class HASSConfig(ObjectiveConfig):
    """HASS (Zhang et al., 2025) on EAGLE drafters: top-K distillation added to every unrolled step, and
    harmonized context alignment (no gradient through the drafter's own fed-back features)."""

    name: str = "hass"
    topk_k: int = 10  # K of -sum_{i in TopK(p)} p_i log q_i
    topk_weight: float = 1.0
    context_alignment: bool = True  # stop-gradient at fed-back features, as HASS's training code
    align_steps: int = 3  # eagle1: unrolled aligned steps (eagle3 unrolls drafter.ttt_steps)

    def check(self) -> None:
        _check_unroll(self)


@dataclass
class GRIFFINConfig(ObjectiveConfig):
    """GRIFFIN (Hu et al., 2025) training on EAGLE drafters: a row stays in the loss at step j+1 only while
    the true token is in the drafter's top-`keep_topk` at every step so far; plus 0.5 x top-K distillation."""

    name: str = "griffin"
    keep_topk: int = 3
    topk_k: int = 10
    topk_weight: float = 0.5
    context_alignment: bool = True  # GRIFFIN's training builds on HASS's (fed-back features detached)
    align_steps: int = 3  # eagle1: unrolled steps (eagle3 unrolls drafter.ttt_steps)

    def check(self) -> None:
        if self.keep_topk < 1:
            raise DraftsmithError(f"objective.keep_topk={self.keep_topk}: GRIFFIN keeps rows whose true token is "
                                  "in the drafter's top-k; use k >= 1 (paper: 3), or objective=hass for no mask")
        _check_unroll(self)


@dataclass
class GTOConfig(ObjectiveConfig):
    """Group Tree Optimization (Hu et al., 2025): fine-tune a converged EAGLE drafter (drafter.checkpoint,
    also the frozen reference M0) on the expected accepted length of the draft tree the decoder builds
    (eval.tree). Total loss = token_weight * drafter loss + weight * L_GTO."""

    name: str = "gto"
    weight: float = 0.5  # of the PPO-clipped surrogate L_GTO
    token_weight: float = 1.0  # of the drafter's own token loss (EAGLE-3: soft-CE TTT)
    eta: float = 1.0  # tree reward r = (1/eta) log sum_i exp(eta L_i) over branches
    group_size: int = 8  # m: adjacent positions per group (advantages are standardised within a group)
    groups: int = 16  # K: groups per sequence (fewer when a sequence has fewer assistant positions)
    clip_eps: float = 0.2  # PPO clip of the ratio s to [1 - eps, 1 + eps]
    adv_eps: float = 1e-4  # delta in A = (R - mean) / (std + delta)

    def check(self) -> None:
        for key, bad, fix in (("group_size", self.group_size < 2, ">= 2 (advantages compare positions in a group)"),
                              ("groups", self.groups < 1, ">= 1"), ("eta", self.eta <= 0, "> 0 (paper: 1)"),
                              ("clip_eps", not 0 < self.clip_eps < 1, "in (0, 1) (PPO: 0.2)"),
                              ("adv_eps", self.adv_eps <= 0, "> 0"), ("weight", self.weight < 0, ">= 0"),
                              ("token_weight", self.token_weight < 0, ">= 0")):
            if bad:
                raise DraftsmithError(f"objective.{key}={getattr(self, key)} must be {fix}")


OBJECTIVE_SCHEMAS = {
    "token": TokenObjectiveConfig,
    "hass": HASSConfig,
    "griffin": GRIFFINConfig,
    "gto": GTOConfig,
}


@dataclass
class OnPolicyConfig(ObjectiveConfig):
    """On-policy distillation of an independent small drafter (training/on_policy.py): DistillSpec's
    drafter-generated sequences, or Draft-OPD's target-assisted rollouts with replayed rejected drafts."""

    name: str = "on_policy"
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | tvd (DistillSpec's choices)
    beta: float = 0.5  # jsd: JSD[beta] = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
    rollout: str = "drafter"  # drafter: the drafter samples alone (DistillSpec) | speculative (Draft-OPD)
    fraction: float = 1.0  # lambda: probability that a micro-batch is replaced by rollouts (else data_gen's rows)
    temperature: float = 1.0  # rollout sampling temperature (0 = greedy); speculative: the decoder's too
    max_new_tokens: int = 128  # per rollout (also capped by train.max_length)
    draft_depth: int = 4  # speculative: drafted chain length per verification
    max_replays: int = 4  # speculative: rejected draft branches replayed per rollout (0 = committed text only)

    def check(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise DraftsmithError(f"objective.divergence={self.divergence!r}: use one of {', '.join(DIVERGENCES)}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise DraftsmithError(f"objective.beta={self.beta} must be in (0, 1) for jsd (0.5 = symmetric JSD)")
        if self.rollout not in ROLLOUTS:
            raise DraftsmithError(f"objective.rollout={self.rollout!r}: use drafter (DistillSpec: the drafter samples) "
                                  "or speculative (Draft-OPD: target-assisted rollouts)")
        if not 0.0 <= self.fraction <= 1.0:
            raise DraftsmithError(f"objective.fraction={self.fraction} must be in [0, 1] (the share of on-policy "
                                  "micro-batches)")
        if self.temperature < 0 or self.max_new_tokens < 1 or self.draft_depth < 1 or self.max_replays < 0:
            raise DraftsmithError(
                f"objective.temperature={self.temperature}, max_new_tokens={self.max_new_tokens}, draft_depth="
                f"{self.draft_depth}, max_replays={self.max_replays}: need temperature >= 0, max_new_tokens >= 1, "
                "draft_depth >= 1, max_replays >= 0")


@dataclass
class AdaSPECConfig(ObjectiveConfig):
    """AdaSPEC (Hu et al., 2025): forward-KL distillation on the `keep_fraction` tokens of each micro-batch
    with the largest KL(p||q_draft) - KL(p||q_ref), q_ref a frozen drafter distilled first (`reference`)."""

    name: str = "adaspec"
    reference: str | None = None  # a trained small drafter folder, e.g. runs/<name>/train/final
    keep_fraction: float = 0.4  # the paper's filter fraction k (0.4 in every reported setting)

    def check(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise DraftsmithError(f"objective.keep_fraction={self.keep_fraction} must be in (0, 1] (the paper uses 0.4)")


OBJECTIVE_SCHEMAS["on_policy"] = OnPolicyConfig
OBJECTIVE_SCHEMAS["adaspec"] = AdaSPECConfig


@dataclass
class CORALConfig(ObjectiveConfig):
    """CORAL (Weng et al., 2025) on EAGLE drafters: every unrolled step i >= 1 adds align_weight x the
    cross-step alignment of its hidden states with step 0's at the same positions (drafters.losses.
    cross_step_align, a soft-label InfoNCE at `temperature`). The HASS fields stack HASS on top (off here,
    so objective=coral alone measures the alignment term)."""

    name: str = "coral"
    align_weight: float = 0.5
    temperature: float = 0.1  # of the cosine similarities (InfoNCE's tau)
    topk_k: int = 10
    topk_weight: float = 0.0  # HASS's top-K distillation (1.0 in HASS)
    context_alignment: bool = False  # HASS's stop-gradient at fed-back features
    align_steps: int = 3  # eagle1: unrolled steps (eagle3 unrolls drafter.ttt_steps)

    def __post_init__(self) -> None:
        if not self.align_weight > 0:
            raise DraftsmithError(f"objective.align_weight={self.align_weight} must be > 0 (coral: 0.5; "
                                  "for no alignment use objective=token or objective=hass)")
        if not self.temperature > 0:
            raise DraftsmithError(f"objective.temperature={self.temperature} must be > 0 (coral: 0.1; "
                                  "smaller = sharper contrast between positions)")


OBJECTIVE_SCHEMAS["coral"] = CORALConfig
