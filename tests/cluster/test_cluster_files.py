"""Every file in clusters/ loads and is consistent: Ray's own schema for the `ray up` YAML,
GPU counts that agree between Ray and Kubernetes for KubeRay, images that exist in one
build, entrypoints that name real job files, and capacities that jobs can be checked against.
And the GPU clusters can run the paper jobs: the shared volume at /mnt/data on the head and
every worker, S3 credentials, vLLM's V1 model runner pinned, the job code's working_dir, Ray
token authentication; job comments state GPU memory as estimates, not as measurements."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from imprag_ray.config.cluster import check_fits, load_cluster
from imprag_ray.config.loader import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = sorted(p for p in (ROOT / "clusters").rglob("*.yaml"))
KUBERAY = [p for p in CLUSTER_FILES if "kuberay" in p.parts]


def test_cluster_dir_has_local_ray_up_and_kuberay_definitions():
    formats = {load_cluster(p).format for p in CLUSTER_FILES}
    assert formats == {"local", "ray_up", "kuberay"}
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cluster_file_loads_and_starts_with_a_comment(path):
    assert path.read_text().startswith("#"), f"{path} must start with a comment: what runs there, how"
    spec = load_cluster(path)
    assert spec.node_types and all(n.num_cpus >= 0 and n.num_gpus >= 0 for n in spec.node_types)


def test_ray_up_yaml_passes_rays_own_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = yaml.safe_load((ROOT / "clusters/aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(doc)))  # what `ray up` does before launching
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["gpu"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        validate_config(prepare_config(bad))
    spec = load_cluster(ROOT / "clusters/aws-gpu.yaml")
    gpu = next(n for n in spec.node_types if n.name == "gpu")
    assert gpu.num_gpus == 8 and gpu.max_count >= 1
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any("imprag-ray" in c and "[gpu]" in c for c in doc["setup_commands"])


def test_kuberay_images_come_from_the_dockerfile_build_and_entrypoints_name_real_jobs():
    dockerfile = (ROOT / "clusters/Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in dockerfile and '".[gpu]"' in dockerfile
    images = {img for p in KUBERAY for img in load_cluster(p).images}
    assert images == {"imprag-ray:0.1.0-gpu"}
    for p in KUBERAY:
        doc = yaml.safe_load(p.read_text())
        spec = doc["spec"]
        entry = spec.get("entrypoint")
        if entry:
            argv = shlex.split(entry)
            assert argv[:3] == ["python", "-m", "imprag_ray.cli"], entry  # as `imprag submit` runs it
            assert (ROOT / argv[argv.index("--config") + 1]).is_file(), entry
        rv = (spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec).get("rayVersion")
        assert rv == "2.60.0", f"{p}: rayVersion must match the pinned Ray"


def test_gpu_mismatch_between_ray_and_kubernetes_is_refused(tmp_path):
    doc = yaml.safe_load((ROOT / "clusters/kuberay/raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "4"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"workerGroupSpecs\[0\]\.rayStartParams\.num-gpus"):
        load_cluster(bad)


def test_capacity_checks():
    local = load_cluster(ROOT / "clusters/local.yaml")
    check_fits(local, num_workers=2, num_cpus=1, num_gpus=0)
    with pytest.raises(ConfigError, match=r"ray\.num_workers.*room for 2"):
        check_fits(local, num_workers=3, num_cpus=1, num_gpus=0)
    with pytest.raises(ConfigError, match="room for 0"):
        check_fits(local, num_workers=1, num_cpus=1, num_gpus=1)
    k8s = load_cluster(ROOT / "clusters/kuberay/raycluster.yaml")
    check_fits(k8s, num_workers=32, num_cpus=8, num_gpus=1)  # 4 nodes x 8 GPUs
    with pytest.raises(ConfigError):
        check_fits(k8s, num_workers=33, num_cpus=8, num_gpus=1)
    check_fits(k8s, num_workers=2, num_cpus=8, num_gpus=0, resources={"index_host": 1})
    with pytest.raises(ConfigError):
        check_fits(k8s, num_workers=3, num_cpus=8, num_gpus=0, resources={"index_host": 1})


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cluster(tmp_path / "nope.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: Pod\n")
    with pytest.raises(ConfigError, match="not a local"):
        load_cluster(other)


PAPER_JOBS = {"llama3_2_3b_imprag.yaml": (7, 19, "fsdp"), "llama3_1_8b_imprag.yaml": (7, 23, "fsdp")}


@pytest.mark.parametrize("name", sorted(PAPER_JOBS))
def test_paper_scale_jobs_fit_the_gpu_clusters(name):
    from imprag_ray.config.loader import load_config
    from imprag_ray.config.schema import TrainJobConfig
    from imprag_ray.model.presets import get_preset
    from imprag_ray.submit import check_cluster

    cfg = load_config(TrainJobConfig, ROOT / "jobs" / name)
    b, t, strategy = PAPER_JOBS[name]
    preset = get_preset("llama3.2-3b" if "3b" in name else "llama3.1-8b")
    assert (cfg.model.retrieval_layer, cfg.model.reader_last_layer) == (b, t)
    assert (preset.retrieval_layer, preset.reader_last_layer) == (b, t)
    assert cfg.model.num_passages == 10 and cfg.train.epochs == 10 and cfg.train.warmup_epochs == 3
    assert cfg.ray.use_gpu and cfg.ray.strategy == strategy and cfg.model.dtype == "bfloat16"
    assert cfg.ray.storage_path.startswith("s3://")
    assert cfg.batch.engine == "vllm" and cfg.index.num_shards > 1
    # cluster-side inputs: absolute paths on the shared volume (they cannot exist here)
    paths = [
        cfg.model.path,
        cfg.data.corpus,
        *(f.path for f in cfg.data.train + cfg.data.dev + cfg.data.eval),
    ]
    assert all(p.startswith("/mnt/data/") for p in paths)
    for cluster in ("clusters/kuberay/raycluster.yaml", "clusters/aws-gpu.yaml"):
        for command in ("train", "index", "batch"):
            check_cluster(cfg, ROOT / cluster, command)
    with pytest.raises(ConfigError, match=r"ray\.num_workers"):
        check_cluster(cfg, ROOT / "clusters/local.yaml", "train")


# ---- the GPU clusters can run the paper jobs -------------------------------------------
DATA = "/mnt/data"
V1_PIN = {"name": "VLLM_USE_V2_MODEL_RUNNER", "value": "0"}


def _kuberay_cluster(doc: dict) -> dict:
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def _pod_groups(path: Path) -> list[tuple[str, dict]]:
    """(name, pod spec) of the head and every worker group of a KubeRay manifest."""
    cluster = _kuberay_cluster(yaml.safe_load(path.read_text()))
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _aws() -> dict:
    return yaml.safe_load((ROOT / "clusters/aws-gpu.yaml").read_text())


def _paper_and_serve_job_paths() -> list[str]:
    from imprag_ray.config.loader import load_config
    from imprag_ray.config.schema import TrainJobConfig
    from imprag_ray.config.serve_schema import ServeJobConfig

    paths = []
    for name in PAPER_JOBS:
        cfg = load_config(TrainJobConfig, ROOT / "jobs" / name)
        paths += [cfg.output_dir, cfg.model.path, cfg.data.corpus, cfg.teacher.path, cfg.index.out_dir]
        paths += [f.path for f in cfg.data.train + cfg.data.dev + cfg.data.eval]
    serve = load_config(ServeJobConfig, ROOT / "jobs/serve_llama3_2_3b.yaml")
    return [*paths, serve.checkpoint, serve.index, serve.corpus]


def test_jobs_read_and_write_only_under_the_shared_volume():
    paths = _paper_and_serve_job_paths()
    assert paths and all(p.startswith(DATA + "/") for p in paths), [
        p for p in paths if not p.startswith(DATA)
    ]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_and_workers_mount_the_shared_volume_with_s3_credentials(path):
    read_only = yaml.safe_load(path.read_text())["kind"] == "RayService"  # serving only reads
    for name, pod in _pod_groups(path):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == DATA]
        assert len(mounts) == 1, f"{path.name} {name}: no volume at {DATA}"
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == "imprag-data", f"{path.name} {name}"
        assert bool(mounts[0].get("readOnly")) == read_only, f"{path.name} {name}"
        # S3 (ray.storage_path) through IRSA: the pod's ServiceAccount carries the IAM role
        assert pod.get("serviceAccountName") == "imprag-ray", f"{path.name} {name}"
    assert "eks.amazonaws.com/role-arn" in (ROOT / "clusters/kuberay/raycluster.yaml").read_text()


def test_aws_nodes_mount_efs_at_the_shared_path_and_have_instance_profiles():
    doc = _aws()
    assert f"--volume {DATA}:{DATA}" in doc["docker"]["run_options"]  # host mount -> container
    mounts = [
        c for c in doc["initialization_commands"] if " mount " in f" {c} " and c.rstrip().endswith(DATA)
    ]
    assert mounts and "nfs4" in mounts[0] and "efs" in mounts[0]
    for name, node in doc["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IamInstanceProfile for S3"


def test_vllm_v1_model_runner_is_pinned_everywhere_vllm_can_run():
    for path in KUBERAY:
        for name, pod in _pod_groups(path):
            for c in pod["containers"]:
                gpus = float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                if gpus > 0:
                    assert V1_PIN in c.get("env", []), f"{path.name} {name}: {V1_PIN['name']} not set"
    job = yaml.safe_load((ROOT / "clusters/kuberay/rayjob-llama3-3b-train.yaml").read_text())
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    service = yaml.safe_load((ROOT / "clusters/kuberay/rayservice-llama3-3b.yaml").read_text())
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["runtime_env"]["env_vars"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "--env VLLM_USE_V2_MODEL_RUNNER=0" in _aws()["docker"]["run_options"]
    assert re.search(r"^ENV VLLM_USE_V2_MODEL_RUNNER=0$", (ROOT / "clusters/Dockerfile").read_text(), re.M)
    # the switch is the one the installed vLLM reads ("0" -> False -> the V1 runner)
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    vllm_dir = Path(next(iter(spec.submodule_search_locations)))
    assert '"VLLM_USE_V2_MODEL_RUNNER": lambda: maybe_convert_bool(' in (vllm_dir / "envs.py").read_text()
    assert "use_v2_model_runner = envs.VLLM_USE_V2_MODEL_RUNNER" in (vllm_dir / "config/vllm.py").read_text()


def test_rayjob_runs_the_image_code_as_imprag_submit_would():
    from imprag_ray.submit import build_submission

    doc = yaml.safe_load((ROOT / "clusters/kuberay/rayjob-llama3-3b-train.yaml").read_text())
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    workdir = "/home/ray/imprag-ray"
    assert env["working_dir"] == f"local://{workdir}"
    dockerfile = (ROOT / "clusters/Dockerfile").read_text()
    assert f"WORKDIR {workdir}" in dockerfile
    assert all(f"COPY --chown=ray:users {d} ./{d}" in dockerfile for d in ("imprag_ray", "jobs"))
    config = shlex.split(doc["spec"]["entrypoint"])[-1]
    sub = build_submission(ROOT / config, "train", [], ROOT)
    assert doc["spec"]["entrypoint"] == sub["entrypoint"]
    assert sub["runtime_env"]["env_vars"].items() <= env["env_vars"].items()
    service = yaml.safe_load((ROOT / "clusters/kuberay/rayservice-llama3-3b.yaml").read_text())
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["runtime_env"]["working_dir"] == f"local://{workdir}"


def _repo_text_files() -> list[Path]:
    """The project's own text files (tests write throwaway jobs/*.yaml of their own: skipped)."""
    skip = {".git", "runs", "tests", "node_modules", "__pycache__"}
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ".json"}
    return [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and not (set(p.relative_to(ROOT).parts) & skip)
        and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
        and (p.suffix in suffixes or p.name in ("Dockerfile", "Makefile"))
    ]


