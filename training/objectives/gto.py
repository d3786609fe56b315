"""GTO - Group Tree Optimization (Hu et al., 2025): fine-tune an EAGLE drafter on the reward of the draft
tree the decoder builds, against a frozen reference copy of its starting point.

    python train.py stage=train drafter=eagle3 objective=gto drafter.checkpoint=runs/demo/train/final run.name=demo-gto
    python -m pytest -q tests/training/test_gto.py tests/training/test_gto_reward.py

Per micro-batch (trees and rewards: training/objectives/tree_reward.py):
1. Positions: each sequence's rows whose first draft is an assistant token are cut into groups of m
   adjacent rows; K groups per sequence, evenly spread (deterministic: resume needs no extra state).
2. Trees: at every position, the tree the decoder would build (eval.tree, top-k children, never sampled)
   with the current drafter M, and with the frozen reference M0 (drafter.checkpoint).
3. Reward: one target forward per sequence scores every node of both trees; per branch
   L_i = sum_j prod_{k<=j} p_target(x_k | prefix, x_<k), r = (1/eta) log sum_i exp(eta L_i).
4. Debiased, group-standardised advantage: R = r(T) - r(T_ref); A = (R - mean_group) / (std_group + delta).
5. Ratio along the longest accepted sequence S (the path a greedy verification of T accepts, length l):
   s = exp((log M(S) - log M0(S)) / max(l, 1)); L_GTO = -mean(min(s A, clip(s, 1 - eps, 1 + eps) A)).
Total loss = token_weight * drafter.loss(signal) + weight * L_GTO (defaults 1 and 0.5).
When M equals M0 every R is 0, so A = 0 and L_GTO has no gradient: the token loss moves M first.

Metrics: the drafter's own, plus loss/gto (weighted surrogate), gto/reward (mean r(T)), gto/reward_ref,
gto/accept_len (mean l: greedy accepted drafts per tree), gto/ratio (mean s), gto/clip_frac, gto/trees.
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from decoding.tree import build_tree
from drafters.common import shifted
from training.objectives.tree_reward import (
    BatchedTreeDrafter,
    accepted_paths,
    chain_logprob,
    prefix_state,
    target_node_logprobs,
    tree_reward,
)

FAMILIES = ("eagle1", "eagle3")


def select_positions(signal, group_size: int, groups: int) -> list[torch.Tensor]:
    """Per sequence, rows [G, m] of G <= groups groups of m adjacent positions. Row t qualifies when its
    tree's first drafts predict an assistant token (loss_mask[t+2]); runs of qualifying rows are cut into
    groups from their start, and `groups` of those are taken evenly spread over the sequence."""
    assistant = (signal.loss_mask > 0) & (signal.attention_mask > 0)
    S, T = assistant.shape
    ok = shifted(assistant, 2, max(T - 1, 1)).cpu()
    out = []
    for s in range(S):
        starts, run = [], 0
        for t, good in enumerate(ok[s].tolist()):
            run = run + 1 if good else 0
            if run and run % group_size == 0:
                starts.append(t - group_size + 1)
        c = len(starts)
        if c > groups:  # evenly spread: the centre of each of `groups` equal slices
            starts = [starts[(2 * j + 1) * c // (2 * groups)] for j in range(groups)]
        rows = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(group_size)
        out.append(rows.view(-1, group_size).to(signal.input_ids.device))
    return out


def same_trees(a, b) -> torch.Tensor:
    """[P] bool: tree p of `a` has the same tokens and shape as tree p of `b`."""
    if a.tokens.shape != b.tokens.shape:
        return torch.zeros(a.tokens.shape[0], dtype=torch.bool, device=a.tokens.device)
    return (a.tokens == b.tokens).all(1) & (a.parents == b.parents).all(1)


def group_advantages(rewards: torch.Tensor, delta: float) -> torch.Tensor:
    """A = (R - mean) / (std + delta) within each group (rows of `rewards` [G, m]; population std)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + delta)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's clipped surrogate, negated for minimisation: -mean(min(s A, clip(s, 1-eps, 1+eps) A))."""
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()


