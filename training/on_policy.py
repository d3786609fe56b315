"""On-policy distillation of an independent small drafter: DistillSpec and Draft-OPD (objective=on_policy).

    python train.py stage=train drafter=small objective=on_policy                                 # DistillSpec
    python train.py stage=train drafter=small objective=on_policy objective.divergence=jsd objective.beta=0.9
    python train.py stage=train drafter=small objective=on_policy objective.rollout=speculative   # Draft-OPD
    python -m pytest -q tests/training/test_on_policy.py tests/training/test_on_policy_train.py

Supervised distillation shows the drafter only the target's text; at decode time it drafts from states its
own proposals created. Here generation and training interleave in one job: before every optimizer step the
train stage calls `prepare`, which replaces each of the step's micro-batches, with probability
`objective.fraction` (lambda; a seeded draw per step and micro-batch index, the same on every rank), by rollouts
made with the drafter's CURRENT weights from the prompts of those data rows (each row's tokens before its first
assistant token). The target then scores every rollout with one forward, the ordinary online
signal, and the loss is the chosen divergence D(p || q) (forward_kl | reverse_kl | jsd[beta] | tvd, from
drafters/losses.py) between the target's and the drafter's next-token distributions. Micro-batches that are
not replaced keep data_gen's rows and get the same divergence on their assistant tokens (and so does eval).

What is trained on, exactly (loss_mask = 1 on token slot t means: the state tokens[:t] predicts slot t):
  rollout=drafter      the drafter samples alone (temperature objective.temperature, its own KV cache through
                       transformers' generate) up to objective.max_new_tokens or EOS; loss on every generated
                       slot (EOS included): the states the drafter itself led to (DistillSpec's on-policy data).
  rollout=speculative  target-assisted rollout with the built-in lossless SpeculativeDecoder (a chain of
                       objective.draft_depth drafted tokens per verification, same temperature for both), so the
                       text follows the target's distribution. Two kinds of rows, scored by the target:
                       - the committed row: prompt + the decoded text, loss on every generated slot; these are
                         the states the drafter drafted from on its accepted path (and the states after each
                         verification's correction or bonus token);
                       - replay rows (Draft-OPD's replay from verification-exposed errors): for a cycle whose
                         root sits at slot r, with drafts d_1..d_g of which the first k were accepted and d_{k+1}
                         rejected (k <= g - 2), the row committed[:r+k+1] + [d_{k+1}, ..., d_g] with loss on the
                         slots of d_{k+2}..d_g: the states the drafter reached after its own rejected proposal,
                         which no target trajectory contains. The state that proposed d_{k+1} is committed[:r+k+1],
                         already a committed-row position. At most objective.max_replays per rollout, drawn
                         uniformly (seeded) when there are more.
                       Together: every state the drafter drafted from during the rollout, accepted or rejected.

Determinism and resume. Which micro-batches roll out, and every sampled token, are pure functions of
(run.seed, optimizer step, rank, micro-batch, row): per-row torch.Generators seeded by `rollout_seed`, no
global RNG touched. The drafter's weights at a step are restored exactly from a checkpoint, so a killed and
rerun job regenerates the same rollouts and ends with the same weights as an uninterrupted one.

ZeRO: stages 0-2 keep whole weights on every rank, so rollouts use the drafter itself. Under ZeRO-3 every rank
gathers the weights once per rolled-out micro-batch (deepspeed.zero.GatheredParameters; the on/off draw is the
same on every rank, so the collective always matches) into a plain copy of the LM that decodes without
partition hooks: decoding lengths differ per rank and must not trigger collectives (LoRA drafters: refused).
Needs train.mode=online: rollouts are new text, so no offline cache can hold the target's view of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial

import torch

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.common import floats, reference_rows, target_positions
from drafters.lm_drafter import LMTreeDrafter


# --------------------------------------------------------------------------------------------------
# Seeds: pure functions of where a rollout sits in the run
# --------------------------------------------------------------------------------------------------
def _hash63(*parts) -> int:
    return int(hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:16], 16) >> 1


def rollout_seed(seed: int, step: int, rank: int, micro: int, row: int) -> int:
    """The 63-bit sampling seed of one rollout row at optimizer step `step` (0-based)."""
    return _hash63("rollout", seed, step, rank, micro, row)


def on_policy_draw(seed: int, step: int, micro: int) -> float:
    """A uniform number in [0, 1) per micro-batch index: it rolls out when the draw is below objective.fraction.
    The same on every rank, so under ZeRO-3 every rank gathers the weights the same number of times."""
    return _hash63("lambda", seed, step, micro) / 2.0**63


# --------------------------------------------------------------------------------------------------
# The loss: one divergence on the loss_mask slots, for data rows and rollouts alike
# --------------------------------------------------------------------------------------------------
def divergence_fn(name: str, beta: float = 0.5):
    """fn(drafter_logits, target_logits) -> mean divergence, by DistillSpec name (one of
    conf.schema.objective.DIVERGENCES; OnPolicyConfig checks the name and jsd's beta)."""
    if name == "jsd":
        return partial(L.jsd, beta=beta)
    return L.DISTRIBUTION_LOSSES[name]


def divergence_loss(model, signal, fn, name: str) -> tuple[torch.Tensor, dict[str, float]]:
    """D(p || q) averaged over the slots t+1 with loss_mask = 1, from the drafter LM's logits at t; acc/1 =
    argmax agreement there. Vocabularies of different widths are compared over the shared id range."""
    logits = model(input_ids=signal.input_ids, attention_mask=signal.attention_mask).logits
    b, t = target_positions(signal, 1)
    q = logits[b, t]
    p = reference_rows(signal, b, t)
    width = min(q.shape[-1], p.shape[-1])
    loss = fn(q[:, :width], p[:, :width])
    acc = (q[:, :width].argmax(-1) == p[:, :width].argmax(-1)).float().mean() if len(b) else loss.new_zeros(())
    return loss, {f"loss/{name}": loss.detach(), "acc/1": acc}


# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------
def prompt_of(ids: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """A data row's prompt: its tokens before the first assistant token (at least one token)."""
    real = int(attention_mask.sum())
    hits = loss_mask[:real].nonzero()
    first = int(hits[0]) if len(hits) else real
    return ids[:max(first, 1)].tolist()


def sample(model, prompts: list[list[int]], caps: list[int], seeds: list[int], temperature: float,
           eos_ids: list[int], pad_id: int) -> list[list[int]]:
    """The drafter LM's own samples (data_gen.regenerate.generate_rows at `temperature`, no nucleus cut)."""
    from data_gen.regenerate import generate_rows

    dev = model.get_input_embeddings().weight.device
    return generate_rows(model, prompts, caps, seeds, temperature, 1.0, eos_ids, pad_id, dev)


@dataclass
class Cycle:
    drafts: list[int]  # the drafted chain d_1..d_g
    accepted: int  # k: leading drafts the target accepted


def speculative_rollout(target, lm_drafter, prompt: list[int], cap: int, depth: int, temperature: float,
                        seed: int, eos_ids: list[int]) -> tuple[list[int], list[Cycle]]:
    """Target-assisted rollout: the built-in SpeculativeDecoder with a chain of `depth` drafts; returns the
    decoded tokens and every cycle's drafted chain with its accepted length."""
    from conf.schema.eval import TreeConfig
    from decoding.decoder import SpeculativeDecoder

    if cap <= 0:
        return [], []
    cycles: list[Cycle] = []
    dec = SpeculativeDecoder(target, lm_drafter, TreeConfig(kind="chain", depth=depth), temperature=temperature)
    gen = torch.Generator(device=target.device).manual_seed(seed)
    tokens, _ = dec.generate(torch.tensor([prompt]), cap, eos_ids=eos_ids, generator=gen,
                             on_cycle=lambda tree, acc: cycles.append(Cycle(tree.tokens[0].tolist(), len(acc.path))))
    return tokens.tolist(), cycles


def replay_rows(prompt: list[int], tokens: list[int], cycles: list[Cycle], max_replays: int,
                seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of the replayed rejected branches (see the module docstring), at most max_replays,
    drawn uniformly with a generator seeded by `seed` when there are more."""
    row = prompt + tokens
    out = []
    r = len(prompt)  # slot of the first cycle's root: the target's first token
    for c in cycles:
        g, k = len(c.drafts), c.accepted
        e = r + k + 1  # slot where the target replaced the rejected d_{k+1}
        if k <= g - 2 and e <= len(row):
            branch = c.drafts[k:]
            out.append((row[:e] + branch, [0] * (e + 1) + [1] * (len(branch) - 1)))
        r = e
    if len(out) > max_replays:
        pick = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))[:max_replays]
        out = [out[i] for i in sorted(pick.tolist())]
    return out


def pack(rows: list[tuple[list[int], list[int]]], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids / attention_mask / loss_mask, rows cut at max_length (training.data.collate's
    layout)."""
    rows = [(ids[:max_length], m[:max_length]) for ids, m in rows]
    B, T = len(rows), max(len(ids) for ids, _ in rows)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long), "loss_mask": torch.zeros((B, T), dtype=torch.long)}
    for b, (ids, m) in enumerate(rows):
        out["input_ids"][b, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][b, :len(ids)] = 1
        out["loss_mask"][b, :len(m)] = torch.tensor(m)
    return out


@dataclass
class RolloutRecord:
    """One rollout row, kept for inspection (tests, debugging): where and with which seed it was drawn."""

    step: int
    micro: int
    row: int
    seed: int
    prompt: list[int]
    tokens: list[int]
    cycles: list[Cycle] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------
class OnPolicyObjective:
    """objective(drafter, signal) -> (loss, metrics), plus `prepare`, the train stage's rollout hook."""

    def __init__(self, cfg, target):
        o = cfg.objective
        o.check()  # OnPolicyConfig's choices and ranges (conf/schema/objective.py), again for code changes
        if cfg.drafter.name != "small":
            raise DraftsmithError(f"objective=on_policy trains drafters that generate on their own, but drafter="
                                  f"{cfg.drafter.name}: use drafter=small")
        if cfg.train.mode != "online":
            raise DraftsmithError("objective=on_policy scores rollouts with the target inside the step, which no "
                                  "offline cache holds: use train.mode=online")
        if cfg.deepspeed.zero_stage == 3 and getattr(cfg.drafter, "lora_r", 0) > 0:
            raise DraftsmithError("objective=on_policy under ZeRO-3 rolls out with a gathered copy of the drafter, "
                                  "which a LoRA-wrapped drafter cannot give: use deepspeed=zero2 or drafter.lora_r=0")
        self.cfg = o
        self.seed = cfg.run.seed
        self.max_length = cfg.train.max_length
        self.target = target
        self.fn = divergence_fn(o.divergence, o.beta)
        tok = target.tokenizer
        self.eos = list(target.eos_token_ids) if tok is not None else []
        pad = tok.pad_token_id if tok is not None else None
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.records: list[RolloutRecord] = []  # the last prepare call's rollouts
        self._share: list[float] = []  # per prepared micro-batch, consumed by the training calls in order

    # --- the loss ------------------------------------------------------------------------------------
    def __call__(self, drafter, signal):
        loss, metrics = divergence_loss(drafter.model, signal, self.fn, self.cfg.divergence)
        # token-weighted over the step by the stage: the share of loss tokens that came from rollouts
        metrics["onpolicy/share"] = self._share.pop(0) if drafter.training and self._share else 0.0
        return loss, floats(metrics)

    # --- the rollouts ---------------------------------------------------------------------------------
    def prepare(self, eng, batches: list[dict], step: int) -> list[dict]:
        """Replace the step's chosen micro-batches by rollouts of the drafter's current weights."""
        rank = eng.env.rank
        self.records, self._share = [], []
        out = []
        for a, batch in enumerate(batches):
            on = on_policy_draw(self.seed, step, a) < self.cfg.fraction
            out.append(self._rollout(eng, batch, step, rank, a) if on else batch)
            self._share.append(float(on))
        return out

    @staticmethod
    def rollout_model(eng):
        """The LM that generates: the drafter's own under ZeRO 0-2 (whole weights on every rank); under ZeRO-3 a
        plain copy built from its gathered weights, so decoding steps (which differ per rank) trigger no
        collective gathers."""
        model = eng.drafter.model
        if eng.zero_stage != 3:
            return model
        with eng.full_state_context():
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dev = next(iter(state.values())).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # its random init is overwritten:
            clone = type(model)(model.config)  # keep the run's RNG stream as it would be under ZeRO 0-2
        clone = clone.to(device=dev, dtype=model.dtype)
        clone.load_state_dict(state)
        return clone

    def _rollout(self, eng, batch: dict, step: int, rank: int, micro: int) -> dict:
        o = self.cfg
        B = batch["input_ids"].shape[0]
        prompts = [prompt_of(batch["input_ids"][b], batch["loss_mask"][b], batch["attention_mask"][b])
                   for b in range(B)]
        caps = [min(o.max_new_tokens, self.max_length - len(p)) for p in prompts]
        seeds = [rollout_seed(self.seed, step, rank, micro, b) for b in range(B)]
        model = self.rollout_model(eng)
        was_training = model.training
        model.eval()  # no dropout while generating; restored below
        try:
            if o.rollout == "drafter":
                news = sample(model, prompts, caps, seeds, o.temperature, self.eos, self.pad)
                cycles = [[] for _ in prompts]
            else:
                lm = eng.drafter.as_drafter(self.target) if model is eng.drafter.model else LMTreeDrafter(
                    model, vocab_size=self.target.vocab_size)
                done = [speculative_rollout(self.target, lm, p, c, o.draft_depth, o.temperature, s, self.eos)
                        for p, c, s in zip(prompts, caps, seeds)]
                news, cycles = [d[0] for d in done], [d[1] for d in done]
        finally:
            model.train(was_training)
        rows = []
        for b, (p, new, cyc) in enumerate(zip(prompts, news, cycles)):
            self.records.append(RolloutRecord(step, micro, b, seeds[b], p, new, cyc))
            rows.append((p + new, [0] * len(p) + [1] * len(new)))
            if o.rollout == "speculative" and o.max_replays:
                rows.extend(replay_rows(p, new, cyc, o.max_replays, seeds[b] ^ 1))
        return pack(rows, self.pad, self.max_length)


def build_on_policy(cfg, target):
    """OBJECTIVES builder: objective=on_policy."""
    return OnPolicyObjective(cfg, target)
