"""The built-in speculative decoder: draft a tree, verify it with one target forward, keep the accepted
path; plus the autoregressive baseline on the same sampling rule and the same fast KV-cache machinery.

    python -m pytest -q tests/decoding/test_decoder.py

    from decoding.decoder import SpeculativeDecoder
    dec = SpeculativeDecoder(target, drafter, cfg.eval.tree, temperature=0.0)
    tokens, stats = dec.generate(prompt_ids, max_new_tokens=128)          # stats.tau, stats.as_dict()
    base, base_stats = dec.generate_autoregressive(prompt_ids, max_new_tokens=128)

One cycle: the target has read the committed tokens up to (not including) the root = its own last
token. build_tree drafts N nodes; the target reads [root, nodes] in one forward with a tree mask and
depth-correct positions on top of its KV cache; the acceptance rule (decoding/verify.py) picks the accepted path
and the bonus token; the cache keeps exactly the root and the accepted entries; the drafter gets
commit(accepted + bonus, target features at [root, accepted]).

Fast path (decoding/kvcache.py), shared by both decoders so the speedup is measured against the best
autoregressive decoding this code does: the target's KV cache is a preallocated StaticCache compacted in
place, inputs go through per-length preallocated buffers, the acceptance result reaches the host in one
transfer per cycle (the only sync), phases are timed with CUDA events (no extra syncs), and on CUDA
(`cuda_graphs`) the verification and autoregressive forwards are replayed as CUDA graphs.

Exact mode (`exact=True`): the target verifies and the baseline decodes in float32 (a float32 copy when the
target is in bf16/fp16). In bf16 a (1+N)-token forward and N+1 one-token forwards sum in different orders, so
greedy outputs can part at a near-tie; in float32 they agree, and the target drafting for itself reaches
tau = depth + 1.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass, field

import torch

from conf.errors import DraftsmithError
from conf.schema.eval import ACCEPTANCE
from decoding.cycle import FixedCycle, supports
from decoding.kvcache import StaticRunner, model_forward
from decoding.opt_tree import OptCost, measure_counts, needs_cost
from decoding.regions import decode_loop
from decoding.tree import build_tree, check_tree_attention, static_plan, tree_nodes
from decoding.verify import Accepted, SamplingRule, accept_paths, cycle_summary, tree_block
from runtime.clock import DeviceClock


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens returned (after cutting at max_new_tokens / EOS)
    cycles: int = 0  # target forwards after the prefill
    cycle_tokens: int = 0  # tokens those forwards produced (accepted + bonus), before any cut
    drafter_forwards: int | None = None  # the drafter model's forwards (drafters that count them), prompt read included
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
        out.update(drafter_forwards_per_cycle=None if self.drafter_forwards is None else self.drafter_forwards / c)
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
            if s.drafter_forwards is not None:
                out.drafter_forwards = (out.drafter_forwards or 0) + s.drafter_forwards
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
        raise DraftsmithError(f"acceptance={acceptance!r} is not a rule: use lossless, traversal or typical (lossy)")


_FLOAT32_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float32_target(target):
    """The target itself when it is float32, else a float32 copy of it (made once per target): exact mode
    verifies and decodes with it so a k-token forward and k one-token forwards agree at T = 0."""
    if target.dtype == torch.float32:
        return target
    twin = _FLOAT32_TWINS.get(target)
    if twin is None:
        model = copy.deepcopy(target.model).to(torch.float32)
        twin = type(target)(model, target.tokenizer, target.feature_layers, name=target.name,
                            chat_template=getattr(target, "_chat_template", None))
        _FLOAT32_TWINS[target] = twin
    return twin


def _target_call(target, cache, ids, mask, pos, logits: bool):
    """Target.forward (logits, tapped features, last hidden) over a static cache."""
    return target(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits=logits)


def target_runner(target, features: str | None, graphs: bool) -> StaticRunner:
    """The target's forwards over one static cache: "prefill" (last row's logits), "verify" (every row's
    logits) and "ar" (last row's); with `features` ("features" | "last_hidden") prefill and verify also
    return that TargetOutput field for the drafter, otherwise no hidden states are kept at all."""
    def with_features(all_rows):
        def fn(ids, mask, pos, cache):
            out = _target_call(target, cache, ids, mask, pos, all_rows)
            return out.logits, getattr(out, features)
        return fn

    def logits_only(keep):
        def fn(ids, mask, pos, cache):
            out = model_forward(target.model, cache, input_ids=ids, attention_mask=mask, position_ids=pos,
                                logits_to_keep=keep)
            return out.logits, None
        return fn

    fns = {"prefill": with_features(False) if features else logits_only(1),
           "verify": with_features(True) if features else logits_only(0), "ar": logits_only(1)}
    return StaticRunner(fns, target.config, target.device, target.dtype, graphs=graphs)


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


def _prefill(run: StaticRunner, ids: torch.Tensor, capacity: int):
    """Reset the cache and read the prompt: (last logits [1, V], features or None)."""
    P = ids.shape[1]
    run.reset(capacity)
    pos = torch.arange(P, device=ids.device)[None]
    logits, feats = run(ids, pos, torch.ones(P, P, dtype=torch.bool, device=ids.device).tril(), "prefill",
                        graph=False)
    run.keep(list(range(P)))
    return logits[:, -1].float(), feats


class SpeculativeDecoder:
    """Lossless speculative decoding of one sequence at a time on any HF causal LM (drafters.target.Target).

    exact: verify and decode the baseline in float32 (see the module docstring). cuda_graphs: replay the
    target's fixed-shape forwards as CUDA graphs (CUDA only; ignored on the CPU)."""

    def __init__(self, target, drafter, tree_cfg, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, acceptance: str = "lossless", typical_epsilon: float = 0.09,
                 typical_alpha: float = 0.3, sample: bool | None = None, exact: bool = False,
                 cuda_graphs: bool = True):
        if drafter.vocab_size != target.vocab_size:
            raise DraftsmithError(
                f"drafter {drafter.name} has vocab {drafter.vocab_size} but target {target.name} has "
                f"{target.vocab_size}: build the drafter for this target (same tokenizer and vocabulary)")
        check_sampling(temperature, top_p, top_k, acceptance)
        tree_cfg.check()
        check_tree_attention(target.model, f"target {target.name}")
        self.target, self.drafter, self.tree_cfg = target, drafter, tree_cfg
        self.rule = SamplingRule(temperature, top_p, top_k, acceptance, typical_epsilon, typical_alpha)
        self.sample = sample
        self.exact, self.cuda_graphs = bool(exact), bool(cuda_graphs)
        self.verifier = float32_target(target) if exact else target
        self.feature_source = getattr(drafter, "feature_source", "features") if drafter.uses_features else None
        self._run: StaticRunner | None = None
        self._cycle: FixedCycle | None = None  # the fixed-shape draft / verify programs (decoding/cycle.py)
        if tree_cfg.kind == "static":  # its per-depth index tensors, made once here rather than in a cycle
            static_plan(tree_cfg.paths, target.device)
        # OPT-Tree's cost model: the config's, else measured on the first generate and kept for this decoder
        self.opt_cost: OptCost | None = OptCost.from_config(tree_cfg) if tree_cfg.kind == "opt" else None

    @classmethod
    def from_config(cls, target, drafter, eval_cfg, temperature: float) -> SpeculativeDecoder:
        """From conf.schema.eval.EvalConfig (one of its temperatures)."""
        return cls(target, drafter, eval_cfg.tree, temperature, eval_cfg.top_p, eval_cfg.top_k,
                   eval_cfg.acceptance, eval_cfg.typical_epsilon, eval_cfg.typical_alpha,
                   exact=eval_cfg.exact, cuda_graphs=eval_cfg.cuda_graphs)

    @property
    def runner(self) -> StaticRunner:
        """The target's static cache and buffers, shared by both decoders (one sequence at a time)."""
        if self._run is None:
            self._run = target_runner(self.verifier, self.feature_source, self.cuda_graphs)
        return self._run

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
        clock = DeviceClock(ids.device)
        st = DecodeStats(prompt_tokens=ids.shape[1], acceptance=rule.acceptance, lossy=rule.lossy,
                         temperature=rule.temperature)
        if max_new_tokens <= 0:
            return torch.zeros(0, dtype=torch.long), st
        if self.opt_cost is None and self.tree_cfg.kind == "opt" and needs_cost(self.tree_cfg):
            self.opt_cost = self.measure_opt_cost()  # before timing starts: a one-off per decoder
        t_begin = clock.wall()
        run = self.runner
        room = max_new_tokens + tree_nodes(self.tree_cfg) + 1
        logits, feats = _prefill(run, ids, ids.shape[1] + room)
        root = rule.next_token(logits, generator)  # [1], stays on the device
        drafter.prepare(room, self.cuda_graphs)
        forwards0 = getattr(drafter, "forwards", None)
        drafter.start(torch.cat([ids, root[:, None]], 1), self._for_drafter(feats))
        tokens = [int(root)]
        done = tokens[0] in eos or max_new_tokens <= 1
        st.time_prefill = clock.wall() - t_begin
        marks = []
        fixed = not done and supports(drafter, self.tree_cfg, rule.acceptance if rule.temperature > 0 else "greedy")
        if fixed:
            if self._cycle is None:
                self._cycle = FixedCycle(self, self.cuda_graphs and ids.device.type == "cuda")
            self._cycle.begin(run, root, generator)
        with decode_loop():
            if fixed:
                marks = self._cycle.loop(run, st, tokens, eos, max_new_tokens, generator, clock, on_cycle,
                                         self._count)
                done = True
            while not done:
                t0 = clock.mark()
                tree = build_tree(drafter, self.tree_cfg, 1, rule.temperature, rule.top_p, rule.top_k, generator,
                                  self.sample, device=ids.device, checked=True, cost=self.opt_cost)
                t1 = clock.mark()
                in_ids, pos, vis, anc = tree_block(tree, root)
                logits, feats = run(in_ids, pos, vis[0], "verify")
                path, bonus = accept_paths(tree, logits.float(), rule, generator, anc)
                D = path.shape[1]
                host = cycle_summary(tree, path[0], bonus).tolist()  # the cycle's one host sync
                t2 = clock.mark()
                n, attempted, depth = host[2], host[1], host[3]
                nodes = host[4:4 + n]
                produced = host[4 + D:4 + D + n] + [host[0]]
                if on_cycle is not None:
                    on_cycle(tree, Accepted(nodes, host[0]))
                keep_dev = torch.cat([path.new_zeros(1), path[0, :n] + 1])  # rows of [root, nodes...] to keep
                run.keep([0] + [1 + i for i in nodes], keep_dev)
                self._count(st, depth, n, attempted, len(produced))
                for t in produced:
                    tokens.append(t)
                    if t in eos or len(tokens) >= max_new_tokens:
                        done = True
                        break
                if not done:
                    root = bonus
                    new_ids = torch.cat([tree.tokens[0, path[0, :n]], bonus])[None]
                    drafter.commit(new_ids, self._for_drafter(feats[:, keep_dev] if feats is not None else None))
                marks.append((t0, t1, t2, clock.mark()))
        drafter.close()
        if forwards0 is not None:
            st.drafter_forwards = drafter.forwards - forwards0
        st.new_tokens = len(tokens)
        st.time_total = clock.wall() - t_begin
        for t0, t1, t2, t3 in marks:
            st.time_draft += clock.span(t0, t1)
            st.time_verify += clock.span(t1, t2)
            st.time_other += clock.span(t2, t3)
        return torch.tensor(tokens, dtype=torch.long), st

    def measure_opt_cost(self, context: int = 128, reps: int = 5) -> OptCost:
        """OPT-Tree's cost model on this machine: the median time of one verification forward of 1 + n tokens
        over a `context`-token cache, for a few node counts n up to eval.tree.total_tokens (the drafter's
        step time is measured while drafting). A synthetic context: the forward's cost depends on shapes,
        not on the tokens. The acceptance rule's own time is left out (small, and nearly flat in n)."""
        run, dev, V = self.runner, self.target.device, self.target.vocab_size
        counts = measure_counts(self.tree_cfg.total_tokens)
        ids = (torch.arange(context, device=dev) * 7 % V)[None]
        _prefill(run, ids, context + counts[-1] + 1)
        clock, points = DeviceClock(dev), []
        for n in counts:
            block = (torch.arange(1 + n, device=dev) * 11 % V)[None]
            pos = torch.arange(1 + n, device=dev)[None]
            vis = torch.ones(1 + n, 1 + n, dtype=torch.bool, device=dev).tril()
            took = []
            for _ in range(reps + 1):  # the first run warms this shape up
                t0 = clock.wall()
                run(block, pos, vis, "verify")
                took.append(clock.wall() - t0)
                run.keep([])
            ms = 1000 * sorted(took[1:])[len(took[1:]) // 2]
            # a forward over more tokens never costs less: a dip below a smaller count is load noise
            points.append((n, max([ms] + [m for _, m in points])))
        return OptCost(points, source="measured")

    def _for_drafter(self, feats: torch.Tensor | None) -> torch.Tensor | None:
        """Target features in the dtype the drafter was built for (exact mode computes them in float32)."""
        return feats if feats is None or feats.dtype == self.target.dtype else feats.to(self.target.dtype)

    @staticmethod
    def _count(st: DecodeStats, depth: int, n: int, attempted: bool, produced: int) -> None:
        """One cycle's stats: n drafts accepted of a tree `depth` deep; `attempted`: the last accepted node
        (or the root) had children, so depth n + 1 was tried."""
        st.cycles += 1
        st.cycle_tokens += produced
        grow = depth - len(st.depth_attempted)
        if grow > 0:
            st.depth_attempted.extend([0] * grow)
            st.depth_accepted.extend([0] * grow)
        for d in range(n):
            st.depth_attempted[d] += 1
            st.depth_accepted[d] += 1
        if n < depth and attempted:
            st.depth_attempted[n] += 1

    def generate_autoregressive(self, prompt_ids, max_new_tokens: int, eos_ids=None,
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DecodeStats]:
        """The baseline with this decoder's sampling rule, target (float32 in exact mode) and cache machinery."""
        return autoregressive_generate(self.verifier, prompt_ids, max_new_tokens, self.rule, eos_ids, generator,
                                       runner=self.runner)


@torch.no_grad()
def autoregressive_generate(target, prompt_ids, max_new_tokens: int, rule: SamplingRule | None = None,
                            eos_ids=None, generator: torch.Generator | None = None, exact: bool = False,
                            runner: StaticRunner | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """The baseline: one target forward per token, the decoder's warp and static KV-cache path (tau = 1).
    exact: decode with the float32 copy of a bf16/fp16 target. `runner`: a decoder's (reuses its cache)."""
    rule = rule or SamplingRule()
    check_sampling(rule.temperature, rule.top_p, rule.top_k, "lossless")
    ids = _prompt_tensor(prompt_ids, target.device)
    eos = _eos(target, eos_ids)
    model = float32_target(target) if exact else target
    run = runner or target_runner(model, None, graphs=False)
    clock = DeviceClock(ids.device)
    st = DecodeStats(prompt_tokens=ids.shape[1], acceptance="autoregressive", temperature=rule.temperature)
    if max_new_tokens <= 0:
        return torch.zeros(0, dtype=torch.long), st
    t_begin = clock.wall()
    logits, _ = _prefill(run, ids, ids.shape[1] + max_new_tokens + 1)
    tok = rule.next_token(logits, generator)
    tokens = [int(tok)]
    t0 = clock.wall()
    st.time_prefill = t0 - t_begin
    zero = torch.zeros(1, 1, dtype=torch.long, device=ids.device)
    one = torch.ones(1, 1, dtype=torch.bool, device=ids.device)
    while tokens[-1] not in eos and len(tokens) < max_new_tokens:
        logits, _ = run(tok.view(1, 1), zero, one, "ar")
        run.keep([0])
        tok = rule.next_token(logits[:, -1].float(), generator)
        tokens.append(int(tok))  # the step's one host sync
        st.cycles += 1
        st.cycle_tokens += 1
    st.time_verify = clock.wall() - t0
    st.new_tokens = len(tokens)
    st.time_total = clock.wall() - t_begin
    return torch.tensor(tokens, dtype=torch.long), st
