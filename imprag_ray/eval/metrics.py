"""Exact match and retrieval recall@k (DESIGN §1 "Metrics"), and a file-level evaluator.

Predictions JSONL, one line per example:
  {"id": str, "prediction": str, "retrieved": [passage ids, best first], "scores": [...] (optional)}
evaluate() result, keyed by task file stem ("qa", "slot_filling", ...):
  {"qa": {"path", "format", "n", "missing", "em", "recall_source", "recall@1", "recall@5", ...}}
Recall by provenance goes through a :class:`~imprag_ray.data.provenance.ProvenanceResolver`:
with ``provenance="page_title"`` (real KILT over Atlas passages) a retrieved passage is a hit when
it belongs to a provenance PAGE, and results add "provenance_unmatched" (examples none of whose
pages is in the corpus); ``passage_id`` compares retrieved ids with the provenance ids.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from imprag_ray.data.io import iter_rows, write_json_atomic
from imprag_ray.data.provenance import ProvenanceResolver
from imprag_ray.data.readers import FACT_CHECK_LABELS, iter_corpus, read_tasks
from imprag_ray.data.records import DataError, TaskExample
from imprag_ray.data.templates import format_passage

__all__ = [
    "answer_in_text",
    "answer_recall_at_k",
    "evaluate",
    "exact_match",
    "normalize_answer",
    "read_predictions",
    "recall_at_k",
    "score_task",
    "write_json_atomic",
]

PREDICTION_FIX = 'each line must be {"id", "prediction", "retrieved": [passage ids], "scores": [...]}'
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD/KILT normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, answers: Iterable[str]) -> bool:
    """True if the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(pred)
    return any(p == normalize_answer(a) for a in answers)


def recall_at_k(retrieved_ids: Sequence[str], gold_ids: Iterable[str], k: int) -> float:
    """1.0 if any of the top-k retrieved ids is a gold id, else 0.0 (per-example hit)."""
    gold = {str(g) for g in gold_ids}
    return float(any(str(r) in gold for r in retrieved_ids[:k]))


def answer_in_text(text: str, answers: Iterable[str]) -> bool:
    """A normalised answer occurs in the normalised text as whole words ("Velmo" !~ "Velmora")."""
    padded = f" {normalize_answer(text)} "
    return any(f" {a} " in padded for a in map(normalize_answer, answers) if a)


def answer_recall_at_k(retrieved_texts: Sequence[str], answers: Iterable[str], k: int) -> float:
    """1.0 if any of the top-k retrieved passage texts contains a gold answer string, else 0.0."""
    answers = list(answers)
    return float(any(answer_in_text(t, answers) for t in retrieved_texts[:k]))


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """id -> {"prediction": str, "retrieved": [str], "scores": [...]}; malformed lines raise DataError."""
    preds: dict[str, dict[str, Any]] = {}
    for where, row in iter_rows(path, PREDICTION_FIX):
        pid = row.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(where, "id", "missing or not a string", PREDICTION_FIX)
        pred = row.get("prediction", "")
        if not isinstance(pred, str):
            raise DataError(
                where, "prediction", f"must be a string, got {type(pred).__name__}", PREDICTION_FIX
            )
        retrieved = row.get("retrieved") or []
        if not isinstance(retrieved, list):
            raise DataError(where, "retrieved", "must be a list of passage ids", PREDICTION_FIX)
        if str(pid) in preds:
            raise DataError(where, "id", f"duplicate prediction for {pid!r}", "keep one line per example id")
        preds[str(pid)] = {
            "prediction": pred,
            "retrieved": [str(r) for r in retrieved],
            "scores": row.get("scores"),
        }
    return preds


def _load_texts(corpus_path: str | os.PathLike, ids: set[str]) -> dict[str, str]:
    """Reader texts ("title: text") of just the needed passages; streams the corpus."""
    return {p.id: format_passage(p) for p in iter_corpus(corpus_path, check_duplicates=False) if p.id in ids}


def _recall_mode(ex: TaskExample, have_corpus: bool) -> str | None:
    """'provenance', 'answer' or None (recall cannot be computed for this example)."""
    if ex.provenance:
        return "provenance"
    if have_corpus and ex.answers and ex.format != "fact_check":  # "true" is not a findable string
        return "answer"
    return None


