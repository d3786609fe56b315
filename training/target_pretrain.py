"""Stage target_pretrain: train the small chat model that draftsmith ships as its demo target.

    python train.py stage=target_pretrain pretrain=cpu pretrain.out_dir=assets/demo-target  # <= 30 min, 2 CPU cores
    python train.py stage=target_pretrain pretrain=gpu pretrain.out_dir=assets/demo-target  # ~4 min, one H100
    python train.py stage=target_pretrain pretrain=cpu pretrain.max_minutes=1 run.name=try  # a quick look

No causal LM's weights can be downloaded where draftsmith is developed, so the pipeline's default target is
made here, top to bottom:
1. read ShareGPT (train split; `data_gen.sources.is_heldout` conversations are only ever measured);
2. train a byte-level BPE tokenizer (training/tokenizer.py; ChatML template, eos <|im_end|>, pad <|endoftext|>);
3. build a Llama with tied embeddings, vocab = len(tokenizer);
4. train on chat-templated conversations packed into seq_len blocks (documents joined by <|endoftext|>),
   next-token loss on every token: each token costs the same forward/backward whether or not it is in the
   loss, and user turns are natural text too, so on a compute-bound CPU budget the loss on all tokens
   gives the most signal per FLOP;
5. save an HF folder, reload it with `drafters.target.load_target` (the proof it works as a target) and
   measure the reloaded weights: held-out loss, degeneracy of greedy and sampled continuations, samples.

AdamW (betas 0.9/0.95, decay on matrices only), linear warmup then cosine over the budget's progress
(wall clock or tokens, whichever is further along), grad-norm clip; bf16 autocast on GPU, fp32 on CPU.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conf.errors import DraftsmithError
from conf.schema import Config, TargetConfig, run_dir, save_config
from conf.schema.pretrain import PretrainConfig
from data_gen.sources import Conversation, SourceReport, is_heldout, iter_sharegpt
from runtime.files import write_json
from runtime.rundir import check_replaceable, normalise_modes, stage_session, writable_dir
from training.engine import decay_factor
from training.tokenizer import IM_END, PAD, SPECIAL_TOKENS, token_byte_lengths, train_tokenizer

MAX_FP32_BYTES = 25 * 2**20  # save_dtype=auto keeps fp32 weights below this, so the folder stays <= 30 MB
SAMPLES = 4  # prompt -> continuation pairs in samples.md


# --- degeneracy measures (pure functions) -----------------------------------------------------------
def _ngram_counts(seqs: Sequence[Sequence[int]], n: int) -> tuple[int, int]:
    """(total n-grams, distinct n-grams) summed over sequences; distinct is counted within each sequence."""
    total = distinct = 0
    for s in seqs:
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        total += len(grams)
        distinct += len(set(grams))
    return total, distinct


def distinct_n(seqs: Sequence[Sequence[int]], n: int = 2) -> float | None:
    """Distinct-n of continuations, pooled: sum over continuations of the number of *different* n-grams in
    that continuation, divided by the sum of their n-gram counts (a continuation of k tokens has k-n+1).
    1.0 = no n-gram repeats inside any continuation; a loop drives it towards 0. None if no continuation
    has n tokens. Example: [[1,2,1,2,1]] has bigrams 12,21,12,21 -> 2 distinct / 4 = 0.5."""
    total, distinct = _ngram_counts(seqs, n)
    return distinct / total if total else None


def repeated_ngram_rate(seqs: Sequence[Sequence[int]], n: int = 3) -> float | None:
    """Repeated-n-gram rate, pooled: the fraction of n-gram positions whose n-gram already occurred earlier
    in the same continuation = sum(count - distinct) / sum(count) = 1 - distinct_n(seqs, n).
    0.0 = never repeats itself. Example: [[5,6,7,5,6,7,5]] has 3-grams 567,675,756,567,675 -> 2/5 = 0.4."""
    total, distinct = _ngram_counts(seqs, n)
    return (total - distinct) / total if total else None


def degeneracy(seqs: Sequence[Sequence[int]], ended: Sequence[bool]) -> dict:
    """The measures reported for one decoding mode (continuations exclude the eos that ended them)."""
    return {"distinct_2": distinct_n(seqs, 2), "repeated_3gram_rate": repeated_ngram_rate(seqs, 3),
            "mean_new_tokens": float(np.mean([len(s) for s in seqs])) if seqs else None,
            "eos_rate": float(np.mean(ended)) if ended else None}


# --- setup ---------------------------------------------------------------------------------------------
def validate(pc: PretrainConfig) -> None:
    """Reject settings that cannot train, before any work starts (one line each: problem and fix)."""
    pc.check()  # the schema's ranges (conf/schema/pretrain.py), again for a config changed in code
    if pc.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DraftsmithError(f"pretrain.vocab_size={pc.vocab_size} is below the 256 bytes + "
                              f"{len(SPECIAL_TOKENS)} special tokens a byte-level BPE needs: use >= 259")


def reuse_tokenizer(path: str):
    """The tokenizer of a target folder (pretrain.tokenizer), which must speak this recipe's chat format: its
    special tokens and a chat template; one line naming the folder otherwise."""
    from transformers import AutoTokenizer

    from conf.schema import project_path

    try:
        tok = AutoTokenizer.from_pretrained(project_path(path))
    except (OSError, ValueError) as e:
        raise DraftsmithError(f"pretrain.tokenizer={path}: no tokenizer loads from there ({e.__class__.__name__}): "
                              "give a target folder such as assets/demo-target, or null to train one") from None
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing or not tok.chat_template:
        raise DraftsmithError(f"pretrain.tokenizer={path} lacks {', '.join(missing) or 'a chat template'}: use a "
                              "folder made by target_pretrain (e.g. assets/demo-target), or null to train one")
    return tok


def pretrain_out_dir(cfg: Config) -> Path:
    return Path(cfg.pretrain.out_dir) if cfg.pretrain.out_dir else run_dir(cfg) / "target_pretrain"


def preflight(cfg: Config) -> None:
    check_replaceable(pretrain_out_dir(cfg), "pretrain.out_dir", "choose another pretrain.out_dir")


def prepare_out_dir(cfg: Config) -> Path:
    """The output folder, created and proven writable up front (not after half an hour of training). Its
    files are overwritten, so it must be empty or an earlier target_pretrain folder."""
    preflight(cfg)
    return writable_dir(pretrain_out_dir(cfg), "pretrain.out_dir", "choose a folder you can write to")


def read_corpus(data_path: str | None, max_conversations: int | None, min_heldout: int,
                what: str = "pretrain") -> tuple[list[Conversation], list[Conversation], SourceReport]:
    """Train and held-out conversations in file order, from one pass over the file. With
    max_conversations set, reading stops once both the train cap and `min_heldout` are reached (the
    drafter's pretraining, training/drafter_pretrain.py, needs no held-out ones: min_heldout=0)."""
    report = SourceReport()
    train: list[Conversation] = []
    held: list[Conversation] = []
    for conv in iter_sharegpt(data_path, report, split="all"):
        (held if is_heldout(conv.id) else train).append(conv)
        if max_conversations and len(train) >= max_conversations and len(held) >= min_heldout:
            break
    train = train[:max_conversations] if max_conversations else train
    if not train or len(held) < min(1, min_heldout):
        raise DraftsmithError(f"the ShareGPT file gave {len(train)} train and {len(held)} held-out "
                              f"conversations ({report.summary()}): pretraining needs "
                              f"{'both' if min_heldout else 'train ones'}; point {what}.data_path at a larger ShareGPT JSON")
    return train, held, report


def build_model(pc: PretrainConfig, tokenizer):
    """A Llama with tied embeddings whose vocabulary is exactly the tokenizer's."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, PAD])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=pc.hidden_size, intermediate_size=pc.intermediate_size,
        num_hidden_layers=pc.num_layers, num_attention_heads=pc.num_heads, num_key_value_heads=pc.num_kv_heads,
        max_position_embeddings=pc.seq_len, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    return model


def count_parameters(model) -> int:
    """Unique parameters (the tied embedding / LM head matrix counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- data ----------------------------------------------------------------------------------------------
class TokenCache:
    """Chat-templated token ids per conversation (+ a separator: `sep`, by default the demo tokenizer's
    <|endoftext|>), encoded lazily in batches and kept: a CPU run never reaches most of the corpus, a GPU
    run reuses it every epoch."""

    def __init__(self, tokenizer, convs: list[Conversation], sep: int | None = None):
        self.tokenizer, self.convs = tokenizer, convs
        self.sep = tokenizer.convert_tokens_to_ids(PAD) if sep is None else sep
        self.ids: list[np.ndarray | None] = [None] * len(convs)

    def get(self, idx: Sequence[int]) -> list[np.ndarray]:
        todo = [i for i in idx if self.ids[i] is None]
        if todo:
            texts = [self.tokenizer.apply_chat_template(self.convs[i].messages, tokenize=False) for i in todo]
            for i, ids in zip(todo, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
                self.ids[i] = np.asarray(ids + [self.sep], dtype=np.int32)
        return [self.ids[i] for i in idx]


class PackedStream:
    """Endless [batch, seq_len] blocks: each epoch walks the conversations in a new seeded order and packs
    them back to back (a long conversation simply continues into the next block)."""

    def __init__(self, cache: TokenCache, seq_len: int, batch_size: int, seed: int, chunk: int = 256):
        self.cache, self.seq_len, self.batch_size, self.seed, self.chunk = cache, seq_len, batch_size, seed, chunk
        self.docs_used = 0  # conversations packed so far (epochs = docs_used / len(conversations))

    def __iter__(self) -> Iterator[torch.Tensor]:
        n, need = len(self.cache.ids), self.batch_size * self.seq_len
        buf = np.empty(0, dtype=np.int32)
        epoch = 0
        while True:
            order = np.random.default_rng(self.seed + epoch).permutation(n)
            for s in range(0, n, self.chunk):
                part = order[s:s + self.chunk].tolist()
                buf = np.concatenate([buf, *self.cache.get(part)])
                self.docs_used += len(part)
                while len(buf) >= need:
                    yield torch.from_numpy(buf[:need].astype(np.int64)).view(self.batch_size, self.seq_len)
                    buf = buf[need:]
            epoch += 1


def pack_blocks(tokenizer, convs: list[Conversation], seq_len: int, max_tokens: int | None,
                sep: int | None = None) -> torch.Tensor:
    """Conversations in file order packed back to back into [n_blocks, seq_len] (the tail that fills no
    block is dropped): the held-out blocks here, the drafter's pretraining rows in drafter_pretrain."""
    cache = TokenCache(tokenizer, convs, sep)
    want = max(1, max_tokens // seq_len) if max_tokens else None
    ids: list[np.ndarray] = []
    total = 0
    for i in range(len(convs)):
        ids += cache.get([i])
        total += len(ids[-1])
        if want and total >= want * seq_len:
            break
    flat = np.concatenate(ids)
    n = len(flat) // seq_len if want is None else min(want, len(flat) // seq_len)
    if n == 0:
        raise DraftsmithError(f"the conversations hold only {len(flat)} tokens, less than one "
                              f"seq_len={seq_len} block: lower the seq_len or read more conversations")
    return torch.from_numpy(flat[:n * seq_len].astype(np.int64)).view(n, seq_len)


# --- measurement ---------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, byte_len: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(nats per token, nats per UTF-8 byte) of next-token prediction over the held-out blocks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, count, nbytes = 0.0, 0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(input_ids=x).logits
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nats += nll.item()
        count += x[:, 1:].numel()
        nbytes += int(byte_len[x[:, 1:].cpu()].sum())
    model.train(was_training)
    return nats / count, nats / nbytes


def unigram_loss(counts: torch.Tensor, blocks: torch.Tensor) -> float:
    """Nats/token on the held-out blocks' predicted positions of an add-one-smoothed unigram model of the
    training tokens: the floor a model must beat to have learnt anything beyond token frequencies."""
    logp = torch.log((counts.double() + 1) / (counts.sum() + len(counts)))
    return float(-logp[blocks[:, 1:]].mean())


def heldout_prompts(tokenizer, convs: list[Conversation], n: int, budget: int) -> tuple[list[list[int]], list[str], int]:
    """Chat-templated first user turns (with the generation prompt) of the first n held-out conversations.
    A turn longer than `budget` tokens keeps its first tokens; returns (ids, texts, number truncated)."""
    ids, texts, cut = [], [], 0
    for conv in convs[:n]:
        text = next(m["content"] for m in conv.messages if m["role"] == "user")
        rendered = _render(tokenizer, text)
        if len(rendered) > budget:
            cut += 1
            content = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = budget - (len(rendered) - len(content))
            while len(rendered) > budget:  # decode -> re-encode may merge differently: shrink until it fits
                text = tokenizer.decode(content[:keep])
                rendered = _render(tokenizer, text)
                keep -= 1
        ids.append(rendered)
        texts.append(text)
    return ids, texts, cut


def _render(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]


@torch.no_grad()
def continuations(model, prompts: list[list[int]], new_tokens: int, sample: bool, eos: int, pad: int,
                  seed: int, batch_size: int = 50) -> tuple[list[list[int]], list[bool]]:
    """Greedy (sample=False) or plain T=1 sampling (no top-k/top-p) continuations of up to new_tokens,
    each cut before its first eos; returns (token lists, whether each ended with eos)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    by_len = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))  # batch similar lengths: less padding
    outs: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for i in range(0, len(prompts), batch_size):
        rows = by_len[i:i + batch_size]
        group = [prompts[k] for k in rows]
        width = max(map(len, group))
        x = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, p in enumerate(group):  # left padding: every prompt ends where generation starts
            x[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with _autocast(device):
            # plain T=1 sampling: top_k=0 / top_p=1 switch off generate's default filters
            knobs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            y = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                               eos_token_id=eos, pad_token_id=pad, **knobs)
        for k, row in zip(rows, y[:, width:].tolist()):
            stop = row.index(eos) if eos in row else len(row)
            outs[k], ended[k] = row[:stop], stop < len(row)
    return outs, ended


def _autocast(device: torch.device):
    """bf16 autocast on GPU (fast, and what serving uses); fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- training ------------------------------------------------------------------------------------------
def lr_at(pc: PretrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    if step < pc.warmup_steps:
        return pc.lr * (step + 1) / pc.warmup_steps
    return pc.lr * decay_factor("cosine", progress, pc.min_lr_ratio)


def train_loop(model, pc: PretrainConfig, stream: PackedStream, eval_fn, device: torch.device) -> dict:
    """Optimise until the wall-clock budget (or max_tokens) is spent; returns counters and loss curves."""
    from tqdm.auto import tqdm

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pc.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    budget = pc.max_minutes * 60
    log_every = 10
    train_curve, heldout_curve = [], []
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)  # for the unigram baseline
    loss0 = eval_fn()
    heldout_curve.append({"step": 0, "tokens": 0, "seconds": 0.0, "loss": loss0})
    model.train()
    step = tokens = 0
    running = torch.zeros((), device=device)
    t0 = time.perf_counter()
    stopped_by = "max_minutes"
    bar = tqdm(total=1.0, desc="target_pretrain", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    for x in stream:
        elapsed = time.perf_counter() - t0
        progress = max(elapsed / budget, tokens / pc.max_tokens if pc.max_tokens else 0.0)
        if progress >= 1.0:
            stopped_by = "max_tokens" if pc.max_tokens and tokens >= pc.max_tokens else "max_minutes"
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(pc, step, progress)
        counts += torch.bincount(x.flatten(), minlength=len(counts))
        x = x.to(device, non_blocking=True)
        with _autocast(device):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        tokens += x.numel()
        if step % log_every == 0 or step == 1:  # .item() syncs the GPU: only every few steps
            n = 1 if step == 1 else log_every
            mean = running.item() / n
            running.zero_()
            seconds = time.perf_counter() - t0
            train_curve.append({"step": step, "tokens": tokens, "seconds": round(seconds, 2),
                                "loss": round(mean, 4), "lr": opt.param_groups[0]["lr"]})
            bar.n = min(progress, 1.0)
            bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tokens / seconds:.0f}", heldout=f"{heldout_curve[-1]['loss']:.3f}")
        if pc.eval_every and step % pc.eval_every == 0:
            heldout_curve.append({"step": step, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 2),
                                  "loss": eval_fn()})
    seconds = time.perf_counter() - t0
    bar.n = 1.0
    bar.close()
    return {"steps": step, "tokens": tokens, "seconds": seconds, "stopped_by": stopped_by,
            "train_curve": train_curve, "heldout_curve": heldout_curve, "token_counts": counts}


def save_folder(model, tokenizer, out: Path, save_dtype: str) -> str:
    """HF folder: config, safetensors weights (bf16 if fp32 would not fit), tokenizer, generation config."""
    n = count_parameters(model)
    name = save_dtype if save_dtype != "auto" else ("float32" if 4 * n <= MAX_FP32_BYTES else "bfloat16")
    model = model.to("cpu")
    if name == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return name


# --- the stage -----------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Train the demo target into pretrain.out_dir (or <run dir>/target_pretrain); returns metrics.json's dict."""
    pc = cfg.pretrain
    validate(pc)
    # pretrain.threads (the recipe's own, recorded with the demo target) wins over run.threads; on a crowded
    # CPU one thread beats two: OpenMP threads spin-wait for each other
    with stage_session(cfg, "target_pretrain", threads=pc.threads):
        out = prepare_out_dir(cfg)
        return _run(cfg, out)


def _run(cfg: Config, out: Path) -> dict:
    from drafters.target import load_target
    from runtime.device import resolve_device

    pc = cfg.pretrain
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]  # the CPU may be shared: the load average says how much
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    train_convs, held_convs, report = read_corpus(pc.data_path, pc.max_conversations, pc.heldout_prompts)
    tok_convs = train_convs[:pc.tokenizer_conversations] if pc.tokenizer_conversations else train_convs
    if pc.tokenizer:  # an existing folder's tokenizer (pretrain=gpu_demo: the demo target's), none trained
        tok_convs = []
        tokenizer = reuse_tokenizer(pc.tokenizer)
    else:
        tokenizer = train_tokenizer((m["content"] for c in tok_convs for m in c.messages), pc.vocab_size)
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, PAD])
    model = build_model(pc, tokenizer).to(device)
    byte_len = torch.tensor(token_byte_lengths(tokenizer))
    blocks = pack_blocks(tokenizer, held_convs, pc.seq_len, pc.eval_tokens)
    eval_batch = max(1, min(pc.batch_size, 16))

    def eval_fn() -> float:
        return round(heldout_loss(model, blocks, byte_len, eval_batch)[0], 4)

    stream = PackedStream(TokenCache(tokenizer, train_convs), pc.seq_len, pc.batch_size, cfg.run.seed)
    setup_seconds = time.perf_counter() - t_start
    log = train_loop(model, pc, stream, eval_fn, device)
    t_measure = time.perf_counter()

    # the stage's mark goes in first, so a folder a kill leaves half-written is still ours to overwrite
    write_json(out / "metrics.json", {"stage": "target_pretrain", "complete": False}, indent=None)
    saved_dtype = save_folder(model, tokenizer, out, pc.save_dtype)
    # Everything below measures the folder as users get it: reloaded through the target loader.
    target = load_target(TargetConfig(path=str(out)), device=device)
    final_loss, final_nats_per_byte = heldout_loss(target.model, blocks, byte_len, eval_batch)
    prompts, prompt_texts, cut = heldout_prompts(tokenizer, held_convs, pc.heldout_prompts, pc.seq_len - pc.gen_tokens)
    gens = {mode: continuations(target.model, prompts, pc.gen_tokens, mode == "sampled", eos, pad, cfg.run.seed)
            for mode in ("greedy", "sampled")}

    metrics = {
        "stage": "target_pretrain",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_start": load_start, "load_average_end": os.getloadavg()[0]},
        "parameters": count_parameters(model),
        "architecture": {"model_type": "llama", "num_layers": pc.num_layers, "hidden_size": pc.hidden_size,
                         "intermediate_size": pc.intermediate_size, "num_heads": pc.num_heads,
                         "num_kv_heads": pc.num_kv_heads, "vocab_size": len(tokenizer), "seq_len": pc.seq_len,
                         "tie_word_embeddings": True},
        "saved_dtype": saved_dtype,
        "corpus": {"train_conversations": len(train_convs), "heldout_conversations": len(held_convs),
                   "tokenizer_conversations": len(tok_convs), "read": report.summary(),
                   "epochs": round(stream.docs_used / len(train_convs), 4)},
        "tokens_seen": log["tokens"],
        "steps": log["steps"],
        "train_seconds": round(log["seconds"], 1),
        "tokens_per_s": round(log["tokens"] / log["seconds"], 1) if log["seconds"] else None,
        "stopped_by": log["stopped_by"],
        "heldout_loss": round(final_loss, 4),  # nats/token, on the saved (reloaded) weights
        "heldout_nats_per_byte": round(final_nats_per_byte, 4),
        "heldout_unigram_loss": round(unigram_loss(log["token_counts"], blocks), 4),
        "heldout_eval_tokens": int(blocks.numel()),
        "degeneracy": {"prompts": len(prompts), "prompts_truncated": cut, "max_new_tokens": pc.gen_tokens,
                       "greedy": degeneracy(*gens["greedy"]), "sampled": degeneracy(*gens["sampled"])},
        "heldout_curve": log["heldout_curve"],
        "train_curve": log["train_curve"],
    }
    # setup = corpus + tokenizer + held-out packing; the first held-out loss is in neither it nor train_seconds
    metrics["setup_seconds"] = round(setup_seconds, 1)
    metrics["measure_seconds"] = round(time.perf_counter() - t_measure, 1)  # save, reload, loss, generations
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "metrics.json", metrics, indent=1)
    write_json(out / "continuations.json", {m: g[0] for m, g in gens.items()}, indent=None)
    (out / "samples.md").write_text(samples_markdown(tokenizer, prompt_texts, gens, metrics))
    save_config(cfg, out)
    normalise_modes(out)
    return metrics


