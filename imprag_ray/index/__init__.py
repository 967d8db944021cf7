"""Passage indexes (FAISS), Ray-free."""

from imprag_ray.index.flat import DenseIndex
from imprag_ray.index.store import IndexManifest, IndexMismatchError, PassageIndex, corpus_fingerprint

__all__ = ["DenseIndex", "IndexManifest", "IndexMismatchError", "PassageIndex", "corpus_fingerprint"]
