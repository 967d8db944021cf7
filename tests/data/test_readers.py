"""Corpus/task readers: good files parse, every bad line names file:line, field and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imprag_ray.data.io import write_parquet_atomic
from imprag_ray.data.readers import iter_corpus, read_corpus, read_tasks
from imprag_ray.data.records import FORMATS, DataError, Passage, TaskExample


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _kilt(id_, input_, *outputs) -> dict:
    return {"id": id_, "input": input_, "output": list(outputs)}


# ---- corpus ----------------------------------------------------------------------------
def test_corpus_jsonl_ids_titles_blank_lines(tmp_path):
    path = _write_lines(
        tmp_path / "corpus.jsonl",
        [
            {"id": 7, "title": "Ilsa Dren", "text": "Ilsa Dren was born in Velmora."},
            "",
            {"id": "p2", "text": "No title here."},
            {"id": "p3", "title": None, "text": "Null title."},
        ],
    )
    assert read_corpus(path) == [
        Passage("7", "Ilsa Dren", "Ilsa Dren was born in Velmora."),
        Passage("p2", "", "No title here."),
        Passage("p3", "", "Null title."),
    ]


def test_corpus_missing_text_names_file_line_field_and_fix(tmp_path):
    lines = [{"id": i, "title": "t", "text": "x"} for i in range(16)] + [{"id": 99, "title": "t"}]
    path = _write_lines(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_corpus(path)
    msg = str(err.value)
    assert "corpus.jsonl:17: field 'text' missing" in msg
    assert 'each line must be {"id", "title", "text"}' in msg
    assert err.value.field == "text"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"id": 1, "title": "t", "text": 5}, "text"),
        ({"id": 1, "title": "t", "text": "  "}, "text"),
        ({"id": 1, "title": 3, "text": "x"}, "title"),
        ({"title": "t", "text": "x"}, "id"),
        ({"id": [1], "title": "t", "text": "x"}, "id"),
    ],
)
def test_corpus_wrong_fields(tmp_path, row, field):
    path = _write_lines(tmp_path / "c.jsonl", [{"id": "ok", "text": "fine"}, row])
    with pytest.raises(DataError, match=rf"c\.jsonl:2: field '{field}'"):
        read_corpus(path)


def test_corpus_bad_json_and_non_object(tmp_path):
    with pytest.raises(DataError, match=r"c\.jsonl:2: invalid JSON"):
        read_corpus(_write_lines(tmp_path / "c.jsonl", [{"id": 1, "text": "a"}, "{not json"]))
    with pytest.raises(DataError, match=r"d\.jsonl:1: line is a JSON list"):
        read_corpus(_write_lines(tmp_path / "d.jsonl", ["[1, 2]"]))


def test_corpus_duplicate_ids(tmp_path):
    path = _write_lines(tmp_path / "c.jsonl", [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'id' duplicate passage id '1'"):
        read_corpus(path)
    assert len(list(iter_corpus(path, check_duplicates=False))) == 2


def test_corpus_parquet_round_trip(tmp_path):
    rows = [{"id": f"p{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(10)]
    write_parquet_atomic(tmp_path / "c.parquet", rows)
    assert read_corpus(tmp_path / "c.parquet") == [Passage(**r) for r in rows]
    assert [p.name for p in tmp_path.iterdir()] == ["c.parquet"]  # no temp file left


def test_corpus_parquet_bad_row_names_row(tmp_path):
    write_parquet_atomic(tmp_path / "c.parquet", [{"id": "a", "text": "x"}, {"id": "b", "text": None}])
    with pytest.raises(DataError, match=r"c\.parquet:row 2: field 'text' missing"):
        read_corpus(tmp_path / "c.parquet")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_corpus(tmp_path / "c.csv")


# ---- tasks ------------------------------------------------------------------------------
def test_kilt_qa_answers_deduped_provenance_gathered(tmp_path):
    path = _write_lines(
        tmp_path / "qa.jsonl",
        [
            _kilt(
                1,
                "Where was Ilsa Dren born?",
                {"answer": "Velmora", "provenance": [{"wikipedia_id": 42, "title": "Ilsa Dren"}]},
                {"provenance": [{"wikipedia_id": "p7"}]},  # provenance-only output is fine
                {"answer": "Velmora"},
                {"answer": "Velmora City", "provenance": [{"wikipedia_id": "42"}]},
            )
        ],
    )
    [ex] = read_tasks(path, "qa")
    # titles are parallel to the deduplicated ids: "42" keeps the title of its titled entry
    assert ex == TaskExample(
        "1",
        "Where was Ilsa Dren born?",
        ("Velmora", "Velmora City"),
        ("42", "p7"),
        "qa",
        provenance_titles=("Ilsa Dren", ""),
    )


@pytest.mark.parametrize(
    "row, field",
    [
        (_kilt("a", "q", {"provenance": [{"wikipedia_id": 1}]}), "output[0].answer"),
        (_kilt("a", "q", {"answer": "x"}, {"answer": 3}), "output[1].answer"),
        (
            _kilt("a", "q", {"answer": "x", "provenance": [{"title": "t"}]}),
            "output[0].provenance[0].wikipedia_id",
        ),
        (_kilt("a", "q", {"answer": "x", "provenance": "p1"}), "output[0].provenance"),
        ({"id": "a", "input": "q"}, "output"),
        ({"id": "a", "input": "q", "output": {"answer": "x"}}, "output"),
        ({"id": "a", "output": [{"answer": "x"}]}, "input"),
        ({"input": "q", "output": [{"answer": "x"}]}, "id"),
    ],
)
def test_kilt_bad_rows_name_dotted_field(tmp_path, row, field):
    path = _write_lines(tmp_path / "qa.jsonl", [_kilt("ok", "q", {"answer": "x"}), "", row])
    with pytest.raises(DataError) as err:
        read_tasks(path, "qa")
    assert f"qa.jsonl:3: field '{field}'" in str(err.value)
    assert '"output"' in str(err.value)  # the fix shows the expected shape


def test_fact_check_label_mapping(tmp_path):
    rows = [
        _kilt(i, f"claim {i}", {"answer": a})
        for i, a in enumerate(["SUPPORTS", "REFUTES", "true", "false", "Supports"])
    ]
    path = _write_lines(tmp_path / "fc.jsonl", rows)
    assert [ex.answers for ex in read_tasks(path, "fact_check")] == [
        ("true",),
        ("false",),
        ("true",),
        ("false",),
        ("true",),
    ]
    # Other formats keep labels verbatim.
    assert read_tasks(path, "qa")[0].answers == ("SUPPORTS",)


def test_fact_check_unknown_label(tmp_path):
    path = _write_lines(tmp_path / "fc.jsonl", [_kilt(1, "c", {"answer": "NOT ENOUGH INFO"})])
    with pytest.raises(DataError, match=r"fc\.jsonl:1: field 'output\[0\]\.answer'.*SUPPORTS, REFUTES"):
        read_tasks(path, "fact_check")


def test_unknown_format_lists_known(tmp_path):
    path = _write_lines(tmp_path / "x.jsonl", [_kilt(1, "q", {"answer": "a"})])
    with pytest.raises(ValueError) as err:
        read_tasks(path, "summarisation")
    for fmt in FORMATS:
        assert fmt in str(err.value)


def test_corpus_text_and_unlabelled_inputs(tmp_path):
    path = _write_lines(
        tmp_path / "t.jsonl",
        [_kilt("a", "", {"answer": "Some text."}), {"id": "b", "text": "Corpus style row."}],
    )
    assert [(e.input, e.answers) for e in read_tasks(path, "corpus_text")] == [
        ("", ("Some text.",)),
        ("", ("Corpus style row.",)),
    ]
    with pytest.raises(DataError, match="field 'input' is empty"):
        read_tasks(_write_lines(tmp_path / "q.jsonl", [_kilt("a", "", {"answer": "x"})]), "qa")
    plain = _write_lines(tmp_path / "in.jsonl", [{"id": "a", "input": "Q?"}])
    assert read_tasks(plain, "qa", require_answers=False)[0].answers == ()


def test_duplicate_task_ids(tmp_path):
    path = _write_lines(
        tmp_path / "qa.jsonl", [_kilt(1, "q", {"answer": "a"}), _kilt("1", "r", {"answer": "b"})]
    )
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'id' duplicate"):
        read_tasks(path, "qa")


def test_tasks_parquet_round_trip(tmp_path):
    rows = [
        _kilt(f"q{i}", f"question {i}", {"answer": f"a{i}", "provenance": [{"wikipedia_id": f"p{i}"}]})
        for i in range(5)
    ]
    write_parquet_atomic(tmp_path / "qa.parquet", rows)
    got = read_tasks(tmp_path / "qa.parquet", "qa")
    assert [(e.id, e.answers, e.provenance) for e in got] == [
        (f"q{i}", (f"a{i}",), (f"p{i}",)) for i in range(5)
    ]


def test_task_example_is_frozen_and_meta_not_compared():
    a = TaskExample("1", "q", ["x"], ["p"], "qa", meta={"k": 1})
    b = TaskExample("1", "q", ("x",), ("p",), "qa")
    assert a == b and hash(a) == hash(b) and a.answers == ("x",)
    with pytest.raises(AttributeError):
        a.input = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown task format"):
        TaskExample("1", "q", (), (), "nope")
