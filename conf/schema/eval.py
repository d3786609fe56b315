"""`eval=` group: benchmarks, sampling and draft-tree shape for the built-in speculative decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from conf.errors import DraftsmithError

# Verification rules: lossless (token-level: chain rule / SpecInfer / point masses), traversal (Traversal
# Verification, sequence-level leaf-to-root; lossless), or Medusa's typical acceptance (lossy).
ACCEPTANCE = ("lossless", "traversal", "typical")
# Draft-tree shapes the decoder builds (decoding/tree.py); a new kind adds its name here and its checks below.
TREE_KINDS = ("chain", "static", "dynamic", "opt")
OPT_BUDGETS = ("cost", "fixed")  # opt: the node budget chosen each cycle from the cost model, or fixed
BRANCHING = ("static", "dynamic")  # kinds that branch, so `delay` (a single path first) means something


@dataclass
class TreeConfig:
    kind: str = "dynamic"  # one of TREE_KINDS: chain | static | dynamic (EAGLE-2) | opt (OPT-Tree)
    depth: int = 5  # chain length gamma / maximum tree depth
    top_k: int = 8  # dynamic: children per expanded node and nodes kept per depth
    total_tokens: int = 60  # dynamic: nodes kept after the global rerank (the delayed trunk included)
    paths: Optional[List[List[int]]] = None  # static: Medusa-style paths of top-k indices
    # opt (OPT-Tree): depth = most drafter steps, top_k = most nodes expanded per depth, total_tokens = the
    # largest node budget. opt_budget: cost = each cycle verify the node count <= total_tokens that maximises
    # expected tokens/s under the cost model; fixed = always total_tokens nodes.
    opt_budget: str = "cost"
    # opt: stop drafting deeper once a depth adds less than this to E[accepted]; None = the cost model's
    # break-even (the gain one more drafter step must bring to keep expected tokens/s from falling).
    opt_threshold: Optional[float] = None
    # opt: the cost model given instead of measured when the decoder starts: one verification forward takes
    # opt_verify_ms[i] ms at opt_verify_nodes[i] nodes (linear in between), one drafter step opt_draft_ms.
    # None = measured.
    opt_verify_nodes: Optional[List[int]] = None
    opt_verify_ms: Optional[List[float]] = None
    opt_draft_ms: Optional[float] = None
    # Delayed expansion: the first `delay` levels are a single path (the drafter's top-1 token, or one sample
    # for sampled static trees) and the tree branches only below it. 0 = branch at the root. One bound for both
    # branching kinds, 0 <= delay < depth (a trunk as deep as the tree would never branch, and a static tree's
    # trunk of hundreds of tokens ran at a crawl): dynamic trees keep their total depth `depth`; static
    # `paths` hang below the delay-token trunk.
    delay: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """One-line errors for an unusable tree, and static `paths` put into node order (by depth, then
        rank) once here, so builders use them as they are. Idempotent: code that changes a config after it
        was built calls it again."""
        kind = self.kind
        if kind not in TREE_KINDS:
            raise DraftsmithError(f"eval.tree.kind={kind!r} is not a tree kind: use one of {', '.join(TREE_KINDS)}")
        if kind in ("chain", "dynamic", "opt") and self.depth < 1:
            raise DraftsmithError(f"eval.tree.depth={self.depth} must be >= 1 (drafted tokens per path)")
        if kind in ("dynamic", "opt"):  # opt: top_k = most nodes expanded per depth, total_tokens = largest budget
            if self.top_k < 1:
                raise DraftsmithError(f"eval.tree.top_k={self.top_k} must be >= 1 for a {kind} tree")
            if self.total_tokens < 1:
                raise DraftsmithError(
                    f"eval.tree.total_tokens={self.total_tokens} must be >= 1 (nodes kept after the rerank)")
        if kind == "static":
            self.paths = [list(p) for p in static_paths(self.paths)]
        if self.delay < 0:
            raise DraftsmithError(f"eval.tree.delay={self.delay} must be >= 0 (0 = branch at the root)")
        if self.delay and kind not in BRANCHING:
            raise DraftsmithError(f"eval.tree.delay={self.delay} needs a branching tree: a {kind} never branches; "
                                  f"use eval.tree.kind={' or '.join(BRANCHING)}, or eval.tree.delay=0")
        if kind in BRANCHING and self.delay >= max(self.depth, 1):  # one rule for static and dynamic trees
            raise DraftsmithError(f"eval.tree.delay={self.delay} must be < eval.tree.depth={self.depth} (the trunk is "
                                  "a single path: the tree branches below it, within eval.tree.depth levels for a "
                                  "dynamic tree, with the static paths hung under it): lower eval.tree.delay or "
                                  "raise eval.tree.depth")
        if kind == "opt":
            self._check_opt()

    def _check_opt(self) -> None:
        """The opt-only fields (depth, top_k and total_tokens are checked with the dynamic tree's)."""
        if self.opt_budget not in OPT_BUDGETS:
            raise DraftsmithError(f"eval.tree.opt_budget={self.opt_budget!r}: use cost (chosen each cycle from the "
                                  "cost model) or fixed (always total_tokens nodes)")
        if self.opt_threshold is not None and self.opt_threshold < 0:
            raise DraftsmithError(f"eval.tree.opt_threshold={self.opt_threshold} must be >= 0 (or null = the "
                                  "cost model's break-even)")
        nodes, ms, draft = self.opt_verify_nodes, self.opt_verify_ms, self.opt_draft_ms
        if len({x is None for x in (nodes, ms, draft)}) > 1:
            raise DraftsmithError("eval.tree.opt_verify_nodes, opt_verify_ms and opt_draft_ms go together: give all "
                                  "three (a cost model) or none (measured when the decoder starts)")
        if ms is not None:
            if not ms or len(nodes) != len(ms) or not all(n >= 1 for n in nodes) or not all(m > 0 for m in ms):
                raise DraftsmithError(f"eval.tree.opt_verify_nodes={list(nodes)} / opt_verify_ms={list(ms)}: give as "
                                      "many node counts (>= 1) as times (ms > 0), e.g. opt_verify_nodes=[1,60] "
                                      "opt_verify_ms=[20,35]")
            if draft <= 0:
                raise DraftsmithError(f"eval.tree.opt_draft_ms={draft} must be > 0 (one drafter step in ms)")


def static_paths(paths) -> list[tuple[int, ...]]:
    """Validated static paths sorted into node order (by depth, then lexicographically)."""
    if not paths:
        raise DraftsmithError("eval.tree.kind=static needs eval.tree.paths, e.g. [[0],[1],[0,0],[0,1]]")
    out: list[tuple[int, ...]] = []
    for p in paths:
        if (not isinstance(p, (list, tuple)) or not p
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p)):
            raise DraftsmithError(
                f"eval.tree.paths has {p!r}: each path must be a non-empty list of top-k ranks >= 0, e.g. [0, 1]")
        out.append(tuple(p))
    seen = set(out)
    if len(seen) != len(out):
        dup = next(p for p in out if out.count(p) > 1)
        raise DraftsmithError(f"eval.tree.paths has {list(dup)} twice: list every path once")
    for p in out:
        if len(p) > 1 and p[:-1] not in seen:
            raise DraftsmithError(
                f"eval.tree.paths has {list(p)} but not its prefix {list(p[:-1])}: every prefix of a path "
                "must be a path too")
    return sorted(out, key=lambda p: (len(p), p))


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=lambda: ["sharegpt_heldout"])
    temperatures: List[float] = field(default_factory=lambda: [0.0])
    num_prompts: int = 20  # per benchmark
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    tree: TreeConfig = field(default_factory=TreeConfig)
    acceptance: str = "lossless"  # lossless | traversal (sequence-level) | typical (Medusa's, LOSSY: flagged)
    # accept x when p(x) > min(epsilon, alpha * exp(-H(p))); Medusa's defaults posterior_threshold=0.09,
    # posterior_alpha=0.3
    typical_epsilon: float = 0.09
    typical_alpha: float = 0.3
    # FastChat question.jsonl ({"question_id","category","turns"}) or a hub dataset id; None = the hub's
    # HuggingFaceH4/mt_bench_prompts (online only)
    mtbench_path: Optional[str] = None
    # JSONL / JSON / parquet with a `question` field, or a hub id; None = the hub's openai/gsm8k (main, test)
    gsm8k_path: Optional[str] = None
    compare_assistant: bool = True  # small drafters: also time transformers' generate(assistant_model=...)
    warmup: int = 1  # untimed generations (spec and AR each) before timing: kernels, caches, allocator
    # Exact mode: the target verifies and the autoregressive baseline decodes in float32 (a float32 copy of a
    # bf16/fp16 target; drafter=target drafts with it too), so greedy output equals the baseline's token for
    # token and the target drafting for itself reaches tau = depth + 1. Off: the target's own dtype (what
    # serving runs), where a (1+N)-token forward and 1-token forwards round differently and can part ways.
    exact: bool = False
    # CUDA only: replay the target's verification / autoregressive forwards (and LM drafters' steps) at
    # their fixed shapes as CUDA graphs. Ignored on the CPU.
    cuda_graphs: bool = True
    # Longer rendered prompts are skipped (and counted); also capped so prompt + max_new_tokens + the
    # draft tree fit the target's max_position_embeddings.
    max_prompt_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The sampling and size settings a user can get wrong, each a one-line error. Runs when the config
        is built; the eval stage runs it again for a config changed in code after that."""
        self.tree.check()
        if not self.temperatures:
            raise DraftsmithError("eval.temperatures is empty: give at least one, e.g. eval.temperatures=[0]")
        for t in self.temperatures:
            if t < 0:
                raise DraftsmithError(f"eval.temperatures has {t}: temperatures must be >= 0 (0 = greedy)")
        if self.acceptance not in ACCEPTANCE:
            raise DraftsmithError(f"eval.acceptance={self.acceptance!r}: choose lossless, traversal or typical "
                                  "(Medusa's, lossy)")
        if not 0 < self.top_p <= 1:
            raise DraftsmithError(f"eval.top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise DraftsmithError(f"eval.top_k={self.top_k}: must be >= 0 (0 = off)")
        for key in ("num_prompts", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise DraftsmithError(f"eval.{key}={getattr(self, key)}: must be at least 1")
        if self.warmup < 0:
            raise DraftsmithError(f"eval.warmup={self.warmup}: must be >= 0")
