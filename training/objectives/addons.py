"""HASS, GRIFFIN and CORAL training add-ons for the EAGLE families (objective=hass, griffin, coral).

    python train.py stage=train drafter=eagle3 objective=hass
    python train.py stage=train drafter=eagle1 objective=griffin objective.align_steps=3
    python -m pytest -q tests/training/test_hass.py tests/training/test_griffin.py

Both are options of the drafters' own unrolled loss (drafters.eagle_base.UnrollOptions), so the step
alignment, masks and weights are the family's:
- HASS (Zhang et al., 2025): every step adds topk_weight x (-sum over the target's top-K tokens of
  p_i log q_i), K = 10 ("harmonized objective distillation"), and "harmonized context alignment": in step
  j the most recent j-1 positions the query sees are the drafter's own earlier features. EAGLE-3's
  training-time test already attends that way (drafters.layers.ttt_attend: a depth-j node's view); what
  HASS's training code adds, and `context_alignment` switches on, is that those fed-back features are
  constants: no gradient flows back into earlier steps. EAGLE-1 trains one step by default; under these
  objectives it unrolls `align_steps` steps with the same attention.
- GRIFFIN (Hu et al., 2025): a row stays in the loss of step j+1 only while the true token is among the
  drafter's top-3 at step j, cumulatively (a tree drafting top-3 children would still be on that path),
  plus 0.5 x the top-K term; its training code builds on HASS's, so context alignment is on by default.
- CORAL (Weng et al., 2025): "cross-step representation alignment": every step i >= 1 adds align_weight x
  drafters.losses.cross_step_align between its hidden states and step 0's at the same positions (step 0's
  detached: it reads the target's true features and is the reference), so the features later steps feed
  back look like those the first step computes. Its LM-head grouping is a drafter option
  (drafter.head_groups, drafters/head_groups.py), independent of the objective.
Metrics add loss/align (CORAL), and, for GRIFFIN, keep/<depth> (fraction of assistant rows still trained).
"""
from __future__ import annotations

import dataclasses

from conf.errors import DraftsmithError
from drafters.eagle_base import UnrollOptions

FAMILIES = ("eagle1", "eagle3")  # drafters whose loss unrolls steps and takes UnrollOptions


def unroll_options(ocfg, keep_topk: int = 0) -> UnrollOptions:
    """UnrollOptions from a HASSConfig / GRIFFINConfig (their ranges: conf/schema/objective.py)."""
    ocfg.check()  # again, for a config changed in code after it was built
    return UnrollOptions(topk_weight=float(ocfg.topk_weight), topk_k=int(ocfg.topk_k), keep_topk=int(keep_topk),
                         detach_context=bool(ocfg.context_alignment), steps=int(ocfg.align_steps))


def _check_family(cfg) -> None:
    if cfg.drafter.name not in FAMILIES:
        raise DraftsmithError(
            f"objective={cfg.objective.name} trains the unrolled steps of EAGLE drafters, not drafter={cfg.drafter.name}: "
            f"use drafter=eagle3 or drafter=eagle1, or objective=token")


def options_objective(options: UnrollOptions):
    """(drafter, signal) -> drafter.loss(signal, options)."""
    def objective(drafter, signal):
        return drafter.loss(signal, options)
    objective.options = options
    return objective


def build_hass(cfg, target=None):
    _check_family(cfg)
    return options_objective(unroll_options(cfg.objective))


def build_griffin(cfg, target=None):
    _check_family(cfg)
    return options_objective(unroll_options(cfg.objective, cfg.objective.keep_topk))


def build_coral(cfg, target=None):
    _check_family(cfg)
    ocfg = cfg.objective
    base = unroll_options(ocfg)
    return options_objective(dataclasses.replace(base, align_weight=float(ocfg.align_weight),
                                                 align_temperature=float(ocfg.temperature)))
