"""PARD: a target-independent parallel drafter (An et al., 2025). A small causal LM on the target's tokenizer
reads the context followed by k-1 mask tokens and drafts k tokens in one forward.

    python train.py stages=[data_gen,train,eval] drafter=pard run.name=p1
    python train.py stage=train drafter=pard drafter.init=runs/s1/train/final      # adapt a trained small LM
    python train.py stage=export export=hf run.name=p1 drafter=pard
    python -m pytest -q tests/drafters/test_pard.py

Model: any HF causal LM, built like the `small` drafter (drafters/small_lm.py: fresh target-shaped config
or a checkpoint, optional LoRA); it never reads the target's hidden states, so one trained PARD drafter
serves every target that shares its tokenizer. Input [x_0..x_t, m, m, ..., m] (k-1 copies of one mask token
m at positions t+1..t+k-1): the output at x_t predicts x_{t+1}, the output at the j-th mask x_{t+j+1}.

Mask token (`mask_token_id`): by default one new embedding row (and LM-head row) is appended, id = the
model's old vocabulary size, initialised at the mean of the existing rows (transformers' mean resizing). A
new row cannot collide with any token of text, and no tokenizer needs reserved ids; its column is past the
target's vocabulary, so it is never drafted. An existing id (a reserved special token of a large tokenizer)
may be given instead. The id is stored in the model's config as `pard_token`, the field vLLM's parallel
drafting reads, so the saved folder and the `hf` export carry it.

Training with conditional drop-token (COD). For every anchor t the training row holds the plain sequence
(depth 1: x_t predicts x_{t+1}) and, appended after it, mask entries M(t, j), j = 1..k-1, at position id
t+j, predicting x_{t+j+1}. M(t, j) attends to x_0..x_t and to M(t, 1..j), never to x_{t+1}.., exactly what
the mask positions see when decoding. Drawing every mask of every anchor would cost k times the plain
sequence; COD keeps M(t, j) only when u_t < rho_j with one u_t ~ U(0, 1) per anchor and
rho_j = max(retain^j, retain_min): the kept depths of an anchor are always 1..J, so a kept mask's
predecessors (its keys and values) are always there, and depth j keeps a share rho_j of the anchors.
Defaults retain 0.7, retain_min 0.2, k = 5: rho = 0.7, 0.49, 0.34, 0.24, so a row holds about 2.8 T
positions instead of 5 T. Chains whose targets are all outside the loss (prompt tokens) are dropped too.
Loss: `losses` (default forward_kl against the target's distribution for the same token, like `small`;
`ce` alone, `drafter.losses.forward_kl=0 +drafter.losses.ce=1`, trains on the data tokens without the target,
whose forward the train stage then skips), one
mean over every kept prediction of every depth; `acc/d` per depth.

Decoding (`PardTreeDrafter`): each cycle one forward reads the committed tokens not read yet plus k-1
masks; the committed tokens' KV entries stay in the drafter's cache and the masks' are dropped at once.
The k rows of logits are the depth-1..k distributions whatever the path (like Medusa's heads), so a chain,
a static tree or a dynamic tree up to depth k costs one drafter forward a cycle.
"""
from __future__ import annotations

import torch

from conf.errors import DraftsmithError
from conf.schema.drafter import PardConfig
from drafters.base import TargetSignal
from drafters.common import floats, logits_at_depth, target_positions, token_objective
from drafters.lm_drafter import LMTreeDrafter
from drafters.small_lm import SmallDrafter

MASK_FIELD = "pard_token"  # the model config's field holding the mask token id (vLLM's name for it)
K_FIELD = "pard_k"  # ... and the tokens drafted per forward


