"""The eval stage: speculative decoding vs the target's own autoregressive decoding, on benchmark prompts.

    python train.py stage=eval drafter=ngram                                  # demo target, reference drafter
    python train.py stage=eval run.name=l31-eagle3 drafter=eagle3 \\
        eval.benchmarks=[mtbench,humaneval,gsm8k] eval.temperatures=[0,1] eval.mtbench_path=question.jsonl
    python train.py stage=eval drafter=small drafter.checkpoint=runs/x/train/final   # + transformers' assisted peer

For each benchmark x temperature, the speculative decoder and the autoregressive baseline of the same
target run in this process on the same prompts (interleaved prompt by prompt, so a noisy shared machine
slows both alike), after an untimed warm-up. Conversations are multi-turn where the benchmark is
(MT-bench): each follow-up is asked on the model's own previous answer. Writes
<run dir>/eval/<drafter>/{report.json, report.md, acceptance_by_depth.png, tau.png, config.yaml} and
prints the table.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch

from conf.errors import DraftsmithError
from conf.schema import Config, run_dir, save_config, trained_drafter_dir
from data_gen.output import draft_vocab_view
from data_gen.sources import SourceReport
from decoding.tree import fit_depth, tree_nodes
from eval.benchmarks import BenchPrompt, check_benchmarks, load_benchmark, render_prompt
from eval.metrics import GenRecord, summarize
from eval.report import LOSSY, machine_info, markdown, with_interval, write_report
from runtime.rundir import stage_session


# --------------------------------------------------------------------------------------------------
# checks and building
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """Every eval setting a user can get wrong, checked before a model is loaded."""
    ev = cfg.eval
    check_benchmarks(list(ev.benchmarks))
    ev.check()  # the schema's own ranges and tree (conf/schema/eval.py), again in case code changed them
    from drafters.registry import REFERENCE, TRAINABLE

    if cfg.drafter.name not in REFERENCE and cfg.drafter.name not in TRAINABLE:
        raise DraftsmithError(f"unknown drafter {cfg.drafter.name!r}: choose from {', '.join([*TRAINABLE, *REFERENCE])}")
    cfg.drafter.check()
    if cfg.drafter.name in REFERENCE and cfg.drafter.draft_vocab is not None:
        raise DraftsmithError(f"drafter.draft_vocab trims a trained drafter's LM head; drafter={cfg.drafter.name} "
                              "has none: set drafter.draft_vocab=null")
    if cfg.drafter.name in TRAINABLE:
        trained_drafter_dir(cfg)


def build_drafter(cfg: Config, target):
    """(decoding Drafter, HF model of an independent drafter or None) for cfg.drafter."""
    from drafters.registry import REFERENCE, drafter_class

    name = cfg.drafter.name
    if name in REFERENCE:  # need no training: built straight from the config
        if name == "target" and cfg.eval.exact:  # drafts with the model that verifies: tau = depth + 1
            from decoding.decoder import float32_target

            target = float32_target(target)
        return drafter_class(name).from_config(cfg.drafter, target), None
    d = trained_drafter_dir(cfg)  # before importing the family: the missing folder is the likelier mistake
    trainable = drafter_class(name).from_pretrained(str(d), target)
    for key in getattr(trainable, "decode_options", ()):  # decoding-time knobs: this command's, not the folder's
        setattr(trainable.cfg, key, getattr(cfg.drafter, key))
    trainable = draft_vocab_view(cfg, trainable, target)
    return trainable.as_drafter(target), hf_assistant_model(trainable, d, target)


def hf_assistant_model(trainable, folder: Path, target):
    """The plain HF causal LM of an independent drafter (family `small`), for transformers'
    generate(assistant_model=...): one the drafter object holds, else its folder when that is an HF
    causal-LM folder; None for drafters that read the target's hidden states."""
    import json

    from transformers import AutoModelForCausalLM, PreTrainedModel

    held = [trainable.plain_model()] if hasattr(trainable, "plain_model") else []  # a LoRA merged (small_lm)
    for m in held + [getattr(trainable, a, None) for a in ("hf_model", "model")]:
        if isinstance(m, PreTrainedModel) and hasattr(m, "generate"):
            # transformers takes a vocabulary of another size (PARD's added mask row) for another tokenizer and
            # refuses it as a plain assistant: no peer then
            same = m.config.vocab_size == target.model.config.vocab_size
            return m if same else None
    cfg = folder / "config.json"
    if cfg.exists() and any(a.endswith("ForCausalLM") for a in json.loads(cfg.read_text()).get("architectures") or []):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=target.dtype).to(target.device).eval()
    return None


