"""Session-wide test settings: offline, few threads, and a lazily started local Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# Tests never reach a model hub: models and tokenizers are built in code.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

try:
    import torch
except ImportError:  # the Ray-free config tests do not need torch
    torch = None  # type: ignore[assignment]
else:
    torch.set_num_threads(2)  # Ray workers and torch share a 2-core CI box
    torch.set_flush_denormal(True)  # denormals make small random models 10x slower on CPU


# Which Ray the test process is connected to: None, "local" or a multi-node address.
_RAY_CONNECTION: dict[str, Any] = {"to": None}


def _connect(to: str, **init_kwargs: Any) -> Any:
    import ray

    if _RAY_CONNECTION["to"] != to or not ray.is_initialized():
        if ray.is_initialized():
            ray.shutdown()
        ray.init(**init_kwargs)
        _RAY_CONNECTION["to"] = to
    return ray


@pytest.fixture
def ray_local() -> Iterator[Any]:
    """This process connected to an embedded local Ray (2 CPUs, no dashboard).

    Started on first use and kept for later tests (shut down at session end or when a
    test connects to a multi-node cluster instead).
    """
    from imprag_ray.pipelines.local_ray import local_ray_kwargs

    yield _connect("local", **local_ray_kwargs(num_cpus=2, logging_level="info"))


@pytest.fixture(scope="session")
def two_node_cluster() -> Iterator[Any]:
    """A real two-node Ray cluster on this machine (tests/multinode.py): two raylets with
    1 CPU each and custom resources ``node_0`` / ``node_1``. Started once per session."""
    from tests.multinode import local_cluster

    with local_cluster((1, 1)) as cluster:
        yield cluster
        import ray

        if _RAY_CONNECTION["to"] == cluster.address:
            ray.shutdown()
            _RAY_CONNECTION["to"] = None


@pytest.fixture
def ray_two_nodes(two_node_cluster) -> Iterator[Any]:
    """This process connected (as a driver) to :func:`two_node_cluster`; yields the cluster."""
    _connect(two_node_cluster.address, address=two_node_cluster.address, logging_level="ERROR")
    yield two_node_cluster


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end() -> Iterator[None]:
    yield
    if _RAY_CONNECTION["to"] is not None:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic world + tiny random checkpoint + job YAML (tests/world.py), built once."""
    from tests.world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
