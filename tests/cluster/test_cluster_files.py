"""Every file in clusters/ loads and is consistent: Ray's own schema for the `ray up` YAML,
GPU counts that agree between Ray and Kubernetes for KubeRay, images that exist in one
build, entrypoints that name real job files, and capacities that jobs can be checked against."""

from __future__ import annotations

import copy
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
            assert argv[0] == "imprag" and (ROOT / argv[argv.index("--config") + 1]).is_file(), entry
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


PAPER_JOBS = {"llama3_2_3b_imprag.yaml": (7, 19, "ddp"), "llama3_1_8b_imprag.yaml": (7, 23, "fsdp")}


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
