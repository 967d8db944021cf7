"""Generic record I/O: row iterators with `file:line` locations and atomic writers.

Readers stream (a corpus may hold tens of millions of rows). Writers never leave a
half-written file behind: they write a temp file next to the target and `os.replace` it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imprag_ray.data.records import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_PARQUET_BATCH = 4096


def iter_rows(path: str | os.PathLike, fix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row dict) for every record of a JSONL or Parquet file.

    location is "file:line" (JSONL; 1-based physical line) or "file:row N" (Parquet).
    Blank JSONL lines are skipped; bad JSON or a non-object line raises DataError with `fix`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, fix)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; use one of "
            f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )


def _iter_jsonl(path: Path, fix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, None, f"invalid JSON ({e.msg} at column {e.colno})", fix) from None
            if not isinstance(row, dict):
                raise DataError(where, None, f"line is a JSON {type(row).__name__}, not an object", fix)
            yield where, row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow; `pip install pyarrow` or convert to JSONL") from e
    rowno = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            rowno += 1
            yield f"{path}:row {rowno}", row


def _temp_path(path: Path) -> Path:
    """A unique temp file in the target's directory (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temp text file; on success fsync and rename it onto `path`, else delete it."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line, atomically. Returns the number of rows written."""
    n = 0
    with _atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with _atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_parquet_atomic(path: str | os.PathLike, rows: list[dict[str, Any]]) -> int:
    """Write rows (dicts with the same keys) as Parquet, atomically. Needs pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = _temp_path(path)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory that becomes `out_dir` only if the block succeeds.

    Refuses (FileExistsError) a non-empty `out_dir` unless overwrite=True; then the old
    directory is swapped out and deleted only after the new one is in place.
    """
    out_dir = Path(out_dir)
    _check_target_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty; refusing to overwrite it (pass overwrite=True or choose another path)"
        )


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    old.rmdir()
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous contents back
        raise
    shutil.rmtree(old, ignore_errors=True)
