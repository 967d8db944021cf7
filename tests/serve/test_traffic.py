"""The app under load (real HTTP, real Ray Serve): zero errors and retrieval autoscaling,
a generation replica killed mid-load, and a hot swap of checkpoint + index mid-load.

Tests run in this order on the one shared app (tests/serve/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from imprag_ray.bench.serve import prompt_for, run_load
from tests.serve.conftest import API_KEY, MODEL, ROOT, LocalReference, replica_counts, wait_for

pytestmark = pytest.mark.timeout(600)


def control_status() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Control", app_name="imprag").status.remote().result(timeout_s=30)


def test_load_has_zero_errors_and_retrieval_scales_1_to_2_and_back(serve_app, tmp_path):
    """`imprag bench serve --concurrency 16 --requests 200` against the app."""
    from imprag_ray.cli import main

    wait_for(lambda: replica_counts().get("RetrievalStage") == 1, 90, what="retrieval at 1 replica")
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(replica_counts().get("RetrievalStage", 0))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "bench.json"
    try:
        rc = main(
            [
                "bench",
                "serve",
                "--url",
                serve_app["url"],
                "--concurrency",
                "16",
                "--requests",
                "200",
                "--model",
                MODEL,
                "--api-key",
                API_KEY,
                "--json",
                str(out),
            ]
        )
    finally:
        stop.set()
        watcher.join()
    result = json.loads(out.read_text())
    print("\nbench serve:", json.dumps(result))
    assert rc == 0 and result["errors"] == 0 and result["ok"] == 200, result["error_samples"]
    assert result["latency_p50_s"] <= result["latency_p99_s"]
    assert max(seen) == 2, f"retrieval replicas seen under load: {sorted(set(seen))}"
    wait_for(lambda: replica_counts().get("RetrievalStage") == 1, 90, what="retrieval back down to 1 replica")


def test_killing_a_generation_replica_mid_load_fails_no_request(serve_app):
    pids = [r["pid"] for r in control_status()["replicas"]["generation"]]
    assert len(pids) == 2
    victim = pids[0]
    statuses: list[int] = []
    killed_at: list[int] = []

    def on_result(i, status, body, dt) -> None:
        statuses.append(status)
        if len(statuses) == 15 and not killed_at:
            os.kill(victim, signal.SIGKILL)  # the replica's process, mid-load
            killed_at.append(len(statuses))

    summary = asyncio.run(
        run_load(
            serve_app["url"],
            requests=80,
            concurrency=8,
            model=MODEL,
            max_tokens=8,
            api_key=API_KEY,
            on_result=on_result,
        )
    )
    failed = sum(1 for s in statuses if s != 200)
    print(
        f"\nfault: killed generation replica pid {victim} after {killed_at} responses; "
        f"{failed} of {len(statuses)} requests failed; load summary {json.dumps(summary)}"
    )
    assert killed_at and failed == 0 and summary["errors"] == 0, summary["error_samples"]

    def restored():
        live = [r["pid"] for r in control_status()["replicas"]["generation"]]
        return replica_counts().get("GenerationStage") == 2 and victim not in live and len(live) == 2

    wait_for(restored, 120, interval=1.0, what="Serve to restore the killed generation replica")


def test_hot_swap_under_load_fails_no_request_and_then_serves_the_new_checkpoint(serve_app):
    w = serve_app
    records: list[tuple[float, float, int, str | None]] = []  # (start, end, status, hash)
    stop = threading.Event()

    async def load() -> None:
        import httpx

        async with httpx.AsyncClient(
            base_url=w["url"], timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:

            async def worker(j: int) -> None:
                i = j
                while not stop.is_set():
                    t0 = time.time()
                    try:
                        resp = await client.post(
                            "/v1/completions", json={"model": MODEL, "prompt": prompt_for(i), "max_tokens": 6}
                        )
                        status, digest = resp.status_code, resp.json().get("checkpoint_hash")
                    except Exception:  # a transport error is a failed request
                        status, digest = -1, None
                    records.append((t0, time.time(), status, digest))
                    i += 8

            await asyncio.gather(*(worker(j) for j in range(8)))

    loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    loader.start()
    wait_for(lambda: len(records) >= 10, 120, what="load to start")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t_start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imprag_ray.cli",
            "serve",
            "reload",
            "--checkpoint",
            str(w["checkpoint_b"]),
            "--index",
            str(w["index_b"]),
            "--address",
            w["gcs_address"],
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=ROOT,
    )
    t_done = time.time()
    time.sleep(3.0)  # keep the load going after the swap
    stop.set()
    loader.join(timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swap = json.loads(proc.stdout[proc.stdout.index("{") :])
    failed = [r for r in records if r[2] != 200]
    during = [r for r in records if r[0] < t_done and r[1] > t_start]
    after = [r for r in records if r[0] > t_done]
    print(
        f"\nhot swap: {swap}; {len(records)} requests, {len(during)} overlapping the reload, "
        f"{len(after)} started after it, {len(failed)} failed"
    )
    assert swap["changed"] and swap["old"] == w["hash_a"] and swap["new"] == w["hash_b"]
    assert not failed
    assert {r[3] for r in records} == {w["hash_a"], w["hash_b"]}
    assert after and all(r[3] == w["hash_b"] for r in after)

    # After the swap the app answers exactly as the new checkpoint + new index do in-process.
    import httpx

    reference = LocalReference(
        w["checkpoint_b"], w["index_b"], w["corpus"], w["cfg"].limits.max_prompt_tokens
    )
    old = LocalReference(w["checkpoint"], w["index"], w["corpus"], w["cfg"].limits.max_prompt_tokens)
    differs = 0
    with httpx.Client(
        base_url=w["url"], timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as client:
        for i in range(4):
            body = client.post(
                "/v1/completions", json={"model": MODEL, "prompt": prompt_for(i), "max_tokens": 8}
            ).json()
            text, pids = reference.complete(prompt_for(i), 8)
            assert body["checkpoint_hash"] == w["hash_b"]
            assert [p["id"] for p in body["retrieved_passages"]] == pids and body["choices"][0][
                "text"
            ] == text
            differs += (text, pids) != old.complete(prompt_for(i), 8)
        assert differs > 0  # the two versions really answer differently

        def dropped_old() -> bool:
            replicas = client.get("/healthz").json()["replicas"]
            return all(r["held"] == [w["hash_b"]] for stage in replicas.values() for r in stage)

        wait_for(dropped_old, 60, what="replicas to drop the old version")
