"""Passage indexes (FAISS), Ray-free."""

from imprag_ray.index.flat import DenseIndex
from imprag_ray.index.parts import load_index, save_parts
from imprag_ray.index.store import (
    IndexManifest,
    IndexMismatchError,
    PassageIndex,
    corpus_fingerprint,
    set_search_params,
)

__all__ = [
    "DenseIndex",
    "IndexManifest",
    "IndexMismatchError",
    "PassageIndex",
    "corpus_fingerprint",
    "load_index",
    "save_parts",
    "set_search_params",
]
