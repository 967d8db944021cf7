"""``imprag serve`` / ``imprag bench serve`` command lines: user mistakes exit 2 with one
line; the slow test runs the real command, hot-swaps it from a second process and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serve.conftest import ROOT


@pytest.mark.parametrize(
    "argv, words",
    [
        (["serve"], "--config is required"),
        (["serve", "--config", "jobs/serve_tiny_synth.yaml", "bogus"], "unexpected argument 'bogus'"),
        (["serve", "--config", "jobs/serve_tiny_synth.yaml", "http.port=0"], "http.port"),
        (["serve", "--config", "jobs/serve_tiny_synth.yaml", "checkpoint=/nonexistent/ckpt"], "checkpoint"),
        (["serve", "reload", "--checkpoint", "/nonexistent/ckpt", "--index", "/tmp"], "--checkpoint"),
        (["serve", "reload", "--index", "/tmp"], "needs --checkpoint DIR and --index DIR"),
        (["bench", "serve", "--url", "http://127.0.0.1:1", "--endpoint", "embeddings"], "--endpoint"),
        (["bench", "serve", "--url", "http://127.0.0.1:1", "--requests", "0"], "--requests"),
        (["bench", "serve", "--url", "http://127.0.0.1:1", "--stream", "--endpoint", "retrieve"], "--stream"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, words, capsys, monkeypatch):
    from imprag_ray.cli import main

    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


@pytest.mark.slow
def test_imprag_serve_runs_reloads_from_another_process_and_stops(serve_world):
    import httpx

    from imprag_ray.bench.serve import free_port

    w, port = serve_world, free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imprag_ray.cli",
            "serve",
            "--config",
            "jobs/serve_tiny_synth.yaml",
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"http.port={port}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = None
        deadline = time.time() + 300
        while address is None and time.time() < deadline:
            line = server.stdout.readline()
            if "ready at" in line and "ray address" in line:
                address = line.rsplit("ray address ", 1)[1].strip(" )\n")
        assert address, "imprag serve did not report ready"
        url = f"http://127.0.0.1:{port}"
        body = httpx.post(
            url + "/v1/completions", json={"prompt": "Q: hi A:", "max_tokens": 3}, timeout=60
        ).json()
        assert body["checkpoint_hash"] == w["hash_a"]
        reload = subprocess.run(
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
                address,
            ],
            cwd=ROOT,
            env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},  # as from a fresh shell
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert reload.returncode == 0, reload.stderr[-2000:]
        body = httpx.post(
            url + "/v1/completions", json={"prompt": "Q: hi A:", "max_tokens": 3}, timeout=60
        ).json()
        assert body["checkpoint_hash"] == w["hash_b"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0
