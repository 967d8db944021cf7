"""Generic record I/O: row iterators with `file:line` locations and atomic writers.

Readers stream (a corpus may hold tens of millions of rows). Writers never leave a
half-written file behind: they write a temp file next to the target and `os.replace` it.

Durability: a rename is only as durable as the data it points at. Without an fsync the
kernel may persist the rename before the file's blocks, and a crash (power loss, a
killed VM) then leaves a renamed-but-empty (or zero-filled) artefact that looks finished.
So every writer here fsyncs the written file(s) and the temp directory before the rename,
and the parent directory after it (which persists the rename itself).

Modes: outputs get the mode a plain ``open``/``mkdir`` would give them (0o666 / 0o777
minus the umask), not the private 0o600 / 0o700 of ``mkstemp`` / ``mkdtemp``: a serving
or evaluation job running as another user of a shared volume must be able to read them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
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


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to stable storage (``os.fsync`` on a read-only handle,
    which Linux accepts for regular files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (files created, renamed or deleted in it).

    Some filesystems (a few network / FUSE mounts) cannot fsync a directory and answer
    EINVAL or ENOTSUP; there is nothing more to do on those, so that error is ignored.
    Every other error (EIO: the disk lost the data) is raised."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (deepest first) and ``root`` itself."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fsync_file(full)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fsync_dir(full)
    fsync_dir(root)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the written temp file ``tmp`` onto ``path`` so that a crash leaves either the
    old file or the complete new one: fsync ``tmp``, rename, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def _unique_name(parent: Path, stem: str, suffix: str) -> Path:
    return parent / f".{stem}.{secrets.token_hex(6)}{suffix}"


def _temp_path(path: Path) -> Path:
    """A new empty temp file in the target's directory (same filesystem, so os.replace is
    atomic), created with mode 0o666 & ~umask as ``open(path, "w")`` would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _unique_name(path.parent, path.name, ".tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # 48 random bits collided: draw again
            continue
        return tmp


def _temp_dir(out_dir: Path) -> Path:
    """A new empty temp directory next to ``out_dir``, created with mode 0o777 & ~umask as a
    plain ``mkdir`` would be (``tempfile.mkdtemp`` makes it 0o700, and the rename keeps that)."""
    while True:
        tmp = _unique_name(out_dir.parent, out_dir.name, ".tmp")
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temp text file; on success fsync and rename it onto `path` (then fsync the
    directory, which makes the rename durable), else delete it."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory that becomes `out_dir` only if the block succeeds.

    Refuses (FileExistsError) a non-empty `out_dir` unless overwrite=True; then the old
    directory is swapped out and deleted only after the new one is in place. Everything
    written in the block is fsynced before the rename and the parent after it, so a crash
    leaves the old directory or the complete new one, never a renamed-but-empty one. The
    directory gets the mode of a plain ``mkdir`` (0o777 & ~umask).
    """
    out_dir = Path(out_dir)
    _check_target_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(out_dir)
    try:
        yield tmp
        fsync_tree(tmp)
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
    """Rename the finished ``tmp`` onto ``out_dir`` (an absent one directly, else through a
    backup name) and fsync the parent so the rename survives a crash."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
        return
    old = _unique_name(out_dir.parent, out_dir.name, ".old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous contents back
        raise
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
