"""Indexes in parts and search settings (imprag_ray.index.parts / store), Ray-free.

The search settings recorded in the manifest (IVF ``nprobe``, HNSW ``ef_search``) are
applied on load, to every part of an index in parts, and a loader may override them.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from imprag_ray.index.parts import load_index, save_parts
from imprag_ray.index.store import PassageIndex

DIM = 16
FIELDS = dict(checkpoint_hash="a" * 64, retrieval_layer=2, post_rope=False, corpus_fingerprint="c" * 64)


def _clustered(n=4000, clusters=64, seed=0) -> tuple[np.ndarray, list[str]]:
    """Points around ``clusters`` random centres: an IVF's lists split the clusters, so a
    query's true neighbours often fall in lists other than its nearest one."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    emb = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return emb.astype(np.float32), [f"p{i:05d}" for i in range(n)]


def _build(ids, emb, kind: str, **search) -> PassageIndex:
    return PassageIndex.build(
        [(ids, emb)], dim=DIM, index_type=kind, train_sample=emb, manifest_fields={**FIELDS, **search}
    )


def _recall(index: PassageIndex, queries: np.ndarray, emb: np.ndarray, ids: list[str], k: int = 10) -> float:
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :k]
    got, _ = index.search(queries, k)
    return float(
        np.mean([len(set(g) & {ids[j] for j in row}) / k for g, row in zip(got, exact, strict=True)])
    )


def _ivf_nprobes(index: PassageIndex) -> list[int]:
    return [faiss.extract_index_ivf(p.index).nprobe for p in index.parts or [index]]


def test_ivf_nprobe_is_recorded_applied_on_load_and_raises_recall(tmp_path):
    emb, ids = _clustered()
    _build(ids, emb, "IVF64,Flat", nprobe=16).save(tmp_path / "ivf")
    queries = emb[:200] + 0.3 * np.random.default_rng(1).standard_normal((200, DIM)).astype(np.float32)

    loaded = load_index(tmp_path / "ivf", checkpoint_hash="a" * 64)
    assert loaded.manifest.nprobe == 16 and _ivf_nprobes(loaded) == [16]
    one = load_index(tmp_path / "ivf", checkpoint_hash="a" * 64, nprobe=1)  # a loader's override
    assert _ivf_nprobes(one) == [1]
    wide, narrow = _recall(loaded, queries, emb, ids), _recall(one, queries, emb, ids)
    assert wide >= 0.9 and wide > narrow + 0.15, (wide, narrow)
    assert _ivf_nprobes(load_index(tmp_path / "ivf", checkpoint_hash="a" * 64, nprobe=500)) == [64]  # clamped


def test_index_in_parts_sets_nprobe_on_every_part_and_equals_single(tmp_path):
    emb, ids = _clustered(n=3000)
    single = _build(ids, emb, "IVF32,Flat", nprobe=32)  # every list: exact
    parts = [_build(ids[s], emb[s], "IVF32,Flat", nprobe=32) for s in (slice(0, 1700), slice(1700, None))]
    save_parts(parts, tmp_path / "parts")
    loaded = load_index(tmp_path / "parts", checkpoint_hash="a" * 64)
    assert len(loaded.parts) == 2 and len(loaded) == 3000 and loaded.manifest.count == 3000
    assert _ivf_nprobes(loaded) == [32, 32]
    queries = emb[::50] + 0.1
    (got, scores), (want, want_scores) = loaded.search(queries, 8), single.search(queries, 8)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert _ivf_nprobes(load_index(tmp_path / "parts", checkpoint_hash="a" * 64, nprobe=3)) == [3, 3]


def test_hnsw_ef_search_is_applied_and_other_settings_are_skipped(tmp_path):
    emb, ids = _clustered(n=500)
    _build(ids, emb, "HNSW16", nprobe=8, ef_search=80).save(tmp_path / "hnsw")
    loaded = load_index(tmp_path / "hnsw", checkpoint_hash="a" * 64)
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 80
    override = load_index(tmp_path / "hnsw", checkpoint_hash="a" * 64, ef_search=200)
    assert faiss.downcast_index(override.index).hnsw.efSearch == 200
    assert override.set_search(nprobe=4) == {}  # no IVF level: nothing to set


def test_parts_refuse_another_checkpoint(tmp_path):
    from imprag_ray.index.store import IndexMismatchError

    emb, ids = _clustered(n=200)
    save_parts([_build(ids[:100], emb[:100], "Flat"), _build(ids[100:], emb[100:], "Flat")], tmp_path / "p")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        load_index(tmp_path / "p", checkpoint_hash="b" * 64)


@pytest.mark.parametrize(
    ("target", "change", "match"),
    [
        ("manifest.json", {"count": 150}, r"manifest count=150 but its 2 parts hold 200 passages"),
        ("manifest.json", {"dim": 32}, r"manifest dim=32 but part part-000 has dim=16"),
        ("manifest.json", {"version": 7}, r"manifest version 7 is not one"),
        ("manifest.json", {"corpus_fingerprint": "d" * 64}, r"corpus_fingerprint='dddd.*part part-000"),
        ("part-001/manifest.json", {"count": 99}, r"count=99 but index\.faiss holds 100 vectors"),
        ("part-001/manifest.json", {"dim": 8}, r"dim=8 but index\.faiss holds vectors of d=16"),
    ],
    ids=["top-count", "top-dim", "top-version", "top-corpus", "part-count", "part-dim"],
)
def test_parts_refuse_a_manifest_that_does_not_describe_them(tmp_path, target, change, match):
    import json

    from imprag_ray.index.store import IndexManifestError

    emb, ids = _clustered(n=200)
    save_parts([_build(ids[:100], emb[:100], "Flat"), _build(ids[100:], emb[100:], "Flat")], tmp_path / "p")
    path = tmp_path / "p" / target
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(IndexManifestError, match=match):
        load_index(tmp_path / "p", checkpoint_hash="a" * 64)


def test_save_parts_refuses_parts_of_different_corpora(tmp_path):
    emb, ids = _clustered(n=200)
    a = _build(ids[:100], emb[:100], "Flat")
    b = PassageIndex.build(
        [(ids[100:], emb[100:])],
        dim=DIM,
        index_type="Flat",
        train_sample=None,
        manifest_fields={**FIELDS, "corpus_fingerprint": "e" * 64},
    )
    with pytest.raises(ValueError, match="differ in corpus_fingerprint"):
        save_parts([a, b], tmp_path / "p")
    assert not (tmp_path / "p").exists()
