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


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A local Ray instance (2 CPUs, no dashboard), started on first use, shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic world + tiny random checkpoint + job YAML (tests/world.py), built once."""
    from tests.world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
