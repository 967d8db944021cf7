"""Training items and batches: context, positives, negatives, candidates."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from imprag_ray.data.records import TaskExample
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.train.batching import collate, make_item, make_items, make_reading_item

RANKING = [f"p{i:05d}" for i in range(60)]
ARGS = dict(
    k=3,
    num_positives=1,
    hard_negative_ranks=(10, 50),
    num_hard_negatives=2,
    num_candidates=5,
    max_prompt_tokens=40,
    max_target_tokens=8,
)


@pytest.fixture(scope="module")
def setup(tiny_world):
    from imprag_ray.data.readers import read_corpus

    tok = load_tokenizer(tiny_world["ckpt"])
    store = PassageStore(read_corpus(tiny_world["world"] / "corpus.jsonl"), tok, 48)
    return tok, store


def _example(i=0):
    return TaskExample(f"q{i}", "Where was Elfen Arkra born?", ("Caselva",), ("p00000",), "qa")


def test_item_roles_follow_the_teacher_ranking(setup):
    tok, _ = setup
    item = make_item(_example(), tok, RANKING, rng=random.Random(0), **ARGS)
    assert item.context == RANKING[:3] and item.positives == RANKING[:1]
    assert item.candidates == RANKING[:5] and item.near == RANKING[:10]
    assert all(RANKING.index(p) >= 10 for p in item.hard_negatives) and len(item.hard_negatives) == 2
    assert item.prompt[0] == tok.bos_token_id and item.target[-1] == tok.eos_token_id
    orders = {
        tuple(make_item(_example(), tok, RANKING, rng=random.Random(s), shuffle_context=True, **ARGS).context)
        for s in range(8)
    }
    assert len(orders) > 1 and all(sorted(o) == RANKING[:3] for o in orders)


def test_make_items_tokenises_in_batches_and_equals_make_item_one_by_one(setup):
    tok, _ = setup
    long = "Where was " + " ".join(["Elfen Arkra"] * 40) + " born?"  # left-truncated prompt
    examples = [
        _example(0),
        TaskExample("i", "Say hi", ("hi",), (), "instruction"),
        TaskExample("c", "", ("Elfen Arkra was born in Caselva, a town by the sea.",), (), "corpus_text"),
        TaskExample("l", long, (" ".join(["Caselva"] * 20),), ("p00001",), "qa"),
        _example(2),
    ]
    rankings = {"q0": RANKING, "l": RANKING[3:], "q2": RANKING[7:]}
    rng = random.Random(5)
    one = [make_item(ex, tok, rankings.get(ex.id), rng=rng, shuffle_context=True, **ARGS) for ex in examples]
    rng = random.Random(5)
    many = make_items(examples, tok, rankings, rng=rng, shuffle_context=True, **ARGS)
    assert many == one
    assert (
        len(many[3].prompt) == ARGS["max_prompt_tokens"] and len(many[3].target) == ARGS["max_target_tokens"]
    )
    assert many[2].prompt == [tok.bos_token_id]  # corpus text: no prompt


def test_warmup_negatives_exclude_the_teachers_near_top(setup):
    tok, store = setup
    a = make_item(_example(0), tok, RANKING, rng=random.Random(0), **ARGS)
    b = make_item(_example(1), tok, RANKING[5:] + RANKING[:5], rng=random.Random(1), **ARGS)
    plain = make_item(
        TaskExample("i", "Say hi", ("hi",), (), "instruction"), tok, None, rng=random.Random(0), **ARGS
    )
    # a whole prompt that needs a passage ("prompt" format) trains retrieval; "instruction" does not
    prompt = TaskExample("w", "Elfen Arkra, home town please. A:", ("Caselva",), ("p00000",), "prompt")
    wrapped = make_item(prompt, tok, RANKING, rng=random.Random(2), **ARGS)
    assert wrapped.retrieval and wrapped.positives == RANKING[:1]
    assert not make_item(
        dataclasses.replace(prompt, format="instruction"), tok, RANKING, rng=random.Random(2), **ARGS
    ).retrieval
    batch = collate([a, plain, b, wrapped], store, 3, tok.pad_token_id, with_passages=True, stage="warmup")
    assert batch.retrieval.tolist() == [True, False, True, True]
    assert batch.passage_mask[1].sum() == 0 and batch.passage_mask[0].sum() > 0
    pool = batch.pool_ids
    assert set(pool) == set(
        a.positives + a.hard_negatives + b.positives + b.hard_negatives + wrapped.hard_negatives
    )
    pos_b = pool.index(b.positives[0])  # rank 5 for query a: neither positive nor negative
    assert not batch.positive[0, pos_b] and not batch.negative[0, pos_b]
    assert batch.positive[1, pos_b] and not batch.negative[1, pos_b]
    assert (batch.candidates.numel() == 0) or bool((batch.candidates < 0).all())
    distill = collate([a, b], store, 3, tok.pad_token_id, with_passages=True, stage="distill")
    assert [distill.pool_ids[i] for i in distill.candidates[0].tolist()] == a.candidates


def test_reading_items_read_the_gold_passage_and_train_no_retrieval(setup):
    tok, store = setup
    others = store.order
    ex = TaskExample(
        "r", "Copy the passage about Elfen Arkra. A:", ("some text",), ("p00007",), "instruction"
    )
    items = [
        make_reading_item(
            ex, tok, others, k=3, max_prompt_tokens=40, max_target_tokens=8, rng=random.Random(s)
        )
        for s in range(6)
    ]
    for it in items:
        assert "p00007" in it.context and len(set(it.context)) == 3 and not it.retrieval
        assert it.positives == [] and it.hard_negatives == [] and it.candidates == []
    assert len({it.context.index("p00007") for it in items}) > 1  # gold not always first
    qa = make_item(_example(), tok, RANKING, rng=random.Random(0), **ARGS)
    batch = collate([items[0], qa], store, 3, tok.pad_token_id, with_passages=True)
    assert batch.retrieval.tolist() == [False, True]  # J_ret rows: teacher-labelled only
    gold, _ = store.tensor(["p00007"])
    slot = items[0].context.index("p00007")
    assert torch.equal(batch.passage_ids[0, slot], gold[0]) and batch.passage_mask[0].sum() > 0
    assert set(batch.pool_ids) == set(qa.positives + qa.hard_negatives)
    alone = collate([items[0]], store, 3, tok.pad_token_id, with_passages=True)
    assert alone.passage_ids is not None and not bool(alone.retrieval.any())
    closed = collate([items[0]], store, 3, tok.pad_token_id, with_passages=False)
    assert closed.passage_ids is None
    with pytest.raises(ValueError, match="provenance"):
        make_reading_item(
            TaskExample("x", "hi", ("a",), (), "instruction"),
            tok,
            others,
            k=3,
            max_prompt_tokens=40,
            max_target_tokens=8,
            rng=random.Random(0),
        )