def _normalize_prediction(pred: str, format: str) -> str:
    if format == "fact_check":
        return FACT_CHECK_LABELS.get(normalize_answer(pred), pred)
    return pred


def score_task(
    examples: list[TaskExample],
    preds: dict[str, dict[str, Any]],
    texts: dict[str, str] | None,
    ks: Sequence[int],
    resolver: ProvenanceResolver | None = None,
) -> dict[str, Any]:
    """Metrics of one task file; a missing prediction counts as wrong and as a retrieval miss.

    resolver: how provenance names gold passages (``data.provenance``); None = provenance ids
    are passage ids (``passage_id``). A ``page_title`` resolver must hold the pages of these
    examples (:meth:`ProvenanceResolver.from_corpus`).
    """
    resolver = resolver or ProvenanceResolver(mode="passage_id")
    n, missing, em = len(examples), 0, 0
    hits = {k: 0.0 for k in ks}
    modes = {_recall_mode(ex, texts is not None) for ex in examples}
    recall_ok = n > 0 and None not in modes
    for ex in examples:
        pred = preds.get(ex.id)
        if pred is None:
            missing += 1
            continue
        em += exact_match(_normalize_prediction(pred["prediction"], ex.format), ex.answers)
        if not recall_ok:
            continue
        retrieved = pred["retrieved"]
        for k in ks:
            if resolver.has_provenance(ex):
                hits[k] += resolver.recall_at_k(ex, retrieved, k)
            else:
                hits[k] += answer_recall_at_k([(texts or {}).get(r, "") for r in retrieved], ex.answers, k)
    result: dict[str, Any] = {"n": n, "missing": missing, "em": em / n if n else None}
    result["recall_source"] = "+".join(sorted(modes)) if recall_ok else None  # type: ignore[arg-type]
    for k in ks:
        result[f"recall@{k}"] = hits[k] / n if recall_ok else None
    if resolver.mode == "page_title":
        result["provenance_unmatched"] = sum(resolver.unmatched(ex) for ex in examples)
    return result


def _task_keys(task_specs: Sequence[tuple[Any, str]]) -> list[str]:
    """Result keys: the file stem, or "parent/stem" where two files share a stem."""
    stems = [Path(p).stem for p, _ in task_specs]
    return [
        s if stems.count(s) == 1 else f"{Path(p).parent.name}/{s}"
        for s, (p, _) in zip(stems, task_specs, strict=True)
    ]


def evaluate(
    predictions_path: str | os.PathLike,
    task_specs: Sequence[tuple[str | os.PathLike, str]],
    corpus_path: str | os.PathLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
    out_path: str | os.PathLike | None = None,
    provenance: str = "passage_id",
) -> dict[str, dict[str, Any]]:
    """EM and recall@k per task file (see module docstring); optionally written to out_path.

    Recall uses provenance when an example has it, else gold answer strings in the
    retrieved passages' texts (needs corpus_path); if neither works for some example, the
    file's recall is null rather than a misleading partial number. provenance: the job's
    ``data.provenance``; ``page_title`` needs corpus_path (page titles -> passages).
    """
    preds = read_predictions(predictions_path)
    tasks = [read_tasks(path, fmt, provenance=provenance) for path, fmt in task_specs]
    resolver = ProvenanceResolver.from_corpus(
        corpus_path, provenance, (ex for ex_list in tasks for ex in ex_list)
    )
    texts = None
    if corpus_path is not None:
        needed = {
            r
            for ex_list in tasks
            for ex in ex_list
            if not ex.provenance
            for r in preds.get(ex.id, {}).get("retrieved", [])[: max(ks)]
        }
        texts = _load_texts(corpus_path, needed)
    results: dict[str, dict[str, Any]] = {}
    for key, (path, fmt), examples in zip(_task_keys(task_specs), task_specs, tasks, strict=True):
        results[key] = {"path": str(path), "format": fmt, **score_task(examples, preds, texts, ks, resolver)}
    if out_path is not None:
        write_json_atomic(out_path, results)
    return results