def cod_plan(attention_mask: torch.Tensor, loss_mask: torch.Tensor, k: int, retain: float, retain_min: float,
             u: torch.Tensor | None = None) -> torch.Tensor:
    """keep [B, T, k-1] bool: mask entry M(t, j) (column j-1) is in the training row. `u` [B, T] are the
    per-anchor uniforms (drawn from torch's global generator when None: checkpoints save its state, so a
    resumed run draws the same entries). Nested in j by construction; an entry is dropped when its target
    x_{t+j+1} is past the row's end or padding, and a chain is cut after its last target in the loss."""
    B, T = attention_mask.shape
    dev = attention_mask.device
    if k < 2:
        return torch.zeros(B, T, 0, dtype=torch.bool, device=dev)
    if u is None:
        u = torch.rand(B, T).to(dev)
    rho = torch.tensor([max(retain ** j, retain_min) for j in range(1, k)], device=dev)
    keep = u[..., None] < rho  # [B, T, k-1]
    real = attention_mask.bool()
    loss = loss_mask.bool() & real
    target_real = torch.zeros(B, T, k - 1, dtype=torch.bool, device=dev)
    target_loss = torch.zeros_like(target_real)
    for j in range(1, k):  # the target of M(t, j) is x_{t+j+1}
        target_real[:, :T - j - 1, j - 1] = real[:, j + 1:]
        target_loss[:, :T - j - 1, j - 1] = loss[:, j + 1:]
    keep &= target_real  # right padding: still nested in j
    # an entry is worth computing when it or a deeper kept entry of its chain is in the loss
    useful = (keep & target_loss).flip(-1).cummax(-1).values.flip(-1)
    return keep & useful


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor, mask_id: int):
    """The training rows: (ids [B, L], positions [B, L], visibility [B, 1, L, L] bool, anchor [B, E],
    depth [B, E]) with L = T + E, the row's T tokens first, then its kept mask entries (anchor -1 / depth 0
    for padding slots, which see only themselves)."""
    B, T = input_ids.shape
    dev = input_ids.device
    flat = keep.flatten(1)  # [B, T*(k-1)], (t, j) order
    per_row = flat.sum(1)
    E = int(per_row.max()) if flat.numel() else 0
    L = T + E
    b, f = flat.nonzero(as_tuple=True)
    slot = flat.long().cumsum(1)[b, f] - 1
    km1 = max(keep.shape[-1], 1)
    t, j = f // km1, f % km1 + 1
    anchor = torch.full((B, E), -1, dtype=torch.long, device=dev)
    depth = torch.zeros(B, E, dtype=torch.long, device=dev)
    anchor[b, slot], depth[b, slot] = t, j
    ids = torch.cat([input_ids, torch.full((B, E), mask_id, dtype=input_ids.dtype, device=dev)], 1)
    pos = torch.cat([torch.arange(T, device=dev).expand(B, T), (anchor + depth).clamp_min(0)], 1)
    vis = torch.zeros(B, L, L, dtype=torch.bool, device=dev)
    vis[:, :T, :T] = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    vis[:, :T, :T] &= attention_mask.bool()[:, None, :] | torch.eye(T, dtype=torch.bool, device=dev)
    cols = torch.arange(T, device=dev)
    vis[:, T:, :T] = cols[None, None, :] <= anchor[..., None]  # the context up to the anchor
    same = (anchor[:, :, None] == anchor[:, None, :]) & (depth[:, None, :] <= depth[:, :, None])
    same &= (anchor >= 0)[:, None, :]
    vis[:, T:, T:] = same | torch.eye(E, dtype=torch.bool, device=dev)  # its own chain's shallower masks
    return ids, pos, vis[:, None], anchor, depth


class PardDrafter(SmallDrafter):
    """A small causal LM trained to draft k tokens per forward through mask tokens."""

    family = "pard"

    def __init__(self, cfg: PardConfig, model, target):
        super().__init__(cfg, model, target)
        mask = getattr(model.config, MASK_FIELD, None)
        if mask is None:
            raise DraftsmithError(f"the PARD drafter model has no {MASK_FIELD} in its config: build it with "
                                  "drafter=pard (from_target), or load a folder a PARD run saved")
        self.mask_id = int(mask)
        setattr(model.config, K_FIELD, int(cfg.k))  # beside the mask id in every saved or exported config.json

    @classmethod
    def adapt(cls, model, cfg: PardConfig, target):
        """Give the model its mask token: a new embedding row by default (kept when the init is already a
        PARD model), else the given existing id, checked against the embedding rows and the target's
        special tokens."""
        rows = model.get_input_embeddings().weight.shape[0]
        mask = cfg.mask_token_id
        if mask is None:
            mask = getattr(model.config, MASK_FIELD, None)
            if mask is None:
                model.resize_token_embeddings(rows + 1, mean_resizing=True)
                mask = rows
        elif mask >= rows:
            raise DraftsmithError(f"drafter.mask_token_id={mask} is outside the drafter's {rows} embedding rows: "
                                  f"use an unused id below {rows}, or null to add a mask row")
        else:
            special = {target.tokenizer.pad_token_id, target.tokenizer.bos_token_id, *target.eos_token_ids}
            if mask in special:
                raise DraftsmithError(f"drafter.mask_token_id={mask} is one of the target's bos/eos/pad tokens, "
                                      "which appear in its text: use an unused id, or null to add a mask row")
        setattr(model.config, MASK_FIELD, int(mask))
        return model

    @classmethod
    def lora_extra(cls, model) -> dict:
        """With LoRA the embeddings are frozen: train the mask token's row (peft's trainable tokens)."""
        return {"trainable_token_indices": [int(getattr(model.config, MASK_FIELD))]}

    @property
    def losses(self) -> dict[str, float]:
        """The weighted loss terms; a zero weight drops its term (`drafter.losses.forward_kl=0
        +drafter.losses.ce=1` is how the command line replaces the default)."""
        return {n: w for n, w in self.cfg.losses.items() if w}

    @property
    def needs_target(self) -> bool:
        """False when the loss is `ce` on the data tokens alone: the train stage then skips the target."""
        return set(self.losses) != {"ce"}

    # --- training ---------------------------------------------------------------------------------------
    def loss(self, signal: TargetSignal) -> tuple[torch.Tensor, dict[str, float]]:
        """One mean of `losses` over the depth-1 rows and every kept mask entry (COD)."""
        # training draws from torch's generator (checkpointed: a resumed run draws the same); held-out evaluation
        # from its own fixed one, so it is repeatable and leaves the training draws untouched
        B, T = signal.input_ids.shape
        u = None if self.training else torch.rand(B, T, generator=torch.Generator().manual_seed(0))
        keep = cod_plan(signal.attention_mask, signal.loss_mask, self.cfg.k, self.cfg.retain, self.cfg.retain_min, u)
        ids, pos, vis, anchor, depth = pack(signal.input_ids, signal.attention_mask, keep, self.mask_id)
        logits = self.model(input_ids=ids, attention_mask=vis, position_ids=pos).logits
        rows = [(*target_positions(signal, 1), None, 1)]  # depth 1: the plain next-token rows
        for j in range(1, self.cfg.k):
            b, e = ((depth == j) & signal.loss_mask.bool().gather(1, (anchor + j + 1).clamp(0, T - 1))).nonzero(
                as_tuple=True)
            rows.append((b, anchor[b, e], T + e, j + 1))
        n_all = sum(len(b) for b, *_ in rows)
        total = logits.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for b, t, col, shift in rows:
            if not len(b):
                continue
            out = logits[b, t if col is None else col]
            value, terms, acc = token_objective(out, signal, b, t, shift, self.losses)
            share = len(b) / n_all
            total = total + share * value
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + share * self.losses[name] * v.detach()
            metrics[f"acc/{shift}"] = acc
        metrics.update({f"loss/{n}": v for n, v in sums.items()})
        metrics["pard/positions_per_token"] = torch.tensor(ids.shape[1] / T)
        return total, floats(metrics)

    # --- decoding ---------------------------------------------------------------------------------------
    def as_drafter(self, target):
        return PardTreeDrafter(self.plain_model(), self.mask_id, self.cfg.k, vocab_size=self.vocab_size)


