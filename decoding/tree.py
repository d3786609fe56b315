"""Draft trees: the data structure shared by the speculative decoder and tree-reward training, and the
ways of building one (chain, Medusa-style static paths, EAGLE-2 dynamic, OPT-Tree in decoding/opt_tree.py).

    from decoding.tree import build_tree
    tree = build_tree(drafter, TreeConfig(kind="dynamic", depth=5, top_k=8, total_tokens=60), batch=1)

The tree itself (tokens, parents, depths, draft probabilities, batched over roots) is
decoding/draft_tree.py's DraftTree, re-exported here.

Delayed expansion (TreeConfig.delay = d): static and dynamic trees first draft a single d-node path (top-1, or
one sample for sampled static trees) and branch below its last node.

Only the depth loop is a Python loop; everything else is vectorised over B roots and N nodes, because
tree-reward training builds trees for many positions at once.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from conf.errors import DraftsmithError
from decoding.draft_tree import DraftTree, expand_logits, keep_best
from decoding.opt_tree import OptCost, opt_tree

__all__ = ["DraftTree", "keep_best", "build_tree", "warp_probs", "tree_attention_mask", "check_tree_attention",
           "keep_cache_entries", "fit_depth", "tree_nodes", "static_plan"]  # DraftTree, keep_best: re-exported


# --------------------------------------------------------------------------------------------------
# Shared sampling warp and tree attention
# --------------------------------------------------------------------------------------------------
def warp_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Probabilities [..., V] (float32) after temperature, top-k, then top-p, in transformers' order.
    T = 0 gives the one-hot argmax. The single warp used for target sampling (speculative and
    autoregressive alike) and for sampled drafts, so both sides see the same distributions."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    x = logits / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=True)
        sp = sx.softmax(-1)
        before = sp.cumsum(-1) - sp  # mass of strictly better tokens: the best token is always kept
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, si, before >= top_p)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1)


def tree_attention_mask(visible: torch.Tensor, past_len: int, dtype: torch.dtype,
                        prefix: int = 0) -> torch.Tensor:
    """Additive 4D mask [B, 1, prefix + F, past_len + prefix + K] for feeding `prefix` causal tokens then F
    tree nodes on top of `past_len` cached tokens: every row sees the whole cache and the prefix causally;
    node rows also see the last K columns (earlier tree entries, then the F new ones) marked in
    `visible` [B, F, K] (for a verification: the ancestor mask, K = F)."""
    B, F, K = visible.shape
    dev = visible.device
    rows, cols = prefix + F, past_len + prefix + K
    see = torch.zeros(B, rows, cols, dtype=torch.bool, device=dev)
    see[:, :, :past_len] = True
    see[:, :, past_len:past_len + prefix] = torch.ones(rows, prefix, dtype=torch.bool, device=dev).tril()
    see[:, prefix:, past_len + prefix:] = visible
    zero = torch.zeros((), dtype=dtype, device=dev)
    return torch.where(see, zero, torch.tensor(float("-inf"), dtype=dtype, device=dev)).unsqueeze(1)


def check_tree_attention(model, who: str) -> None:
    """Tree verification and tree drafting pass 4D masks; FlashAttention kernels only do causal/padding
    masks, so a tree would be read with the wrong attention pattern: refuse instead. Sliding-window models
    keep a cache that drops old entries and cannot keep arbitrary tree positions (keep_cache_entries):
    refuse them here, before any decoding, whatever the drafter."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if "flash" in impl:
        raise DraftsmithError(
            f"{who} uses attn_implementation={impl!r}, which cannot apply a tree attention mask: load it with "
            "attn_implementation=sdpa (target.attn_implementation=sdpa) or eager")
    if _sliding(model.config):
        raise DraftsmithError(
            f"{who} uses sliding-window attention (sliding_window={getattr(model.config, 'sliding_window', None)}), "
            "whose KV cache cannot keep arbitrary draft-tree positions: use a full-attention model, or set "
            "sliding_window to null in its config.json when prompt + answer fit in the window")


