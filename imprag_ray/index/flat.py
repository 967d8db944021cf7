"""Exact inner-product search over passage embeddings with FAISS (Ray-free).

Scores are dot products of layer-b query/passage projections (DESIGN §1); an exact
``IndexFlatIP`` is the reference every approximate index is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class IdIndex:
    """A FAISS index whose row j is the passage ``ids[j]``; search returns ids."""

    index: Any  # a faiss.Index
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k passage ids per query (best first) and their scores [Q, k]."""
        k = min(k, len(self.ids))
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[self.ids[j] for j in row if j >= 0] for row in idx], scores


class DenseIndex(IdIndex):
    """Passage ids + an exact FAISS inner-product index over their embeddings [M, d]."""

    def __init__(self, ids: Sequence[str], embeddings: np.ndarray):
        import faiss

        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids but {embeddings.shape[0]} embeddings")
        self.ids = list(ids)
        self.dim = int(embeddings.shape[1])
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
