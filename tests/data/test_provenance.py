"""ProvenanceResolver: gold passages of an example by passage id or through page titles."""

from __future__ import annotations

import json

import pytest

from imprag_ray.data.provenance import ProvenanceResolver, normalize_title
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.data.records import DataError, Passage, TaskExample

PASSAGES = [
    Passage("10", "Ilsa Dren", "Ilsa Dren was a weaver.", ""),
    Passage("11", "Velmora", "Velmora is a city on the Eske.", ""),
    Passage("12", "Ilsa Dren", "She was born in Velmora in 1801.", "Early life"),
    Passage("13", "Velmora", "The town was founded in 1100.", "History"),
    Passage("14", "Zorbin Kalt", "Zorbin Kalt was a baker.", ""),
]


def _ex(ids, titles=(), answers=("Velmora",), id_="q"):
    return TaskExample(id_, "where was ilsa dren born", answers, ids, "qa", provenance_titles=titles)


def test_normalize_title():
    assert normalize_title("  ilsa_Dren\u00a0 ") == "Ilsa Dren"
    assert normalize_title("Cafe\u0301") == normalize_title("Caf\u00e9")  # NFC
    assert normalize_title("") == ""


def test_page_title_gold_ids_are_the_pages_passages_in_corpus_order():
    r = ProvenanceResolver(PASSAGES, "page_title")
    ex = _ex(("11", "999"), ("velmora", "Ilsa_Dren"))  # ids are page ids: "11" is NOT passage 11's page
    assert r.gold_ids(ex) == ["11", "13", "10", "12"]  # pages in provenance order
    assert r.is_gold(ex, "12") and not r.is_gold(ex, "14")
    assert r.recall_at_k(ex, ["14", "12"], 1) == 0.0 and r.recall_at_k(ex, ["14", "12"], 2) == 1.0
    assert not r.unmatched(ex)
    missing = _ex(("5",), ("Nowhere",))
    assert r.gold_ids(missing) == [] and r.unmatched(missing) and r.recall_at_k(missing, ["10"], 5) == 0.0
    assert r.gold_ids(_ex(())) == [] and not r.has_provenance(_ex(()))


def test_passage_id_mode_uses_the_ids_and_needs_no_corpus():
    r = ProvenanceResolver(mode="passage_id")
    ex = _ex(("12", "10"), ("Velmora", "Velmora"))
    assert r.gold_ids(ex) == ["12", "10"] and r.is_gold(ex, "10") and not r.is_gold(ex, "11")
    assert r.recall_at_k(ex, ["11", "10"], 2) == 1.0


def test_order_gold_and_reading_passage():
    r = ProvenanceResolver(PASSAGES, "page_title")
    ex = _ex(("1",), ("Ilsa Dren",))
    # the teacher's order first, then the other gold passages; non-gold ids never appear
    assert r.order_gold(ex, ["14", "12", "11"]) == ["12", "10"]
    assert r.order_gold(ex) == ["10", "12"]
    texts = {p.id: p.text for p in PASSAGES}
    assert r.reading_passage(ex, texts) == "12"  # the page passage holding the answer
    assert r.reading_passage(_ex(("1",), ("Ilsa Dren",), answers=("nothing",)), texts) == "10"
    assert r.reading_passage(_ex(("1",), ("Nowhere",)), texts) is None


def test_page_title_example_without_title_names_field_and_fix():
    r = ProvenanceResolver(PASSAGES, "page_title")
    with pytest.raises(DataError) as err:
        r.gold_ids(_ex(("10", "11"), ("Ilsa Dren", "")))
    msg = str(err.value)
    assert "example 'q'" in msg and "output[].provenance[].title" in msg and "'11' has no title" in msg
    assert "data.provenance: passage_id" in msg
    with pytest.raises(DataError, match="'10' has no title"):
        r.gold_ids(_ex(("10",)))
    with pytest.raises(ValueError, match="one title per id"):
        _ex(("10", "11"), ("Ilsa Dren",))
    with pytest.raises(ValueError, match=r"data\.provenance must be one of passage_id, page_title"):
        ProvenanceResolver(PASSAGES, "wikipedia_id")


def test_from_corpus_keeps_only_the_examples_pages(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PASSAGES))
    assert read_corpus(path) == PASSAGES  # the section is read and kept
    ex = _ex(("1",), ("Velmora",))
    r = ProvenanceResolver.from_corpus(path, "page_title", [ex])
    assert r.gold_ids(ex) == ["11", "13"] and r._pages.keys() == {"Velmora"}
    assert ProvenanceResolver.from_corpus(None, "passage_id").gold_ids(_ex(("9",))) == ["9"]


def test_reader_refuses_an_untitled_entry_at_file_line_with_page_title(tmp_path):
    path = tmp_path / "nq.jsonl"
    rows = [
        {
            "id": "a",
            "input": "q",
            "output": [{"answer": "x", "provenance": [{"wikipedia_id": 1, "title": "T"}]}],
        },
        {"id": "b", "input": "q", "output": [{"answer": "x"}, {"provenance": [{"wikipedia_id": 2}]}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [ex.provenance_titles for ex in read_tasks(path, "qa")] == [("T",), ()]
    with pytest.raises(DataError) as err:
        read_tasks(path, "qa", provenance="page_title")
    assert str(err.value).startswith(f"{path}:2: field 'output[1].provenance[0].title' missing")
