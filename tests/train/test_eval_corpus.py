"""eval.corpus_sample: evaluation searches a bounded sub-corpus that holds the gold
passages (and the teacher's top passages), and says so in its metrics."""

from __future__ import annotations

import json

import pytest

from imprag_ray.config.loader import ConfigError, load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.records import TaskExample
from imprag_ray.train import recipe as recipe_module
from imprag_ray.train.eval_corpus import eval_passage_ids
from imprag_ray.train.recipe import ImpRAGRecipe, read_task_files


def _ex(i: int, gold: tuple[str, ...]) -> TaskExample:
    return TaskExample(f"q{i}", f"question {i}", ("a",), gold, "qa")


def test_eval_passage_ids_keep_gold_then_teacher_ranks_then_a_seeded_sample():
    corpus = [f"p{i:03d}" for i in range(100)]
    examples = [_ex(0, ("p050", "missing")), _ex(1, ("p007",))]
    rankings = [["p001", "p002", "p003"], ["p090", "p091", "p092"]]
    ids = eval_passage_ids(corpus, examples, 6, seed=3, rankings=rankings)
    assert ids == sorted(ids) and len(ids) == 6  # corpus order, bounded
    assert {"p050", "p007"} <= set(ids)  # gold; ids outside the corpus are skipped
    assert {"p001", "p090", "p002", "p091"} <= set(ids) and "p003" not in ids  # rank by rank
    bigger = eval_passage_ids(corpus, examples, 30, seed=3, rankings=rankings)
    assert len(bigger) == 30 and set(ids) <= set(bigger)
    assert bigger == eval_passage_ids(corpus, examples, 30, seed=3, rankings=rankings)  # seeded
    assert bigger != eval_passage_ids(corpus, examples, 30, seed=4, rankings=rankings)
    many_gold = [_ex(i, (corpus[i],)) for i in range(10)]
    assert len(eval_passage_ids(corpus, many_gold, 4, seed=0)) == 10  # gold is never dropped
    # KILT page provenance: gold passages come from a resolver (data.provenance: page_title)
    pages = eval_passage_ids(corpus, examples, 3, seed=0, gold_of=lambda ex: ["p060", "p061"])
    assert {"p060", "p061"} <= set(pages) and len(pages) == 3


@pytest.fixture
def recording(monkeypatch):
    """encode_corpus as the recipe calls it, recording which passages it encodes."""
    encoded: list[list[str]] = []
    real = recipe_module.encode_corpus

    def encode(model, store, *args, ids=None, **kwargs):
        encoded.append(list(store.order if ids is None else ids))
        return real(model, store, *args, ids=ids, **kwargs)

    monkeypatch.setattr(recipe_module, "encode_corpus", encode)
    return encoded


def test_evaluation_encodes_a_bounded_sub_corpus_with_the_gold_passages(tiny_world, tmp_path, recording):
    cfg = load_config(TrainJobConfig, tiny_world["job"], [f"output_dir={tmp_path}", "eval.corpus_sample=40"])
    recipe = ImpRAGRecipe(cfg)
    recipe.setup()
    result = recipe.evaluate("dev", limit=8)
    (encoded,) = recording
    examples = read_task_files(cfg.data.dev)[0][1][:8]
    gold = {pid for ex in examples for pid in ex.provenance}
    assert gold and gold <= set(encoded) and 40 <= len(encoded) <= 40 + len(gold)
    assert len(encoded) < len(recipe.store) == 300
    qa = result["qa"]
    assert qa["corpus_size"] == len(encoded) and qa["sub_corpus"] is True
    preds = [json.loads(line) for line in (tmp_path / "eval/dev-predictions.jsonl").read_text().splitlines()]
    assert all(set(p["retrieved"]) <= set(encoded) for p in preds)
    # the teacher (BM25, built for training) adds its top passages for the dev questions
    ranked = recipe._teacher.rank([ex.input for ex in examples], 1, [ex.id for ex in examples])
    assert {r[0][0] for r in ranked} <= set(encoded)
    recipe.evaluate("dev", limit=8, write=False)
    assert recording[1] == encoded  # the same sub-corpus at every evaluation of a run


def test_without_corpus_sample_evaluation_searches_the_whole_corpus(tiny_world, tmp_path, recording):
    recipe = ImpRAGRecipe(load_config(TrainJobConfig, tiny_world["job"], [f"output_dir={tmp_path}"]))
    recipe.setup()
    qa = recipe.evaluate("dev", limit=4, write=False)["qa"]
    assert recording == [list(recipe.store.order)]
    assert qa["corpus_size"] == 300 and qa["sub_corpus"] is False


def test_corpus_sample_must_be_positive(tiny_world):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, tiny_world["job"], ["eval.corpus_sample=0"])
    assert err.value.key == "eval.corpus_sample"
