"""Serve job configs, the Serve config file and the KubeRay RayService: loaded and validated
(schema, resources, paths), and bad values fail naming the dotted key. No app is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imprag_ray.config.loader import ConfigError, check_paths, load_config
from imprag_ray.config.serve_schema import ServeJobConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_JOBS = [p for p in sorted((ROOT / "jobs").glob("serve_*.yaml")) if not p.name.endswith("_app.yaml")]
SERVE_APP_FILES = sorted((ROOT / "jobs").glob("serve_*_app.yaml"))
RAYSERVICES = sorted((ROOT / "clusters/kuberay").glob("rayservice-*.yaml"))


@pytest.mark.parametrize("job", SERVE_JOBS, ids=[p.name for p in SERVE_JOBS])
def test_every_serve_job_loads_and_says_what_it_runs(job):
    assert job.read_text().startswith("#"), "each job YAML starts with a comment: what, where, command"
    cfg = load_config(ServeJobConfig, job)
    assert cfg.http.port and cfg.deployments.generation.max_ongoing_requests > 0


def test_the_files_exist():
    assert [p.name for p in SERVE_JOBS] == ["serve_llama3_2_3b.yaml", "serve_tiny_synth.yaml"]
    assert SERVE_APP_FILES and RAYSERVICES


def test_tiny_job_binds_loopback_and_fits_two_cores():
    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml")
    assert cfg.http.host == "127.0.0.1" and cfg.engine.kind == "torch"
    d = cfg.deployments
    cpus = 0.01 + sum(
        s.autoscaling_config.max_replicas * s.ray_actor_options.num_cpus
        for s in (d.ingress, d.retrieval, d.generation)
    )
    assert cpus <= 2.0, f"max replicas need {cpus} CPUs on a 2-CPU local Ray"
    assert all(s.ray_actor_options.num_gpus == 0 for s in (d.ingress, d.retrieval, d.generation))


def test_tiny_job_paths_must_exist_locally(tmp_path, serve_world):
    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml")
    with pytest.raises(ConfigError) as info:
        check_paths(cfg, tmp_path)  # nothing there: the first missing path is named
    assert info.value.key == "checkpoint" and "not found" in info.value.message
    w = serve_world
    ok = load_config(
        ServeJobConfig,
        ROOT / "jobs/serve_tiny_synth.yaml",
        [f"checkpoint={w['checkpoint']}", f"index={w['index']}", f"corpus={w['corpus']}"],
    )
    check_paths(ok, tmp_path)


def test_llama3_2_3b_job_matches_the_paper_split_and_uses_gpus_and_vllm():
    from imprag_ray.model.presets import llama3_2_3b

    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_llama3_2_3b.yaml")
    preset = llama3_2_3b()
    assert (cfg.model.retrieval_layer, cfg.model.reader_last_layer, cfg.model.num_passages) == (7, 19, 10)
    assert (preset.retrieval_layer, preset.reader_last_layer, preset.num_passages) == (7, 19, 10)
    assert cfg.engine.kind == "vllm" and cfg.model.dtype == "bfloat16" and cfg.top_k == 10
    assert cfg.deployments.generation.ray_actor_options.num_gpus == 1
    assert cfg.auth.api_key is None and cfg.auth.api_key_env  # the key comes from a Secret
    region = preset.num_passages * preset.max_passage_tokens
    assert (
        cfg.engine.options["max_model_len"] >= region + cfg.limits.max_prompt_tokens + cfg.limits.max_tokens
    )
    for key in ("checkpoint", "index", "corpus"):
        assert getattr(cfg, key).startswith("/mnt/data/"), key  # the shared volume (PVC imprag-data)


def _rayservice(path: Path) -> tuple[dict, dict]:
    doc = yaml.safe_load(path.read_text())
    return doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("path", RAYSERVICES, ids=[p.name for p in RAYSERVICES])
def test_rayservice_is_valid_and_its_minimum_replicas_fit_its_pods(path):
    from ray.serve.schema import ServeDeploySchema

    assert path.read_text().startswith("#")
    doc, serve_cfg = _rayservice(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    ServeDeploySchema.model_validate(serve_cfg)  # Ray's own schema for serveConfigV2
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "imprag_ray.serve.app:build_app"
    job = ROOT / app["args"]["config"]
    cfg = load_config(ServeJobConfig, job, app["args"].get("overrides", []))
    assert serve_cfg["http_options"]["port"] == cfg.http.port
    workdir = next(
        line.split()[1]
        for line in (ROOT / "clusters/Dockerfile").read_text().splitlines()
        if line.startswith("WORKDIR")
    )
    assert app["runtime_env"]["working_dir"] == "local://" + workdir

    cluster = doc["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    params = group["rayStartParams"]
    pods = [
        {"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])}
        for _ in range(group["minReplicas"])
    ]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == params["num-gpus"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(cfg.checkpoint.startswith(m + "/") for m in mounts), "checkpoint must be on a mounted volume"
    assert cfg.auth.api_key_env in {e["name"] for e in container.get("env", [])}
    # First-fit decreasing of every deployment's minimum replicas onto the minimum pods.
    d = cfg.deployments
    replicas = [
        (s.ray_actor_options.num_cpus, s.ray_actor_options.num_gpus)
        for s in (d.generation, d.retrieval, d.ingress)
        for _ in range(s.autoscaling_config.min_replicas)
    ]
    for cpus, gpus in sorted(replicas, key=lambda r: (-r[1], -r[0])):
        pod = next((p for p in pods if p["CPU"] >= cpus and p["GPU"] >= gpus - 1e-9), None)
        assert pod is not None, f"a replica needing {cpus} CPU / {gpus} GPU fits no {path.name} pod"
        pod["CPU"] -= cpus
        pod["GPU"] -= gpus


@pytest.mark.parametrize("path", SERVE_APP_FILES, ids=[p.name for p in SERVE_APP_FILES])
def test_serve_config_file_builds_the_app(path, serve_world):
    """What `serve run jobs/serve_tiny_synth_app.yaml` does up to deploying: Ray's schema,
    the import path, and the app builder with the file's args (paths pointed at a built world)."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from imprag_ray.serve.app import build_app, http_options

    assert path.read_text().startswith("#")
    serve_cfg = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("imprag_ray.serve.app", "build_app")
    cfg = load_config(ServeJobConfig, ROOT / app["args"]["config"])
    assert serve_cfg["http_options"] == http_options(cfg)  # the proxy as `imprag serve` starts it
    w = serve_world
    args = {
        **app["args"],
        "overrides": [f"checkpoint={w['checkpoint']}", f"index={w['index']}", f"corpus={w['corpus']}"],
    }
    assert isinstance(build_app(args), Application)
    with pytest.raises(ValueError, match="config"):
        build_app({"cfg": "x"})


