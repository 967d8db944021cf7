"""Actor pools that would leave no CPU for the read tasks feeding them are reported."""

from __future__ import annotations


def test_warn_if_starved(ray_local):
    from imprag_ray.pipelines.batch import warn_if_starved

    said: list[str] = []
    assert not warn_if_starved("batch.num_cpus", 1.5, 0.25, said.append)
    assert said == []
    assert warn_if_starved("batch.num_cpus", 3 * 1.0, 0.25, said.append)  # 3 actors x 1 CPU on 2 CPUs
    assert "batch.num_cpus" in said[0] and "3.25" not in said[0] and "has 2" in said[0]
