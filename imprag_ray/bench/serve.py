"""``imprag bench serve``: HTTP load against the Serve app -> p50/p99 latency, time to first
token, throughput, errors.

Real HTTP (httpx, one connection pool, ``--concurrency`` workers) against ``--url``; without
``--url`` it builds the tiny servable world in a temp dir, starts the app from
``jobs/serve_tiny_synth.yaml`` on a free loopback port, measures, and tears it down. Either
way it first waits for the app's ``/readyz`` (``/healthz`` on an app without it).

``--stream`` sends ``stream: true`` and reads the SSE chunks: TTFT is the time from sending
the request to the first chunk that carries generated text (the ingress's first chunk, with
the retrieved passages, carries none). Without ``--stream`` the first token arrives with the
whole answer, so TTFT is not reported. Every non-2xx answer, transport error, in-band error
chunk or stream without ``data: [DONE]`` counts as an error (the JSON lists the first few).
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = (
    "Q: Where was {name} born? A:",
    "Q: Who founded the guild that {name} joined? A:",
    "Is this statement true? {name} was a painter. A:",
    "{name} [SEP] place of birth Provide the answer corresponding to the relation specified after "
    "[SEP] for the entity mentioned before [SEP] A:",
)
NAMES = ("Ilsa Dren", "Tamcas Pelkal", "Yoril Tamsel", "Linost Pelkal", "Drensa Navyor", "Sapel Tamsel")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "retrieve": "/v1/retrieve"}


def prompt_for(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)].format(name=NAMES[(i // len(PROMPTS)) % len(NAMES)])


def _body(endpoint: str, i: int, model: str, max_tokens: int, stream: bool = False) -> dict:
    if endpoint == "retrieve":
        return {"prompt": prompt_for(i)}
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt_for(i)}]
    else:
        body["prompt"] = prompt_for(i)
    if stream:
        body["stream"] = True
    return body


def _chunk_text(chunk: dict) -> str:
    """The generated text of one SSE chunk (completion ``text`` or chat ``delta.content``)."""
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _read_stream(resp, t0: float) -> tuple[float | None, int, str | None]:
    """Read an SSE response to its end: (seconds to the first text chunk, text chunks,
    error or None)."""
    ttft, chunks, done, error = None, 0, False, None
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            error = error or f"in-band error: {json.dumps(chunk['error'])[:200]}"
        elif _chunk_text(chunk):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    if not done and error is None:
        error = "stream ended without data: [DONE]"
    return ttft, chunks, error


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[pos]


async def run_load(
    url: str,
    *,
    requests: int = 200,
    concurrency: int = 16,
    endpoint: str = "completions",
    model: str = "imprag-tiny",
    max_tokens: int = 8,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    stream: bool = False,
    on_result=None,
) -> dict[str, Any]:
    """Send ``requests`` requests with ``concurrency`` workers; returns the summary.

    ``on_result(i, status, body, seconds)`` is called after each request (tests use it
    to record versions and to act mid-load; ``body`` is None for streams).
    """
    import httpx

    if stream and endpoint == "retrieve":
        raise ValueError("--stream needs a generating endpoint (completions or chat), not retrieve")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    ttfts: list[float] = []
    completion_tokens = 0
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    path = ENDPOINTS[endpoint]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:

        async def one(i: int) -> tuple[int, dict | None, str | None]:
            """(HTTP status, JSON body, error) of request ``i``; records its TTFT."""
            nonlocal completion_tokens
            body = _body(endpoint, i, model, max_tokens, stream)
            t0 = time.perf_counter()
            if stream:
                async with client.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 300:
                        await resp.aread()
                        return resp.status_code, None, f"HTTP {resp.status_code}: {resp.text[:200]}"
                    ttft, _, error = await _read_stream(resp, t0)
                    if ttft is not None:
                        ttfts.append(ttft)
                    return resp.status_code, None, error
            resp = await client.post(path, json=body)
            data = (
                resp.json() if resp.headers.get("content-type", "").startswith("application/json") else None
            )
            if resp.status_code >= 300:
                return resp.status_code, data, f"HTTP {resp.status_code}: {resp.text[:200]}"
            completion_tokens += int(((data or {}).get("usage") or {}).get("completion_tokens") or 0)
            return resp.status_code, data, None

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                status, body, error = -1, None, None
                try:
                    status, body, error = await one(i)
                except Exception as err:  # transport error: counted, reported
                    error = f"{type(err).__name__}: {err}"
                dt = time.perf_counter() - t0
                if error is None:
                    latencies.append(dt)
                else:
                    errors.append(f"request {i}: {error}")
                if on_result is not None:
                    on_result(i, status if error is None or status >= 300 else -1, body, dt)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "url": url,
        "endpoint": path,
        "stream": stream,
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens if endpoint != "retrieve" else None,
        "ok": ok,
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 3) if wall > 0 else None,
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p99_s": _round(percentile(latencies, 99)),
        "latency_mean_s": _round(sum(latencies) / ok if ok else None),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p99_s": _round(percentile(ttfts, 99)),
        "completion_tokens": completion_tokens if not stream and endpoint != "retrieve" else None,
    }


async def wait_ready(url: str, timeout_s: float = 180.0, api_key: str | None = None) -> str:
    """Wait until the app answers ``/readyz`` with 200 (``/healthz`` on an app without
    ``/readyz``); returns the route that answered. Raises TimeoutError."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        route = "/readyz"
        while time.monotonic() < deadline:
            try:
                resp = await client.get(route)
                if resp.status_code == 200:
                    return route
                if resp.status_code == 404 and route == "/readyz":
                    route = "/healthz"  # an app from before /readyz: liveness is all it tells
                    continue
                last = f"{route}: HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as err:
                last = f"{route}: {type(err).__name__}: {err}"
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready within {timeout_s} s ({last})")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tiny_app(root: Path, port: int, overrides: list[str] | None = None):
    """Build the tiny world under ``root`` and serve it locally; returns (url, cfg)."""
    import ray
    from ray import serve

    from imprag_ray.serve.app import build_application, load_serve_config
    from imprag_ray.serve.tiny import build_tiny_servable

    w = build_tiny_servable(root)
    cfg = load_serve_config(
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"http.port={port}",
            *(overrides or []),
        ],
    )
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.http.host, "port": port})
    serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/")
    return f"http://{cfg.http.host}:{port}", cfg


