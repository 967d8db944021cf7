"""The recipe on KILT/Atlas-format data (tests/kilt_micro.py) with ``data.provenance:
page_title``: provenance names Wikipedia pages whose ids collide with other passages' ids, so
positives, reading items and recall must join through the page titles."""

from __future__ import annotations

import json

import pytest
import yaml

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.train.recipe import ImpRAGRecipe
from tests.llama3_micro import B, T


@pytest.fixture(scope="module")
def kilt_recipe(tmp_path_factory):
    from tests.kilt_micro import write_kilt_world
    from tests.llama3_micro import build_snapshot

    root = tmp_path_factory.mktemp("kilt")
    world = write_kilt_world(root / "data")
    snap = build_snapshot(root / "snapshot", world["texts"], instruct=False)
    data = root / "data"
    job = {
        "name": "kilt",
        "output_dir": str(root / "run"),
        "threads": 1,
        "model": {
            "path": str(snap),
            "retrieval_layer": B,
            "reader_last_layer": T,
            "max_passage_tokens": 32,
            "num_passages": 2,
        },
        "data": {
            "corpus": str(data / "atlas/enwiki-dec2021/passages.jsonl"),
            "provenance": "page_title",
            "train": [
                {"path": str(data / "kilt/nq-train-kilt.jsonl"), "format": "qa", "limit": 12},
                {
                    "path": str(data / "kilt/nq-train-kilt.jsonl"),
                    "format": "qa",
                    "limit": 4,
                    "context": "gold",
                },
            ],
            "dev": [{"path": str(data / "kilt/nq-dev-kilt.jsonl"), "format": "qa", "limit": 6}],
            "max_prompt_tokens": 64,
            "max_target_tokens": 8,
        },
        "teacher": {
            "kind": "labels",
            "path": str(data / "labels/contriever_msmarco_top50.jsonl"),
            "num_positives": 2,
            "provenance_positives": True,
        },
        "train": {"epochs": 1, "warmup_epochs": 1, "steps_per_epoch": 1, "batch_size": 4},
        "eval": {"top_k": 2, "recall_ks": [1, 2, 10], "max_new_tokens": 2},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    recipe = ImpRAGRecipe(load_config(TrainJobConfig, root / "job.yaml"))
    recipe.setup()
    return recipe, data


def _titles(data) -> dict[str, str]:
    rows = (data / "atlas/enwiki-dec2021/passages.jsonl").read_text().splitlines()
    return {str(r["id"]): r["title"] for r in map(json.loads, rows)}


def _gold_titles(path, n) -> list[set[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [{p["title"] for o in r["output"] for p in o.get("provenance") or []} for r in rows]


def test_positives_and_reading_passages_are_passages_of_the_gold_pages(kilt_recipe):
    recipe, data = kilt_recipe
    titles = _titles(data)
    gold = _gold_titles(data / "kilt/nq-train-kilt.jsonl", 12)
    teacher_items, reading_items = recipe.items[:12], recipe.items[12:]
    for item, pages in zip(teacher_items, gold, strict=True):
        assert item.positives and all(titles[pid] in pages for pid in item.positives)
        assert not any(titles[pid] in pages for pid in item.hard_negatives)
    for item, pages in zip(reading_items, gold[:4], strict=True):
        assert sum(titles[pid] in pages for pid in item.context) >= 1


def test_dev_recall_is_recall_through_page_titles(kilt_recipe):
    recipe, data = kilt_recipe
    metrics = recipe.evaluate("dev")["nq-dev-kilt"]
    preds = [
        json.loads(line)
        for line in (recipe.output_dir / "eval/dev-predictions.jsonl").read_text().splitlines()
    ]
    titles = _titles(data)
    gold = _gold_titles(data / "kilt/nq-dev-kilt.jsonl", 6)
    for k in (1, 2, 10):
        hits = sum(
            bool(pages & {titles[pid] for pid in p["retrieved"][:k]})
            for p, pages in zip(preds, gold, strict=True)
        )
        assert metrics[f"recall@{k}"] == pytest.approx(hits / 6)
    # ids that name another page's passage must not count: the old id comparison would
    ids = [
        {str(pr["wikipedia_id"]) for o in json.loads(line)["output"] for pr in o.get("provenance") or []}
        for line in (data / "kilt/nq-dev-kilt.jsonl").read_text().splitlines()[:6]
    ]
    assert any(ids_ & set(titles) for ids_ in ids)  # the collision is there to be caught