def test_no_file_names_a_job_file_that_does_not_exist():
    named = {}
    for path in _repo_text_files():
        for m in re.finditer(r"\bjobs/([a-z0-9_]+\.ya?ml)\b", path.read_text(errors="replace")):
            named.setdefault(m.group(1), set()).add(str(path.relative_to(ROOT)))
    assert "llama3_2_3b_imprag.yaml" in named  # the scan does see the files
    missing = {name: sorted(where) for name, where in named.items() if not (ROOT / "jobs" / name).is_file()}
    assert not missing, f"files name job files that do not exist: {missing}"


def test_ray_token_authentication_is_on():
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"  # the variable Ray 2.60 reads (ray start, clients)
    for path in KUBERAY:  # KubeRay sets RAY_AUTH_MODE / RAY_AUTH_TOKEN from the Secret everywhere
        cluster = _kuberay_cluster(yaml.safe_load(path.read_text()))
        assert cluster.get("authOptions") == {"mode": "token", "secretName": "imprag-ray-auth"}, path.name
    doc = _aws()
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    assert doc["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    [head_start] = [c for c in doc["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start  # behind `ray dashboard`'s SSH tunnel


def _comment_lines(path: Path) -> list[str]:
    return [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]


GIB_FIGURE = re.compile(r"\d+(\.\d+)?\s*(GiB|GB)\b")


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "jobs").glob("*.yaml")), *CLUSTER_FILES, ROOT / "clusters/Dockerfile"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_gpu_memory_figures_are_estimates_not_unmeasured_measurements(path):
    lines = _comment_lines(path)
    claims = [
        line
        for line in lines
        if GIB_FIGURE.search(line) and "measured" in line.lower() and "not measured" not in line.lower()
    ]
    assert not claims, f"{path.name}: a GiB figure stated as measured (no GPU run exists): {claims}"
    if path.name in PAPER_JOBS:
        text = "\n".join(lines)
        assert "ESTIMATE" in text and "not measured" in text and GIB_FIGURE.search(text)


def test_rayservice_http_options_are_the_serve_jobs():
    """Under KubeRay the proxy takes serveConfigV2's http_options, not the job's http section:
    the timeouts must be the job's, so a slow stage's 504 JSON comes before the proxy's limit."""
    from imprag_ray.serve.app import load_serve_config

    service = yaml.safe_load((ROOT / "clusters/kuberay/rayservice-llama3-3b.yaml").read_text())
    options = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cfg = load_serve_config(ROOT / app["args"]["config"], check=False)
    assert options["port"] == cfg.http.port
    assert options["request_timeout_s"] == cfg.http.request_timeout_s
    assert options["keep_alive_timeout_s"] == cfg.http.keep_alive_timeout_s
    assert options["request_timeout_s"] > cfg.timeouts.retrieval_s + cfg.timeouts.generation_s
