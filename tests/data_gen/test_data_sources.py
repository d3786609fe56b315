"""Prompt sources: the cut-off ShareGPT file, JSONL in both schemas, HF datasets; malformed rows counted."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conf.errors import DraftsmithError
from conf.schema.data import DataConfig
from data_gen.sources import SourceReport, is_heldout, iter_jsonl, iter_sharegpt, iter_source

GOOD = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


def test_cut_off_json_array(tmp_path):
    rows = [GOOD, {"id": "b", "conversations": []}, {**GOOD, "id": "c"}]
    text = json.dumps(rows)[:-1] + ', {"id": "d", "conversations": [{"from": "human", "val'
    path = tmp_path / "cut.json"
    path.write_text(text)
    report = SourceReport()
    convs = list(iter_sharegpt(path, report, split="all"))
    assert [c.id for c in convs] == ["a", "c"]
    assert convs[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert report.read == 3 and report.kept == 2 and report.skipped == Counter({"no turns": 1})
    assert report.truncated_at == text.index('{"id": "d"')
    assert "file cut off at byte" in report.summary()
    # a file that just stops after a complete record (no closing bracket) is also reported, not an error
    path.write_text(json.dumps([GOOD])[:-1])
    report = SourceReport()
    assert len(list(iter_sharegpt(path, report, split="all"))) == 1 and report.truncated_at is not None


def test_bundled_sharegpt_parses_to_the_cut():
    report = SourceReport()
    n = sum(1 for _ in iter_sharegpt(report=report, split="train"))
    assert report.read + report.heldout == 17671  # every complete record, then the cut
    assert report.truncated_at is not None and n == report.kept > 16000 and report.heldout > 0


def test_sharegpt_train_split_excludes_heldout(tmp_path):
    rows = [{**GOOD, "id": f"conv{i}"} for i in range(300)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    report = SourceReport()
    train = [c.id for c in iter_source(DataConfig(source="sharegpt", path=str(path)), report)]
    held = [f"conv{i}" for i in range(300) if is_heldout(f"conv{i}")]
    assert held and not set(train) & set(held) and len(train) + len(held) == 300
    assert report.heldout == len(held)


def test_jsonl_both_schemas_and_malformed_rows_counted(tmp_path):
    lines = [
        json.dumps(GOOD),
        json.dumps({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}], "id": 7}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]},
                                 {"role": "assistant", "content": "ok"}]}),
        "{not json",
        "",  # blank lines are layout, not rows
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"text": "plain text"}),
        json.dumps(["a list"]),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = SourceReport()
    convs = list(iter_jsonl(path, report))
    assert [c.id for c in convs] == ["a", "7", "2"]
    assert convs[1].messages[0] == {"role": "system", "content": "Be kind."}
    assert convs[2].messages[0] == {"role": "user", "content": "parts"}
    assert report.skipped == Counter({"bad JSON line": 1, "turn without a role": 1, "empty turn": 1,
                                      "non-string content": 1, "no assistant turn": 1,
                                      "no conversations or messages field": 1, "row is not an object": 1,
                                      "unknown role 'tool'": 1})
    assert report.read == 11 == report.kept + sum(report.skipped.values())


def test_max_conversations_stops_reading(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "id": str(i)}) for i in range(10)) + "\n")
    report = SourceReport()
    convs = list(iter_source(DataConfig(source="jsonl", path=str(path), max_conversations=4), report))
    assert [c.id for c in convs] == ["0", "1", "2", "3"] and report.read == 4 == report.kept


def _rows():
    return {"id": ["x", "y", "z"],
            "messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
                         [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]]}


def test_hf_dataset_from_save_to_disk_and_from_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_rows()).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_dict(_rows())}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "data.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "messages": m}) for i, m in zip(_rows()["id"], _rows()["messages"])))
    for path, split in ((tmp_path / "saved", "train"), (tmp_path / "dict", "train_sft"), (tmp_path / "files", "train")):
        report = SourceReport()
        convs = list(iter_source(DataConfig(source="hf", path=str(path), split=split), report))
        assert [c.id for c in convs] == ["x", "z"], path
        assert report.skipped == Counter({"empty turn": 1}) and convs[1].source == f"hf:{path}"
    with pytest.raises(DraftsmithError, match=r"has splits \['train_sft'\], not 'train': set data.split"):
        list(iter_source(DataConfig(source="hf", path=str(tmp_path / "dict")), SourceReport()))


def test_source_errors(tmp_path):
    def err(**kw):
        with pytest.raises(DraftsmithError) as e:
            list(iter_source(DataConfig(**kw), SourceReport()))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert err(source="csv") == "data.source='csv' is not a prompt source: use one of sharegpt, jsonl, hf"
    assert err(source="jsonl").startswith("data.source=jsonl needs data.path")
    assert err(source="jsonl", path=str(tmp_path / "none.jsonl")).startswith(f"data.path '{tmp_path}/none.jsonl' is not a file")
    assert err(source="sharegpt", path=str(tmp_path / "none.json")).startswith("data.path")
    assert err(source="sharegpt", split="test").startswith("data.split='test' is not a ShareGPT split")
    assert "could not load the dataset" in err(source="hf", path=str(tmp_path / "no-such-folder"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "d.jsonl").write_text(json.dumps({"text": "hi"}))
    assert "needs a 'conversations' (ShareGPT) or 'messages' (OpenAI) column" in err(source="hf", path=str(tmp_path / "plain"))
    assert err(source="jsonl", path=str(tmp_path / "plain" / "d.jsonl"), max_conversations=0).startswith(
        "data.max_conversations=0")