def test_deployment_options_are_accepted_by_serve():
    from ray import serve

    from imprag_ray.serve.app import deployment_options

    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_llama3_2_3b.yaml")
    opts = deployment_options(cfg.deployments.generation, cfg.logging)
    assert opts["autoscaling_config"]["min_replicas"] == 2 and opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["max_queued_requests"] == 256
    assert opts["logging_config"] == {"encoding": "JSON", "enable_access_log": True}
    dep = serve.deployment(lambda: None, name="probe").options(**opts)  # Serve validates the options
    assert dep.ray_actor_options["num_gpus"] == 1
    assert dep._deployment_config.max_queued_requests == 256
    assert dep._deployment_config.logging_config["encoding"] == "JSON"
    fixed = load_config(
        ServeJobConfig,
        ROOT / "jobs/serve_tiny_synth.yaml",
        ["deployments.generation.autoscaling_config={min_replicas: 2, max_replicas: 2}"],
    )
    opts = deployment_options(fixed.deployments.generation)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    # Unset: bounded at 4 x max_ongoing_requests; -1: Serve's unbounded queue.
    default = load_config(
        ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml", ["deployments.retrieval.max_ongoing_requests=5"]
    )
    assert deployment_options(default.deployments.retrieval)["max_queued_requests"] == 20
    unbounded = load_config(
        ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml", ["deployments.retrieval.max_queued_requests=-1"]
    )
    assert deployment_options(unbounded.deployments.retrieval)["max_queued_requests"] == -1


def test_http_options_are_accepted_by_serve():
    from ray.serve.config import HTTPOptions

    from imprag_ray.serve.app import http_options

    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_llama3_2_3b.yaml")
    options = HTTPOptions(**http_options(cfg))  # what serve.start builds from the dict
    assert (options.request_timeout_s, options.keep_alive_timeout_s) == (600, 90)
    assert options.host == "0.0.0.0" and options.port == 8000


