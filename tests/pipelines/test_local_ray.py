"""The embedded local Ray that commands start: its workers' setup hook."""

from __future__ import annotations

import logging


def test_local_ray_workers_log_state_api_failures_as_errors_only(ray_local):
    """Without a dashboard the State API never answers; Ray Train's placement-group cleaner
    would warn about it once a second in every training run."""
    import ray

    from imprag_ray.pipelines.local_ray import STATE_API_LOGGERS

    @ray.remote(num_cpus=0)
    def levels() -> list[int]:
        return [logging.getLogger(name).getEffectiveLevel() for name in STATE_API_LOGGERS]

    assert STATE_API_LOGGERS and ray.get(levels.remote()) == [logging.ERROR] * len(STATE_API_LOGGERS)
    assert logging.getLogger(STATE_API_LOGGERS[0]).getEffectiveLevel() != logging.ERROR  # workers only
