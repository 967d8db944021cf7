"""Many concurrent streams on ONE torch-engine generation replica, client disconnects, and
``imprag bench serve --stream``.

A second app (``imprag-streams`` under ``/streams``) next to the package app, on the same
checkpoint and index: one generation replica taking up to 80 requests at once, and a
``limits.max_tokens`` large enough (1500 tokens, 10+ s of decoding on the 2-core box) that
a request cut by its client must visibly stop before its budget would have run out.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from imprag_ray.bench.serve import prompt_for
from tests.serve.conftest import API_KEY, MODEL, OVERRIDES, ROOT, wait_for

pytestmark = pytest.mark.timeout(600)

APP = "imprag-streams"
STREAMS = 64
LONG = 1500  # max_tokens of the disconnect tests (the tiny model does not stop by itself)


@pytest.fixture(scope="module")
def streams_app(serve_app):
    from ray import serve

    from imprag_ray.bench.serve import wait_ready
    from imprag_ray.serve.app import build_application, load_serve_config

    w = serve_app
    overrides = [o for o in OVERRIDES if not o.startswith(("deployments.", "limits.max_tokens"))]
    cfg = load_serve_config(
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"app_name={APP}",
            *overrides,
            f"limits.max_tokens={LONG}",
            "deployments.ingress.ray_actor_options.num_cpus=0.05",
            "deployments.ingress.max_ongoing_requests=100",
            "deployments.retrieval.ray_actor_options.num_cpus=0.05",
            "deployments.retrieval.autoscaling_config={min_replicas: 1, max_replicas: 1}",
            "deployments.retrieval.max_ongoing_requests=80",
            "deployments.retrieval.batching={max_batch_size: 16, batch_wait_timeout_s: 0.01}",
            "deployments.generation.ray_actor_options.num_cpus=0.1",
            "deployments.generation.autoscaling_config={min_replicas: 1, max_replicas: 1}",
            "deployments.generation.max_ongoing_requests=80",
        ],
    )
    serve.run(build_application(cfg), name=APP, route_prefix="/streams")
    url = w["url"] + "/streams"
    try:
        asyncio.run(wait_ready(url, timeout_s=180))
        yield {**w, "url": url}
    finally:
        serve.delete(APP)


def generation_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("GenerationStage", app_name=APP).info.remote().result(timeout_s=60)


async def _streams(url: str, n: int, max_tokens: int) -> list[tuple[str, str, float]]:
    """``n`` concurrent completion streams through the ``openai`` client: (prompt, text,
    seconds from request to the end of the stream) each."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i: int) -> tuple[str, str, float]:
        prompt = prompt_for(i)
        t0 = time.perf_counter()
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return prompt, text, time.perf_counter() - t0

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_64_concurrent_streams_on_one_torch_replica_all_finish(streams_app):
    from ray import serve

    status = serve.status().applications[APP].deployments["GenerationStage"].replica_states
    assert status.get("RUNNING") == 1
    t0 = time.perf_counter()
    results = asyncio.run(_streams(streams_app["url"], STREAMS, 32))
    wall = time.perf_counter() - t0
    seconds = sorted(r[2] for r in results)
    print(
        f"\n{STREAMS} concurrent streams, one torch replica: all done in {wall:.1f} s; per stream "
        f"min {seconds[0]:.1f} s, median {seconds[len(seconds) // 2]:.1f} s, max {seconds[-1]:.1f} s"
    )
    assert len(results) == STREAMS and all(r[1] for r in results)
    assert seconds[-1] < 120, seconds[-1]
    by_prompt: dict[str, set[str]] = {}
    for prompt, text, _ in results:
        by_prompt.setdefault(prompt, set()).add(text)
    # Greedy decoding: the same prompt streams the same text however it was batched.
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt
    wait_for(lambda: not generation_info()["running"], 30, what="engine idle after the streams")


def _watch_running(stop: threading.Event, seen: set[str]) -> None:
    """Collect the engine ids the generation replica steps until ``stop``."""
    while not stop.is_set():
        seen.update(generation_info()["running"])
        time.sleep(0.1)


def _until_idle(timeout: float) -> float:
    """Seconds until the generation replica has nothing in flight and its engine steps
    nothing (polled every 0.1 s)."""
    t0 = time.perf_counter()

    def idle() -> bool:
        info = generation_info()
        return not info["running"] and not info["inflight"]

    wait_for(idle, timeout, interval=0.1, what="the engine to stop the abandoned request")
    return time.perf_counter() - t0


def test_client_disconnect_stops_the_engine_request(streams_app):
    """A stream closed after a few tokens, then a non-streaming request whose client times
    out: the engine drops each within seconds, while its budget (1500 tokens) would take
    far longer (estimated from the stream's own token rate)."""
    import httpx

    url = streams_app["url"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    wait_for(lambda: not generation_info()["running"], 60, what="engine idle")

    body = {"model": MODEL, "prompt": prompt_for(1), "max_tokens": LONG, "stream": True}
    chunks, first, last = 0, None, None
    with (
        httpx.Client(base_url=url, headers=headers, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
                chunks += 1
                if chunks == 40:
                    break  # leave the stream: the connection closes below
    assert first is not None and last is not None and last > first
    rate = (chunks - 1) / (last - first)  # text chunks per second, about tokens per second
    full = LONG / rate
    stream_stop = _until_idle(60)

    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=_watch_running, args=(stop, seen), daemon=True)
    watcher.start()
    body = {"model": MODEL, "prompt": prompt_for(2), "max_tokens": LONG}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                url + "/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(30, read=3.0)
            )
        plain_stop = _until_idle(60)
    finally:
        stop.set()
        watcher.join()
    print(
        f"\ndisconnect: stream rate {rate:.0f} tokens/s, so {LONG} tokens take about {full:.0f} s; the engine "
        f"dropped the closed stream {stream_stop:.1f} s and the timed-out request {plain_stop:.1f} s "
        f"after the client left (engine ids seen: {sorted(seen)})"
    )
    assert seen, "the timed-out request never reached the engine"
    assert stream_stop < max(5.0, 0.25 * full) and plain_stop < max(5.0, 0.25 * full)
    assert stream_stop < full / 2 and plain_stop < full / 2


def test_bench_serve_stream_reports_ttft_and_no_errors(streams_app, tmp_path):
    from imprag_ray.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "serve",
        "--url",
        streams_app["url"],
        "--stream",
        "--requests",
        "32",
        "--concurrency",
        "16",
        "--max-tokens",
        "16",
        "--model",
        MODEL,
        "--api-key",
        API_KEY,
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    print(f"\nbench serve --stream: {json.dumps(result)}")
    assert result["stream"] and result["errors"] == 0 and result["ok"] == 32, result["error_samples"]
    assert 0 < result["ttft_p50_s"] <= result["ttft_p99_s"] <= result["latency_p99_s"]
    assert result["latency_p50_s"] <= result["latency_p99_s"] and result["throughput_rps"] > 0
