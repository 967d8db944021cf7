"""Job configs: every YAML in jobs/ loads; bad values fail naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imprag_ray.config.loader import ConfigError, check_paths, load_config
from imprag_ray.config.schema import TrainJobConfig

ROOT = Path(__file__).resolve().parents[2]
# serve_*.yaml are Serve jobs (ServeJobConfig, tests/serve); the rest are training jobs.
JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.name.startswith("serve_"))

MINIMAL = """
name: t
output_dir: out
model: {path: ckpt}
data:
  corpus: corpus.jsonl
  train: [{path: train.jsonl, format: qa}]
"""


def _write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_every_job_yaml_loads_and_says_what_it_runs(job):
    assert job.read_text().startswith("#"), "each job YAML starts with a comment: what, where, command"
    cfg = load_config(TrainJobConfig, job)
    assert cfg.name and cfg.data.train


def test_jobs_directory_is_not_empty():
    assert JOBS


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("model.retrieval_layer=4", "model.retrieval_layer", "must be < reader_last_layer"),
        ("model.num_passages=0", "model.num_passages", "must be > 0"),
        ("model.max_passage_tokens=-3", "model.max_passage_tokens", "must be > 0"),
        ("train.lr=fast", "train.lr", "float"),
        ("train.warmup_epochs=20", "train.warmup_epochs", "0..epochs"),
        ("train.lrr=0.1", "train.lrr", "did you mean"),
        ("teacher.kind=tfidf", "teacher.kind", "bm25"),
        ("data.train=[{path: a.jsonl, format: quiz}]", "data.train[0].format", "qa"),
        ("teacher.hard_negative_ranks=[50,10]", "teacher.hard_negative_ranks", "lo < hi"),
    ],
)
def test_bad_values_name_the_dotted_key(tmp_path, override, key, words):
    path = _write(tmp_path, MINIMAL)
    overrides = ["model.reader_last_layer=3", override] if "retrieval_layer" in override else [override]
    with pytest.raises(ConfigError) as info:
        load_config(TrainJobConfig, path, overrides)
    assert info.value.key == key
    assert words in str(info.value)


def test_missing_files_are_reported_with_their_key(tmp_path):
    cfg = load_config(TrainJobConfig, _write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError) as info:
        check_paths(cfg, tmp_path)
    assert info.value.key in ("model.path", "data.corpus", "data.train[0].path")


def test_reader_layer_beyond_the_model_is_a_config_error(tmp_path, tiny_world):
    from imprag_ray.train.recipe import ImpRAGRecipe

    cfg = load_config(TrainJobConfig, tiny_world["job"], ["model.reader_last_layer=6"])
    with pytest.raises(ConfigError) as info:
        ImpRAGRecipe(cfg).setup()
    assert info.value.key == "model.reader_last_layer" and "4 layers" in str(info.value)
