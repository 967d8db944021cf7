"""The demo's report table."""

from imprag_ray.demo import markdown_table


def test_markdown_table_has_a_row_per_system_and_em_recall_per_format():
    row = {"em": 0.5, "recall@1": 0.25, "recall@10": None}
    table = markdown_table({"closed-book": {"qa": row, "fact_check": row}, "ImpRAG": {"qa": row, "fact_check": row}},
                           (1, 10))
    lines = table.splitlines()
    assert lines[0] == ("| system | qa EM | qa R@1 | qa R@10 | fact_check EM | fact_check R@1 | fact_check R@10 |")
    assert lines[2] == "| closed-book | 50.0 | 25.0 | - | 50.0 | 25.0 | - |"
    assert len(lines) == 4


def test_prepare_starts_from_the_checked_in_base_or_a_random_init(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import pytest
    from safetensors.torch import load_file

    from imprag_ray import demo

    monkeypatch.chdir(tmp_path)  # runs/demo/... is relative to where the demo runs
    demo.prepare(echo=lambda s: None)
    init = Path(demo.INIT)
    assert json.loads((init / demo.INIT_MARK).read_text())["from"] == "base"
    want = load_file(demo.BASE / "model.safetensors")
    got = load_file(init / "model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    assert (Path(demo.WORLD) / "train/qa_once.jsonl").is_file()  # every file the demo jobs read

    import shutil

    rebuilt = tmp_path / "rebuilt_base"  # the same base rebuilt (other weights): copied again
    shutil.copytree(demo.BASE, rebuilt)
    demo.prepare(echo=lambda s: None, base=rebuilt)
    assert (init / "base.json").read_bytes() == (rebuilt / "base.json").read_bytes()
    manifest = json.loads((rebuilt / "base.json").read_text())
    (rebuilt / "base.json").write_text(json.dumps({**manifest, "steps": manifest["steps"] + 1}))
    lines: list[str] = []
    demo.prepare(echo=lines.append, base=rebuilt)
    assert any("starting from the pretrained base" in line for line in lines)
    assert json.loads((init / "base.json").read_text())["steps"] == manifest["steps"] + 1
    lines.clear()
    demo.prepare(echo=lines.append, base=rebuilt)  # unchanged: kept
    assert lines == []

    demo.prepare(echo=lambda s: None, base=None)  # --from-scratch swaps the start
    assert json.loads((init / demo.INIT_MARK).read_text())["from"] == "random"
    assert not (init / "base.json").exists()

    other = tmp_path / "other_base"  # a base pretrained for another world is refused
    other.mkdir()
    (other / "base.json").write_text(json.dumps({"demo_world": {"corpus_sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="is not the world"):
        demo.prepare(echo=lambda s: None, base=other)
    assert json.loads((init / demo.INIT_MARK).read_text())["from"] == "random"  # left as it was
