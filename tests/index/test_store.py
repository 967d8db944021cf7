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
    index = PassageIndex.build(shards, dim=DIM, index_type=kind, train_sample=emb[:400], manifest_fields=FIELDS)
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
    fields = dict(checkpoint_hash=checkpoint_hash(ckpt), retrieval_layer=model.b, post_rope=False,
                  corpus_fingerprint=corpus_fingerprint(tiny_world["world"] / "corpus.jsonl"))
    PassageIndex.build([(flat.ids, emb)], dim=model.embedding_dim, index_type="Flat", train_sample=None,
                       manifest_fields=fields).save(tmp_path / "idx")
    assert len(PassageIndex.load(tmp_path / "idx", checkpoint_hash=checkpoint_hash(ckpt))) == len(store)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "tuned")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        PassageIndex.load(tmp_path / "idx", checkpoint_hash=checkpoint_hash(tmp_path / "tuned"))
