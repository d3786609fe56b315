"""`objective=` group: what the train stage optimises beyond each drafter's own token losses."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class ObjectiveConfig:
    name: str = MISSING


@dataclass
class TokenObjectiveConfig(ObjectiveConfig):
    """Plain imitation of the target's tokens/distributions with the drafter's `losses`."""

    name: str = "token"


OBJECTIVE_SCHEMAS = {"token": TokenObjectiveConfig}


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


@dataclass
class AdaSPECConfig(ObjectiveConfig):
    """AdaSPEC (Hu et al., 2025): forward-KL distillation on the `keep_fraction` tokens of each micro-batch
    with the largest KL(p||q_draft) - KL(p||q_ref), q_ref a frozen drafter distilled first (`reference`)."""

    name: str = "adaspec"
    reference: str | None = None  # a trained small drafter folder, e.g. runs/<name>/train/final
    keep_fraction: float = 0.4  # the paper's filter fraction k (0.4 in every reported setting)


OBJECTIVE_SCHEMAS["on_policy"] = OnPolicyConfig
OBJECTIVE_SCHEMAS["adaspec"] = AdaSPECConfig
