"""Passage indexes (FAISS), Ray-free."""

from imprag_ray.index.flat import DenseIndex
from imprag_ray.index.parts import load_index, save_parts
from imprag_ray.index.store import (
    CorpusMismatchError,
    IndexManifest,
    IndexManifestError,
    IndexMismatchError,
    PassageIndex,
    check_corpus,
    corpus_fingerprint,
    read_manifest,
    set_search_params,
)

__all__ = [
    "CorpusMismatchError",
    "DenseIndex",
    "IndexManifest",
    "IndexManifestError",
    "IndexMismatchError",
    "PassageIndex",
    "check_corpus",
    "corpus_fingerprint",
    "load_index",
    "read_manifest",
    "save_parts",
    "set_search_params",
]
