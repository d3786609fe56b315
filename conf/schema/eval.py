"""`eval=` group: benchmarks, sampling and draft-tree shape for the built-in speculative decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from conf.errors import DraftsmithError

ACCEPTANCE = ("lossless", "typical")  # verification rules: lossless, or Medusa's typical acceptance (lossy)


@dataclass
class TreeConfig:
    kind: str = "dynamic"  # chain | static | dynamic (EAGLE-2) | opt (OPT-Tree)
    depth: int = 5  # chain length gamma / maximum tree depth
    top_k: int = 8  # dynamic: children per expanded node and nodes kept per depth
    total_tokens: int = 60  # dynamic: nodes kept after the global rerank
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


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=lambda: ["sharegpt_heldout"])
    temperatures: List[float] = field(default_factory=lambda: [0.0])
    num_prompts: int = 20  # per benchmark
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    tree: TreeConfig = field(default_factory=TreeConfig)
    acceptance: str = "lossless"  # lossless | typical (Medusa's, LOSSY: flagged in every report)
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
        if not self.temperatures:
            raise DraftsmithError("eval.temperatures is empty: give at least one, e.g. eval.temperatures=[0]")
        for t in self.temperatures:
            if t < 0:
                raise DraftsmithError(f"eval.temperatures has {t}: temperatures must be >= 0 (0 = greedy)")
        if self.acceptance not in ACCEPTANCE:
            raise DraftsmithError(
                f"eval.acceptance={self.acceptance!r}: choose lossless or typical (Medusa's, lossy)")
        if not 0 < self.top_p <= 1:
            raise DraftsmithError(f"eval.top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise DraftsmithError(f"eval.top_k={self.top_k}: must be >= 0 (0 = off)")
        for key in ("num_prompts", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise DraftsmithError(f"eval.{key}={getattr(self, key)}: must be at least 1")
        if self.warmup < 0:
            raise DraftsmithError(f"eval.warmup={self.warmup}: must be >= 0")