def cmd_bench_serve(args) -> int:
    from imprag_ray.data.io import write_json_atomic

    if args.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {sorted(ENDPOINTS)}")
    if args.requests <= 0 or args.concurrency <= 0:
        raise ValueError("--requests and --concurrency must be > 0")
    if args.stream and args.endpoint == "retrieve":
        raise ValueError("--stream needs --endpoint completions or chat (retrieve does not stream)")
    started = None
    url, model = args.url, args.model
    if url is None:
        started = tempfile.TemporaryDirectory(prefix="imprag-bench-serve-")
        url, cfg = start_tiny_app(Path(started.name), free_port())
        model = model or cfg.model_name
    try:
        asyncio.run(wait_ready(url.rstrip("/"), api_key=args.api_key))
        result = asyncio.run(
            run_load(
                url.rstrip("/"),
                requests=args.requests,
                concurrency=args.concurrency,
                endpoint=args.endpoint,
                model=model or "imprag-tiny",
                max_tokens=args.max_tokens,
                api_key=args.api_key,
                stream=args.stream,
            )
        )
    finally:
        if started is not None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            started.cleanup()
    result["started_tiny_app"] = started is not None
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return 0 if result["errors"] == 0 else 1


def add_parser(bsub) -> None:
    p = bsub.add_parser(
        "serve", help="HTTP load test of the Serve app: p50/p99 latency and TTFT, throughput, errors"
    )
    p.add_argument(
        "--url", default=None, help="running app, e.g. http://127.0.0.1:8000 (default: start the tiny app)"
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--endpoint", default="completions", help=f"one of {sorted(ENDPOINTS)}")
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--stream", action="store_true", help="stream: true (SSE); reports time to first token p50/p99"
    )
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_bench_serve)
