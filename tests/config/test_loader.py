"""Tests for imprag_ray.config.loader: every error a user can hit names the dotted key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from imprag_ray.config.loader import (
    ConfigError,
    apply_overrides,
    check_paths,
    from_dict,
    load_config,
    parse_yaml,
    read_job,
    to_dict,
)


@dataclass(frozen=True)
class Model:
    n_layers: int
    b: int = 2
    t: int = 4
    embedding: Literal["pre_rope", "post_rope"] = "pre_rope"
    checkpoint: str | None = field(default=None, metadata={"path": "dir"})

    def validate(self) -> None:
        if not 0 <= self.b < self.t < self.n_layers:
            raise ConfigError.at("b", f"need 0 <= b < t < n_layers, got b={self.b} t={self.t}; lower b")


@dataclass(frozen=True)
class Stage:
    name: str
    lr: float = 1e-3
    epochs: int = 1


@dataclass(frozen=True)
class Train:
    lr: float = 1e-3
    steps: int = 10
    bf16: bool = False
    stages: tuple[Stage, ...] = ()
    ks: list[int] = field(default_factory=list)
    shape: tuple[int, str] = (1, "a")
    weights: dict[str, float] = field(default_factory=dict)
    extra: Any = None
    corpus: str = field(default="corpus.jsonl", metadata={"path": "file"})
    shards: tuple[str, ...] = field(default=(), metadata={"path": "file"})


@dataclass(frozen=True)
class Job:
    model: Model
    train: Train = field(default_factory=Train)
    name: str = "job"
    seed: int | str | None = None

    def validate(self) -> None:
        if self.name == "bad":
            raise ValueError("name 'bad' is reserved; pick another name")


@dataclass(frozen=True)
class PostInit:
    x: int = 0

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ConfigError.at("x", "must be >= 0; use a positive value")


def good() -> dict[str, Any]:
    return {
        "name": "demo",
        "model": {"n_layers": 6, "b": 2, "t": 4},
        "train": {
            "lr": 2e-3,
            "stages": [{"name": "warmup", "lr": 1e-3}, {"name": "distill", "epochs": 7}],
            "ks": [1, 10],
            "shape": [3, "x"],
            "weights": {"nq": 0.5, "hotpot": 1},
        },
    }


def error(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


def test_builds_nested_frozen_dataclasses() -> None:
    cfg = from_dict(Job, good())
    assert cfg.model == Model(n_layers=6, b=2, t=4)
    assert cfg.train.stages == (Stage("warmup", 1e-3), Stage("distill", 1e-3, 7))
    assert cfg.train.ks == (1, 10)  # lists are stored as tuples
    assert cfg.train.shape == (3, "x")
    assert cfg.train.weights == {"nq": 0.5, "hotpot": 1.0}
    assert isinstance(cfg.train.weights["hotpot"], float)  # int accepted for float
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


def test_defaults_and_optional() -> None:
    cfg = from_dict(Job, {"model": {"n_layers": 6}, "seed": None})
    assert cfg.train == Train() and cfg.seed is None
    assert from_dict(Job, {"model": {"n_layers": 6}, "seed": "auto"}).seed == "auto"
    assert from_dict(Job, {"model": {"n_layers": 6}, "seed": 3}).seed == 3


def test_unknown_key_names_path_valid_keys_and_suggestion() -> None:
    data = good()
    data["train"]["lr_"] = 1
    err = error(from_dict, Job, data)
    assert err.key == "train.lr_"
    assert "did you mean 'lr'?" in str(err)
    assert "valid keys here: lr, steps, bf16" in str(err)


def test_unknown_key_in_list_item() -> None:
    data = good()
    data["train"]["stages"][1]["epoch"] = 3
    err = error(from_dict, Job, data)
    assert err.key == "train.stages[1].epoch" and "epochs" in str(err)


def test_missing_required() -> None:
    err = error(from_dict, Job, {"model": {"b": 1}})
    assert err.key == "model.n_layers"
    assert "required" in str(err) and "under 'model'" in str(err)
    assert error(from_dict, Job, {}).key == "model"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.lr", "fast", "expected float, got str 'fast'"),
        ("train.steps", 1.5, "expected int, got float 1.5"),
        ("train.steps", True, "expected int, got bool True"),
        ("train.bf16", 1, "expected bool, got int 1"),
        ("train.bf16", "true", "expected bool, got str 'true'"),
        ("name", 2024, "expected str, got int 2024"),
        ("name", None, "expected str, got null"),
        ("train.lr", False, "expected float, got bool False"),
        ("train.ks", 3, "expected a list, got int 3"),
        ("train.ks", "1,2", "expected a list, got str"),
        ("train.weights", [1], "expected a mapping, got list"),
        ("train.shape", [1], "exactly 2 items"),
        ("model", 5, "expected a section"),
        ("seed", 1.5, "expected int or str, got float 1.5"),
    ],
)
def test_wrong_types_say_expected_and_got(key: str, value: Any, expected: str) -> None:
    data = good()
    section = data
    *parents, last = key.split(".")
    for part in parents:
        section = section[part]
    section[last] = value
    err = error(from_dict, Job, data)
    assert err.key == key
    assert expected in str(err)


def test_wrong_type_inside_containers() -> None:
    data = good()
    data["train"]["ks"] = [1, "ten"]
    assert error(from_dict, Job, data).key == "train.ks[1]"
    data = good()
    data["train"]["weights"]["nq"] = "high"
    assert error(from_dict, Job, data).key == "train.weights.nq"


def test_literal() -> None:
    data = good()
    data["model"]["embedding"] = "post_rop"
    err = error(from_dict, Job, data)
    assert err.key == "model.embedding"
    assert "expected one of 'pre_rope', 'post_rope'" in str(err)
    assert "did you mean 'post_rope'?" in str(err)


def test_validate_error_is_prefixed_with_dataclass_path() -> None:
    data = good()
    data["model"]["b"] = 5
    err = error(from_dict, Job, data)
    assert err.key == "model.b"
    assert str(err).startswith("model.b: need 0 <= b < t")


def test_validate_plain_value_error_reported_at_dataclass_path() -> None:
    data = good()
    data["name"] = "bad"
    err = error(from_dict, Job, data)
    assert err.key == "" and "reserved" in str(err)


def test_post_init_config_error_is_prefixed() -> None:
    @dataclass(frozen=True)
    class Outer:
        inner: PostInit

    assert error(from_dict, Outer, {"inner": {"x": -1}}).key == "inner.x"


def test_error_str_without_key_and_with_source() -> None:
    assert str(ConfigError("", "boom")) == "(top level): boom"
    assert str(ConfigError("a.b", "boom", "x.yaml")) == "x.yaml: a.b: boom"
    assert str(ConfigError("", "boom", "x.yaml")) == "x.yaml: boom"
    assert ConfigError.at("b", "m").prefixed("model").key == "model.b"
    assert ConfigError.at("[0]", "m").prefixed("stages").key == "stages[0]"
    assert isinstance(ConfigError("k", "m"), ValueError)


def test_overrides_parse_yaml_values() -> None:
    data = apply_overrides(
        good(),
        ["train.lr=1e-3", "train.steps=3", "train.bf16=true", "train.ks=[1,2]", "name=x=y", "seed="],
    )
    cfg = from_dict(Job, data)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 3 and cfg.train.bf16 is True and cfg.train.ks == (1, 2)
    assert cfg.name == "x=y"  # split on the first '=' only
    assert cfg.seed is None


def test_overrides_copy_input_and_create_sections() -> None:
    base = {"model": {"n_layers": 6}}
    out = apply_overrides(base, ["train.lr=0.5"])
    assert base == {"model": {"n_layers": 6}}
    assert from_dict(Job, out).train.lr == 0.5


def test_override_list_item_by_index() -> None:
    out = apply_overrides(good(), ["train.stages.1.lr=5e-5"])
    assert from_dict(Job, out).train.stages[1].lr == 5e-5
    err = error(apply_overrides, good(), ["train.stages.2.lr=1"])
    assert err.key == "train.stages.2" and "list of 2 items" in str(err)


def test_override_unknown_key_rejected_by_from_dict() -> None:
    out = apply_overrides(good(), ["train.lrr=1"])
    err = error(from_dict, Job, out)
    assert err.key == "train.lrr" and "did you mean 'lr'?" in str(err)


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", ".lr=1"])
def test_malformed_override(bad: str) -> None:
    err = error(apply_overrides, good(), [bad])
    assert "key.sub=value" in str(err)


def test_override_through_scalar_is_an_error() -> None:
    err = error(apply_overrides, good(), ["name.first=x"])
    assert err.key == "name" and "not a section" in str(err)


def test_override_unparsable_value() -> None:
    err = error(apply_overrides, good(), ["train.ks=[1,"])
    assert err.key == "train.ks" and "quote it" in str(err)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("-2E+5", -2e5), ("1.5e3", 1500.0), ("3", 3), ("1_000", 1000), ("abc", "abc")],
)
def test_parse_yaml_reads_floats_without_dot(text: str, value: Any) -> None:
    parsed = parse_yaml(text)
    assert parsed == value and type(parsed) is type(value)
    assert yaml.safe_load("1e-3") == "1e-3"  # the YAML 1.1 trap this works around


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_load_config_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_layers: 6\ntrain:\n  lr: 1e-4\n  stages:\n    - name: w\n")
    cfg = load_config(Job, path, ["train.steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7 and cfg.train.stages == (Stage("w"),)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_layers: 6\n  bb: 1\n")
    err = error(load_config, Job, path)
    assert err.key == "model.bb" and err.source == str(path)
    assert str(err).startswith(
        f"{path}: model.bb: unknown key (did you mean 'b'?); valid keys here: n_layers"
    )


def test_load_config_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {n_layers: 6\n")
    err = error(load_config, Job, path)
    assert str(err).startswith(f"{path}: invalid YAML at line 2, column 1:")


@pytest.mark.parametrize("text", ["- a\n- b\n", "3\n", ""])
def test_load_config_top_level_not_mapping(tmp_path: Path, text: str) -> None:
    err = error(load_config, Job, write(tmp_path, text))
    assert "top level must be a mapping" in str(err)


def test_load_config_missing_file(tmp_path: Path) -> None:
    err = error(load_config, Job, tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err) and "not found" in str(err)


def test_extends_lays_the_file_over_the_job_it_names(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs/base.yaml").write_text(
        "name: base\nmodel:\n  n_layers: 6\n  b: 1\ntrain:\n  lr: 1e-3\n  ks: [1, 10]\n  stages:\n    - name: w\n"
    )
    (tmp_path / "jobs/mid.yaml").write_text("extends: base.yaml\ntrain:\n  steps: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: jobs/mid.yaml\nname: child\nmodel:\n  t: 5\ntrain:\n  ks: [4]\n")
    cfg = load_config(Job, child, ["train.lr=5e-4"])
    assert cfg.name == "child" and (cfg.model.n_layers, cfg.model.b, cfg.model.t) == (6, 1, 5)  # merged
    assert list(cfg.train.ks) == [4] and cfg.train.steps == 3 and cfg.train.stages == (Stage("w"),)  # lists replace
    assert cfg.train.lr == 5e-4  # overrides apply last
    assert read_job(child)["model"] == {"n_layers": 6, "b": 1, "t": 5} and "extends" not in read_job(child)


def test_extends_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\nname: a\n")
    b.write_text("extends: a.yaml\nmodel:\n  n_layers: 6\n")
    err = error(load_config, Job, a)
    assert err.key == "extends" and "cycle" in err.message and "remove one 'extends'" in err.message
    b.write_text("extends: missing.yaml\n")
    err = error(load_config, Job, a)
    assert err.key == "extends" and err.source == str(tmp_path / "b.yaml") and "missing.yaml does not exist" in err.message
    b.write_text("extends: [a.yaml]\n")
    assert "must be the path of another job YAML" in error(load_config, Job, a).message
    b.write_text("model:\n  n_layers: 6\n  bb: 1\n")
    err = error(load_config, Job, a)  # a key error in the merged job is reported for the file loaded
    assert err.key == "model.bb" and err.source == str(a)
    b.write_text("model: {n_layers: 6\n")
    assert error(load_config, Job, a).source == str(b)  # a syntax error: the file that has it


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = from_dict(Job, good())
    plain = to_dict(cfg)
    assert plain["train"]["ks"] == [1, 10] and plain["train"]["stages"][0] == {
        "name": "warmup",
        "lr": 1e-3,
        "epochs": 1,
    }
    assert from_dict(Job, plain) == cfg
    path = write(tmp_path, yaml.safe_dump(plain, sort_keys=False))
    assert load_config(Job, path) == cfg


def test_check_paths(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text("{}\n")
    (tmp_path / "ckpt").mkdir()
    cfg = from_dict(Job, {"model": {"n_layers": 6, "checkpoint": "ckpt"}})
    check_paths(cfg, tmp_path)  # relative paths resolve against base_dir

    missing = from_dict(Job, {"model": {"n_layers": 6, "checkpoint": "nope"}})
    err = error(check_paths, missing, tmp_path)
    assert err.key == "model.checkpoint" and str(tmp_path / "nope") in str(err)

    not_a_dir = from_dict(Job, {"model": {"n_layers": 6, "checkpoint": "corpus.jsonl"}})
    assert "directory not found" in str(error(check_paths, not_a_dir, tmp_path))

    shards = from_dict(Job, {"model": {"n_layers": 6}, "train": {"shards": ["corpus.jsonl", "s1"]}})
    err = error(check_paths, shards, tmp_path)
    assert err.key == "train.shards[1]" and "file not found" in str(err)


def test_check_paths_skips_none_and_uris(tmp_path: Path) -> None:
    cfg = from_dict(Job, {"model": {"n_layers": 6}, "train": {"corpus": "s3://bucket/corpus.jsonl"}})
    check_paths(cfg, tmp_path)  # checkpoint None, corpus remote: nothing to check


def test_absolute_paths_resolves_every_path_field_but_uris(tmp_path):
    """Ray workers run in other directories: the driver ships absolute paths."""
    from imprag_ray.config.loader import absolute_paths, load_config
    from imprag_ray.config.schema import TrainJobConfig

    job = tmp_path / "job.yaml"
    job.write_text(
        "name: t\noutput_dir: out\nmodel: {path: ckpt}\n"
        "data: {corpus: c.jsonl, train: [{path: t.jsonl, format: qa}]}\n"
        "ray: {storage_path: 's3://bucket/runs'}\nbatch: {output: preds/p.jsonl}\n"
    )
    cfg = absolute_paths(load_config(TrainJobConfig, job), tmp_path)
    base = str(tmp_path.resolve())
    assert cfg.output_dir == f"{base}/out" and cfg.model.path == f"{base}/ckpt"
    assert cfg.data.corpus == f"{base}/c.jsonl" and cfg.data.train[0].path == f"{base}/t.jsonl"
    assert cfg.batch.output == f"{base}/preds/p.jsonl"
    assert cfg.ray.storage_path == "s3://bucket/runs"  # URIs untouched
    assert cfg.index.out_dir is None  # unset stays unset