class GTOObjective:
    """(drafter, signal) -> (loss, metrics) for objective=gto. `reference` is M0 (frozen here)."""

    def __init__(self, ocfg, tree_cfg, target, reference):
        ocfg.check()  # GTOConfig's ranges (conf/schema/objective.py), again for a config changed in code
        tree_cfg.check()
        self.cfg, self.tree_cfg, self.target = ocfg, tree_cfg, target
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def _check(self, drafter) -> None:
        if getattr(drafter, "family", None) != self.reference.family:
            raise DraftsmithError(f"objective=gto: the drafter is {getattr(drafter, 'family', type(drafter).__name__)} "
                                  f"but the reference checkpoint is {self.reference.family}: set drafter= to match")
        vocab = getattr(drafter, "draft_vocab_size", None)
        if vocab is not None and self.tree_cfg.kind == "dynamic" and self.tree_cfg.top_k > vocab:
            raise DraftsmithError(f"eval.tree.top_k={self.tree_cfg.top_k} exceeds the drafter's {vocab}-token draft "
                                  "vocabulary: lower eval.tree.top_k")
        p = drafter.fc.weight
        if self.reference.fc.weight.dtype != p.dtype or self.reference.fc.weight.device != p.device:
            self.reference.to(device=p.device, dtype=p.dtype)  # e.g. bf16 under DeepSpeed: M0 must match M

    def __call__(self, drafter, signal):
        self._check(drafter)
        token_loss, metrics = drafter.loss(signal)
        gto, extra = self.gto_loss(drafter, signal)
        c = self.cfg
        total = (token_loss if c.token_weight == 1 else c.token_weight * token_loss) + c.weight * gto
        metrics["loss/gto"] = c.weight * float(gto.detach())
        metrics.update(extra)
        return total, metrics

    def gto_loss(self, drafter, signal) -> tuple[torch.Tensor, dict[str, float]]:
        """The surrogate L_GTO (with gradient through the drafter) and the gto/* metrics."""
        c, ref = self.cfg, self.reference
        feats = signal.features if drafter.feature_source == "features" else signal.last_hidden
        if feats is None:
            raise DraftsmithError(f"objective=gto drafts trees from the target's {drafter.feature_source}, but this "
                                  "batch has none: train online (train.mode=online) or cache them in data_gen")
        ids = signal.input_ids
        per_seq = select_positions(signal, c.group_size, c.groups)
        if not any(r.numel() for r in per_seq):
            zero = torch.zeros((), device=ids.device)
            return zero, {"gto/reward": 0.0, "gto/reward_ref": 0.0, "gto/accept_len": 0.0, "gto/ratio": 1.0,
                          "gto/clip_frac": 0.0, "gto/trees": 0.0}
        states = prefix_state(drafter, ids, feats)
        with torch.no_grad():
            ref_states = prefix_state(ref, ids, feats)
        rs, refs, logm, logm0, lens = [], [], [], [], []
        for s, rows in enumerate(per_seq):
            if rows.numel() == 0:
                continue
            rows = rows.flatten()
            P = rows.shape[0]
            tree = build_tree(BatchedTreeDrafter(drafter, states[s], rows), self.tree_cfg, P, sample=False,
                              device=ids.device, checked=True)
            ref_tree = build_tree(BatchedTreeDrafter(ref, ref_states[s], rows), self.tree_cfg, P, sample=False,
                                  device=ids.device, checked=True)
            (lp, greedy), (lp_ref, _) = target_node_logprobs(self.target, ids[s], rows, [tree, ref_tree], c.group_size)
            anc = tree.ancestor_mask()
            r = tree_reward(lp, tree, c.eta, anc)[0]
            rs.append(r)
            # Identical trees have identical rewards: take them from the same scores, so R is exactly 0 where
            # M drafts what M0 drafts. The two trees sit in different rows of one batched target forward,
            # and a CPU may round rows differently (AVX-512 blocking: 2.3348424 vs 2.3348427).
            refs.append(torch.where(same_trees(tree, ref_tree), r.detach(), tree_reward(lp_ref, ref_tree, c.eta)[0]))
            toks, n = accepted_paths(tree, greedy, anc)
            logm.append(chain_logprob(drafter, states[s], rows, toks, n))
            with torch.no_grad():
                logm0.append(chain_logprob(ref, ref_states[s], rows, toks, n))
            lens.append(n)
        r, r_ref, lens = torch.cat(rs), torch.cat(refs), torch.cat(lens)
        with torch.no_grad():
            adv = group_advantages((r - r_ref).view(-1, c.group_size), c.adv_eps).flatten()
        ratio = torch.exp((torch.cat(logm) - torch.cat(logm0)) / lens.clamp_min(1))
        loss = clipped_surrogate(ratio, adv, c.clip_eps)
        ratio = ratio.detach()
        stats = torch.stack([r.mean(), r_ref.mean(), lens.float().mean(), ratio.mean(),
                             ((ratio - 1).abs() > c.clip_eps).float().mean(), torch.tensor(float(r.numel()))])
        names = ("gto/reward", "gto/reward_ref", "gto/accept_len", "gto/ratio", "gto/clip_frac", "gto/trees")
        return loss, dict(zip(names, stats.tolist()))


def load_reference(cfg, target):
    """M0: the drafter in cfg.drafter.checkpoint (a train/final folder), frozen."""
    from conf.schema import project_path
    from drafters.registry import drafter_class

    if cfg.drafter.name not in FAMILIES:
        raise DraftsmithError(f"objective=gto builds EAGLE draft trees at training time, not drafter={cfg.drafter.name}: "
                              "use drafter=eagle3 or drafter=eagle1")
    if not cfg.drafter.checkpoint:
        raise DraftsmithError("objective=gto fine-tunes a converged drafter: set drafter.checkpoint=<a train/final "
                              "folder> (it is also the frozen reference), e.g. drafter.checkpoint=runs/demo/train/final")
    return drafter_class(cfg.drafter.name).from_pretrained(project_path(cfg.drafter.checkpoint), target)


def build_gto(cfg, target):
    """The objective for `objective=gto`: the reference from drafter.checkpoint, trees as eval.tree."""
    if target is None:
        raise DraftsmithError("objective=gto scores draft trees with the target: build it with the loaded target")
    return GTOObjective(cfg.objective, cfg.eval.tree, target, load_reference(cfg, target))