def samples_markdown(tokenizer, prompt_texts: list[str], gens: dict, metrics: dict) -> str:
    """A few held-out prompts (the first short ones) with their greedy and sampled continuations."""
    short = [i for i, t in enumerate(prompt_texts) if len(t) <= 200][:SAMPLES]
    short = short or list(range(min(SAMPLES, len(prompt_texts))))
    lines = [f"# Demo target samples\n\nHeld-out ShareGPT prompts (first user turn), up to "
             f"{metrics['degeneracy']['max_new_tokens']} new tokens; greedy and plain sampling at T=1. "
             f"Model: {metrics['parameters']:,} parameters, {metrics['tokens_seen']:,} training tokens, "
             f"held-out loss {metrics['heldout_loss']:.2f} nats/token.\n"]
    for k, i in enumerate(short, 1):
        lines.append(f"## {k}. Prompt\n\n{_quote(prompt_texts[i])}\n")
        for mode in ("greedy", "sampled"):
            ids, ended = gens[mode][0][i], gens[mode][1][i]
            tail = " (ended with <|im_end|>)" if ended else ""
            lines.append(f"**{mode}**{tail}:\n\n{_quote(tokenizer.decode(ids))}\n")
    return "\n".join(lines)


def _quote(text: str) -> str:
    if not text.strip():  # e.g. a loop of newlines: show it rather than an empty quote
        shown = repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text)} characters)"
        return f"> (only whitespace) `{shown}`" if text else "> (nothing: <|im_end|> at once)"
    return "\n".join("> " + line for line in text.strip().splitlines())
