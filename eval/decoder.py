"""The built-in speculative decoder: draft a tree, verify it with one target forward, keep the accepted
path; plus the autoregressive baseline on the same sampling rule and KV-cache path.

    python -m pytest -q tests/test_decoder.py

    from eval.decoder import SpeculativeDecoder
    dec = SpeculativeDecoder(target, drafter, cfg.eval.tree, temperature=0.0)
    tokens, stats = dec.generate(prompt_ids, max_new_tokens=128)          # stats.tau, stats.as_dict()
    base, base_stats = dec.generate_autoregressive(prompt_ids, max_new_tokens=128)

One cycle: the target has read the committed tokens up to (not including) the root = its own last
token. build_tree drafts N nodes; the target reads [root, nodes] in one forward with a 4D tree mask and
depth-correct positions on top of its DynamicCache; the acceptance rule (eval/verify.py) picks the
accepted path and the bonus token; the cache keeps exactly the root and the accepted entries; the drafter
gets commit(accepted + bonus, target features at [root, accepted]).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from conf.errors import DraftsmithError
from drafters.tree import build_tree, check_tree_attention, check_tree_config, keep_cache_entries
from eval.verify import ACCEPTANCE, SamplingRule, accept, tree_inputs


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens returned (after cutting at max_new_tokens / EOS)
    cycles: int = 0  # target forwards after the prefill
    cycle_tokens: int = 0  # tokens those forwards produced (accepted + bonus), before any cut
    depth_attempted: list[int] = field(default_factory=list)  # [d-1]: cycles that tried a depth-d node
    depth_accepted: list[int] = field(default_factory=list)  # [d-1]: cycles that accepted a depth-d node
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0  # target forward + acceptance rule
    time_other: float = 0.0  # cache gather, drafter commit, bookkeeping
    time_total: float = 0.0
    acceptance: str = "lossless"
    lossy: bool = False  # True only for typical acceptance at T > 0
    temperature: float = 0.0

    @property
    def tau(self) -> float:
        """Tokens per target forward (the mean accepted length + 1)."""
        return self.cycle_tokens / self.cycles if self.cycles else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def depth_rate(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.depth_accepted, self.depth_attempted)]

    def as_dict(self) -> dict:
        out = asdict(self)
        c = max(self.cycles, 1)
        out.update(tau=self.tau, tokens_per_s=self.tokens_per_s, depth_rate=self.depth_rate,
                   ms_per_cycle={k: 1000 * getattr(self, f"time_{k}") / c for k in ("draft", "verify", "other")})
        return out

    @staticmethod
    def total(stats: list[DecodeStats]) -> DecodeStats:
        """Sum over generations (tau and rates then weight every cycle equally)."""
        out = DecodeStats(acceptance=stats[0].acceptance if stats else "lossless",
                          lossy=any(s.lossy for s in stats), temperature=stats[0].temperature if stats else 0.0)
        for s in stats:
            for k in ("prompt_tokens", "new_tokens", "cycles", "cycle_tokens", "time_prefill", "time_draft",
                      "time_verify", "time_other", "time_total"):
                setattr(out, k, getattr(out, k) + getattr(s, k))
            for name in ("depth_attempted", "depth_accepted"):
                mine, theirs = getattr(out, name), getattr(s, name)
                mine.extend([0] * (len(theirs) - len(mine)))
                for i, v in enumerate(theirs):
                    mine[i] += v
        return out


def check_sampling(temperature: float, top_p: float, top_k: int, acceptance: str) -> None:
    """One-line errors for unusable sampling settings."""
    if temperature < 0:
        raise DraftsmithError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise DraftsmithError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if top_k < 0:
        raise DraftsmithError(f"top_k={top_k} must be >= 0 (0 = off)")
    if acceptance not in ACCEPTANCE:
        raise DraftsmithError(f"acceptance={acceptance!r} is not a rule: use lossless or typical (lossy)")


class _Clock:
    """Wall time that waits for queued GPU work first, so each phase is charged its own kernels."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _prompt_tensor(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise DraftsmithError(f"prompt_ids has shape {tuple(ids.shape)}: give one non-empty prompt, [P] or [1, P]")
    return ids.to(device)


def _eos(target, eos_ids) -> set[int]:
    """EOS ids: the given ones, else the target's (none for a target without tokenizer)."""
    if eos_ids is not None:
        return {int(i) for i in eos_ids}
    return set(target.eos_token_ids) if target.tokenizer is not None else set()


