"""The micro KILT + Atlas world (tests/kilt_micro.py) is what the paper jobs read: every file
they name exists in it and reads with the project's readers and the labels teacher, and its
provenance page ids really collide with passage ids of other pages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.provenance import ProvenanceResolver
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.eval.metrics import answer_in_text, recall_at_k
from imprag_ray.retrievers.teachers import build_teacher
from tests.kilt_micro import write_kilt_world

ROOT = Path(__file__).resolve().parents[2]
PAPER_JOBS = ["llama3_2_3b_imprag.yaml", "llama3_1_8b_imprag.yaml"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kilt_world")
    start = time.perf_counter()
    out = write_kilt_world(root)
    out["seconds"] = time.perf_counter() - start
    return out


def _local(path: str, root: Path) -> Path:
    assert path.startswith("/mnt/data/"), path
    return root / path.removeprefix("/mnt/data/")


def _job_task_files(name: str) -> tuple[TrainJobConfig, list[tuple[str, str]]]:
    cfg = load_config(TrainJobConfig, ROOT / "jobs" / name)
    specs = {(f.path, f.format) for f in cfg.data.train + cfg.data.dev + cfg.data.eval}
    return cfg, sorted(specs)


def test_fast_deterministic_and_seeded(world, tmp_path):
    assert world["seconds"] < 5
    again = write_kilt_world(tmp_path / "again")
    for rel, path in world["files"].items():
        assert path.read_bytes() == again["files"][rel].read_bytes(), rel
    other = write_kilt_world(tmp_path / "other", seed=1)
    assert [p["passage_ids"] for p in other["pages"]] != [p["passage_ids"] for p in world["pages"]]
    assert world["texts"] and all(isinstance(t, str) and t for t in world["texts"])


def test_atlas_corpus_format(world):
    passages = read_corpus(world["files"]["atlas/enwiki-dec2021/passages.jsonl"])
    assert len(passages) == 200 and len({p.title for p in passages}) == 40
    assert all(p.id.isdigit() for p in passages)
    assert all(60 <= len(p.text.split()) <= 100 for p in passages)
    assert {p.section for p in passages} >= {"", "Early life", "History"}  # Atlas sections are kept
    per_page = {}
    for p in passages:
        per_page.setdefault(p.title, []).append(p.id)
    assert set(map(len, per_page.values())) == {5}


@pytest.mark.parametrize("job", PAPER_JOBS)
def test_every_file_of_the_paper_jobs_reads_with_the_jobs_settings(world, job):
    cfg, specs = _job_task_files(job)
    assert cfg.data.provenance == "page_title"
    root = world["root"]
    passages = read_corpus(_local(cfg.data.corpus, root))
    resolver = ProvenanceResolver(passages, cfg.data.provenance)
    texts = {p.id: p.text for p in passages}
    retrieval_ids = []
    for path, fmt in specs:
        examples = read_tasks(_local(path, root), fmt, provenance=cfg.data.provenance)
        assert examples, path
        if fmt in ("instruction", "corpus_text"):
            assert all(not ex.provenance for ex in examples)
            continue
        assert 16 <= len(examples) <= 60, path
        retrieval_ids += [ex.id for ex in examples]
        for ex in examples:
            gold = resolver.gold_ids(ex)
            assert gold and len(gold) == 5 * len(ex.provenance_titles)
            if fmt != "fact_check":  # answers are strings in the gold pages' passages
                assert any(answer_in_text(texts[pid], ex.answers) for pid in gold), ex.id
            else:
                assert ex.answers[0] in ("true", "false")
    # the labels teacher ranks every train and dev example, 50 corpus passages each
    teacher = build_teacher(cfg.teacher.kind, passages, _local(cfg.teacher.path, root))
    ranked = teacher.rank(["unused"] * len(retrieval_ids), 50, retrieval_ids)
    assert all(len(r) == 50 for r in ranked)


def test_labels_put_the_gold_pages_first(world):
    root = world["root"]
    passages = read_corpus(root / "atlas/enwiki-dec2021/passages.jsonl")
    resolver = ProvenanceResolver(passages, "page_title")
    teacher = build_teacher("labels", passages, root / "labels/contriever_msmarco_top50.jsonl")
    for name in ("nq-train-kilt.jsonl", "hotpotqa-dev-kilt.jsonl"):
        for ex in read_tasks(root / "kilt" / name, "qa", provenance="page_title"):
            [ranking] = teacher.rank([ex.input], 50, [ex.id])
            n = len(resolver.gold_ids(ex))
            assert {pid for pid, _ in ranking[:n]} == set(resolver.gold_ids(ex))
            assert not any(resolver.is_gold(ex, pid) for pid, _ in ranking[n:])


def test_page_ids_collide_with_passage_ids_of_other_pages(world):
    root = world["root"]
    by_id = {p.id: p for p in read_corpus(root / "atlas/enwiki-dec2021/passages.jsonl")}
    resolver = ProvenanceResolver(by_id.values(), "page_title")
    collisions = 0
    for path in sorted((root / "kilt").glob("*-kilt.jsonl")):
        fmt = "fact_check" if "fever" in path.name else "qa"
        for ex in read_tasks(path, fmt, provenance="page_title"):
            for wid, title in zip(ex.provenance, ex.provenance_titles, strict=True):
                assert wid in by_id and by_id[wid].title != title  # a passage of ANOTHER page
                collisions += 1
            # the old comparison (retrieved id == wikipedia_id) counts that passage as a hit
            spurious = [ex.provenance[0]]
            assert recall_at_k(spurious, ex.provenance, 1) == 1.0
            assert resolver.recall_at_k(ex, spurious, 1) == 0.0
    assert collisions >= 8 * 16
    pages = {p["title"]: p for p in world["pages"]}
    assert len({p["wikipedia_id"] for p in pages.values()}) == 40
    assert all(p["wikipedia_id"] not in p["passage_ids"] for p in pages.values())
