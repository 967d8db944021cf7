"""Ray Data corpus encoding -> embedding shards -> FAISS index (imprag_ray.pipelines.encode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imprag_ray.config.loader import ConfigError, load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.readers import read_corpus
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.eval.predict import encode_corpus
from imprag_ray.index.store import IndexMismatchError, PassageIndex, corpus_fingerprint
from imprag_ray.model.bottom import BottomModel
from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
from imprag_ray.model.imprag import ImpRAGModel
from imprag_ray.pipelines.encode import (
    build_faiss,
    build_index,
    finished_shards,
    iter_shards,
    load_index,
    verify_finished,
)


def _cfg(world, tmp: Path, *overrides: str) -> TrainJobConfig:
    return load_config(
        TrainJobConfig,
        world["job"],
        [
            f"index.out_dir={tmp / 'index'}",
            "index.shard_size=128",
            "index.num_cpus=0.5",
            "index.tokenize_num_cpus=0.25",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def reference(tiny_world):
    """The Ray-free embeddings of every passage (``encode_corpus`` = ``embed_passages``)."""
    model = ImpRAGModel.from_pretrained(tiny_world["ckpt"]).eval()
    store = PassageStore(
        read_corpus(tiny_world["world"] / "corpus.jsonl"), load_tokenizer(tiny_world["ckpt"]), model.l_max
    )
    with torch.no_grad():
        dense = encode_corpus(model, store)
    emb = dense.index.reconstruct_n(0, len(store.order))
    return {"model": model, "store": store, "ids": list(store.order), "emb": emb}


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    """One Ray Data build (2 encoder actors), shared by the tests below."""
    import ray

    from tests.conftest import _connect

    _connect("local", num_cpus=2, include_dashboard=False, address="local")
    assert ray.is_initialized()
    tmp = tmp_path_factory.mktemp("encode")
    cfg = _cfg(tiny_world, tmp, "index.encoders=2")
    lines: list[str] = []
    report = build_index(cfg, echo=lines.append)
    return {"cfg": cfg, "tmp": tmp, "report": report, "lines": lines}


def test_bottom_model_loads_only_the_bottom_group_and_embeds_exactly(tiny_world, reference):
    full, store = reference["model"], reference["store"]
    bottom = BottomModel.from_pretrained(tiny_world["ckpt"])
    assert bottom.loaded_layers == full.b + 1  # layers 0..b-1 + layer b's projections
    layer_b = bottom.layers[full.b]
    assert layer_b.mlp is None and layer_b.self_attn.v_proj is None and layer_b.self_attn.o_proj is None
    n_bottom = sum(p.numel() for p in bottom.parameters())
    assert n_bottom < sum(p.numel() for p in full.parameters()) / 2
    ids, mask = store.tensor(store.order[:40])
    with torch.no_grad():
        assert torch.allclose(bottom.embed_passages(ids, mask), full.embed_passages(ids, mask), atol=1e-5)
        assert torch.allclose(bottom.embed_queries(ids, mask), full.embed_queries(ids, mask), atol=1e-5)
    with pytest.raises(NotImplementedError, match="only embeds"):
        bottom.generate(ids, mask)


def test_bottom_model_refuses_incomplete_checkpoint(tiny_world, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_world["ckpt"], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        BottomModel.from_pretrained(broken)


def test_ray_embeddings_equal_embed_passages_and_index_equals_ray_free(built, reference, tiny_world):
    report, cfg = built["report"], built["cfg"]
    shard_dir = Path(report["shard_dir"])
    assert report["shards_written"] == [0, 1, 2] and report["count"] == len(reference["ids"])
    assert any("shard 1 written" in line for line in built["lines"])  # progress per shard
    ids, embs = [], []
    for shard_ids, emb in iter_shards(shard_dir, sorted(finished_shards(shard_dir))):
        ids += shard_ids
        embs.append(np.asarray(emb))
    assert ids == reference["ids"]  # deterministic: shard s = corpus rows [128 s, 128 (s+1))
    np.testing.assert_allclose(np.concatenate(embs), reference["emb"], atol=1e-5)

    index = load_index(report["out_dir"], checkpoint_hash=checkpoint_hash(cfg.model.path))
    m = index.manifest
    assert (m.count, m.dim, m.index_type, m.retrieval_layer) == (
        300,
        reference["model"].embedding_dim,
        "Flat",
        1,
    )
    assert m.corpus_fingerprint == corpus_fingerprint(cfg.data.corpus)
    fields = {
        k: getattr(m, k) for k in ("checkpoint_hash", "retrieval_layer", "post_rope", "corpus_fingerprint")
    }
    ray_free = PassageIndex.build(
        [(reference["ids"], reference["emb"])],
        dim=m.dim,
        index_type="Flat",
        train_sample=None,
        manifest_fields=fields,
    )
    queries = np.random.default_rng(0).standard_normal((8, m.dim)).astype(np.float32)
    assert index.search(queries, 10)[0] == ray_free.search(queries, 10)[0]
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        load_index(report["out_dir"], checkpoint_hash="0" * 64)


def test_interrupted_build_resumes_only_the_missing_shard(built, reference):
    cfg, report = built["cfg"], built["report"]
    shard_dir = Path(report["shard_dir"])
    before = load_index(report["out_dir"], checkpoint_hash=report["checkpoint_hash"])
    (shard_dir / "shard-00001.done.json").unlink()  # as if killed while writing shard 1
    (shard_dir / "shard-00001.npy").unlink()
    untouched = (shard_dir / "shard-00000.npy").stat().st_mtime_ns
    again = build_index(cfg, echo=lambda _: None)
    assert again["shards_skipped"] == [0, 2] and again["shards_written"] == [1]
    assert again["passages_encoded"] == 128 and again["count"] == 300
    assert (shard_dir / "shard-00000.npy").stat().st_mtime_ns == untouched
    after = load_index(again["out_dir"], checkpoint_hash=report["checkpoint_hash"])
    assert after.ids == before.ids
    queries = np.random.default_rng(1).standard_normal((8, before.manifest.dim)).astype(np.float32)
    np.testing.assert_array_equal(after.search(queries, 10)[1], before.search(queries, 10)[1])
    assert after.search(queries, 10)[0] == before.search(queries, 10)[0]


def test_resume_recomputes_a_truncated_shard_and_one_of_other_ids(built):
    """A done marker is not proof: a truncated shard and a shard whose ids are not its
    corpus rows are recomputed on resume (with a line saying why), the rest is reused."""
    cfg, report = built["cfg"], built["report"]
    shard_dir = Path(report["shard_dir"])
    before = load_index(report["out_dir"], checkpoint_hash=report["checkpoint_hash"])
    npy = shard_dir / "shard-00001.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # a write cut short
    ids_file = shard_dir / "shard-00002.ids.json"
    ids = json.loads(ids_file.read_text())
    ids_file.write_text(json.dumps(ids[1:] + ids[:1]))  # the right ids, in another order
    untouched = (shard_dir / "shard-00000.npy").stat().st_mtime_ns
    lines: list[str] = []
    again = build_index(cfg, echo=lines.append)
    assert again["shards_skipped"] == [0] and again["shards_written"] == [1, 2]
    assert any(line.startswith("index: shard 1 is recomputed: shard-00001.npy") for line in lines), lines
    assert any("shard 2 is recomputed: shard-00002.ids.json row 0" in line for line in lines), lines
    assert (shard_dir / "shard-00000.npy").stat().st_mtime_ns == untouched
    after = load_index(again["out_dir"], checkpoint_hash=report["checkpoint_hash"])
    assert after.ids == before.ids
    queries = np.random.default_rng(2).standard_normal((8, before.manifest.dim)).astype(np.float32)
    np.testing.assert_allclose(after.search(queries, 10)[1], before.search(queries, 10)[1], rtol=1e-6)


def _fake_shard(shard_dir: Path, s: int, ids: list[str], emb: np.ndarray, count: int | None = None) -> None:
    name = f"shard-{s:05d}"
    np.save(shard_dir / f"{name}.npy", emb)
    (shard_dir / f"{name}.ids.json").write_text(json.dumps(ids))
    (shard_dir / f"{name}.done.json").write_text(json.dumps({"shard": s, "count": count or len(ids)}))


def test_verify_finished_names_why_each_bad_shard_is_recomputed(tmp_path):
    """Ray-free: each way a finished shard can be wrong, and what is deleted."""
    corpus = [f"p{i}" for i in range(10)]  # shard_size 3: shards 0..3, the last one of 1 row
    good = np.zeros((3, 4), np.float32)
    _fake_shard(tmp_path, 0, corpus[0:3], good)
    _fake_shard(tmp_path, 1, corpus[3:6], np.zeros((3, 5), np.float32))  # another dim
    _fake_shard(tmp_path, 2, corpus[6:9], good, count=2)  # marker disagrees
    _fake_shard(tmp_path, 3, [*corpus[9:10], "p10"], np.zeros((2, 4), np.float32))  # corpus shrank
    _fake_shard(tmp_path, 4, ["p12"], np.zeros((1, 4), np.float32))  # past the corpus's end
    lines: list[str] = []
    kept = verify_finished(tmp_path, finished_shards(tmp_path), iter(corpus), 3, 4, lines.append)
    assert sorted(kept) == [0]
    assert lines == [
        "index: shard 1 is recomputed: shard-00001.npy holds float32 [3, 5], expected float32 [3, 4]",
        "index: shard 2 is recomputed: its done marker counts 2 passages, the corpus has 3 rows for it",
        "index: shard 3 is recomputed: its done marker counts 2 passages, the corpus has 1 rows for it",
        "index: shard 4 is recomputed: it starts at row 12, but the corpus now has 10 rows",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00000.done.json",
        "shard-00000.ids.json",
        "shard-00000.npy",
    ]


def test_shard_files_are_fsynced_before_the_done_marker(tmp_path, monkeypatch):
    import os

    from imprag_ray.pipelines.encode import _write_shard

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(f"rename {Path(b).name}") or real_replace(a, b)
    )
    _write_shard(tmp_path, 7, ["a", "b"], np.ones((2, 4)), ["n1", "n1"])
    names = [Path(e).name if not e.startswith("rename") else e for e in events]
    npy, ids, done = (names.index(f"rename shard-00007.{x}") for x in ("npy", "ids.json", "done.json"))
    assert names[npy - 1] == ".shard-00007.npy.tmp" and names[npy + 1] == tmp_path.name  # file, dir
    assert names[ids + 1] == tmp_path.name and names[done + 1] == tmp_path.name
    assert npy < ids < done  # the marker is renamed last, after the data is durable
    assert np.load(tmp_path / "shard-00007.npy").shape == (2, 4)


def test_resume_refuses_shards_of_another_checkpoint(built):
    state = Path(built["report"]["shard_dir"]) / "build.json"
    saved = state.read_text()
    state.write_text(json.dumps({**json.loads(saved), "checkpoint_hash": "f" * 64}))
    try:
        with pytest.raises(ValueError, match="another checkpoint_hash"):
            build_index(built["cfg"], echo=lambda _: None)
    finally:
        state.write_text(saved)


@pytest.mark.parametrize(
    ("kind", "parts"), [("IVF4,PQ16x4", 1), ("HNSW16", 1), ("Flat", 2), ("IVF4,Flat", 3)]
)
def test_index_types_and_sharded_index_build_and_search(built, reference, tiny_world, kind, parts):
    out = built["tmp"] / f"index-{kind.replace(',', '_')}-{parts}"
    cfg = _cfg(
        tiny_world,
        built["tmp"],
        f"index.out_dir={out}",
        f"index.type={kind}",
        f"index.num_shards={parts}",
        f"index.shard_dir={built['report']['shard_dir']}",
    )
    build_faiss(cfg, built["report"], echo=lambda _: None)
    index = load_index(out, checkpoint_hash=built["report"]["checkpoint_hash"])
    assert len(index) == 300 and index.manifest.index_type == kind and index.manifest.count == 300
    assert (out / "parts.json").exists() == (parts > 1)
    emb, ids = reference["emb"], reference["ids"]
    for sub in getattr(index, "parts", [index]):
        if hasattr(sub.index, "nprobe"):
            sub.index.nprobe = 4
    got, _ = index.search(emb[:30] * 3.0, 5)  # scaled copies: the passage itself is the max-IP hit
    exact = np.argsort(-(emb[:30] * 3.0) @ emb.T, axis=1)[:, :5]
    hits = sum(len(set(g) & {ids[j] for j in row}) for g, row in zip(got, exact, strict=True))
    assert hits >= (150 if kind == "Flat" or (parts > 1 and "PQ" not in kind) else 60)
    # and each passage is found by its own scaled copy (64-bit PQ codes measured 29 of 30; the
    # 32-bit PQ8x4 kept only 15 of 30 on the prefix-space tokenizer's embeddings)
    assert sum(ids[row[0]] in g for g, row in zip(got, exact, strict=True)) >= 27
    if kind == "Flat":
        assert got == [[ids[j] for j in row] for row in exact]


@pytest.mark.timeout(900)  # the session's first user builds the micro Llama-3 snapshot
def test_index_build_of_a_base_llama3_snapshot_takes_b_from_the_job(tiny_world, tmp_path_factory, tmp_path):
    """A plain HF snapshot (no imprag_config.json): b and l_max come from the job's model:
    section, the encoder actors load its bottom layers with them; without b the build
    stops before Ray with an error naming model.retrieval_layer."""
    from tests.conftest import _connect
    from tests.engine.llama3_imprag import snapshot

    base = snapshot(tmp_path_factory, tiny_world["world"] / "corpus.jsonl", instruct=False)
    assert not (base / "imprag_config.json").exists()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join((tiny_world["world"] / "corpus.jsonl").read_text().splitlines(True)[:40]))
    job = [f"model.path={base}", f"data.corpus={corpus}", f"index.shard_dir={tmp_path / 'emb'}"]
    with pytest.raises(ConfigError) as err:
        build_index(_cfg(tiny_world, tmp_path, *job), echo=lambda _: None)
    assert err.value.key == "model.retrieval_layer" and "imprag_config.json" in str(err.value)

    _connect("local", num_cpus=2, include_dashboard=False, address="local")
    cfg = _cfg(tiny_world, tmp_path, *job, "model.retrieval_layer=7", "model.max_passage_tokens=32")
    report = build_index(cfg, echo=lambda _: None)
    assert (report["retrieval_layer"], report["max_passage_tokens"], report["count"]) == (7, 32, 40)
    index = load_index(report["out_dir"], checkpoint_hash=checkpoint_hash(base), retrieval_layer=7)
    assert index.manifest.nprobe == cfg.index.nprobe  # search settings recorded at build time
    full = ImpRAGModel.from_pretrained(base, retrieval_layer=7, reader_last_layer=19, max_passage_tokens=32)
    store = PassageStore(read_corpus(corpus), load_tokenizer(base), 32)
    ids, mask = store.tensor(store.order)  # [40, 32]
    with torch.no_grad():
        want = full.embed_passages(ids, mask).numpy()  # [40, h_kv * d_h]
    assert index.ids == list(store.order)
    np.testing.assert_allclose(index.index.reconstruct_n(0, 40), want, atol=1e-4)


def test_bad_index_config_names_the_key(tiny_world, tmp_path):
    for override, key in [
        ("index.num_shards=0", "index.num_shards"),
        ("index.encoders=-1", "index.encoders"),
        ("index.batch_size=zero", "index.batch_size"),
        ("index.typo=1", "index.typo"),
        ("index.num_cpus=0", "index.num_cpus"),
    ]:
        with pytest.raises(ConfigError) as err:
            _cfg(tiny_world, tmp_path, override)
        assert err.value.key == key


def test_bad_factory_string_names_index_type(built, tiny_world):
    cfg = _cfg(
        tiny_world,
        built["tmp"],
        f"index.out_dir={built['tmp'] / 'bogus'}",
        "index.type=Bogus7",
        f"index.shard_dir={built['report']['shard_dir']}",
    )
    with pytest.raises(ValueError, match=r"index\.type 'Bogus7'"):
        build_faiss(cfg, built["report"], echo=lambda _: None)
    cfg = _cfg(
        tiny_world, built["tmp"], "index.num_shards=9", f"index.shard_dir={built['report']['shard_dir']}"
    )
    with pytest.raises(ValueError, match=r"lower index\.num_shards"):
        build_faiss(cfg, built["report"], echo=lambda _: None)


@pytest.mark.multinode
def test_encoder_actors_run_on_both_nodes(two_node_cluster, tiny_world, tmp_path, reference):
    """``imprag index build --address`` from a fresh driver process on the real two-node
    cluster: the two encoder actors land on both raylets (node id recorded per row)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**two_node_cluster.env, "PYTHONPATH": str(root), "RAY_ADDRESS": ""}
    cmd = [
        sys.executable,
        "-m",
        "imprag_ray.cli",
        "index",
        "build",
        "--config",
        str(tiny_world["job"]),
        "--address",
        two_node_cluster.address,
        "--json",
        str(tmp_path / "report.json"),
        f"index.out_dir={tmp_path / 'index'}",
        "index.encoders=2",
        "index.num_cpus=0.5",
        "index.tokenize_num_cpus=0.25",
        "index.shard_size=50",
        "index.batch_size=16",
    ]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    nodes = {node for per_shard in report["nodes"].values() for node in per_shard}
    probe = (
        "import json, ray; ray.init(); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    )
    listed = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "RAY_ADDRESS": two_node_cluster.address},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    cluster_nodes = set(json.loads(listed.stdout.strip().splitlines()[-1]))
    assert len(cluster_nodes) == 2 and nodes == cluster_nodes, report["nodes"]
    assert report["count"] == 300 and report["shards_written"] == list(range(6))
    index = load_index(report["out_dir"], checkpoint_hash=report["checkpoint_hash"])
    queries = reference["emb"][:10]
    exact = np.argsort(-queries @ reference["emb"].T, axis=1)[:, :3]
    assert index.search(queries, 3)[0] == [[reference["ids"][j] for j in row] for row in exact]
    assert os.path.exists(tmp_path / "index" / "manifest.json")