def fit_tree(cfg: Config, drafter) -> None:
    """Heads draft at most num_heads tokens deep: cap a deeper chain or dynamic tree there (said in one line,
    and the report shows the tree used) instead of failing after training. Static paths are the user's own
    and still fail clearly when too deep."""
    tree = cfg.eval.tree
    fitted = fit_depth(tree, getattr(drafter, "max_depth", None))
    if fitted is not tree:
        why = getattr(drafter, "depth_why", None) or f"has {fitted.depth} heads"  # PARD: tokens per forward
        print(f"eval: drafter {cfg.drafter.name} {why}, so it drafts at most {fitted.depth} "
              f"tokens deep: eval.tree.depth {tree.depth} -> {fitted.depth}", flush=True)
        tree.depth, tree.delay = fitted.depth, fitted.delay


def make_decoder(cfg: Config, target, drafter, temperature: float):
    """The speculative decoder at one of eval.temperatures (a vocab mismatch is its one-line error)."""
    from decoding.decoder import SpeculativeDecoder

    return SpeculativeDecoder.from_config(target, drafter, cfg.eval, temperature)


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _record(tokens, st, wall: float) -> GenRecord:
    return GenRecord(new_tokens=st.new_tokens, wall_s=wall, forwards=st.cycles, forward_tokens=st.cycle_tokens,
                     depth_attempted=list(st.depth_attempted), depth_accepted=list(st.depth_accepted),
                     draft_s=st.time_draft, verify_s=st.time_verify, other_s=st.time_other,
                     tokens=[int(t) for t in tokens], drafter_forwards=st.drafter_forwards)


def _timed(decoder, generate, ids: list[int], max_new_tokens: int, eos_ids: list[int], generator) -> GenRecord:
    """Run one decoder.generate* call as a GenRecord; wall time measured here, around the whole call."""
    dev = decoder.target.device
    _sync(dev)
    t0 = time.perf_counter()
    tokens, st = generate(ids, max_new_tokens, eos_ids, generator)
    _sync(dev)
    return _record(tokens, st, time.perf_counter() - t0)


def spec_generate(decoder, ids: list[int], max_new_tokens: int, eos_ids: list[int], generator) -> GenRecord:
    """One speculative generation (a drafter that replays the target's own continuation learns it first,
    untimed)."""
    prime = getattr(decoder.drafter, "replay_autoregressive", None)
    if prime is not None:
        prime(decoder, ids, max_new_tokens)
    return _timed(decoder, decoder.generate, ids, max_new_tokens, eos_ids, generator)


def ar_generate(decoder, ids: list[int], max_new_tokens: int, eos_ids: list[int], generator) -> GenRecord:
    """The autoregressive baseline: the same target, sampling rule and KV-cache path, one token per forward."""
    return _timed(decoder, decoder.generate_autoregressive, ids, max_new_tokens, eos_ids, generator)


def answer_text(tokenizer, tokens: list[int], eos_ids: list[int]) -> str:
    """The assistant turn's text: generated tokens up to (not including) the first eos."""
    cut = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def converse(gen, prompt: BenchPrompt, target, limit: int, seed: int, skipped: Counter,
             prompt_log: list | None = None) -> list[GenRecord]:
    """Ask prompt.turns in order; each answer is the model's own generation (gen: ids, generator -> GenRecord).
    A follow-up whose rendered context exceeds `limit` ends the conversation (counted in `skipped`)."""
    messages: list[dict] = []
    records = []
    eos = target.eos_token_ids
    for k, turn in enumerate(prompt.turns):
        messages.append({"role": "user", "content": turn})
        ids = render_prompt(target.tokenizer, target.chat_template, messages)
        if len(ids) > limit:
            skipped[f"turn {k + 1} over {limit} context tokens"] += 1
            break
        g = torch.Generator(device=target.device).manual_seed(seed * 1000 + k)
        rec = gen(ids, g)
        records.append(rec)
        if prompt_log is not None:
            prompt_log.append(ids)
        messages.append({"role": "assistant", "content": answer_text(target.tokenizer, rec.tokens, eos)})
    return records


