"""The two-node cluster fixture really gives two raylets with separate resources."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.multinode


def test_tasks_land_on_both_nodes(ray_two_nodes):
    import ray

    @ray.remote(num_cpus=1)
    def node() -> str:
        return ray.get_runtime_context().get_node_id()

    a = ray.get(node.options(resources={"node_0": 0.01}).remote())
    b = ray.get(node.options(resources={"node_1": 0.01}).remote())
    assert a != b
    assert sorted([a, b]) == sorted(ray_two_nodes.node_ids())
    assert ray.cluster_resources()["CPU"] == 2
    assert len(ray_two_nodes.processes()) > 0