def _sliding(config) -> bool:
    """Whether the model's DynamicCache (what the decoder and the drafters use) has sliding-window layers."""
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=config).layers
    except (TypeError, ValueError, AttributeError):  # no cache from this config: the decoder says so itself
        return False
    return any(getattr(layer, "is_sliding", False) for layer in layers)


def keep_cache_entries(cache, start: int, keep: list[int]) -> None:
    """Keep the first `start` entries of every layer of a transformers DynamicCache plus the entries at
    start + keep (in that order), dropping the rest: the accepted tree positions after a verification."""
    n = len(keep)
    prefix = keep == list(range(n))
    idx = None
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if getattr(layer, "is_sliding", False):
            raise DraftsmithError(
                "sliding-window KV caches cannot keep arbitrary tree positions: load the model with "
                "use_sliding_window=False (or a non-sliding attention implementation)")
        if not prefix:
            if idx is None:
                idx = torch.tensor(keep, device=layer.keys.device) + start
            # the right-hand side is gathered into a new tensor first, so the in-place write is safe
            layer.keys[..., start:start + n, :] = layer.keys[..., idx, :]
            layer.values[..., start:start + n, :] = layer.values[..., idx, :]
        layer.keys = layer.keys[..., :start + n, :]
        layer.values = layer.values[..., :start + n, :]


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def fit_depth(tree_cfg, max_depth: int | None):
    """The tree a drafter that drafts at most `max_depth` tokens deep can build (head drafters: one head per
    depth; None = no limit): a deeper chain or dynamic tree is cut to max_depth. Static paths are the user's
    own and are kept, so a too-deep one still fails in the drafter with its one-line error. A copy when
    anything changes, else `tree_cfg` itself. A delay that no longer fits is cut to max_depth - 1 (the tree
    still branches at its last level)."""
    if max_depth is None or tree_cfg.kind == "static" or tree_cfg.depth <= max_depth:
        return tree_cfg
    return replace(tree_cfg, depth=max_depth, delay=min(tree_cfg.delay, max_depth - 1))


def tree_nodes(tree_cfg) -> int:
    """The most nodes a tree of this config holds (the verification forward reads 1 + this many tokens)."""
    if tree_cfg.kind == "chain":
        return tree_cfg.depth
    if tree_cfg.kind == "static":
        return tree_cfg.delay + len(tree_cfg.paths or [])
    return tree_cfg.total_tokens  # dynamic, and opt's largest budget


def build_tree(drafter, tree_cfg, batch: int = 1, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None, sample: bool | None = None,
               device: torch.device | str | None = None, checked: bool = False, cost=None,
               cut_on_device: bool = False) -> DraftTree:
    """Build one draft tree per root (B = `batch`) by calling `drafter.expand(partial_tree, frontier)`
    once per depth. `tree_cfg` is a conf.schema.eval.TreeConfig: its own check() validates it (and puts static
    paths into node order) when it is built; here again unless `checked` (callers that build a tree every
    cycle, the decoder and GTO, check it once when they are constructed).

    `sample`: None = chains are sampled from the warped draft distribution at T > 0 and static/dynamic
    trees pick top-k children; True = chains and static trees sample (static siblings i.i.d., verified
    with the SpecInfer rule); False = always top-k. At T = 0 nothing is sampled. `cost`: an OPT-Tree cost
    model (decoding.opt_tree.OptCost; the decoder measures one), else the config's if it gives one.
    `cut_on_device`: a chain that a drafter's `stop_below` ends keeps its depth and marks the rest dead
    (the fixed-shape cycle's way; see _chain)."""
    if not checked:
        tree_cfg.check()
    if temperature < 0:
        raise DraftsmithError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if sample is None:
        sample = tree_cfg.kind == "chain"
    sample = bool(sample) and temperature > 0
    if sample and tree_cfg.kind in ("dynamic", "opt"):
        raise DraftsmithError(f"{tree_cfg.kind} trees pick children by top-k score and cannot be sampled: "
                              "use eval.tree.kind=chain or static for sampled drafts")
    if device is None:
        device = getattr(drafter, "device", "cpu")
    warp = (temperature, top_p, top_k)
    if tree_cfg.kind == "chain":
        return _chain(drafter, tree_cfg.depth, batch, device, sample, warp, generator, cut_on_device)
    # delayed expansion: a single path first (sampled like the tree below it, else top-1), branching below it
    trunk = _chain(drafter, tree_cfg.delay, batch, device, sample, warp, generator) if tree_cfg.delay else None
    if tree_cfg.kind == "static":
        return _static(drafter, tree_cfg.paths, batch, device, sample, warp, generator, trunk)
    if tree_cfg.kind == "opt":
        return opt_tree(drafter, tree_cfg, batch, device, cost or OptCost.from_config(tree_cfg))
    return _dynamic(drafter, tree_cfg.depth - tree_cfg.delay, tree_cfg.top_k, tree_cfg.total_tokens, batch, device,
                    trunk)





