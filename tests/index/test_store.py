"""Passage indexes on disk: FAISS factory types, shards, manifest, checkpoint refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imprag_ray.index.store import IndexMismatchError, PassageIndex, corpus_fingerprint

DIM = 16
FIELDS = dict(checkpoint_hash="a" * 64, retrieval_layer=2, post_rope=False, corpus_fingerprint="c" * 64)


def _shards(n=600, shard=150, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = [f"p{i:04d}" for i in range(n)]
    return emb, ids, [(ids[i : i + shard], emb[i : i + shard]) for i in range(0, n, shard)]


def test_flat_index_from_shards_equals_brute_force():
    emb, ids, shards = _shards()
    index = PassageIndex.build(shards, dim=DIM, index_type="Flat", train_sample=None, manifest_fields=FIELDS)
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    got, _ = index.search(queries, 3)
    best = np.argsort(-(queries @ emb.T), axis=1)[:, :3]
    assert got == [[ids[j] for j in row] for row in best]
    assert index.manifest.count == 600 and index.manifest.dim == DIM


@pytest.mark.parametrize("kind", ["IVF8,Flat", "IVF8,PQ4", "HNSW16"])
def test_approximate_index_types_find_exact_duplicates(kind):
    emb, ids, shards = _shards()
    index = PassageIndex.build(
        shards, dim=DIM, index_type=kind, train_sample=emb[:400], manifest_fields=FIELDS
    )
    if hasattr(index.index, "nprobe"):
        index.index.nprobe = 8
    got, _ = index.search(emb[:20] * 3.0, 5)  # scaled copies: the original is the max-IP hit
    hits = sum(ids[i] in row for i, row in enumerate(got))
    assert hits >= 15


def test_bad_factory_string_and_missing_training_data():
    _, _, shards = _shards()
    with pytest.raises(ValueError, match="not a valid FAISS factory string"):
        PassageIndex.build(shards, dim=DIM, index_type="Bogus99", train_sample=None, manifest_fields=FIELDS)
    with pytest.raises(ValueError, match="needs training vectors"):
        PassageIndex.build(shards, dim=DIM, index_type="IVF8,Flat", train_sample=None, manifest_fields=FIELDS)


def test_save_load_round_trip_and_checkpoint_refusal(tmp_path):
    emb, ids, shards = _shards()
    index = PassageIndex.build(shards, dim=DIM, index_type="Flat", train_sample=None, manifest_fields=FIELDS)
    index.save(tmp_path / "idx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    manifest = json.loads((tmp_path / "idx/manifest.json").read_text())
    assert manifest["checkpoint_hash"] == "a" * 64 and manifest["index_type"] == "Flat"
    loaded = PassageIndex.load(tmp_path / "idx", checkpoint_hash="a" * 64, retrieval_layer=2, post_rope=False)
    assert loaded.ids == ids and loaded.manifest == index.manifest
    assert loaded.search(emb[:7], 4)[0] == index.search(emb[:7], 4)[0]
    with pytest.raises(IndexMismatchError, match=r"built with checkpoint aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        PassageIndex.load(tmp_path / "idx", checkpoint_hash="b" * 64)
    with pytest.raises(IndexMismatchError, match="retrieval_layer=2 but the model uses retrieval_layer=3"):
        PassageIndex.load(tmp_path / "idx", checkpoint_hash="a" * 64, retrieval_layer=3)
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        PassageIndex.load(tmp_path, checkpoint_hash="a" * 64)


def test_index_of_a_real_checkpoint_is_refused_after_its_weights_change(tiny_world, tmp_path):
    """End to end: embed the corpus with a checkpoint, save, then load with changed weights."""
    import torch

    from imprag_ray.data.readers import read_corpus
    from imprag_ray.data.tokenized import PassageStore
    from imprag_ray.eval.predict import encode_corpus
    from imprag_ray.model import ImpRAGModel
    from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer

    ckpt = tiny_world["ckpt"]
    model = ImpRAGModel.from_pretrained(ckpt)
    store = PassageStore(read_corpus(tiny_world["world"] / "corpus.jsonl"), load_tokenizer(ckpt), model.l_max)
    flat = encode_corpus(model, store)
    emb = flat.index.reconstruct_n(0, len(flat))
    fields = dict(
        checkpoint_hash=checkpoint_hash(ckpt),
        retrieval_layer=model.b,
        post_rope=False,
        corpus_fingerprint=corpus_fingerprint(tiny_world["world"] / "corpus.jsonl"),
    )
    PassageIndex.build(
        [(flat.ids, emb)],
        dim=model.embedding_dim,
        index_type="Flat",
        train_sample=None,
        manifest_fields=fields,
    ).save(tmp_path / "idx")
    assert len(PassageIndex.load(tmp_path / "idx", checkpoint_hash=checkpoint_hash(ckpt))) == len(store)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "tuned")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        PassageIndex.load(tmp_path / "idx", checkpoint_hash=checkpoint_hash(tmp_path / "tuned"))


def _saved_flat(tmp_path, fields=FIELDS):
    _, ids, shards = _shards(n=40, shard=20)
    index = PassageIndex.build(shards, dim=DIM, index_type="Flat", train_sample=None, manifest_fields=fields)
    return index.save(tmp_path / "idx"), ids


def _edit_manifest(index_dir, **changes):
    path = index_dir / "manifest.json"
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in manifest.items() if v is not ...}))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dim": DIM * 2}, rf"manifest dim={DIM * 2} but index\.faiss holds vectors of d={DIM}"),
        ({"count": 41}, r"manifest count=41 but index\.faiss holds 40 vectors and ids\.json 40 ids"),
        ({"count": -1}, r"manifest count=-1 is not an integer >= 0"),
        ({"dim": "16"}, r"manifest dim='16' is not an integer"),
        ({"version": 2}, r"manifest version 2 is not one this imprag-ray reads"),
        ({"version": ...}, r"manifest version None is not one"),
        ({"shards": 3}, r"unknown manifest field\(s\) \['shards'\]"),
        ({"dim": ...}, r"manifest field\(s\) \['dim'\] missing"),
    ],
    ids=["dim", "count", "negative-count", "dim-type", "version", "no-version", "unknown-field", "no-dim"],
)
def test_a_manifest_that_does_not_describe_its_index_is_refused(tmp_path, change, match):
    from imprag_ray.index.parts import load_index
    from imprag_ray.index.store import IndexManifestError

    index_dir, _ = _saved_flat(tmp_path)
    _edit_manifest(index_dir, **change)
    for load in (PassageIndex.load, load_index):
        with pytest.raises(IndexManifestError, match=match) as err:
            load(index_dir, checkpoint_hash="a" * 64)
        assert "rebuild the index" in str(err.value) or "imprag-ray that built it" in str(err.value)


def test_an_ids_file_of_another_length_is_refused(tmp_path):
    from imprag_ray.index.store import IndexManifestError

    index_dir, ids = _saved_flat(tmp_path)
    (index_dir / "ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(
        IndexManifestError, match=r"count=40 but index\.faiss holds 40 vectors and ids\.json 39"
    ):
        PassageIndex.load(index_dir, checkpoint_hash="a" * 64)


def test_check_corpus_refuses_another_corpus_and_warns_without_a_fingerprint(tmp_path, caplog):
    from imprag_ray.index.parts import save_parts
    from imprag_ray.index.store import CorpusMismatchError, check_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "p0", "text": "a"}\n{"id": "p1", "text": "b"}\n')
    fp = corpus_fingerprint(corpus)
    index_dir, _ = _saved_flat(tmp_path, {**FIELDS, "corpus_fingerprint": fp})
    assert check_corpus(index_dir, corpus) == fp
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "p0", "text": "a"}\n{"id": "p1", "text": "B"}\n')  # same size, one byte
    with pytest.raises(CorpusMismatchError, match=r"corpus '.*other\.jsonl' .* is not the corpus the index"):
        check_corpus(index_dir, other)
    # an index in parts: the top-level manifest speaks for the parts
    part = PassageIndex.load(index_dir, checkpoint_hash="a" * 64)
    save_parts([part, part], tmp_path / "parts")
    assert check_corpus(tmp_path / "parts", corpus) == fp
    with pytest.raises(CorpusMismatchError, match="corpus"):
        check_corpus(tmp_path / "parts", other)
    # a manifest from before the fingerprint was recorded: accepted, with a warning
    _edit_manifest(index_dir, corpus_fingerprint=...)
    with caplog.at_level("WARNING", logger="imprag_ray.index.store"):
        assert check_corpus(index_dir, other) is None
    assert "records no corpus fingerprint" in caplog.text
    assert len(PassageIndex.load(index_dir, checkpoint_hash="a" * 64)) == 40  # still loads
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        check_corpus(tmp_path, corpus)


def test_corpus_fingerprint_of_a_directory_follows_names_and_bytes(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.jsonl").write_text('{"id": "1"}\n')
    (d / "b.jsonl").write_text('{"id": "2"}\n')
    first = corpus_fingerprint(d)
    assert first == corpus_fingerprint(str(d)) and len(first) == 64
    (d / "b.jsonl").write_text('{"id": "3"}\n')
    assert corpus_fingerprint(d) != first
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_fingerprint(tmp_path / "missing")
