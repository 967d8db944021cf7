"""Application metrics of the Serve app, exported through Ray's metrics agent.

Each replica records into one :class:`ServeMetrics` (``metrics()``); the metrics are
``ray.serve.metrics`` objects, so Ray adds the ``deployment``, ``replica`` and
``application`` tags and exports them on every node's Prometheus endpoint (the
``metrics_export_port`` of ``ray start`` / ``ray.init``) with Ray's ``ray_`` prefix, e.g.
``ray_imprag_requests_total{route="/v1/completions",status="200",...}``.

Names (all prefixed ``imprag_``):

* ``requests_total{route,status}``: HTTP requests answered by the ingress;
* ``request_latency_seconds{route}``: arrival to last byte;
* ``time_to_first_token_seconds{route}``: arrival to the first generated text (streams
  and non-streaming generation alike);
* ``generated_tokens_total`` and ``tokens_per_second`` (per request: generated tokens /
  time from the request's arrival to its last token; recorded by the ingress only);
* ``retrieval_latency_seconds``: one batched bottom-layer forward + FAISS search;
* ``queue_depth{stage}``: requests waiting or running in a stage replica;
* ``retries_total{stage}``: stage calls replayed on another replica;
* ``swaps_total{outcome}``: hot swaps (``done``, ``failed``, ``unchanged``).
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
RATE_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ServeMetrics:
    """The app's Prometheus metrics in one replica (create through :func:`metrics`)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._requests = Counter(
            "imprag_requests_total", "HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._latency = Histogram(
            "imprag_request_latency_seconds",
            "request arrival to last byte",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("route",),
        )
        self._ttft = Histogram(
            "imprag_time_to_first_token_seconds",
            "request arrival to the first generated token",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("route",),
        )
        self._tokens = Counter("imprag_generated_tokens_total", "generated tokens")
        self._rate = Histogram(
            "imprag_tokens_per_second", "per request: generated tokens per second", boundaries=RATE_BUCKETS
        )
        self._retrieval = Histogram(
            "imprag_retrieval_latency_seconds",
            "one batched bottom-layer forward and FAISS search",
            boundaries=LATENCY_BUCKETS,
        )
        self._queue = Gauge(
            "imprag_queue_depth", "requests waiting or running in a stage replica", tag_keys=("stage",)
        )
        self._retries = Counter(
            "imprag_retries_total", "stage calls replayed on another replica", tag_keys=("stage",)
        )
        self._swaps = Counter("imprag_swaps_total", "hot swaps by outcome", tag_keys=("outcome",))

    def request(self, route: str, status: int, seconds: float | None = None) -> None:
        self._requests.inc(1, tags={"route": route, "status": str(status)})
        if seconds is not None:
            self._latency.observe(seconds, tags={"route": route})

    def ttft(self, route: str, seconds: float) -> None:
        self._ttft.observe(seconds, tags={"route": route})

    def tokens(self, n: int, seconds: float) -> None:
        if n > 0:
            self._tokens.inc(n)
            if seconds > 0:
                self._rate.observe(n / seconds)

    def retrieval_latency(self, seconds: float) -> None:
        self._retrieval.observe(seconds)

    def queue_depth(self, stage: str, n: int) -> None:
        self._queue.set(n, tags={"stage": stage})

    def retry(self, stage: str) -> None:
        self._retries.inc(1, tags={"stage": stage})

    def swap(self, outcome: str) -> None:
        self._swaps.inc(1, tags={"outcome": outcome})


_metrics: ServeMetrics | None = None
_lock = threading.Lock()


def metrics() -> ServeMetrics:
    """This process's :class:`ServeMetrics` (created on first use, inside a replica)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = ServeMetrics()
        return _metrics
