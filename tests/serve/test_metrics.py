"""The app's metrics reach Ray's per-node metrics agent (Prometheus text on the node's
metrics export port, names prefixed ``ray_``): requests and time to first token (ingress),
retrieval batch latency and queue depth (stages), swaps (Control). The test Ray runs
without the dashboard, as the project's local Ray does: the metrics agent still runs."""

from __future__ import annotations

import re
import time

import pytest

from imprag_ray.bench.serve import prompt_for
from tests.serve.conftest import MODEL

pytestmark = pytest.mark.timeout(300)

# metric -> a label that must be on one of its samples (None: any sample)
EXPECTED = {
    "ray_imprag_requests_total": 'route="/v1/completions"',
    "ray_imprag_time_to_first_token_seconds_count": None,
    "ray_imprag_generated_tokens_total": None,
    "ray_imprag_retrieval_latency_seconds_count": None,
    "ray_imprag_queue_depth": 'stage="retrieval"',
    "ray_imprag_swaps_total": 'outcome="unchanged"',
}


def _missing(text: str) -> list[str]:
    missing = []
    for name, label in EXPECTED.items():
        samples = re.findall(rf"^{name}\{{([^}}]*)\}} ", text, flags=re.M)
        if not samples or (label is not None and not any(label in s for s in samples)):
            missing.append(name if label is None else f"{name}{{{label}}}")
    # the generation stage's gauge too (both stages share the metric)
    if not re.search(r'^ray_imprag_queue_depth\{[^}]*stage="generation"', text, flags=re.M):
        missing.append('ray_imprag_queue_depth{stage="generation"}')
    return missing


def test_app_metrics_are_exported_on_the_ray_metrics_endpoint(serve_app, client):
    import httpx
    from ray import serve

    for i in range(3):
        body = {"model": MODEL, "prompt": prompt_for(i), "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
    stream = {"model": MODEL, "prompt": prompt_for(3), "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/completions", json=stream) as resp:
        assert resp.status_code == 200
        resp.read()
    assert client.post("/v1/retrieve", json={"prompt": prompt_for(4)}).status_code == 200
    control = serve.get_deployment_handle("Control", app_name="imprag")
    active = control.status.remote().result(timeout_s=30)["active"]
    swap = control.reload.remote(active["checkpoint"], active["index"]).result(timeout_s=60)
    assert swap["changed"] is False  # counted as an "unchanged" swap

    t0, text, missing = time.time(), "", list(EXPECTED)
    while time.time() - t0 < 90:  # the agent exports what replicas recorded every few seconds
        try:
            text = httpx.get(serve_app["metrics_url"], timeout=10).text
        except httpx.HTTPError:
            text = ""
        missing = _missing(text)
        if not missing:
            break
        time.sleep(2)
    print(f"\nmetrics: all expected names on {serve_app['metrics_url']} after {time.time() - t0:.1f} s")
    assert not missing, (
        f"missing {missing}; imprag lines: {[ln for ln in text.splitlines() if 'imprag' in ln][:20]}"
    )
