"""Readers for the corpus (Atlas style) and task files (KILT style).

Corpus row:  {"id": str|int, "title": str (optional), "section": str (optional), "text": str}
             (Atlas enwiki-dec2021 passages: several passages per page share its title)
Task row:    {"id": str|int, "input": str,
              "output": [{"answer": str,
                          "provenance": [{"wikipedia_id": str|int, "title": str (optional),
                                          "start_paragraph_id", "end_paragraph_id", ...}, ...]}, ...]}
KILT's `wikipedia_id` is a Wikipedia PAGE id; the synthetic world writes passage ids there.
The readers keep both the ids and the titles (TaskExample.provenance / provenance_titles);
which of them names gold passages is `data.provenance` (see imprag_ray.data.provenance).
Every malformed row raises DataError naming file:line, the (dotted) field and the fix;
nothing is silently dropped. Blank lines are allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from imprag_ray.data.io import iter_rows
from imprag_ray.data.records import DataError, Passage, TaskExample, check_format

CORPUS_FIX = 'each line must be {"id", "title", "text"} ("section" optional)'
TASK_FIX = (
    'each line must be {"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id", "title"}]}]}'
)
TITLE_FIX = (
    "data.provenance: page_title finds gold passages through the page title of each provenance "
    'entry: give every entry a "title" (as KILT does), or set data.provenance: passage_id if '
    "wikipedia_id holds passage ids of data.corpus"
)
PROVENANCE_MODES = ("passage_id", "page_title")
# KILT FEVER labels -> our fact-check answers.
FACT_CHECK_LABELS = {"supports": "true", "refutes": "false", "true": "true", "false": "false"}


def _get_id(where: str, row: dict[str, Any], field: str, fix: str, label: str | None = None) -> str:
    """An id may be int or str in the file; it is always str in memory.

    label: the dotted field name used in errors (defaults to `field`).
    """
    label = label or field
    if field not in row or row[field] is None:
        raise DataError(where, label, "missing", fix)
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(where, label, f"must be a non-empty string or integer, got {value!r}", fix)
    return str(value)


def _get_str(where: str, row: dict[str, Any], field: str, fix: str, *, allow_empty: bool) -> str:
    if field not in row or row[field] is None:
        raise DataError(where, field, "missing", fix)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(where, field, f"must be a string, got {type(value).__name__}", fix)
    if not allow_empty and not value.strip():
        raise DataError(where, field, "is empty", fix)
    return value


def _optional_str(where: str, row: dict[str, Any], field: str, fix: str, label: str | None = None) -> str:
    """An optional string field: missing or null -> ""."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(where, label or field, f"must be a string, got {type(value).__name__}", fix)
    return value


def iter_corpus(path: str | os.PathLike, *, check_duplicates: bool = True) -> Iterator[Passage]:
    """Stream passages from a .jsonl/.json/.parquet corpus; duplicate ids raise DataError."""
    seen: set[str] = set()
    for where, row in iter_rows(path, CORPUS_FIX):
        pid = _get_id(where, row, "id", CORPUS_FIX)
        title = _optional_str(where, row, "title", CORPUS_FIX)
        section = _optional_str(where, row, "section", CORPUS_FIX)
        text = _get_str(where, row, "text", CORPUS_FIX, allow_empty=False)
        if check_duplicates:
            if pid in seen:
                raise DataError(where, "id", f"duplicate passage id {pid!r}", "passage ids must be unique")
            seen.add(pid)
        yield Passage(id=pid, title=title, text=text, section=section)


def read_corpus(path: str | os.PathLike) -> list[Passage]:
    """All passages of a corpus file, in file order."""
    return list(iter_corpus(path))