def _prefill(target, rule: SamplingRule, ids: torch.Tensor, generator):
    """The target reads the prompt into a fresh DynamicCache and draws its first token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    out = target(ids, cache=cache, use_cache=True, logits=False)
    return cache, out, rule.next_token(out.logits[:, -1].float(), generator)


class SpeculativeDecoder:
    """Lossless speculative decoding of one sequence at a time on any HF causal LM (drafters.target.Target)."""

    def __init__(self, target, drafter, tree_cfg, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, acceptance: str = "lossless", typical_epsilon: float = 0.09,
                 typical_alpha: float = 0.3, sample: bool | None = None):
        if drafter.vocab_size != target.vocab_size:
            raise DraftsmithError(
                f"drafter {drafter.name} has vocab {drafter.vocab_size} but target {target.name} has "
                f"{target.vocab_size}: build the drafter for this target (same tokenizer and vocabulary)")
        check_sampling(temperature, top_p, top_k, acceptance)
        check_tree_config(tree_cfg)
        check_tree_attention(target.model, f"target {target.name}")
        self.target, self.drafter, self.tree_cfg = target, drafter, tree_cfg
        self.rule = SamplingRule(temperature, top_p, top_k, acceptance, typical_epsilon, typical_alpha)
        self.sample = sample

    @classmethod
    def from_config(cls, target, drafter, eval_cfg, temperature: float) -> SpeculativeDecoder:
        """From conf.schema.eval.EvalConfig (one of its temperatures)."""
        return cls(target, drafter, eval_cfg.tree, temperature, eval_cfg.top_p, eval_cfg.top_k,
                   eval_cfg.acceptance, eval_cfg.typical_epsilon, eval_cfg.typical_alpha)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, eos_ids=None,
                 generator: torch.Generator | None = None, on_cycle=None) -> tuple[torch.Tensor, DecodeStats]:
        """New tokens [n] (at most max_new_tokens, ending at the first EOS) and the decoding stats.
        `generator` (on the target's device) makes sampling reproducible; eos_ids=None = the target's.
        `on_cycle(tree, accepted)` is called after every verification (draft-induced training records
        the drafted tree and what the target accepted of it)."""
        target, drafter, rule = self.target, self.drafter, self.rule
        ids = _prompt_tensor(prompt_ids, target.device)
        eos = _eos(target, eos_ids)
        clock = _Clock(ids.device)
        st = DecodeStats(prompt_tokens=ids.shape[1], acceptance=rule.acceptance, lossy=rule.lossy,
                         temperature=rule.temperature)
        if max_new_tokens <= 0:
            return torch.zeros(0, dtype=torch.long), st
        t_begin = clock()
        cache, out, root = _prefill(target, rule, ids, generator)
        feats = drafter.uses_features
        src = getattr(drafter, "feature_source", "features")  # EAGLE-1 reads last_hidden, EAGLE-3 the taps
        drafter.start(torch.cat([ids, root[:, None]], 1), getattr(out, src) if feats else None)
        past = ids.shape[1]
        tokens = [int(root)]
        done = tokens[0] in eos or max_new_tokens <= 1
        t0 = clock()
        st.time_prefill = t0 - t_begin
        while not done:
            tree = build_tree(drafter, self.tree_cfg, 1, rule.temperature, rule.top_p, rule.top_k, generator,
                              self.sample, device=ids.device)
            t1 = clock()
            in_ids, mask, pos, anc = tree_inputs(tree, root, past, target.dtype)
            vout = target(in_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            acc = accept(tree, vout.logits.float(), rule, generator, anc)[0]
            if on_cycle is not None:
                on_cycle(tree, acc)
            t2 = clock()
            keep = [0] + [1 + i for i in acc.path]  # rows of [root, nodes...] the cache keeps
            keep_cache_entries(cache, past, keep)
            past += len(keep)
            produced = tree.tokens[0, acc.path].tolist() + [acc.bonus]
            self._count(st, tree, acc.path, len(produced))
            for t in produced:
                tokens.append(t)
                if t in eos or len(tokens) >= max_new_tokens:
                    done = True
                    break
            if not done:
                root = torch.tensor([acc.bonus], device=ids.device)
                keep_t = torch.tensor(keep, device=ids.device)
                drafter.commit(torch.tensor([produced], device=ids.device),
                               getattr(vout, src)[:, keep_t] if feats else None)
            t3 = clock()
            st.time_draft += t1 - t0
            st.time_verify += t2 - t1
            st.time_other += t3 - t2
            t0 = t3
        drafter.close()
        st.new_tokens = len(tokens)
        st.time_total = clock() - t_begin
        return torch.tensor(tokens, dtype=torch.long), st

    @staticmethod
    def _count(st: DecodeStats, tree, path: list[int], produced: int) -> None:
        st.cycles += 1
        st.cycle_tokens += produced
        n, depth = len(path), tree.max_depth
        grow = depth - len(st.depth_attempted)
        if grow > 0:
            st.depth_attempted.extend([0] * grow)
            st.depth_accepted.extend([0] * grow)
        for d in range(n):
            st.depth_attempted[d] += 1
            st.depth_accepted[d] += 1
        # the next depth was attempted when the last accepted node (or the root) has children
        if n < depth and bool((tree.parents[0] == (path[-1] if path else -1)).any()):
            st.depth_attempted[n] += 1

    def generate_autoregressive(self, prompt_ids, max_new_tokens: int, eos_ids=None,
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DecodeStats]:
        """The baseline with this decoder's sampling rule (see autoregressive_generate)."""
        return autoregressive_generate(self.target, prompt_ids, max_new_tokens, self.rule, eos_ids, generator)


@torch.no_grad()
def autoregressive_generate(target, prompt_ids, max_new_tokens: int, rule: SamplingRule | None = None,
                            eos_ids=None, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, DecodeStats]:
    """The baseline: one target forward per token, the decoder's warp and KV-cache path (tau = 1)."""
    rule = rule or SamplingRule()
    check_sampling(rule.temperature, rule.top_p, rule.top_k, "lossless")
    ids = _prompt_tensor(prompt_ids, target.device)
    eos = _eos(target, eos_ids)
    clock = _Clock(ids.device)
    st = DecodeStats(prompt_tokens=ids.shape[1], acceptance="autoregressive", temperature=rule.temperature)
    if max_new_tokens <= 0:
        return torch.zeros(0, dtype=torch.long), st
    t_begin = clock()
    cache, _, tok = _prefill(target, rule, ids, generator)
    tokens = [int(tok)]
    t0 = clock()
    st.time_prefill = t0 - t_begin
    while tokens[-1] not in eos and len(tokens) < max_new_tokens:
        out = target(tok[:, None], cache=cache, use_cache=True, logits=False)
        tok = rule.next_token(out.logits[:, -1].float(), generator)
        tokens.append(int(tok))
        st.cycles += 1
        st.cycle_tokens += 1
    st.time_verify = clock() - t0
    st.new_tokens = len(tokens)
    st.time_total = clock() - t_begin
    return torch.tensor(tokens, dtype=torch.long), st
