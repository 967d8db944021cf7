"""Atomic writers: a failed write leaves the previous file/dir intact and no temp files."""

from __future__ import annotations

import json

import pytest

from imprag_ray.data.io import atomic_dir, write_json_atomic, write_jsonl_atomic


def test_jsonl_and_json_written(tmp_path):
    assert write_jsonl_atomic(tmp_path / "sub" / "a.jsonl", [{"x": 1}, {"y": "é"}]) == 2
    assert (tmp_path / "sub" / "a.jsonl").read_text(encoding="utf-8") == '{"x": 1}\n{"y": "é"}\n'
    write_json_atomic(tmp_path / "m.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": [1, 2]}


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl_atomic(path, [{"old": True}])

    def rows():
        yield {"new": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, rows())
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_atomic_dir_refuses_non_empty_and_overwrites(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "f.txt").write_text("one")
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_dir(out):
        pass
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as d:
        (d / "f.txt").write_text("half")
        raise RuntimeError("crash")
    assert (out / "f.txt").read_text() == "one"
    with atomic_dir(out, overwrite=True) as d:
        (d / "g.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["g.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp/backup dirs left


def test_atomic_dir_accepts_existing_empty_dir(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("x")
    assert (tmp_path / "out" / "f").exists()


def _record_syncs(monkeypatch) -> list[tuple[str, str]]:
    """Patch os.fsync / os.rename / os.replace to log ("fsync", path) and ("rename", dst)
    in call order (the path of an fsynced descriptor is read from /proc/self/fd)."""
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_dir_fsyncs_files_and_dirs_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "sub").mkdir()
        (d / "sub" / "f.bin").write_bytes(b"x" * 10)
        (d / "g.txt").write_text("g")
        tmp = str(d)
    renamed = events.index(("rename", str(out)))
    before = {p for kind, p in events[:renamed] if kind == "fsync"}
    assert {f"{tmp}/sub/f.bin", f"{tmp}/g.txt", f"{tmp}/sub", tmp} <= before  # files and dirs
    assert ("fsync", str(tmp_path)) in events[renamed + 1 :]  # the rename itself is made durable

    events.clear()
    with atomic_dir(out, overwrite=True) as d:  # the swap through a backup name, too
        (d / "h.txt").write_text("h")
    renamed = events.index(("rename", str(out)))
    assert ("fsync", str(tmp_path)) in events[renamed + 1 :]


def test_atomic_file_writers_fsync_the_file_then_the_directory(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    renamed = events.index(("rename", str(tmp_path / "m.json")))
    assert [k for k, _ in events[:renamed]] == ["fsync"]  # the temp file's data first
    assert events[renamed + 1 :] == [("fsync", str(tmp_path))]


@pytest.mark.parametrize(
    ("umask", "dir_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
    ids=["umask022", "umask027"],
)
def test_outputs_get_the_mode_of_a_plain_mkdir_and_open(tmp_path, umask, dir_mode, file_mode):
    import os

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "f").write_text("x")
        write_json_atomic(tmp_path / "m.json", {})
        write_jsonl_atomic(tmp_path / "r.jsonl", [{}])
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode  # not mkdtemp's 0o700
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == file_mode  # not mkstemp's 0o600
    assert (tmp_path / "r.jsonl").stat().st_mode & 0o777 == file_mode
