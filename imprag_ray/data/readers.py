"""Readers for the corpus (Atlas style) and task files (KILT style).

Corpus row:  {"id": str|int, "title": str (optional), "text": str}
Task row:    {"id": str|int, "input": str,
              "output": [{"answer": str, "provenance": [{"wikipedia_id": str|int}, ...]}, ...]}
Every malformed row raises DataError naming file:line, the (dotted) field and the fix;
nothing is silently dropped. Blank lines are allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from imprag_ray.data.io import iter_rows
from imprag_ray.data.records import DataError, Passage, TaskExample, check_format

CORPUS_FIX = 'each line must be {"id", "title", "text"}'
TASK_FIX = 'each line must be {"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id"}]}]}'
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


def iter_corpus(path: str | os.PathLike, *, check_duplicates: bool = True) -> Iterator[Passage]:
    """Stream passages from a .jsonl/.json/.parquet corpus; duplicate ids raise DataError."""
    seen: set[str] = set()
    for where, row in iter_rows(path, CORPUS_FIX):
        pid = _get_id(where, row, "id", CORPUS_FIX)
        title = row.get("title")
        if title is None:
            title = ""
        elif not isinstance(title, str):
            raise DataError(where, "title", f"must be a string, got {type(title).__name__}", CORPUS_FIX)
        text = _get_str(where, row, "text", CORPUS_FIX, allow_empty=False)
        if check_duplicates:
            if pid in seen:
                raise DataError(where, "id", f"duplicate passage id {pid!r}", "passage ids must be unique")
            seen.add(pid)
        yield Passage(id=pid, title=title, text=text)


def read_corpus(path: str | os.PathLike) -> list[Passage]:
    """All passages of a corpus file, in file order."""
    return list(iter_corpus(path))


def _dedup(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _parse_provenance(where: str, value: Any, field: str) -> list[str]:
    """[{"wikipedia_id": ...}, ...] -> list of passage ids (str)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(where, field, f"must be a list, got {type(value).__name__}", TASK_FIX)
    ids = []
    for j, prov in enumerate(value):
        if not isinstance(prov, dict):
            raise DataError(where, f"{field}[{j}]", "must be an object", TASK_FIX)
        ids.append(_get_id(where, prov, "wikipedia_id", TASK_FIX, f"{field}[{j}].wikipedia_id"))
    return ids


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
    where: str, row: dict[str, Any], format: str, require_answers: bool
) -> tuple[list[str], list[str]]:
    """KILT `output` list -> (answers, provenance ids), both in file order (not deduped)."""
    outputs = row.get("output")
    if outputs is None:
        if require_answers:
            raise DataError(where, "output", "missing", TASK_FIX)
        return [], []
    if not isinstance(outputs, list):
        raise DataError(where, "output", f"must be a list, got {type(outputs).__name__}", TASK_FIX)
    answers: list[str] = []
    provenance: list[str] = []
    for i, out in enumerate(outputs):
        if not isinstance(out, dict):
            raise DataError(where, f"output[{i}]", "must be an object", TASK_FIX)
        if out.get("answer") is not None:
            answers.append(_parse_answer(where, out["answer"], f"output[{i}].answer", format))
        provenance += _parse_provenance(where, out.get("provenance"), f"output[{i}].provenance")
    if require_answers and not answers:
        # Outputs without `answer` (provenance-only) are fine only next to one with an answer.
        raise DataError(where, "output[0].answer", "missing (no output has an answer)", TASK_FIX)
    return answers, provenance


def _corpus_text_row(where: str, row: dict[str, Any], fmt: str) -> TaskExample:
    """Plain LM text given as an Atlas corpus row {id, text}: empty input, the text is the answer."""
    tid = _get_id(where, row, "id", TASK_FIX)
    text = _get_str(where, row, "text", TASK_FIX, allow_empty=False)
    return TaskExample(id=tid, input="", answers=(text,), provenance=(), format=fmt)


def iter_tasks(
    path: str | os.PathLike, format: str, *, require_answers: bool = True
) -> Iterator[TaskExample]:
    """Stream TaskExamples from a KILT-style .jsonl/.json/.parquet file.

    require_answers=False accepts unlabelled inputs (batch inference), giving answers=().
    For `corpus_text`, a corpus-style row {"id", "text"} is accepted as well.
    """
    fmt = check_format(format)
    seen: set[str] = set()
    for where, row in iter_rows(path, TASK_FIX):
        if fmt == "corpus_text" and "input" not in row and "text" in row:
            ex = _corpus_text_row(where, row, fmt)
        else:
            tid = _get_id(where, row, "id", TASK_FIX)
            text = _get_str(where, row, "input", TASK_FIX, allow_empty=fmt == "corpus_text")
            answers, provenance = _parse_outputs(where, row, fmt, require_answers)
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            ex = TaskExample(
                id=tid,
                input=text,
                answers=_dedup(answers),
                provenance=_dedup(provenance),
                format=fmt,
                meta=dict(meta),
            )
        if ex.id in seen:
            raise DataError(where, "id", f"duplicate example id {ex.id!r}", "example ids must be unique")
        seen.add(ex.id)
        yield ex


def read_tasks(path: str | os.PathLike, format: str, *, require_answers: bool = True) -> list[TaskExample]:
    """All examples of a task file, in file order (see iter_tasks)."""
    return list(iter_tasks(path, format, require_answers=require_answers))
