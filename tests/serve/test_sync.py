"""Version sync and failed hot swaps: the replicas' sync thread survives any exception,
retries a failed load with back-off and reports the error to Control; a reload whose
version a replica cannot load fails within seconds (``imprag serve reload`` exits non-zero
quoting the replica's error) and leaves the app on its version; ``check_health`` fails on a
dead sync thread or a closed engine."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from imprag_ray.serve import control as control_mod
from imprag_ray.serve.control import ReplicaSync
from imprag_ray.serve.versions import Version, VersionCache
from tests.serve.conftest import API_KEY, MODEL, ROOT, control_status, wait_for


class _Result:
    def __init__(self, value=None, error: Exception | None = None):
        self.value, self.error = value, error

    def result(self, timeout_s=None):
        if self.error is not None:
            raise self.error
        return self.value


class FakeControl:
    """Control's ``report`` without Ray: answers ``wanted``; ``faults`` are consumed one
    per report (an exception to raise, or a malformed state to return)."""

    def __init__(self, wanted: list[Version]):
        self.wanted = wanted
        self.faults: list[object] = []
        self.reports: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class _Report:
            @staticmethod
            def remote(name, stage, held, extra):
                with outer.lock:
                    outer.reports.append({"held": list(held), **extra})
                    fault = outer.faults.pop(0) if outer.faults else None
                    wanted = [v.to_dict() for v in outer.wanted]
                if isinstance(fault, Exception):
                    raise fault  # a report call that raises a non-Ray exception
                if fault is not None:
                    return _Result(fault)  # a malformed state: the loop must survive it
                return _Result({"active": wanted[-1], "wanted": wanted})

        self.report = _Report()

    def last(self) -> dict:
        with self.lock:
            return self.reports[-1] if self.reports else {}


def _version(name: str) -> Version:
    return Version(f"/ckpt/{name}", f"/index/{name}", name * 8)


def test_sync_thread_survives_injected_exceptions_and_picks_up_the_next_swap(monkeypatch):
    monkeypatch.setattr(control_mod, "LOAD_RETRY_BASE_S", 0.05)
    a, b, c = _version("a"), _version("b"), _version("c")
    failures = {b.hash: 2}  # b fails twice, then loads

    def loader(v: Version) -> str:
        if failures.get(v.hash, 0) > 0:
            failures[v.hash] -= 1
            raise OSError(f"disk hiccup loading {v.hash}")
        return f"state-{v.hash}"

    cache = VersionCache(loader)
    cache.get(a)
    control = FakeControl([a])
    extra_calls = {"n": 0}

    def extra() -> dict:
        extra_calls["n"] += 1
        if extra_calls["n"] == 3:
            raise KeyError("extra() broke once")
        return {"inflight": 0}

    sync = ReplicaSync(control, "generation", cache, 0.01, extra=extra)
    try:
        control.faults += [RuntimeError("report raised once"), {"no": "wanted key"}, None]
        wait_for(lambda: sync.ticks > 8, 10, interval=0.01, what="sync ticks")
        assert sync.alive() and sync.tick_errors >= 2  # the malformed state and extra() raised

        control.wanted = [a, b]  # a swap: b fails to load twice, reported, then loads
        wait_for(lambda: b.hash in control.last().get("errors", {}), 10, interval=0.01, what="b's error")
        err = control.last()["errors"][b.hash]
        assert "disk hiccup" in err["error"] and err["attempts"] >= 1
        wait_for(lambda: b.hash in cache.held(), 10, interval=0.01, what="b loaded after retries")
        wait_for(lambda: not control.last().get("errors"), 10, interval=0.01, what="b's error cleared")

        control.wanted = [b]  # the swap completes: a is dropped
        wait_for(lambda: cache.held() == [b.hash], 10, interval=0.01, what="a dropped")

        control.faults.append(ValueError("one more non-Ray exception"))
        control.wanted = [b, c]  # the next swap after the fault is still picked up
        wait_for(lambda: c.hash in cache.held(), 10, interval=0.01, what="c loaded")
        assert sync.alive()
    finally:
        sync.stop()


def test_failed_load_is_retried_with_capped_back_off_and_forgotten_when_unwanted(monkeypatch):
    monkeypatch.setattr(control_mod, "LOAD_RETRY_BASE_S", 0.05)
    monkeypatch.setattr(control_mod, "LOAD_RETRY_MAX_S", 0.2)
    a, bad = _version("a"), _version("x")
    attempts: list[float] = []

    def loader(v: Version) -> str:
        if v.hash == bad.hash:
            attempts.append(time.monotonic())
            raise ValueError("corrupt weights")
        return "ok"

    cache = VersionCache(loader)
    cache.get(a)
    control = FakeControl([a, bad])
    sync = ReplicaSync(control, "retrieval", cache, 0.01)
    try:
        wait_for(lambda: len(attempts) >= 5, 10, interval=0.01, what="five load attempts")
        gaps = [t1 - t0 for t0, t1 in itertools.pairwise(attempts)]
        # 0.05, 0.1, 0.2, 0.2 s (doubling, capped at 0.2): not one attempt per 0.01 s tick
        assert gaps[0] >= 0.04 and gaps[2] >= 0.15 and max(gaps) < 1.0, gaps
        assert "corrupt weights" in control.last()["errors"][bad.hash]["error"]
        control.wanted = [a]  # the reload was abandoned: the error goes, no more attempts
        wait_for(lambda: control.last().get("errors") == {}, 10, interval=0.01, what="error forgotten")
        n = len(attempts)
        time.sleep(0.5)
        assert len(attempts) == n and cache.held() == [a.hash]
    finally:
        sync.stop()


def test_check_health_fails_on_a_dead_sync_thread_or_a_closed_engine(serve_world):
    from imprag_ray.engine import build_engine
    from imprag_ray.serve.stages import GenerationStage, RetrievalStage

    class DeadSync:
        def alive(self) -> bool:
            return False

    class LiveSync:
        def alive(self) -> bool:
            return True

    retrieval = RetrievalStage.__new__(RetrievalStage)
    retrieval.sync = DeadSync()
    with pytest.raises(RuntimeError, match="sync thread is dead"):
        retrieval.check_health()
    retrieval.sync = LiveSync()
    retrieval.check_health()

    generation = GenerationStage.__new__(GenerationStage)
    generation.sync = LiveSync()
    engine = build_engine("torch", str(serve_world["checkpoint"]), device="cpu")
    generation.cache = VersionCache(lambda v: engine)
    generation.cache.get(_version("a"))
    generation.check_health()
    engine.close()  # a closed engine (its scheduler thread ends too)
    with pytest.raises(RuntimeError, match=r"engine of version .*closed"):
        generation.check_health()
    generation.sync = DeadSync()
    with pytest.raises(RuntimeError, match="sync thread is dead"):
        generation.check_health()


def _broken_version(serve_app, root) -> tuple:
    """A checkpoint that hashes and passes Control's checks (config, index manifest) but
    whose weights do not load: the replicas fail, Control cannot tell beforehand."""
    from imprag_ray.model.checkpoint import checkpoint_hash

    ckpt, index = root / "ckpt_broken", root / "index_broken"
    shutil.copytree(serve_app["checkpoint"], ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x00" * 64 + weights.read_bytes()[64:])  # clobber the header
    shutil.copytree(serve_app["index"], index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["checkpoint_hash"] = checkpoint_hash(ckpt)
    (index / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, index


def test_reload_of_a_version_replicas_cannot_load_fails_fast_and_keeps_serving(serve_app, tmp_path):
    import httpx

    w = serve_app
    before = control_status()
    active = before["active"]["hash"]
    ckpt, index = _broken_version(w, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imprag_ray.cli",
            "serve",
            "reload",
            "--checkpoint",
            str(ckpt),
            "--index",
            str(index),
            "--address",
            w["gcs_address"],
        ],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        cwd=ROOT,
    )
    seconds = time.time() - t0
    print(f"\nfailed reload: exit {proc.returncode} after {seconds:.1f} s; stderr tail: {proc.stderr[-400:]}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not load version" in last and "replica" in last, proc.stderr[-3000:]
    # Seconds, not reload.load_timeout_s (240 s here); the process start and Ray connect
    # take most of it.
    assert seconds < 60, seconds

    status = control_status()
    assert status["active"]["hash"] == active and [v["hash"] for v in status["wanted"]] == [active]
    failed = status["history"][-1]
    assert failed["failed"] and "could not load version" in failed["error"]

    def settled() -> bool:  # the replicas forget the abandoned version and its error
        s = control_status()
        reps = [r for stage in ("retrieval", "generation") for r in s["replicas"][stage]]
        return s["ready"] and all(not r.get("errors") and r["held"] == [active] for r in reps)

    wait_for(settled, 30, interval=0.5, what="replicas to drop the failed version's errors")
    with httpx.Client(base_url=w["url"], timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        body = c.post("/v1/completions", json={"model": MODEL, "prompt": "Q: hi A:", "max_tokens": 3})
        assert body.status_code == 200 and body.json()["checkpoint_hash"] == active
