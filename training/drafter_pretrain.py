"""Stage drafter_pretrain: FastDraft's first phase, pre-training the small drafter on generic text.

    python train.py experiment=fastdraft        # this phase, data_gen with regeneration, train (alignment), eval
    python train.py stage=drafter_pretrain drafter=small drafter_pretrain.max_steps=300 run.name=fd

FastDraft (Intel, 2024) makes a draft model in two steps: pre-train it as a plain language model on a large
generic corpus, then align it to the target on data the target generated. This stage is the first step:
the bundled ShareGPT conversations (train split; held-out ones are never read) rendered with the target's
chat template and packed back to back into `drafter_pretrain.seq_len` blocks (target_pretrain's corpus and
packing code), loss = next-token CE on every token. The second step is the ordinary data_gen
(`data.regenerate=true`) + train stages, the train stage starting from this stage's final folder
(`train.init_from`).

It is the train stage's loop (training.stage.train_phase) with its own rows and settings: the packed
blocks instead of data_gen's rows, `drafter.losses={ce: 1.0}` with no frozen target forward (CE needs only
the data tokens), the plain `token` objective, and drafter_pretrain.{max_steps, lr, warmup_steps} instead
of train's; the rest of train.* (micro-batch, schedule, clipping, checkpoint cadence) applies as it is.
So it resumes exactly like the train stage: rerunning after a kill continues from the newest checkpoint in
<run>/drafter_pretrain/checkpoints/ and ends with the weights of an uninterrupted run; a checkpoint made
from other blocks (another corpus, tokenizer or seq_len) is refused by their fingerprint.

Outputs (<run>/drafter_pretrain/): config.yaml (this phase's effective config), corpus.json (what was
read and packed), ds_config.json, checkpoints/step_*, metrics.jsonl, final/ (a small-drafter folder,
also a plain HF causal-LM folder).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from conf.errors import DraftsmithError
from conf.schema import Config, run_dir
from conf.schema.objective import TokenObjectiveConfig
from runtime.distributed import is_main_rank
from runtime.files import write_json
from runtime.rundir import check_replaceable, stage_session
from training.data import DataGenOutput
from training.stage import FINAL_FIX, Phase, train_phase
from training.target_pretrain import pack_blocks, read_corpus

STAGE = "drafter_pretrain"


def phase_dir(cfg: Config) -> Path:
    return run_dir(cfg) / STAGE


def phase_config(cfg: Config) -> Config:
    """The config this phase trains with: cfg, with drafter_pretrain's budget in train.*, the CE loss, the
    token objective, and the drafter's own initialisation (never another folder's weights)."""
    dp = cfg.drafter_pretrain
    train = dataclasses.replace(cfg.train, max_steps=dp.max_steps, lr=dp.lr, warmup_steps=dp.warmup_steps,
                                max_length=dp.seq_len, mode="online", init_from=None)
    drafter = dataclasses.replace(cfg.drafter, losses={"ce": 1.0}, checkpoint=None)
    return dataclasses.replace(cfg, train=train, drafter=drafter, objective=TokenObjectiveConfig())


def preflight(cfg: Config) -> None:
    """The checks that need no model (train.py runs them before any listed stage starts)."""
    if cfg.drafter.name != "small":
        raise DraftsmithError(f"stage drafter_pretrain (FastDraft) pre-trains the small drafter, not "
                              f"drafter={cfg.drafter.name}: use drafter=small (experiment=fastdraft sets it; "
                              "drop the drafter= override)")
    if cfg.drafter.lora_r:
        raise DraftsmithError(f"drafter.lora_r={cfg.drafter.lora_r}: FastDraft pre-trains every weight of the small "
                              "drafter and aligns the same full model: set drafter.lora_r=0")
    phase_config(cfg).train.check()
    check_replaceable(phase_dir(cfg) / "final", f"{STAGE}/final", FINAL_FIX)


def load_corpus(cfg: Config, target, out: Path) -> DataGenOutput:
    """The packed pretraining blocks as training rows (loss on every token), with their fingerprint;
    what was read and packed goes to <out>/corpus.json."""
    import datasets

    dp = cfg.drafter_pretrain
    convs, _, report = read_corpus(dp.data_path, dp.max_conversations, 0, what=STAGE)
    tok = target.tokenizer
    # documents are joined by the token the target's own pretraining most likely used between them
    sep = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if sep is None:
        raise DraftsmithError(f"target {target.name}'s tokenizer has neither a pad nor an eos token to separate "
                              "packed documents: give it one (target.path to a tokenizer with eos)")
    blocks = pack_blocks(tok, convs, dp.seq_len, None, sep)
    meta = {"fingerprint": hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16],
            "conversations": len(convs), "blocks": int(blocks.shape[0]), "seq_len": dp.seq_len,
            "tokens": int(blocks.numel()), "separator": int(sep), "read": report.summary()}
    # every token is a target except each block's first (nothing before it in the block predicts it), so
    # loss-mask sums count exactly the predicted positions, as the train loop's token weighting expects
    mask = [0] + [1] * (dp.seq_len - 1)
    ds = datasets.Dataset.from_dict({"input_ids": blocks.tolist(), "loss_mask": [mask] * len(blocks)})
    if is_main_rank():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "corpus.json", meta, indent=1)
        print(f"{STAGE}: {len(convs)} conversations ({report.summary()}) packed into {len(blocks)} blocks of "
              f"{dp.seq_len} tokens, fingerprint {meta['fingerprint']}")
    return DataGenOutput(dir=out, dataset=ds, meta=meta, token_counts=None, cache=None)


def run(cfg: Config, target=None) -> dict:
    """`stage=drafter_pretrain`: see the module docstring; returns the train loop's summary."""
    preflight(cfg)
    with stage_session(cfg, STAGE):
        pcfg, out = phase_config(cfg), phase_dir(cfg)
        phase = Phase(STAGE, out, lambda tgt: load_corpus(pcfg, tgt, out), run_target=False)
        return train_phase(pcfg, phase, target=target)
