"""What a retrieval replica loads and searches (``load_retrieval_state`` /
``search_passages``, the code ``RetrievalStage`` runs), without Ray: an index in parts
(``index.num_shards > 1``) is served like the single index, and ``search.nprobe``
overrides the nprobe the manifest recorded, on every part."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from imprag_ray.bench.serve import prompt_for
from imprag_ray.data.readers import iter_corpus
from imprag_ray.data.tokenized import encode_prompt_text
from imprag_ray.index.parts import save_parts
from imprag_ray.index.store import PassageIndex
from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
from imprag_ray.serve.app import load_serve_config
from imprag_ray.serve.stages import load_retrieval_state, search_passages
from imprag_ray.serve.versions import make_version
from tests.serve.conftest import ROOT

FIELDS = ("checkpoint_hash", "retrieval_layer", "post_rope", "corpus_fingerprint")


def _split(single_dir, checkpoint, out_dir, kind: str, nprobe: int | None = None):
    """The single index's vectors rebuilt as two parts of ``kind`` (recording ``nprobe``)."""
    single = PassageIndex.load(single_dir, checkpoint_hash=checkpoint_hash(checkpoint))
    emb = single.index.reconstruct_n(0, len(single))  # [N, dim]
    fields = {k: getattr(single.manifest, k) for k in FIELDS}
    cut = len(single) // 2 + 7
    parts = [
        PassageIndex.build(
            [(single.ids[s], emb[s])],
            dim=single.manifest.dim,
            index_type=kind,
            train_sample=emb,
            manifest_fields={**fields, "nprobe": nprobe},
        )
        for s in (slice(0, cut), slice(cut, None))
    ]
    return save_parts(parts, out_dir)


def _cfg(world, *overrides: str):
    paths = [f"checkpoint={world['checkpoint']}", f"index={world['index']}", f"corpus={world['corpus']}"]
    return load_serve_config(ROOT / "jobs/serve_tiny_synth.yaml", [*paths, *overrides])


def _requests(checkpoint) -> list[dict]:
    tok = load_tokenizer(checkpoint)
    return [{"prompt_ids": encode_prompt_text(tok, prompt_for(i), 96), "top_k": 3} for i in range(8)]


@pytest.fixture(scope="module")
def corpus(serve_world) -> dict:
    return {p.id: p for p in iter_corpus(serve_world["corpus"])}


def test_an_index_in_parts_serves_the_same_passages_as_the_single_index(serve_world, corpus, tmp_path):
    w, cfg = serve_world, _cfg(serve_world)
    parts_dir = _split(w["index"], w["checkpoint"], tmp_path / "parts", "Flat")
    single = load_retrieval_state(cfg, make_version(w["checkpoint"], w["index"]), corpus)
    parts = load_retrieval_state(cfg, make_version(w["checkpoint"], parts_dir), corpus)
    assert len(parts.index.parts) == 2 and len(parts.index) == len(single.index)

    requests = _requests(w["checkpoint"])
    got, want = search_passages(parts, corpus, requests), search_passages(single, corpus, requests)
    assert [[p["id"] for p in r["passages"]] for r in got] == [[p["id"] for p in r["passages"]] for r in want]
    assert [[p["token_ids"] for p in r["passages"]] for r in got] == [
        [p["token_ids"] for p in r["passages"]] for r in want
    ]
    np.testing.assert_allclose(
        [[p["score"] for p in r["passages"]] for r in got],
        [[p["score"] for p in r["passages"]] for r in want],
        rtol=1e-5,
    )
    assert {r["hash"] for r in got} == {w["hash_a"]}


def test_search_nprobe_overrides_the_manifest_on_every_part(serve_world, corpus, tmp_path):
    w = serve_world
    parts_dir = _split(w["index"], w["checkpoint"], tmp_path / "ivf", "IVF4,Flat", nprobe=1)
    version = make_version(w["checkpoint"], parts_dir)
    recorded = load_retrieval_state(_cfg(w), version, corpus)
    assert [faiss.extract_index_ivf(p.index).nprobe for p in recorded.index.parts] == [1, 1]
    every_list = load_retrieval_state(_cfg(w, "search.nprobe=4"), version, corpus)
    assert [faiss.extract_index_ivf(p.index).nprobe for p in every_list.index.parts] == [4, 4]

    exact = load_retrieval_state(_cfg(w), make_version(w["checkpoint"], w["index"]), corpus)
    requests = _requests(w["checkpoint"])
    ids = lambda results: [[p["id"] for p in r["passages"]] for r in results]  # noqa: E731
    assert ids(search_passages(every_list, corpus, requests)) == ids(search_passages(exact, corpus, requests))


def test_a_corpus_other_than_the_indexed_one_is_refused(serve_world, corpus, tmp_path):
    """The same passages with one text edited: every id still resolves, but the index was
    built from other texts, so the replica refuses to load (naming ``corpus``)."""
    from imprag_ray.index.store import CorpusMismatchError

    w = serve_world
    lines = w["corpus"].read_text().splitlines(keepends=True)
    edited = tmp_path / "corpus.jsonl"
    edited.write_text("".join(lines[:-1]) + lines[-1].replace('"text": "', '"text": "Edited. ', 1))
    cfg = _cfg({**w, "corpus": edited})
    with pytest.raises(CorpusMismatchError, match=r"^corpus .* is not the corpus the index"):
        load_retrieval_state(cfg, make_version(w["checkpoint"], w["index"]), corpus)
