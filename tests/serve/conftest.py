"""One Serve app (real Ray Serve, real HTTP on 127.0.0.1) shared by every test in tests/serve.

Tiny random checkpoint + its FAISS index built in-process, and a second version of the
same architecture (+ its index) for the hot-swap test. Retrieval autoscales 1..2 with
short delays; generation runs 2 fixed replicas so a killed one has a live peer.

Ray starts with a known metrics export port (``serve_app["metrics_url"]``): Ray's per-node
metrics agent serves the app's Prometheus metrics there (it runs without the dashboard).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
MODEL = "imprag-tiny"

OVERRIDES = [
    f"auth.api_key={API_KEY}",
    "limits.max_prompt_chars=600",
    "limits.max_prompt_tokens=160",
    "limits.max_tokens=32",
    "limits.max_request_bytes=4096",
    "deployments.ingress.ray_actor_options.num_cpus=0.1",
    "deployments.retrieval.ray_actor_options.num_cpus=0.2",
    "deployments.retrieval.autoscaling_config={min_replicas: 1, max_replicas: 2, target_ongoing_requests: 0.5, metrics_interval_s: 0.5,"
    " upscale_delay_s: 1, downscale_delay_s: 4, look_back_period_s: 2}",
    "deployments.retrieval.batching={max_batch_size: 8, batch_wait_timeout_s: 0.01}",
    "deployments.generation.ray_actor_options.num_cpus=0.3",
    "deployments.generation.autoscaling_config={min_replicas: 2, max_replicas: 2}",
    "retry={max_attempts: 8, deadline_s: 90, backoff_s: 0.25}",
    "reload={load_timeout_s: 240, drain_timeout_s: 60, poll_interval_s: 0.2}",
]


def replica_counts(app: str = "imprag") -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="package")
def serve_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny world + checkpoint + index (version A) and a perturbed checkpoint + index (B)."""
    import torch

    from imprag_ray.model.checkpoint import checkpoint_hash
    from imprag_ray.serve.tiny import build_passage_index, build_tiny_servable, perturbed_checkpoint

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_world")
    world = build_tiny_servable(root, n_passages=200)
    ckpt_b = perturbed_checkpoint(world["checkpoint"], root / "ckpt_b")
    build_passage_index(ckpt_b, world["corpus"], root / "index_b")
    return {
        **world,
        "checkpoint_b": ckpt_b,
        "index_b": root / "index_b",
        "hash_a": checkpoint_hash(world["checkpoint"]),
        "hash_b": checkpoint_hash(ckpt_b),
    }


@pytest.fixture(scope="package")
def serve_app(serve_world) -> Iterator[dict[str, Any]]:
    """The running app: {url, cfg, gcs_address, world...}; torn down after tests/serve."""
    import ray
    from ray import serve

    from imprag_ray.bench.serve import free_port, wait_ready
    from imprag_ray.serve.app import build_application, load_serve_config

    port, metrics_port = free_port(), free_port()
    w = serve_world
    cfg = load_serve_config(
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"http.port={port}",
            *OVERRIDES,
        ],
    )
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
        )
    # The port of this node's metrics agent (another test's Ray may have been started first).
    metrics_port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{port}"
    try:  # a failed start tears down too: no Ray process outlives the tests
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/")
        asyncio.run(wait_ready(url, timeout_s=180))  # every stage replica holds the version
        yield {
            **w,
            "url": url,
            "cfg": cfg,
            "port": port,
            "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
            "gcs_address": ray.get_runtime_context().gcs_address,
        }
    finally:
        serve.shutdown()
        if own_ray:
            ray.shutdown()


def control_status(app: str = "imprag") -> dict:
    """``Control.status()`` of a running app."""
    from ray import serve

    return serve.get_deployment_handle("Control", app_name=app).status.remote().result(timeout_s=30)


@pytest.fixture()
def client(serve_app):
    import httpx

    with httpx.Client(
        base_url=serve_app["url"], timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as c:
        yield c


class LocalReference:
    """Two-stage ImpRAG inference in this process, no Ray: the full model's query
    embedding, the saved index, the torch reference engine. What the app must match."""

    def __init__(self, checkpoint, index, corpus, max_prompt_tokens: int):
        import torch

        from imprag_ray.data.readers import iter_corpus
        from imprag_ray.engine.torch_engine import TorchEngine
        from imprag_ray.index.store import PassageIndex
        from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
        from imprag_ray.model.imprag import ImpRAGModel

        torch.set_num_threads(1)
        self.tokenizer = load_tokenizer(checkpoint)
        self.model = ImpRAGModel.from_pretrained(checkpoint).eval()
        self.index = PassageIndex.load(index, checkpoint_hash=checkpoint_hash(checkpoint))
        self.corpus = {p.id: p for p in iter_corpus(corpus)}
        self.engine = TorchEngine(str(checkpoint), device="cpu")
        self.max_prompt_tokens = max_prompt_tokens

    def prompt_ids(self, prompt: str) -> list[int]:
        from imprag_ray.data.tokenized import encode_prompt_text

        return encode_prompt_text(self.tokenizer, prompt, self.max_prompt_tokens + 1)

    def retrieve(self, prompt: str, k: int | None = None) -> tuple[list[str], list[float], list[list[int]]]:
        import torch

        from imprag_ray.data.templates import format_passage

        ids = torch.tensor([self.prompt_ids(prompt)])
        with torch.no_grad():
            q = self.model.embed_queries(ids, torch.ones_like(ids))
        found, scores = self.index.search(q.numpy(), k or self.model.k)
        tokens = [
            self.tokenizer(format_passage(self.corpus[pid]), add_special_tokens=False)["input_ids"][
                : self.model.l_max
            ]
            for pid in found[0]
        ]
        return found[0], scores[0].tolist(), tokens

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, list[str]]:
        from imprag_ray.engine import GenerationRequest, Sampling

        pids, _, tokens = self.retrieve(prompt)
        request = GenerationRequest(
            tuple(self.prompt_ids(prompt)),
            tuple(tuple(t) for t in tokens),
            Sampling(max_new_tokens=max_tokens),
        )
        result = self.engine.generate([request])[0]
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True), pids
