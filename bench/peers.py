"""transformers' own decoding as peers of ours, on the same target, prompts and process: greedy `generate`
with a static KV cache (compiled by transformers on CUDA; `generate` does that by itself for a static
cache) and `generate(assistant_model=...)`. The speedup that matters is against the best autoregressive
decoding available, so bench_decode divides by the faster of ours and this one.

    from bench.peers import hf_greedy, hf_assisted
    g = hf_greedy(target, prompts, 64)                    # {"tok_s", "ms_per_token", "compiled", ...}
    a = hf_assisted(target, assistant_model, prompts, 64, g["outputs"])
"""
from __future__ import annotations

import contextlib
import signal
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kwargs(target, max_new_tokens: int) -> dict:
    eos = target.eos_token_ids
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos[0]
    return dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None)


def _run(model, ids: list[int], device, **kw) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
    _sync(device)
    return out[0, x.shape[1]:].tolist(), time.perf_counter() - t0


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in this (main) thread after `seconds` (0 = no limit)."""
    if seconds <= 0:
        yield
        return

    def _raise(*_):
        raise TimeoutError(f"warm-up with compile took over {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _summary(name: str, walls: list[float], outputs: list[list[int]], **extra) -> dict:
    tokens = sum(map(len, outputs))
    wall = sum(walls)
    return {"peer": name, "generations": len(outputs), "new_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else None, "ms_per_token": 1000 * wall / tokens if tokens else None,
            "outputs": outputs, **extra}


def hf_greedy(target, prompts: list[list[int]], max_new_tokens: int, cache: str = "static",
              compile: str = "auto", compile_limit_s: int = 0) -> dict:
    """Greedy generate over the prompts, timed per call (prefill included, like ours). With a static cache
    the warm-up runs the LONGEST prompt first: transformers keeps the largest cache length it has seen, so
    every timed call then reuses one cache size and one compiled graph. compile='auto' lets transformers
    compile where it does (CUDA); if compiling fails, or the warm-up outlasts compile_limit_s (0 = no
    limit; a bounded GPU suite cannot wait for every compile), the reason is kept and it runs eager."""
    model, dev = target.model, target.device
    kw = _kwargs(target, max_new_tokens)
    if cache == "static":
        kw["cache_implementation"] = "static"
    gc = model.generation_config
    old = getattr(gc, "disable_compile", False)
    gc.disable_compile = compile == "off"
    note = ""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # did transformers compile? (its own flag moved across versions)
    t0 = time.perf_counter()
    try:
        try:
            with _time_limit(compile_limit_s if not gc.disable_compile else 0):
                _run(model, max(prompts, key=len), dev, **kw)  # warm-up: cache size, compile, kernels
        except Exception as e:  # noqa: BLE001 - any compile failure: say it, time the eager path instead
            if gc.disable_compile:
                raise
            note = f"compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); eager"
            gc.disable_compile = True
            torch._dynamo.reset()
            _run(model, max(prompts, key=len), dev, **kw)
        warm = time.perf_counter() - t0
        compiled = counters["stats"]["unique_graphs"] > graphs
        walls, outs = [], []
        for ids in prompts:
            out, wall = _run(model, ids, dev, **kw)
            outs.append(out)
            walls.append(wall)
    finally:
        gc.disable_compile = old
    return _summary(f"hf-greedy-{cache}", walls, outs, compiled=compiled, warmup_s=warm, note=note)


def hf_assisted(target, assistant, prompts: list[list[int]], max_new_tokens: int,
                greedy_outputs: list[list[int]] | None = None) -> dict:
    """generate(assistant_model=...) greedy (transformers' assisted decoding keeps its own dynamic caches);
    `identical` counts outputs equal to greedy_outputs (lossless decoding must match greedy)."""
    kw = _kwargs(target, max_new_tokens)
    _run(target.model, prompts[0], target.device, assistant_model=assistant, **kw)  # warm-up
    walls, outs = [], []
    for ids in prompts:
        out, wall = _run(target.model, ids, target.device, assistant_model=assistant, **kw)
        outs.append(out)
        walls.append(wall)
    same = None if greedy_outputs is None else sum(a == b for a, b in zip(outs, greedy_outputs))
    return _summary("hf-assisted", walls, outs, identical=same)
