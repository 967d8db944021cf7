"""The embedded local Ray that commands (and the test suite) start when no cluster is given.

It runs without a dashboard, to spare a small machine the extra processes. Ray's State API is
served by the dashboard, so on this Ray it never answers. Ray Train's placement-group cleaner
asks it once a second whether the train controller still lives and logs a warning at each
failed try: some 200 lines per training run, most of what a demo prints. The setup hook below
sets that logger to errors only, in every worker of this Ray and nowhere else. A cluster
joined by address (which has its dashboard) keeps Ray's logging as it is.
"""

from __future__ import annotations

import logging
from typing import Any

# Loggers whose warnings only say that the State API cannot be reached.
STATE_API_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_warnings() -> None:
    """Worker setup hook: the :data:`STATE_API_LOGGERS` report errors only."""
    for name in STATE_API_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def local_ray_kwargs(**overrides: Any) -> dict[str, Any]:
    """``ray.init`` keyword arguments of the embedded local Ray; ``overrides`` win."""
    return {
        "address": "local",
        "include_dashboard": False,
        "logging_level": "ERROR",
        "runtime_env": {"worker_process_setup_hook": f"{__name__}.{quiet_state_api_warnings.__name__}"},
        **overrides,
    }


def init_local_ray(**overrides: Any) -> None:
    """Start the embedded local Ray (``ray.init(**local_ray_kwargs(**overrides))``)."""
    import ray

    ray.init(**local_ray_kwargs(**overrides))