def prompt_limit(cfg: Config, target) -> int:
    """Longest rendered prompt allowed: eval.max_prompt_tokens, and room for the answer and the draft tree
    within the target's position limit."""
    hf = target.config
    max_pos = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    limit = cfg.eval.max_prompt_tokens
    if max_pos:
        room = int(max_pos) - cfg.eval.max_new_tokens - tree_nodes(cfg.eval.tree) - 1
        if room < 1:
            raise DraftsmithError(
                f"eval.max_new_tokens={cfg.eval.max_new_tokens} plus the draft tree leaves no room for a prompt in "
                f"{target.name}'s {max_pos} positions: lower eval.max_new_tokens or eval.tree.total_tokens")
        limit = min(limit, room)
    return limit


def select_prompts(name: str, cfg: Config, target, limit: int) -> tuple[list[BenchPrompt], Counter, SourceReport]:
    """The first eval.num_prompts prompts of a benchmark whose first turn fits `limit` tokens."""
    report = SourceReport()
    skipped: Counter = Counter()
    chosen = []
    for p in load_benchmark(name, cfg, report):
        ids = render_prompt(target.tokenizer, target.chat_template, [{"role": "user", "content": p.turns[0]}])
        if len(ids) > limit:
            skipped[f"prompt over {limit} tokens"] += 1
            continue
        chosen.append(p)
        if len(chosen) == cfg.eval.num_prompts:
            break
    if not chosen:
        raise DraftsmithError(f"benchmark {name}: no prompt fits {limit} tokens ({report.summary()}): "
                              "raise eval.max_prompt_tokens")
    return chosen, skipped, report


def time_assisted(target, assistant, prompts: list[list[int]], max_new_tokens: int, warmup: int = 1) -> dict:
    """transformers' generate(assistant_model=...) vs plain greedy generate on the same prompts (T=0), and
    whether the assisted output equals greedy (it must: assisted greedy decoding is lossless). `warmup`
    untimed rounds on the first prompt come first."""
    dev = target.device
    eos = target.eos_token_ids
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos[0]
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
              temperature=None, top_p=None, top_k=None)
    walls = {"assisted": 0.0, "greedy": 0.0}
    toks = {"assisted": 0, "greedy": 0}
    identical = 0
    for k, ids in enumerate(prompts[:1] * warmup + prompts):
        x = torch.tensor([ids], device=dev)
        outs = {}
        timed = k >= warmup
        for mode in ("assisted", "greedy"):
            extra = {"assistant_model": assistant} if mode == "assisted" else {}
            _sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = target.model.generate(x, attention_mask=torch.ones_like(x), **kw, **extra)
            _sync(dev)
            outs[mode] = out[0, x.shape[1]:].tolist()
            if timed:
                walls[mode] += time.perf_counter() - t0
                toks[mode] += len(outs[mode])
        identical += timed and outs["assisted"] == outs["greedy"]
    tps = {m: toks[m] / walls[m] if walls[m] > 0 else None for m in walls}
    return {"generations": len(prompts), "tok_s_assisted": tps["assisted"], "tok_s_greedy": tps["greedy"],
            "speedup": tps["assisted"] / tps["greedy"] if tps["assisted"] and tps["greedy"] else None,
            "identical": identical, "new_tokens_assisted": toks["assisted"], "new_tokens_greedy": toks["greedy"]}


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------
def evaluate(cfg: Config, target, drafter, assistant=None, progress: bool = True) -> list[dict]:
    """One result row per benchmark x temperature: speculative vs autoregressive decoding of the same
    prompts (and, at T=0 with an independent drafter, transformers' assisted generation)."""
    from tqdm.auto import tqdm

    ev = cfg.eval
    limit = prompt_limit(cfg, target)
    eos = target.eos_token_ids
    flag = f" [{LOSSY}]" if ev.acceptance == "typical" else ""
    results = []
    for bench in ev.benchmarks:
        prompts, skipped, source = select_prompts(bench, cfg, target, limit)
        first = render_prompt(target.tokenizer, target.chat_template, [{"role": "user", "content": prompts[0].turns[0]}])
        for temp in ev.temperatures:
            dec = make_decoder(cfg, target, drafter, temp)

            def spec(ids, g, dec=dec):
                return spec_generate(dec, ids, ev.max_new_tokens, eos, g)

            def ar(ids, g, dec=dec):
                return ar_generate(dec, ids, ev.max_new_tokens, eos, g)

            for _ in range(ev.warmup):  # untimed: first-call costs must not land on prompt 1
                g = torch.Generator(device=target.device).manual_seed(ev.seed)
                spec_generate(dec, first, min(ev.max_new_tokens, 16), eos, g)
                ar_generate(dec, first, min(ev.max_new_tokens, 16), eos, g)
            if dec.opt_cost is not None:  # OPT-Tree: report the budgets of the timed cycles only
                dec.opt_cost.history.clear()
            spec_recs, ar_recs, turn_ids = [], [], []  # [prompt][turn]: the intervals resample prompts
            sk: Counter = Counter(skipped)
            bar = tqdm(prompts, desc=f"{bench} T={temp:g}{flag}", unit="prompt", disable=not progress)
            for i, p in enumerate(bar):  # interleaved: machine noise hits both decoders alike
                s = converse(spec, p, target, limit, ev.seed + i, sk, turn_ids)
                a = converse(ar, p, target, limit, ev.seed + i, Counter())
                n = min(len(s), len(a))  # the same turns on both sides (T > 0 answers differ in length)
                spec_recs.append(s[:n])
                ar_recs.append(a[:n])
            row = {"benchmark": bench, "temperature": float(temp), "prompts": len(prompts),
                   "source": source.summary(), "skipped": dict(sk),
                   **summarize(spec_recs, ar_recs, [p.id for p in prompts]), "peer": None}
            if dec.opt_cost is not None:
                c = dec.opt_cost
                row["opt_tree"] = {"mean_nodes": c.mean_budget(), "mean_drafter_steps": c.mean_steps(),
                                   "mean_expected_accepted": c.mean_expected(), "cost_model": c.source, "verify_ms": c.verify_points, "draft_ms": c.draft_ms}
            if temp == 0 and assistant is not None and ev.compare_assistant:
                row["peer"] = time_assisted(target, assistant, turn_ids, ev.max_new_tokens, ev.warmup)
            results.append(row)
            print(_line(row, flag), flush=True)
    return results


