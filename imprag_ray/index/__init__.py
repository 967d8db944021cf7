"""Passage indexes (FAISS), Ray-free."""

from imprag_ray.index.flat import DenseIndex

__all__ = ["DenseIndex"]