class PardTreeDrafter(LMTreeDrafter):
    """One forward per cycle: the committed tokens not read yet + k-1 masks; the k distributions serve every
    tree node up to depth k. Only the committed tokens' KV entries stay in the cache."""

    def __init__(self, model, mask_id: int, k: int, vocab_size: int | None = None):
        super().__init__(model, vocab_size=vocab_size, name="pard")
        self.mask_id, self.k = int(mask_id), int(k)
        self.max_depth = self.k  # eval cuts a deeper chain / dynamic tree to k (decoding.tree.fit_depth)
        self.depth_why = f"drafts {self.k} tokens per forward"  # eval's note when it cuts the tree
        self.masks = torch.full((1, self.k - 1), self.mask_id, dtype=torch.long, device=self.device)
        self.depth_logits: torch.Tensor | None = None  # [1, k, V] for the current root

    def _forwards(self) -> dict[str, int]:
        # the last committed token's row and the k-1 mask rows; draft_at: the rows in self.at (fixed shapes)
        return {"draft": self.k, "draft_at": None}

    @torch.no_grad()
    def expand(self, tree, frontier: torch.Tensor) -> torch.Tensor:
        if self.run is None or self.pending is None:
            raise RuntimeError("PardTreeDrafter.expand called before start")
        frontier = frontier.to(self.device)
        if tree.num_nodes == 0:  # every builder expands the root first: the cycle's one forward
            self._draft()
        return logits_at_depth(self.depth_logits, tree, frontier,
                               f"pard drafts {self.k} tokens per forward, so at most {self.k} deep: set the eval "
                               f"tree depth to <= {self.k} or train with a larger drafter.k")

    def _draft(self) -> None:
        self.run.discard()
        if self.fixed is not None:
            return self._draft_fixed()
        n = self.pending.shape[1]
        ids = torch.cat([self.pending, self.masks], 1)
        Q = ids.shape[1]
        self._room(Q)
        pos = torch.arange(Q, device=self.device)[None]
        vis = torch.ones(Q, Q, dtype=torch.bool, device=self.device).tril()  # masks: context + earlier masks
        logits = self.run(ids, pos, vis, "draft", graph=not self.first)
        self.forwards += 1
        self.run.keep(list(range(n)))  # the committed tokens' entries; the masks' are dropped
        self.depth_logits = self._to_vocab(logits.float()).clone()  # kept past later (graph) calls
        self.pending, self.first = self.pending[:, :0], False

    def _draft_fixed(self) -> None:
        """_draft over the padded committed buffer (decoding/cycle.py): [P committed slots, k-1 masks]; the
        masks sit right after the `count` real tokens and see only those, the logits kept are row count - 1
        and the mask rows."""
        ids, count = self.fixed
        P, dev = ids.shape[1], self.device
        Q = P + self.k - 1
        self._room(Q)
        r = torch.arange(Q, device=dev)
        is_mask = r >= P
        pos = torch.where(is_mask, count + r - P, r)[None]
        causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
        vis = torch.where(is_mask[:, None], (r[None, :] < count) | (is_mask[None, :] & causal), causal)
        self.at = torch.cat([(count - 1).clamp(min=0).view(1), r[P:]])
        logits = self.run(torch.cat([ids, self.masks], 1), pos, vis, "draft_at", graph=False)
        self.forwards += 1
        self.run.keep_fixed(None, count)  # the committed tokens' entries; the masks' are dropped
        self.depth_logits.copy_(self._to_vocab(logits.float()))
