"""Teacher retrievers: BM25, dense (tiny local encoder), labels file."""

from __future__ import annotations

import json

import pytest

from imprag_ray.data.records import DataError, Passage
from imprag_ray.retrievers.teachers import build_teacher

PASSAGES = [
    Passage("p0", "Elfen Arkra", "Elfen Arkra was born in Caselva and works as a painter."),
    Passage("p1", "Halcas Losa", "Halcas Losa was born in Tamgalra and works as a smith."),
    Passage("p2", "Velbri Naros", "Velbri Naros lived by the river Jormor as a tanner."),
]


def test_bm25_ranks_the_matching_passage_first():
    teacher = build_teacher("bm25", PASSAGES)
    ranked = teacher.rank(["Where was Halcas Losa born?", "Who lived by the river Jormor?"], 3)
    assert ranked[0][0][0] == "p1" and ranked[1][0][0] == "p2"
    assert len(ranked[0]) == 3 and ranked[0][0][1] >= ranked[0][1][1]


def test_labels_teacher_reads_rankings_and_reports_bad_lines(tmp_path):
    good = tmp_path / "labels.jsonl"
    good.write_text(json.dumps({"id": "q1", "ranking": ["p2", "p0"]}) + "\n")
    teacher = build_teacher("labels", PASSAGES, good)
    assert [p for p, _ in teacher.rank(["x"], 5, ["q1"])[0]] == ["p2", "p0"]
    with pytest.raises(DataError, match="no ranking for query ids"):
        teacher.rank(["x"], 5, ["q9"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q1", "ranking": ["p7"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*'ranking' names passages not in the corpus"):
        build_teacher("labels", PASSAGES, bad)


def test_dense_teacher_from_a_local_encoder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for p in PASSAGES for w in (p.title + " " + p.text).replace(".", "").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    enc = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64))
    enc.save_pretrained(tmp_path / "enc")
    fast.save_pretrained(tmp_path / "enc")
    teacher = build_teacher("dense", PASSAGES, tmp_path / "enc")
    # a query identical to a passage's text must rank that passage first (cosine = 1)
    ranked = teacher.rank(["Velbri Naros: Velbri Naros lived by the river Jormor as a tanner."], 2)
    assert ranked[0][0][0] == "p2" and ranked[0][0][1] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(FileNotFoundError, match=r"teacher\.path"):
        build_teacher("dense", PASSAGES, tmp_path / "missing")


def test_unknown_teacher_is_refused():
    with pytest.raises(ValueError, match="unknown teacher 'tfidf'"):
        build_teacher("tfidf", PASSAGES)