def _chain(drafter, depth, B, device, sample, warp, generator, cut_on_device: bool = False) -> DraftTree:
    # Kangaroo's second early exit: a drafter may set `stop_below`; the chain then ends after a draft whose
    # top-1 draft probability (plain softmax) is below it. A function of the drafter's outputs only, so
    # verification stays lossless. Step by step the host stops drafting there (one sync per depth, every
    # root low); with `cut_on_device` (the fixed-shape cycle) the chain keeps its depth and the nodes after
    # the cut are marked dead (`alive`), per root: no sync, the same accepted tokens, no drafter step saved.
    stop_below = getattr(drafter, "stop_below", None)
    tree = DraftTree.empty(B, device)
    frontier = torch.full((B, 1), -1, dtype=torch.long, device=device)
    q_rows, alive = [], []
    ended = None  # [B] bool: a draft before this one ended the chain
    for d in range(depth):
        logits = expand_logits(drafter, tree, frontier)[:, 0]  # [B, V]
        low = logits.softmax(-1).amax(-1) < stop_below if stop_below else None  # this draft ends it
        last = low is not None and not cut_on_device and bool(low.all())
        if sample:
            q = warp_probs(logits, *warp)
            tok = torch.multinomial(q, 1, generator=generator)
            lq = q.gather(1, tok).log()
            q_rows.append(q if ended is None else q * ~ended[:, None])  # a dead node was never drawn
        else:
            lp = logits.log_softmax(-1)
            tok = lp.argmax(-1, keepdim=True)
            lq = lp.gather(1, tok)
        tree = tree.extend(tok, frontier.to(tok.device), lq)
        frontier = torch.full_like(tok, d)
        if low is not None and cut_on_device:
            ended = torch.zeros_like(low) if ended is None else ended
            alive.append(~ended)
            ended = ended | low
        if last:
            break
    if sample:
        q_rows.append(torch.zeros_like(q_rows[-1]))  # the last node has no children
        tree = replace(tree, q=torch.stack(q_rows, 1))
    return replace(tree, chain=True, width_bound=1, alive=torch.stack(alive, 1) if alive else None)


_STATIC_PLANS: dict = {}


