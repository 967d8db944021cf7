"""The `imprag` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imprag(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "imprag_ray.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_data_synth_then_model_init(tmp_path):
    res = imprag("data", "synth", "--out", str(tmp_path / "w"), "--passages", "150", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["corpus.jsonl"] == 150
    again = imprag("data", "synth", "--out", str(tmp_path / "w"), "--passages", "150")
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    res = imprag("model", "init", "--preset", "tiny", "--corpus", str(tmp_path / "w/corpus.jsonl"),
                 "--tasks", str(tmp_path / "w/train/qa.jsonl"), "--vocab-size", "800",
                 "--out", str(tmp_path / "ckpt"))
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "ckpt/imprag_config.json").read_text())
    assert (cfg["retrieval_layer"], cfg["reader_last_layer"]) == (1, 4)
    assert json.loads((tmp_path / "ckpt/config.json").read_text())["tie_word_embeddings"] is True
    assert (tmp_path / "ckpt/tokenizer.json").exists()
    # preset fields from the command line: an untied model with a wider input embedding table
    base = ["model", "init", "--corpus", str(tmp_path / "w/corpus.jsonl"), "--vocab-size", "800"]
    res = imprag(*base, "--set", "tie_word_embeddings=false", "--set", "embedding_init_std=0.4",
                 "--set", "first_o_proj_init_std=0.2", "--out", str(tmp_path / "wide"))
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "wide/model.safetensors")
    assert 0.35 < weights["model.embed_tokens.weight"].std().item() < 0.45
    assert 0.015 < weights["lm_head.weight"].std().item() < 0.025
    assert 0.17 < weights["model.layers.0.self_attn.o_proj.weight"].std().item() < 0.23
    assert 0.015 < weights["model.layers.1.self_attn.o_proj.weight"].std().item() < 0.025
    # a minimum frequency spells rare words (here a 150-passage world's nicknames) in pieces
    # (the default vocab size has room for every word of it)
    init = ["model", "init", "--corpus", str(tmp_path / "w/corpus.jsonl")]
    for out, extra in (("whole", []), ("pieces", ["--min-frequency", "10"])):
        res = imprag(*init, *extra, "--out", str(tmp_path / out))
        assert res.returncode == 0, res.stderr
    from imprag_ray.data.synth import build_world
    from imprag_ray.model.checkpoint import load_tokenizer

    alias = build_world(3, 150).people[0].alias
    assert len(load_tokenizer(tmp_path / "whole").tokenize(alias)) == 1
    assert len(load_tokenizer(tmp_path / "pieces").tokenize(alias)) > 1
    for bad, named in (("embedding_init_std=0.4", "tie_word_embeddings=False"),  # tied preset
                       ("num_layer=4", "num_layers"), ("tie_word_embeddings=maybe", "true/false")):
        res = imprag(*base, "--set", bad, "--out", str(tmp_path / "bad"))
        assert res.returncode == 2 and named in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "bad").exists()


def test_data_synth_disjoint_from_writes_a_pretraining_world(tmp_path):
    res = imprag("data", "synth", "--out", str(tmp_path / "w"), "--passages", "150", "--seed", "3")
    assert res.returncode == 0, res.stderr
    res = imprag("data", "synth", "--out", str(tmp_path / "pre"), "--passages", "120", "--seed", "4",
                 "--disjoint-from", str(tmp_path / "w"))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "pre/world.json").read_text())
    assert manifest["disjoint_from"] == {"seed": 3, "n_passages": 150}
    names = {json.loads(line)["title"] for line in (tmp_path / "w/corpus.jsonl").read_text().splitlines()}
    pre = {json.loads(line)["title"] for line in (tmp_path / "pre/corpus.jsonl").read_text().splitlines()}
    assert len(pre) == 120 and not names & pre
    for bad, says in ((tmp_path / "pre", "is itself a pretraining world"), (tmp_path / "nowhere", "world.json")):
        res = imprag("data", "synth", "--out", str(tmp_path / "x"), "--disjoint-from", str(bad))
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "x").exists()


def test_train_with_a_bad_override_names_the_key(tiny_world, tmp_path):
    res = imprag("train", "--config", str(tiny_world["job"]), "model.num_passages=0")
    assert res.returncode == 2
    assert "model.num_passages" in res.stderr and "Traceback" not in res.stderr
    res = imprag("train", "--config", str(tiny_world["job"]), f"data.corpus={tmp_path}/nope.jsonl")
    assert res.returncode == 2 and "data.corpus" in res.stderr


def test_bad_corpus_line_is_reported_with_file_and_line(tiny_world, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = (tiny_world["world"] / "corpus.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"id": "x", "title": "T"})
    corpus.write_text("\n".join(lines) + "\n")
    res = imprag("train", "--no-ray", "--config", str(tiny_world["job"]), f"data.corpus={corpus}",
                 f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert "corpus.jsonl:5" in res.stderr and "'text'" in res.stderr


def test_train_runs_and_eval_rescores_its_predictions(tiny_world, tmp_path):
    out = tmp_path / "run"
    # the one-process path (--no-ray); Ray Train runs are tested in tests/pipelines
    res = imprag("train", "--no-ray", "--config", str(tiny_world["job"]), f"output_dir={out}",
                 "train.epochs=1", "train.warmup_epochs=1", "eval.limit=6", "--json", str(tmp_path / "f.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads((tmp_path / "f.json").read_text())
    assert set(final) == {"qa", "slot_filling", "fact_check", "entity_linking"}
    assert (out / "checkpoints/epoch-001/model.safetensors").exists()
    world = tiny_world["world"]
    res = imprag("eval", "--predictions", str(out / "eval/eval-predictions.jsonl"),
                 "--tasks", str(world / "eval/qa.jsonl"), f"{world}/eval/fact_check.jsonl:fact_check",
                 "--json", str(tmp_path / "m.json"))
    assert res.returncode == 0, res.stderr
    scored = json.loads((tmp_path / "m.json").read_text())
    # the CLI scores every line of the task file; predictions exist for the first 6 only
    assert scored["qa"]["missing"] == scored["qa"]["n"] - 6
