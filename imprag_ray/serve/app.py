"""The Serve application: build, run, reload (the Ray edge of serving).

The stage classes are plain Python (:mod:`imprag_ray.serve.stages`,
:mod:`imprag_ray.serve.ingress`, :mod:`imprag_ray.serve.control`); this module applies
``serve.deployment`` with the options computed from the job config, so the same app runs
from ``imprag serve --config ...``, from ``serve run`` / ``serve deploy`` with a Serve
config file (``import_path: imprag_ray.serve.app:build_app``) and as a KubeRay
RayService (``clusters/kuberay/rayservice-llama3-3b.yaml``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from imprag_ray.config.loader import check_paths, load_config, to_dict
from imprag_ray.config.serve_schema import DeploymentSection, LoggingSection, ServeJobConfig

CONTROL_OPTIONS = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0.01},
    "max_ongoing_requests": 1000,
}


def load_serve_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check: bool = True):
    """Load + validate a serve job YAML; with ``check`` its checkpoint/index/corpus must exist."""
    cfg = load_config(ServeJobConfig, path, list(overrides))
    if check:
        check_paths(cfg, Path.cwd())
    return cfg


def absolute_paths(cfg: ServeJobConfig) -> ServeJobConfig:
    """Resolve relative paths against the current directory (replicas run elsewhere)."""
    from dataclasses import replace

    def fix(p: str) -> str:
        return p if "://" in p else str(Path(p).expanduser().resolve())

    return replace(cfg, checkpoint=fix(cfg.checkpoint), index=fix(cfg.index), corpus=fix(cfg.corpus))


def logging_config(section: LoggingSection, access_log: bool | None = None) -> dict[str, Any]:
    """Serve's ``logging_config`` from the ``logging`` section (``access_log`` overrides it)."""
    return {
        "encoding": section.encoding,
        "enable_access_log": section.access_log if access_log is None else access_log,
    }


def http_options(cfg: ServeJobConfig) -> dict[str, Any]:
    """``serve.start(http_options=...)`` from the ``http`` section."""
    return {
        "host": cfg.http.host,
        "port": cfg.http.port,
        "request_timeout_s": cfg.http.request_timeout_s,
        "keep_alive_timeout_s": cfg.http.keep_alive_timeout_s,
    }


def deployment_options(section: DeploymentSection, logging: LoggingSection | None = None) -> dict[str, Any]:
    """``serve.deployment(...).options`` of one stage from its config section (and the
    job's ``logging`` section)."""
    a, r = section.autoscaling_config, section.ray_actor_options
    autoscaling = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "metrics_interval_s": a.metrics_interval_s,
        "look_back_period_s": a.look_back_period_s,
    }
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    actor: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.memory is not None:
        actor["memory"] = r.memory
    if r.resources:
        actor["resources"] = dict(r.resources)
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": section.max_ongoing_requests,
        "max_queued_requests": section.queue_limit,
        "logging_config": logging_config(logging or LoggingSection()),
    }
    if a.min_replicas == a.max_replicas:
        options["num_replicas"] = a.min_replicas  # fixed size: no autoscaler
    else:
        options["autoscaling_config"] = autoscaling
    return options


def build_application(
    cfg: ServeJobConfig, *, retrieval_cls: type | None = None, generation_cls: type | None = None
):
    """The bound Serve application (ingress -> retrieval, generation; control).

    ``retrieval_cls`` / ``generation_cls`` replace the stage classes (constructed with
    ``(cfg_dict, control)``), for tests that need a stage that hangs or fails on demand.
    """
    from ray import serve

    from imprag_ray.serve.control import Control
    from imprag_ray.serve.ingress import make_ingress_class
    from imprag_ray.serve.stages import GenerationStage, RetrievalStage

    cfg = absolute_paths(cfg)
    data = to_dict(cfg)
    d = cfg.deployments
    # Control never gets access logs: every replica's heartbeats would flood them.
    control_options = {**CONTROL_OPTIONS, "logging_config": logging_config(cfg.logging, access_log=False)}
    control = serve.deployment(Control, name="Control").options(**control_options).bind(data)
    retrieval = (
        serve.deployment(retrieval_cls or RetrievalStage, name="RetrievalStage")
        .options(**deployment_options(d.retrieval, cfg.logging))
        .bind(data, control)
    )
    generation = (
        serve.deployment(generation_cls or GenerationStage, name="GenerationStage")
        .options(**deployment_options(d.generation, cfg.logging))
        .bind(data, control)
    )
    return (
        serve.deployment(make_ingress_class(), name="Ingress")
        .options(**deployment_options(d.ingress, cfg.logging))
        .bind(data, control, retrieval, generation)
    )


def build_app(args: dict[str, Any]):
    """Serve app builder for ``serve run`` / ``serve deploy`` / RayService.

    ``args``: ``{"config": "jobs/serve_tiny_synth.yaml", "overrides": ["top_k=2", ...]}``.
    """
    unknown = set(args) - {"config", "overrides"}
    if unknown or "config" not in args:
        raise ValueError(f"build_app args: need 'config' (and optional 'overrides'), got keys {sorted(args)}")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    return build_application(load_serve_config(args["config"], overrides))


def run(cfg: ServeJobConfig, *, blocking: bool = True, address: str | None = None, echo=print) -> str:
    """Start Serve on ``cfg.http`` and deploy the app; returns the base URL.

    ``address=None`` joins ``$RAY_ADDRESS`` when set (a submitted job), else starts a local
    Ray instance for this process; pass ``auto`` / ``host:port`` to deploy onto a cluster.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():  # inside `ray job submit` / `imprag submit`, RAY_ADDRESS names the cluster
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    serve.start(http_options=http_options(cfg))
    serve.run(build_application(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
    echo(f"imprag serve: {cfg.app_name} ready at {url} (ray address {ray.get_runtime_context().gcs_address})")
    if blocking:
        import signal

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)  # `timeout`, `kill`, pod shutdown: as Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut shutdown short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            echo("imprag serve: shutting down")
            serve.shutdown()
            ray.shutdown()
    return url


def connect(address: str | None) -> None:
    """Join a running cluster (``auto`` by default). A cluster started by ``ray.init()``
    uses token auth with the token in ``~/.ray/auth_token`` (or ``$RAY_AUTH_TOKEN``), but a
    connecting driver only sends it in token mode: turn that on when a token is at hand."""
    import ray

    if ray.is_initialized():
        return
    try:  # sets RAY_AUTH_MODE=token and refreshes Ray's cached config (must follow `import ray`)
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:  # a Ray without token auth
        pass
    ray.init(address=address or "auto", include_dashboard=False, log_to_driver=False)


def reload(checkpoint: str, index: str, *, app_name: str = "imprag", address: str | None = None) -> dict:
    """Hot-swap a running app to (checkpoint, index): returns the swap record."""
    from ray import serve

    connect(address)
    ckpt, idx = str(Path(checkpoint).resolve()), str(Path(index).resolve())
    handle = serve.get_deployment_handle("Control", app_name=app_name)
    return handle.reload.remote(ckpt, idx).result(timeout_s=None)
