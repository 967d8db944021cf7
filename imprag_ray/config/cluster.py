"""Cluster files (``clusters/``) -> what each node type offers, and whether a job fits.

Three formats are read, so one check covers every way we run on a cluster:

* our local definition (``kind: local`` with ``node_types``),
* a ``ray up`` cluster YAML (``available_node_types`` with ``resources``),
* KubeRay manifests (``RayCluster``, ``RayJob`` with ``rayClusterSpec``, ``RayService``
  with ``rayClusterConfig``): head and worker groups with ``rayStartParams``.

Ray-free and vLLM-free: it only reads YAML.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imprag_ray.config.loader import ConfigError


@dataclass(frozen=True)
class NodeType:
    name: str
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    max_count: int = 1  # how many such nodes the cluster can have at most


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    format: str  # local | ray_up | kuberay
    node_types: tuple[NodeType, ...]
    storage_path: str | None = None
    images: tuple[str, ...] = ()

    def capacity(self, num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None) -> int:
        """How many bundles of this size the cluster can hold at its largest."""
        total = 0
        for node in self.node_types:
            fits = []
            if num_cpus > 0:
                fits.append(math.floor(node.num_cpus / num_cpus + 1e-9))
            if num_gpus > 0:
                fits.append(math.floor(node.num_gpus / num_gpus + 1e-9))
            for key, amount in (resources or {}).items():
                if amount > 0:
                    fits.append(math.floor(node.resources.get(key, 0.0) / amount + 1e-9))
            per_node = min(fits) if fits else 1
            total += per_node * node.max_count
        return total


def check_fits(
    cluster: ClusterSpec,
    *,
    num_workers: int,
    num_cpus: float,
    num_gpus: float,
    resources: dict[str, float] | None = None,
    key: str = "ray.num_workers",
) -> None:
    """Raise ConfigError(key) when ``num_workers`` bundles cannot be placed on the cluster."""
    cap = cluster.capacity(num_cpus, num_gpus, resources)
    if cap < num_workers:
        raise ConfigError(
            key,
            f"{num_workers} workers x (CPU {num_cpus}, GPU {num_gpus}, {resources or {}}) do not fit "
            f"cluster {cluster.name!r} (room for {cap}); lower the worker count or the per-worker "
            "resources, or add nodes to the cluster file",
        )


def _num(value: Any, where: str) -> float:
    try:
        return float(str(value).strip('"'))
    except ValueError as err:
        raise ConfigError(where, f"must be a number, got {value!r}") from err


def _local(doc: dict, path: Path) -> ClusterSpec:
    nodes = []
    for i, nt in enumerate(doc.get("node_types") or []):
        where = f"node_types[{i}]"
        if "name" not in nt:
            raise ConfigError(f"{where}.name", "is required")
        nodes.append(
            NodeType(
                nt["name"],
                _num(nt.get("num_cpus", 1), f"{where}.num_cpus"),
                _num(nt.get("num_gpus", 0), f"{where}.num_gpus"),
                {k: _num(v, f"{where}.resources.{k}") for k, v in (nt.get("resources") or {}).items()},
                int(nt.get("count", 1)),
            )
        )
    if not nodes:
        raise ConfigError("node_types", f"{path}: a local cluster needs at least one node type")
    return ClusterSpec(doc.get("name", path.stem), "local", tuple(nodes), doc.get("storage_path"))


def _ray_up(doc: dict, path: Path) -> ClusterSpec:
    from_cfg = doc["available_node_types"]
    nodes = []
    for name, nt in from_cfg.items():
        res = dict(nt.get("resources") or {})
        where = f"available_node_types.{name}.resources"
        cpus = _num(res.pop("CPU", 0), f"{where}.CPU")
        gpus = _num(res.pop("GPU", 0), f"{where}.GPU")
        count = 1 if name == doc.get("head_node_type") else int(nt.get("max_workers", 0))
        nodes.append(NodeType(name, cpus, gpus, {k: _num(v, f"{where}.{k}") for k, v in res.items()}, count))
    images = (doc["docker"]["image"],) if doc.get("docker", {}).get("image") else ()
    return ClusterSpec(doc.get("cluster_name", path.stem), "ray_up", tuple(nodes), images=images)


def _group(name: str, group: dict, count: int, where: str) -> tuple[NodeType, list[str]]:
    params = group.get("rayStartParams") or {}
    containers = group["template"]["spec"]["containers"]
    limits = containers[0].get("resources", {}).get("limits", {})
    cpus = _num(params.get("num-cpus", limits.get("cpu", 1)), f"{where}.rayStartParams.num-cpus")
    gpus = _num(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)), f"{where}.rayStartParams.num-gpus")
    gpu_limit = _num(limits.get("nvidia.com/gpu", 0), f"{where}.limits.nvidia.com/gpu")
    if gpus != gpu_limit:
        raise ConfigError(
            f"{where}.rayStartParams.num-gpus",
            f"is {gpus:g} but the container requests {gpu_limit:g} nvidia.com/gpu; make them equal",
        )
    if "cpu" in limits and cpus > _num(limits["cpu"], f"{where}.limits.cpu"):
        raise ConfigError(f"{where}.rayStartParams.num-cpus", f"{cpus:g} > the container's cpu limit")
    raw = params.get("resources")
    custom = json.loads(json.loads(raw) if raw.startswith('"') else raw) if raw else {}
    return NodeType(name, cpus, gpus, {k: float(v) for k, v in custom.items()}, count), [
        c["image"] for c in containers
    ]


def _kuberay(doc: dict, path: Path) -> ClusterSpec:
    kind = doc["kind"]
    spec = doc["spec"]
    cluster = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }.get(kind)
    if cluster is None:
        raise ConfigError("kind", f"{path}: unsupported KubeRay kind {kind!r} (or no cluster spec)")
    nodes, images = [], []
    head, imgs = _group("head", cluster["headGroupSpec"], 1, "spec.headGroupSpec")
    nodes.append(head)
    images += imgs
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        count = int(group.get("maxReplicas", group.get("replicas", 1)))
        node, imgs = _group(group["groupName"], group, count, f"spec.workerGroupSpecs[{i}]")
        nodes.append(node)
        images += imgs
    return ClusterSpec(doc["metadata"]["name"], "kuberay", tuple(nodes), images=tuple(images))


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read any of the three cluster file formats; ConfigError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("cluster", f"{path} does not exist; pass a file from clusters/")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ConfigError("cluster", f"{path}: expected a YAML mapping")
    try:
        if doc.get("kind") == "local":
            return _local(doc, path)
        if "available_node_types" in doc:
            return _ray_up(doc, path)
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            return _kuberay(doc, path)
    except (KeyError, TypeError, IndexError) as err:
        raise ConfigError("cluster", f"{path}: malformed cluster file ({err!r} missing or wrong)") from err
    raise ConfigError("cluster", f"{path}: not a local, `ray up` or KubeRay cluster file")
