"""Teacher retrievers: pseudo labels for the warmup stage and candidate sets for
self-distillation (DESIGN §1; the paper used Contriever-MSMARCO, ours is pluggable).

A small registry maps a config name to a builder:

* ``bm25``  — ``bm25s`` over "title: text" (default; also the explicit-query baseline)
* ``dense`` — a sentence-transformers-style encoder from a local directory
  (mean pooling over the last hidden state, cosine similarity)
* ``labels`` — a precomputed JSONL file ``{"id": query id, "ranking": [passage ids]}``

Every teacher answers ``rank(queries, top_n) -> list of ranked (passage_id, score)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from imprag_ray.data.io import iter_rows
from imprag_ray.data.records import DataError, Passage
from imprag_ray.data.templates import format_passage

Ranking = list[tuple[str, float]]
LABELS_FIX = 'each line must be {"id": query id, "ranking": [passage ids, best first]}'


class Teacher:
    """Interface: rank passages of the corpus for each query text."""

    def rank(self, queries: Sequence[str], top_n: int, query_ids: Sequence[str] = ()) -> list[Ranking]:
        raise NotImplementedError


class BM25Teacher(Teacher):
    """Sparse BM25 (``bm25s``) over the passages' reader text."""

    def __init__(self, passages: Sequence[Passage]):
        import bm25s

        self.ids = [p.id for p in passages]
        tokens = bm25s.tokenize([format_passage(p) for p in passages], show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=False)

    def rank(self, queries: Sequence[str], top_n: int, query_ids: Sequence[str] = ()) -> list[Ranking]:
        import bm25s

        top_n = min(top_n, len(self.ids))
        tokens = bm25s.tokenize(list(queries), show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=top_n, show_progress=False, n_threads=1)
        return [
            [(self.ids[int(d)], float(s)) for d, s in zip(row_d, row_s, strict=False)]
            for row_d, row_s in zip(docs, scores, strict=False)
        ]


class DenseTeacher(Teacher):
    """Mean-pooled encoder (e.g. all-MiniLM-L6-v2) loaded from a local directory."""

    def __init__(self, passages: Sequence[Passage], path: str, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"teacher.path {path!r} is not a directory; point it at a local "
                "sentence-transformers model (no hub downloads at run time)"
            )
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.enc = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.ids = [p.id for p in passages]
        self.matrix = self._encode([format_passage(p) for p in passages])  # [M, d]

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
                hidden = self.enc(**batch).last_hidden_state  # [B, L, d]
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(self.torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    def rank(self, queries: Sequence[str], top_n: int, query_ids: Sequence[str] = ()) -> list[Ranking]:
        scores = self._encode(list(queries)) @ self.matrix.T  # [Q, M]
        top_n = min(top_n, len(self.ids))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_n]
        return [[(self.ids[j], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


class LabelsTeacher(Teacher):
    """Rankings read from a JSONL file, looked up by query id (scores = -rank)."""

    def __init__(self, passages: Sequence[Passage], path: str):
        known = {p.id for p in passages}
        self.path = path
        self.rankings: dict[str, list[str]] = {}
        for where, row in iter_rows(path, LABELS_FIX):  # JSONL or Parquet
            if "id" not in row:
                raise DataError(where, "id", "missing", LABELS_FIX)
            if not isinstance(row.get("ranking"), list):
                raise DataError(where, "ranking", "missing or not a list", LABELS_FIX)
            unknown = [str(p) for p in row["ranking"] if str(p) not in known]
            if unknown:
                raise DataError(where, "ranking", f"names passages not in the corpus: {unknown[:3]}",
                                "use passage ids of data.corpus")
            self.rankings[str(row["id"])] = [str(p) for p in row["ranking"]]

    def rank(self, queries: Sequence[str], top_n: int, query_ids: Sequence[str] = ()) -> list[Ranking]:
        if len(query_ids) != len(queries):
            raise ValueError("the labels teacher needs the query ids")
        missing = [q for q in query_ids if q not in self.rankings]
        if missing:
            raise DataError(str(self.path), None, f"has no ranking for query ids {missing[:3]}",
                            "add a line per training example id")
        return [[(p, -float(r)) for r, p in enumerate(self.rankings[q][:top_n])] for q in query_ids]


TEACHERS: dict[str, Callable[..., Teacher]] = {
    "bm25": lambda passages, path=None: BM25Teacher(passages),
    "dense": lambda passages, path=None: DenseTeacher(passages, str(path)),
    "labels": lambda passages, path=None: LabelsTeacher(passages, str(path)),
}


def build_teacher(kind: str, passages: Sequence[Passage], path: str | os.PathLike | None = None) -> Teacher:
    """Teacher by registry name (``bm25``, ``dense``, ``labels``)."""
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher {kind!r}; choose one of {sorted(TEACHERS)}")
    if kind != "bm25" and path is None:
        raise ValueError(f"teacher {kind!r} needs teacher.path")
    return TEACHERS[kind](passages, path)