def _dedup(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _parse_provenance(where: str, value: Any, field: str, provenance: str | None) -> list[tuple[str, str]]:
    """[{"wikipedia_id": ..., "title": ...}, ...] -> [(wikipedia_id, title or "")].

    provenance="page_title" requires a non-empty title on every entry (DataError otherwise).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(where, field, f"must be a list, got {type(value).__name__}", TASK_FIX)
    entries = []
    for j, prov in enumerate(value):
        if not isinstance(prov, dict):
            raise DataError(where, f"{field}[{j}]", "must be an object", TASK_FIX)
        wid = _get_id(where, prov, "wikipedia_id", TASK_FIX, f"{field}[{j}].wikipedia_id")
        title = _optional_str(where, prov, "title", TASK_FIX, f"{field}[{j}].title")
        if provenance == "page_title" and not title.strip():
            raise DataError(
                where, f"{field}[{j}].title", "missing (data.provenance is page_title)", TITLE_FIX
            )
        entries.append((wid, title))
    return entries


def _parse_answer(where: str, value: Any, field: str, format: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(where, field, f"must be a non-empty string, got {value!r}", TASK_FIX)
    if format != "fact_check":
        return value
    label = FACT_CHECK_LABELS.get(value.strip().lower())
    if label is None:
        raise DataError(
            where,
            field,
            f"has unknown fact-check label {value!r}",
            "fact_check answers must be SUPPORTS, REFUTES, true or false",
        )
    return label


def _parse_outputs(
    where: str, row: dict[str, Any], format: str, require_answers: bool, provenance_mode: str | None
) -> tuple[list[str], list[tuple[str, str]]]:
    """KILT `output` list -> (answers, provenance (id, title) pairs), in file order (not deduped)."""
    outputs = row.get("output")
    if outputs is None:
        if require_answers:
            raise DataError(where, "output", "missing", TASK_FIX)
        return [], []
    if not isinstance(outputs, list):
        raise DataError(where, "output", f"must be a list, got {type(outputs).__name__}", TASK_FIX)
    answers: list[str] = []
    provenance: list[tuple[str, str]] = []
    for i, out in enumerate(outputs):
        if not isinstance(out, dict):
            raise DataError(where, f"output[{i}]", "must be an object", TASK_FIX)
        if out.get("answer") is not None:
            answers.append(_parse_answer(where, out["answer"], f"output[{i}].answer", format))
        provenance += _parse_provenance(
            where, out.get("provenance"), f"output[{i}].provenance", provenance_mode
        )
    if require_answers and not answers:
        # Outputs without `answer` (provenance-only) are fine only next to one with an answer.
        raise DataError(where, "output[0].answer", "missing (no output has an answer)", TASK_FIX)
    return answers, provenance


def _corpus_text_row(where: str, row: dict[str, Any], fmt: str) -> TaskExample:
    """Plain LM text given as an Atlas corpus row {id, text}: empty input, the text is the answer."""
    tid = _get_id(where, row, "id", TASK_FIX)
    text = _get_str(where, row, "text", TASK_FIX, allow_empty=False)
    return TaskExample(id=tid, input="", answers=(text,), provenance=(), format=fmt)


def _provenance_fields(entries: list[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(id, title) pairs -> (ids deduplicated, the first non-empty title of each id), or
    titles=() when no entry has a title."""
    titles: dict[str, str] = {}
    for wid, title in entries:
        if not titles.get(wid):
            titles[wid] = title
    ids = tuple(titles)
    return ids, (tuple(titles.values()) if any(titles.values()) else ())


def iter_tasks(
    path: str | os.PathLike,
    format: str,
    *,
    require_answers: bool = True,
    provenance: str | None = None,
) -> Iterator[TaskExample]:
    """Stream TaskExamples from a KILT-style .jsonl/.json/.parquet file.

    require_answers=False accepts unlabelled inputs (batch inference), giving answers=().
    For `corpus_text`, a corpus-style row {"id", "text"} is accepted as well.
    provenance: the job's `data.provenance`; "page_title" refuses, at file:line, a provenance
    entry without a title (None / "passage_id": titles are kept where given, never required).
    """
    fmt = check_format(format)
    if provenance is not None and provenance not in PROVENANCE_MODES:
        raise ValueError(f"provenance must be one of {PROVENANCE_MODES}, got {provenance!r}")
    seen: set[str] = set()
    for where, row in iter_rows(path, TASK_FIX):
        if fmt == "corpus_text" and "input" not in row and "text" in row:
            ex = _corpus_text_row(where, row, fmt)
        else:
            tid = _get_id(where, row, "id", TASK_FIX)
            text = _get_str(where, row, "input", TASK_FIX, allow_empty=fmt == "corpus_text")
            answers, entries = _parse_outputs(where, row, fmt, require_answers, provenance)
            ids, titles = _provenance_fields(entries)
            meta: dict[str, Any] = row["meta"] if isinstance(row.get("meta"), dict) else {}
            ex = TaskExample(
                id=tid,
                input=text,
                answers=_dedup(answers),
                provenance=ids,
                format=fmt,
                meta=dict(meta),
                provenance_titles=titles,
            )
        if ex.id in seen:
            raise DataError(where, "id", f"duplicate example id {ex.id!r}", "example ids must be unique")
        seen.add(ex.id)
        yield ex


def read_tasks(
    path: str | os.PathLike, format: str, *, require_answers: bool = True, provenance: str | None = None
) -> list[TaskExample]:
    """All examples of a task file, in file order (see iter_tasks)."""
    return list(iter_tasks(path, format, require_answers=require_answers, provenance=provenance))