def static_plan(paths, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Per depth (frontier node ids [F], rows into the frontier [n_d], sibling ranks [n_d], kmax) of a static
    tree, built once per paths and device: host-to-device copies in the hot loop would each be a sync."""
    key = (tuple(map(tuple, paths)), str(device))
    plan = _STATIC_PLANS.get(key)
    if plan is None:
        paths = [tuple(p) for p in paths]
        index = {p: i for i, p in enumerate(paths)}
        plan = []
        for d in range(1, max(len(p) for p in paths) + 1):
            level = [p for p in paths if len(p) == d]
            parent_ids = sorted({index[p[:-1]] if d > 1 else -1 for p in level})
            fpos = {n: i for i, n in enumerate(parent_ids)}
            plan.append((torch.tensor(parent_ids, dtype=torch.long, device=device),
                         torch.tensor([fpos[index[p[:-1]] if d > 1 else -1] for p in level], device=device),
                         torch.tensor([p[-1] for p in level], device=device), max(p[-1] for p in level) + 1))
        _STATIC_PLANS[key] = plan
    return plan


def _static(drafter, paths, B, device, sample, warp, generator, trunk: DraftTree | None = None) -> DraftTree:
    """The static paths below the root, or below the last node of `trunk` (a delayed tree's single path):
    the plan's node ids shift by the trunk's length and its root (-1) becomes the trunk's last node."""
    tree = DraftTree.empty(B, device) if trunk is None else trunk
    d0 = tree.num_nodes
    q_full = None
    for frontier, rows, ranks, kmax in static_plan(paths, device):
        frontier = (frontier + d0).expand(B, -1)  # -1 (the root) + d0 = the trunk's last node
        logits = expand_logits(drafter, tree, frontier)  # [B, F, V]
        dev = logits.device
        frontier, rows, ranks = frontier.to(dev), rows.to(dev), ranks.to(dev)
        if kmax > logits.shape[-1]:
            raise DraftsmithError(f"eval.tree.paths asks for the rank-{kmax - 1} child but the vocabulary has "
                                  f"only {logits.shape[-1]} tokens: use smaller ranks")
        if sample:
            q = warp_probs(logits, *warp)  # [B, F, V]
            F_, V = q.shape[1:]
            draws = torch.multinomial(q.reshape(-1, V), kmax, replacement=True, generator=generator)
            draws = draws.view(B, F_, kmax)
            tok = draws[:, rows, ranks]  # [B, n_d]
            lq = q[:, rows].gather(2, tok.unsqueeze(-1)).squeeze(-1).log()
            if q_full is None:
                q_full = torch.zeros(B, d0 + len(paths) + 1, V, device=dev)
                if d0:  # the rows the trunk's nodes were drawn from
                    q_full[:, :d0] = trunk.q[:, :d0].to(dev)
            q_full[:, frontier[0] + 1] = q
        else:
            lp = logits.log_softmax(-1)
            topv, topi = lp.topk(kmax, dim=-1)  # [B, F, kmax]
            tok, lq = topi[:, rows, ranks], topv[:, rows, ranks]
        parents = frontier[:, rows]
        tree = tree.extend(tok, parents, lq)
    width = max([kmax for *_, kmax in static_plan(paths, device)] + [1])
    return replace(tree, q=q_full if sample else None, width_bound=width)


def _dynamic(drafter, depth, k, total_tokens, B, device, trunk: DraftTree | None = None) -> DraftTree:
    """EAGLE-2's tree `depth` levels deep below the root, or below the last node of `trunk` (a delayed tree's
    top-1 path, which then counts in total_tokens: its nodes outscore all their descendants, so the rerank
    keeps them first)."""
    tree = DraftTree.empty(B, device) if trunk is None else trunk
    d0 = tree.num_nodes
    frontier = torch.full((B, 1), d0 - 1, dtype=torch.long, device=device)  # -1 = the root
    lp = expand_logits(drafter, tree, frontier).log_softmax(-1)  # [B, 1, V]
    k = min(k, lp.shape[-1])
    topv, topi = lp[:, 0].topk(k, dim=-1)
    dev = topv.device
    trunk_scores = tree.logq.to(dev).cumsum(1)  # [B, d0]: a chain's path scores
    tree = tree.extend(topi, frontier.to(dev).expand(B, k), topv)
    # cumulative draft log-probability of every node so far
    scores = torch.cat([trunk_scores, topv + (trunk_scores[:, -1:] if d0 else 0)], 1)
    last = torch.arange(d0, d0 + k, device=dev).expand(B, k)  # the candidates of the deepest level
    for _ in range(depth - 1):
        # EAGLE-2: expand only the best top_k candidates of the last level ...
        sel = scores.gather(1, last).topk(min(k, last.shape[1]), dim=-1).indices
        frontier = last.gather(1, sel)  # [B, k]
        lp = expand_logits(drafter, tree, frontier).log_softmax(-1)  # [B, k, V]
        topv, topi = lp.topk(k, dim=-1)  # [B, k, k]
        child = (scores.gather(1, frontier).unsqueeze(-1) + topv).flatten(1)
        n0 = tree.num_nodes
        tree = tree.extend(topi.flatten(1), frontier.repeat_interleave(k, dim=1), topv.flatten(1))
        scores = torch.cat([scores, child], 1)
        last = torch.arange(n0, tree.num_nodes, device=dev).expand(B, -1)
    # ... then rerank every candidate globally
    return keep_best(tree, scores, total_tokens)