@pytest.mark.parametrize(
    "overrides",
    [
        ["http.host=0.0.0.0"],
        ["http.host=10.1.2.3"],
        ["http.host=serve.example.com"],
        ["http.host='::'"],
    ],
)
def test_non_loopback_host_without_auth_is_refused(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml", overrides)
    err = info.value
    assert err.key == "http.host", str(err)
    assert "auth.api_key_env" in err.message and "auth.allow_unauthenticated: true" in err.message


@pytest.mark.parametrize(
    "overrides",
    [
        ["http.host=127.0.0.1"],
        ["http.host=localhost"],
        ["http.host='::1'"],
        ["http.host=0.0.0.0", "auth.api_key_env=IMPRAG_API_KEY"],
        ["http.host=0.0.0.0", "auth.api_key=k"],
        ["http.host=0.0.0.0", "auth.allow_unauthenticated=true"],
    ],
)
def test_loopback_or_authenticated_or_accepted_risk_loads(overrides):
    cfg = load_config(ServeJobConfig, ROOT / "jobs/serve_tiny_synth.yaml", overrides)
    assert cfg.http.host == overrides[0].split("=", 1)[1].strip("'")


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("engine.kind=tgi", "engine.kind", "vllm"),
        ("http.port=70000", "http.port", "1..65535"),
        ("limits.max_tokens=0", "limits.max_tokens", "> 0"),
        ("limits.default_max_tokens=600", "limits.default_max_tokens", "max_tokens"),
        (
            "deployments.retrieval.autoscaling_config.max_replicas=0",
            "deployments.retrieval.autoscaling_config.max_replicas",
            ">= max(1",
        ),
        (
            "deployments.generation.autoscaling_config.target_ongoing_requests=-1",
            "deployments.generation.autoscaling_config.target_ongoing_requests",
            "> 0",
        ),
        (
            "deployments.ingress.ray_actor_options.num_gpus=-1",
            "deployments.ingress.ray_actor_options.num_gpus",
            ">= 0",
        ),
        (
            "deployments.retrieval.batching.max_batch_size=0",
            "deployments.retrieval.batching.max_batch_size",
            "> 0",
        ),
        ("deployments.retrieval.batching.wait=1", "deployments.retrieval.batching.wait", "unknown key"),
        # generation batches inside its engine: no @serve.batch knob to set (and ignore)
        (
            "deployments.generation.batching={max_batch_size: 8}",
            "deployments.generation.batching",
            "unknown key",
        ),
        ("top_k=0", "top_k", "> 0"),
        ("auth={api_key: a, api_key_env: B}", "auth.api_key", "not both"),
        ("model.retrieval_layer=20", "model.retrieval_layer", "< reader_last_layer"),
        ("http.request_timeout_s=0", "http.request_timeout_s", "> 0"),
        ("http.request_timeout_s=.inf", "http.request_timeout_s", "finite"),
        (
            "http.request_timeout_s=100",
            "http.request_timeout_s",
            "timeouts.retrieval_s + timeouts.generation_s",
        ),
        ("http.keep_alive_timeout_s=0", "http.keep_alive_timeout_s", "> 0"),
        ("http.keep_alive_timeout_s=1.5", "http.keep_alive_timeout_s", "int"),
        ("timeouts.generation_s=0", "timeouts.generation_s", "> 0"),
        ("timeouts.retrieval_s=-1", "timeouts.retrieval_s", "> 0"),
        ("timeouts.control_s=.nan", "timeouts.control_s", "finite"),
        ("timeouts.prefill_s=3", "timeouts.prefill_s", "unknown key"),
        ("deployments.generation.max_queued_requests=0", "deployments.generation.max_queued_requests", "-1"),
        ("deployments.ingress.max_queued_requests=-5", "deployments.ingress.max_queued_requests", "-1"),
        ("logging.encoding=XML", "logging.encoding", "JSON"),
        ("logging.access_log=maybe", "logging.access_log", "bool"),
        ("auth.allow_unauthenticated=1", "auth.allow_unauthenticated", "bool"),
    ],
)
def test_bad_values_name_the_dotted_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(ServeJobConfig, ROOT / "jobs/serve_llama3_2_3b.yaml", [override])
    assert info.value.key == key and words in info.value.message, str(info.value)


def test_checkpoint_that_does_not_match_the_config_split_is_refused(serve_world):
    from imprag_ray.config.serve_schema import ModelExpectation
    from imprag_ray.serve.versions import VersionMismatchError, make_version

    w = serve_world
    with pytest.raises(VersionMismatchError, match=r"model\.retrieval_layer"):
        make_version(str(w["checkpoint"]), str(w["index"]), ModelExpectation(retrieval_layer=7))


def test_index_of_another_checkpoint_is_refused_before_any_replica_loads(serve_world):
    from imprag_ray.index.store import IndexMismatchError
    from imprag_ray.serve.versions import make_version

    w = serve_world
    assert make_version(str(w["checkpoint"]), str(w["index"])).hash == w["hash_a"]
    with pytest.raises(IndexMismatchError, match="build the index with this checkpoint"):
        make_version(str(w["checkpoint"]), str(w["index_b"]))


def test_bottom_layer_model_gives_the_full_models_query_embeddings(serve_world):
    import torch

    from imprag_ray.model.imprag import ImpRAGModel
    from imprag_ray.serve.versions import load_bottom_model

    bottom = load_bottom_model(str(serve_world["checkpoint"]))
    full = ImpRAGModel.from_pretrained(serve_world["checkpoint"]).eval()
    assert len(bottom.layers) == bottom.b + 1 < len(full.layers)
    ids = torch.randint(5, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(bottom.embed_queries(ids, mask), full.embed_queries(ids, mask))
        torch.testing.assert_close(bottom.embed_passages(ids, mask), full.embed_passages(ids, mask))
