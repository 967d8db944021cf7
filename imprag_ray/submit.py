"""``imprag submit JOB.yaml --address URL``: run a job file on a Ray cluster.

A thin wrapper around Ray's job submission API (what ``ray job submit`` does) that
validates the job file first (schema, and with ``--cluster`` that its Ray resources
fit the cluster's node types), ships the project directory as the job's
``working_dir`` (so every node runs this exact code and these job files), and runs
``python -m imprag_ray.cli <command> --config JOB [overrides]`` as the entrypoint.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

from imprag_ray.config.loader import ConfigError

# imprag command -> (argv words, config schema)
COMMANDS = {
    "train": ("train",),
    "index": ("index", "build"),
    "batch": ("batch",),
    "serve": ("serve",),
}
EXCLUDES = ["runs/", ".git/", "**/__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def load_job(job: Path, command: str, overrides: list[str]):
    """Validate the job file for ``command`` (schema only: paths may live on the cluster)."""
    from imprag_ray.config.loader import load_config

    if command == "serve":
        from imprag_ray.config.serve_schema import ServeJobConfig as schema
    else:
        from imprag_ray.config.schema import TrainJobConfig as schema
    return load_config(schema, job, overrides)


def check_cluster(cfg: Any, cluster_file: Path, command: str = "train") -> None:
    """Check that the job's Ray workers for ``command`` fit the cluster file's node types:
    training workers (``ray:``), encoder actors (``index:``) or generation actors (``batch:``)."""
    from imprag_ray.config.cluster import check_fits, load_cluster

    cluster = load_cluster(cluster_file)
    if command == "train" and hasattr(cfg, "ray"):
        r = cfg.ray
        check_fits(
            cluster,
            num_workers=r.num_workers,
            num_cpus=r.cpus_per_worker,
            num_gpus=1.0 if r.use_gpu else 0.0,
            resources=dict(r.resources_per_worker),
        )
    elif command == "index" and hasattr(cfg, "index"):
        i = cfg.index
        check_fits(
            cluster, num_workers=i.encoders, num_cpus=i.num_cpus, num_gpus=i.num_gpus, key="index.encoders"
        )
    elif command == "batch" and hasattr(cfg, "batch"):
        b = cfg.batch
        check_fits(
            cluster,
            num_workers=b.generators,
            num_cpus=b.num_cpus,
            num_gpus=b.num_gpus,
            key="batch.generators",
        )


def build_submission(
    job: Path, command: str, overrides: list[str], working_dir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The entrypoint + runtime_env that ``JobSubmissionClient.submit_job`` receives."""
    working_dir = working_dir.resolve()
    job_abs = job.resolve()
    try:
        rel = job_abs.relative_to(working_dir)
    except ValueError as err:
        raise ConfigError(
            "job", f"{job} is outside the working dir {working_dir}; put it under the project (jobs/)"
        ) from err
    argv = ["python", "-m", "imprag_ray.cli", *COMMANDS[command], "--config", str(rel), *overrides]
    return {
        "entrypoint": shlex.join(argv),
        "runtime_env": {
            "working_dir": str(working_dir),
            "excludes": EXCLUDES,
            "env_vars": {"PYTHONPATH": ".", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        },
    }


def submit(
    address: str,
    submission: dict[str, Any],
    *,
    wait: bool = True,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    out=sys.stdout,
) -> tuple[str, str]:
    """Submit; with ``wait``, stream the logs until the job ends -> (job id, final status)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(**submission)
    print(f"imprag submit: job {job_id} submitted to {address}", file=out, flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    start, seen = time.time(), 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status in TERMINAL:
            return job_id, status
        if timeout_s is not None and time.time() - start > timeout_s:
            client.stop_job(job_id)
            return job_id, "TIMEOUT"
        time.sleep(poll_s)
