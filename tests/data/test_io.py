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