def build_report(cfg: Config, target, results: list[dict]) -> dict:
    """The report dict eval.report writes: results plus what produced them."""
    from omegaconf import OmegaConf

    ev = cfg.eval
    return {"drafter": {"name": cfg.drafter.name, "checkpoint": cfg.drafter.checkpoint,
                        "draft_vocab": cfg.drafter.draft_vocab, "draft_vocab_source": cfg.drafter.draft_vocab_source},
            "target": cfg.target.path, "acceptance": ev.acceptance, "lossy": ev.acceptance == "typical",
            "tree": OmegaConf.to_container(OmegaConf.structured(ev.tree)), "max_new_tokens": ev.max_new_tokens,
            "exact": ev.exact, "verify_dtype": str(torch.float32 if ev.exact else target.dtype).removeprefix("torch."),
            "machine": machine_info(target.device), "command": " ".join(sys.argv),
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "results": results}


def run(cfg: Config) -> dict:
    """Evaluate cfg.drafter against the target; returns {"report": dict, "paths": {name: Path}}."""

    validate(cfg)
    with stage_session(cfg, "eval"):
        return _run(cfg)


def _run(cfg: Config) -> dict:
    from drafters.target import load_target

    print(f"eval: {torch.get_num_threads()} torch CPU threads (run.threads)", flush=True)
    torch.manual_seed(cfg.run.seed)
    target = load_target(cfg.target, cfg.run.device)
    drafter, assistant = build_drafter(cfg, target)
    fit_tree(cfg, drafter)
    out_dir = run_dir(cfg) / "eval" / cfg.drafter.name
    save_config(cfg, out_dir)
    report = build_report(cfg, target, evaluate(cfg, target, drafter, assistant))
    paths = write_report(report, out_dir)
    print(markdown(report), flush=True)
    print(f"eval report: {paths['md']}", flush=True)
    return {"report": report, "paths": paths}


def _line(r: dict, flag: str) -> str:
    tau = with_interval(r["tau"], r["ci"]["tau"])
    sp = with_interval(r["speedup"], r["ci"]["speedup"], "{:.2f}x")
    out = "-" if r["outside_target"] is None else f"{100 * r['outside_target']:.0f}%"
    return (f"eval{flag}: {r['benchmark']} T={r['temperature']:g} tau {tau} speedup {sp} (95% intervals), {out} of "
            f"the cycle outside the target's verification ({r['prompts']} prompts, {r['target_forwards']} cycles)")
