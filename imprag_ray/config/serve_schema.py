"""Serve job configuration (``imprag serve --config jobs/serve_*.yaml``): frozen dataclasses.

One checkpoint + the index built from it + the corpus the index ids point into, served by
three Ray Serve deployments (DESIGN §2 "online serving"): ``ingress`` (HTTP, OpenAI API),
``retrieval`` (bottom layers 0..b + FAISS; dynamic request batching) and ``generation``
(the full model in a generation engine). Each deployment has its own autoscaling,
actor resources, concurrency cap and batching. Loaded by the Ray-free loader
(:mod:`imprag_ray.config.loader`); bad values fail naming the dotted key.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from imprag_ray.config.loader import ConfigError


@dataclass(frozen=True)
class ModelExpectation:
    """What the served checkpoint must be (null = accept what ``imprag_config.json`` says).

    Replicas compare these with the checkpoint at load time and refuse a mismatch, so a
    config written for Llama-3.2-3B b=7 t=19 k=10 cannot silently serve another split.
    """

    retrieval_layer: int | None = None  # b
    reader_last_layer: int | None = None  # t
    num_passages: int | None = None  # k
    dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        b, t = self.retrieval_layer, self.reader_last_layer
        if b is not None and b < 0:
            raise ConfigError.at("retrieval_layer", f"must be >= 0, got {b}")
        if b is not None and t is not None and b >= t:
            raise ConfigError.at("retrieval_layer", f"b must be < reader_last_layer (t={t}), got b={b}")
        if self.num_passages is not None and self.num_passages <= 0:
            raise ConfigError.at("num_passages", f"must be > 0, got {self.num_passages}")


@dataclass(frozen=True)
class EngineSection:
    """Generation engine: ``imprag_ray.engine.build_engine(kind, checkpoint, **options)``.

    The vLLM engine also gets the request budget (``limits.max_prompt_tokens`` and
    ``limits.max_tokens``) to size ``max_model_len``; ``options`` may set any engine or
    ``vllm.AsyncEngineArgs`` option (``max_model_len``, ``kv_cache_gib``, ...) instead.
    """

    kind: Literal["torch", "vllm"] = "torch"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSection:
    """FAISS search settings of the retrieval stage (null = what the index manifest
    recorded at build time, ``index.nprobe`` / ``index.ef_search`` of the build job)."""

    nprobe: int | None = None  # IVF lists visited per query
    ef_search: int | None = None  # HNSW efSearch

    def validate(self) -> None:
        for key in ("nprobe", "ef_search"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError.at(key, f"must be > 0 or null (the index manifest's), got {value}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


@dataclass(frozen=True)
class HttpSection:
    """Serve's HTTP proxy (``serve.start(http_options=...)``, built by
    :func:`imprag_ray.serve.app.http_options`).

    ``host``: the address the proxy binds; anything but loopback needs ``auth`` (checked by
    :meth:`ServeJobConfig.validate`). ``request_timeout_s``: the proxy's end-to-end limit per
    request, streams included (null = none); past it the proxy answers 408 in plain text,
    so keep it above ``timeouts.retrieval_s + timeouts.generation_s``, which answer 504
    JSON first. ``keep_alive_timeout_s``: how long an idle keep-alive connection stays
    open; Serve's 90 s outlasts the 60 s idle timeout common in load balancers, so a
    balancer never reuses a connection the server has just closed.
    """

    host: str = "127.0.0.1"  # loopback unless configured otherwise
    port: int = 8000
    route_prefix: str = "/"
    request_timeout_s: float | None = 300.0
    keep_alive_timeout_s: int = 90

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError.at("port", f"must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError.at("route_prefix", f"must start with '/', got {self.route_prefix!r}")
        if self.request_timeout_s is not None and not 0 < self.request_timeout_s < math.inf:
            raise ConfigError.at(
                "request_timeout_s", f"must be a finite number > 0 or null, got {self.request_timeout_s}"
            )
        if self.keep_alive_timeout_s <= 0:
            raise ConfigError.at("keep_alive_timeout_s", f"must be > 0, got {self.keep_alive_timeout_s}")


@dataclass(frozen=True)
class AuthSection:
    """Bearer API key: given inline or (better) named by an environment variable.

    Without a key the API is open to whoever reaches ``http.host``: allowed on loopback;
    on any other address only with ``allow_unauthenticated: true`` (the risk accepted).
    """

    api_key: str | None = None
    api_key_env: str | None = None
    allow_unauthenticated: bool = False

    @property
    def enabled(self) -> bool:
        return self.api_key is not None or self.api_key_env is not None

    def validate(self) -> None:
        if self.api_key is not None and self.api_key_env is not None:
            raise ConfigError.at("api_key", "set api_key or api_key_env, not both")
        if self.api_key is not None and not self.api_key:
            raise ConfigError.at("api_key", "must not be empty; remove it to disable the key check")


@dataclass(frozen=True)
class LimitsSection:
    max_request_bytes: int = 65536
    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 512  # including <s>; longer prompts are refused, not truncated
    max_tokens: int = 256  # upper bound of a request's max_tokens
    default_max_tokens: int = 16

    def validate(self) -> None:
        for key in ("max_request_bytes", "max_prompt_chars", "max_prompt_tokens", "max_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")
        if not 0 < self.default_max_tokens <= self.max_tokens:
            raise ConfigError.at(
                "default_max_tokens",
                f"must be in 1..max_tokens ({self.max_tokens}), got {self.default_max_tokens}",
            )


@dataclass(frozen=True)
class AutoscalingSection:
    """Ray Serve ``autoscaling_config`` (the subset we expose)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0  # how often replicas/handles push load metrics (Ray's default)
    look_back_period_s: float = 10.0

    def validate(self) -> None:
        if self.min_replicas < 0:
            raise ConfigError.at("min_replicas", f"must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError.at(
                "max_replicas",
                f"must be >= max(1, min_replicas={self.min_replicas}), got {self.max_replicas}",
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ConfigError.at("initial_replicas", "must lie in min_replicas..max_replicas")
        if self.target_ongoing_requests <= 0:
            raise ConfigError.at(
                "target_ongoing_requests", f"must be > 0, got {self.target_ongoing_requests}"
            )
        for key in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, key) < 0:
                raise ConfigError.at(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("metrics_interval_s", "look_back_period_s"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class ActorOptionsSection:
    """Ray Serve ``ray_actor_options`` for each replica."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes
    resources: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for key in ("num_cpus", "num_gpus"):
            if getattr(self, key) < 0:
                raise ConfigError.at(key, f"must be >= 0, got {getattr(self, key)}")
        for name, amount in self.resources.items():
            if amount < 0:
                raise ConfigError.at(f"resources.{name}", f"must be >= 0, got {amount}")


@dataclass(frozen=True)
class BatchingSection:
    """Dynamic request batching (``@serve.batch``) inside a replica."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01

    def validate(self) -> None:
        if self.max_batch_size <= 0:
            raise ConfigError.at("max_batch_size", f"must be > 0, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError.at("batch_wait_timeout_s", f"must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass(frozen=True)
class DeploymentSection:
    """One deployment's replicas, resources, concurrency and queue.

    ``max_ongoing_requests``: requests one replica runs at once. ``max_queued_requests``:
    Ray Serve's per-caller queue of requests waiting for a free replica (each proxy or
    ingress replica queues its own); past it the caller refuses at once instead of letting
    waits grow without bound: HTTP 503 in plain text from the proxy (the ingress queue), 503
    JSON with ``Retry-After`` from the ingress (a stage queue). null = 4 x
    ``max_ongoing_requests``; -1 = no limit.
    """

    autoscaling_config: AutoscalingSection = AutoscalingSection()
    ray_actor_options: ActorOptionsSection = ActorOptionsSection()
    max_ongoing_requests: int = 16
    max_queued_requests: int | None = None

    def validate(self) -> None:
        if self.max_ongoing_requests <= 0:
            raise ConfigError.at("max_ongoing_requests", f"must be > 0, got {self.max_ongoing_requests}")
        q = self.max_queued_requests
        if q is not None and q != -1 and q <= 0:
            raise ConfigError.at(
                "max_queued_requests",
                f"must be > 0, -1 (no limit) or null (4 x max_ongoing_requests), got {q}",
            )

    @property
    def queue_limit(self) -> int:
        """The ``max_queued_requests`` given to Serve (-1: unbounded)."""
        if self.max_queued_requests is None:
            return 4 * self.max_ongoing_requests
        return self.max_queued_requests


@dataclass(frozen=True)
class RetrievalDeploymentSection(DeploymentSection):
    """The retrieval stage's deployment; ``batching``: its ``@serve.batch`` of requests into
    one bottom-layer forward and one FAISS search. (The generation stage has no such knob:
    its engine batches running requests itself, vLLM continuously, the torch engine every
    ``engine.options.batch_wait_s``.)"""

    batching: BatchingSection = BatchingSection()


@dataclass(frozen=True)
class DeploymentsSection:
    ingress: DeploymentSection = DeploymentSection()
    retrieval: RetrievalDeploymentSection = RetrievalDeploymentSection()
    generation: DeploymentSection = DeploymentSection()


@dataclass(frozen=True)
class RetrySection:
    """Ingress retries of a stage call whose replica died (actor death, replica unavailable)."""

    max_attempts: int = 5
    deadline_s: float = 60.0
    backoff_s: float = 0.2

    def validate(self) -> None:
        if self.max_attempts <= 0:
            raise ConfigError.at("max_attempts", f"must be > 0, got {self.max_attempts}")
        if self.deadline_s <= 0 or self.backoff_s < 0:
            raise ConfigError.at("deadline_s", "deadline_s must be > 0 and backoff_s >= 0")


@dataclass(frozen=True)
class TimeoutsSection:
    """How long the ingress waits on each call before giving up with a 504 JSON answer
    (the call is cancelled, so a hung stage frees its slot).

    ``retrieval_s``: one retrieval call. ``generation_s``: a whole non-streaming
    generation; for a stream, the time to its first token and then the longest gap
    between two token chunks. ``control_s``: a call to the Control deployment (version
    lookup, ``/v1/status``, ``/readyz``).
    """

    retrieval_s: float = 30.0
    generation_s: float = 120.0
    control_s: float = 10.0

    def validate(self) -> None:
        for key in ("retrieval_s", "generation_s", "control_s"):
            value = getattr(self, key)
            if not 0 < value < math.inf:
                raise ConfigError.at(key, f"must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class LoggingSection:
    """Serve's ``logging_config`` of the ingress and both stages (Control's heartbeats
    never get access logs). ``encoding``: ``TEXT`` or ``JSON`` (one JSON object per line,
    for log collectors). ``access_log``: one line per request and deployment (method,
    route, status, latency, request id)."""

    encoding: Literal["TEXT", "JSON"] = "TEXT"
    access_log: bool = True


@dataclass(frozen=True)
class ReloadSection:
    """Hot swap: how long replicas may take to load a new version, and to drain the old one."""

    load_timeout_s: float = 900.0
    drain_timeout_s: float = 120.0
    poll_interval_s: float = 0.25

    def validate(self) -> None:
        for key in ("load_timeout_s", "drain_timeout_s", "poll_interval_s"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class ServeJobConfig:
    """``imprag serve``: checkpoint + its index + corpus, engine, HTTP, auth, limits,
    deployments, retries, hot swap, timeouts and logging (each section documented on its class).

    Checked across sections: a non-loopback ``http.host`` needs auth (or
    ``auth.allow_unauthenticated: true``), and ``http.request_timeout_s`` must leave room for
    ``timeouts.retrieval_s + timeouts.generation_s``.
    """

    name: str
    checkpoint: str = field(metadata={"path": "dir"})
    index: str = field(metadata={"path": "dir"})
    corpus: str = field(metadata={"path": "file"})  # the passages the index ids point into
    app_name: str = "imprag"
    model_name: str = "imprag"  # the OpenAI ``model`` id clients must send
    top_k: int | None = None  # passages read per request (null = the checkpoint's k)
    threads: int | None = 1  # torch intra-op threads per replica
    # Wrap each prompt (a completion's prompt, a chat's user text) in the checkpoint's chat
    # template as one user turn (instruct snapshots); false: <s> + the raw text, as trained.
    chat_template: bool = False
    model: ModelExpectation = ModelExpectation()
    engine: EngineSection = EngineSection()
    search: SearchSection = SearchSection()
    http: HttpSection = HttpSection()
    auth: AuthSection = AuthSection()
    limits: LimitsSection = LimitsSection()
    deployments: DeploymentsSection = DeploymentsSection()
    retry: RetrySection = RetrySection()
    reload: ReloadSection = ReloadSection()
    timeouts: TimeoutsSection = TimeoutsSection()
    logging: LoggingSection = LoggingSection()

    def validate(self) -> None:
        if not self.auth.enabled and not self.auth.allow_unauthenticated and not is_loopback(self.http.host):
            raise ConfigError.at(
                "http.host",
                f"{self.http.host!r} is reachable from other machines but auth is off: anyone who "
                "reaches it can use the model; set auth.api_key_env (an environment variable holding "
                "the key), or set auth.allow_unauthenticated: true to accept the risk",
            )
        budget = self.timeouts.retrieval_s + self.timeouts.generation_s
        if self.http.request_timeout_s is not None and self.http.request_timeout_s <= budget:
            raise ConfigError.at(
                "http.request_timeout_s",
                f"must be > timeouts.retrieval_s + timeouts.generation_s ({budget:g} s), got "
                f"{self.http.request_timeout_s:g}: a slow stage must get its 504 JSON answer before "
                "the proxy cuts the request",
            )
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError.at("top_k", f"must be > 0 or null, got {self.top_k}")
        k = self.model.num_passages
        if self.top_k is not None and k is not None and self.top_k > k:
            raise ConfigError.at("top_k", f"must be <= model.num_passages ({k}), got {self.top_k}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError.at("threads", f"must be > 0 or null, got {self.threads}")
        if not self.app_name or not self.model_name:
            raise ConfigError.at("model_name", "app_name and model_name must not be empty")
