"""Version control for hot swaps: one checkpoint, both stages, no failed request.

Protocol (``imprag serve reload --checkpoint C --index I``):

1. ``Control.reload`` hashes C, checks I's manifest names it, and adds the new version to
   ``wanted``. Every stage replica polls ``Control.report`` (every ``reload.poll_interval_s``)
   and loads wanted versions *next to* the one it serves (a loader thread; requests keep
   flowing on the old version).
2. When every live retrieval and generation replica reports holding the new version, the
   active version flips (one assignment here). Ingress replicas pick it up on their next
   poll; each request is pinned to the version active when it arrived and carries it to
   both stages, which answer with the hash they used.
3. When every ingress replica has switched and reports no in-flight request on the old
   version, ``wanted`` becomes just the new version and replicas drop the old one.

A request that reaches a replica not holding its version (a replica started mid-swap)
loads it on demand: slower, never wrong. "Live" = reported within the last few polls, so
a killed replica stops counting and a restarted one reports again. A starting replica
asks Control for the active version first; Control keeps it in Ray's GCS key-value store,
so a restarted Control replica resumes the swapped-in version, not the config's.

A replica that fails to load a wanted version retries with capped exponential back-off and
reports the error in its heartbeat (``errors: {hash: {error, t, attempts}}``); a reload
then fails fast with :class:`SwapError` quoting that error and restores ``wanted``, instead
of waiting out ``reload.load_timeout_s``.

Readiness (:meth:`Control.readiness`): every live retrieval and generation replica holds
the active version, and each of the two stages has at least one live replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from imprag_ray.config.loader import from_dict
from imprag_ray.config.serve_schema import ServeJobConfig
from imprag_ray.serve.versions import Version, VersionCache, make_version

log = logging.getLogger("ray.serve")
STAGES = ("retrieval", "generation")
KV_NAMESPACE = "imprag-serve"
# Back-off between a replica's attempts to load a version that failed to load: doubling
# from LOAD_RETRY_BASE_S, capped, so a broken version neither spins a loader nor waits long
# once its files are fixed.
LOAD_RETRY_BASE_S = 1.0
LOAD_RETRY_MAX_S = 30.0


class SwapError(RuntimeError):
    """A hot swap failed: a replica could not load the new version, or a step timed out.
    The active version is unchanged and ``wanted`` is restored."""


def _swap_metric(outcome: str) -> None:
    """Count a swap outcome (``done`` / ``failed`` / ``unchanged``); never fails a swap."""
    try:
        from imprag_ray.serve.metrics import metrics

        metrics().swap(outcome)
    except Exception as err:  # outside a Ray worker (unit use): no metrics
        log.debug("swap metric not recorded: %s", err)


class Control:
    """Holds the active version, the wanted set and every replica's last report."""

    def __init__(self, cfg: dict):
        self.cfg = from_dict(ServeJobConfig, cfg)
        version = self._restore() or make_version(self.cfg.checkpoint, self.cfg.index, self.cfg.model)
        self.versions: dict[str, Version] = {version.hash: version}
        self.active = version.hash
        self.wanted = [version.hash]
        self.reports: dict[str, dict] = {}
        self.history: list[dict] = []
        self._reload_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------ persistence
    def _kv_key(self) -> bytes:
        """One key per (app, configured version): a redeploy with another config starts fresh."""
        return f"{self.cfg.app_name}/{self.cfg.checkpoint}|{self.cfg.index}".encode()

    def _restore(self) -> Version | None:
        """The version active before this Control replica restarted (Ray's GCS key-value
        store outlives replicas), if its files are still there."""
        try:
            from ray.experimental.internal_kv import _internal_kv_get

            raw = _internal_kv_get(self._kv_key(), namespace=KV_NAMESPACE)
        except Exception:  # outside Ray (unit use): nothing to restore
            return None
        if not raw:
            return None
        saved = Version.from_dict(json.loads(raw))
        try:
            version = make_version(saved.checkpoint, saved.index, self.cfg.model)
        except (OSError, ValueError) as err:
            log.warning("not restoring version %s: %s", saved.hash[:12], err)
            return None
        return version if version.hash == saved.hash else None

    def _persist(self) -> None:
        try:
            from ray.experimental.internal_kv import _internal_kv_put

            data = json.dumps(self.versions[self.active].to_dict()).encode()
            _internal_kv_put(self._kv_key(), data, overwrite=True, namespace=KV_NAMESPACE)
        except Exception as err:
            log.warning("could not persist the active version: %s", err)

    def _state(self) -> dict:
        return {
            "active": self.versions[self.active].to_dict(),
            "wanted": [self.versions[h].to_dict() for h in self.wanted],
        }

    async def state(self) -> dict:
        return self._state()

    async def report(self, replica: str, stage: str, held: list[str], extra: dict | None = None) -> dict:
        """A replica's heartbeat: what it holds (stages) or its active version and in-flight
        counts (ingress). Returns the state it should converge to."""
        self.reports[replica] = {"stage": stage, "held": list(held), "t": time.time(), **(extra or {})}
        return self._state()

    def _live(self, stage: str, since: float = 0.0) -> list[dict]:
        window = max(3.0, 8 * self.cfg.reload.poll_interval_s)
        now = time.time()
        return [r for r in self.reports.values() if r["stage"] == stage and r["t"] > max(now - window, since)]

    def _readiness(self) -> dict:
        """Whether every live retrieval and generation replica holds the active version
        (and each stage has one): what the ingress's ``/readyz`` answers."""
        stages, reasons = {}, []
        for stage in STAGES:
            live = self._live(stage)
            holding = sum(1 for r in live if self.active in r["held"])
            stages[stage] = {"live": len(live), "holding_active": holding}
            if not live:
                reasons.append(f"no live {stage} replica")
            elif holding < len(live):
                reasons.append(
                    f"{len(live) - holding} of {len(live)} {stage} replicas do not hold the active version"
                )
        return {"ready": not reasons, "active": self.active, "stages": stages, "reasons": reasons}

    async def readiness(self) -> dict:
        return self._readiness()

    async def status(self) -> dict:
        """Active version, wanted versions, readiness, live replicas per stage (with their
        load errors) and the swap history."""
        live = {s: self._live(s) for s in (*STAGES, "ingress")}
        readiness = self._readiness()
        return {
            **self._state(),
            "ready": readiness["ready"],
            "readiness": readiness,
            "replicas": live,
            "history": list(self.history),
            "control_pid": os.getpid(),
        }

    def check_health(self) -> None:
        """Serve's health probe: the version bookkeeping is consistent."""
        if self.active not in self.versions or self.active not in self.wanted:
            raise RuntimeError(f"control: active version {self.active[:12]} is not among the wanted versions")

    async def reload(self, checkpoint: str, index: str) -> dict:
        """Swap both stages to (checkpoint, index) under traffic; see the module docstring."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            return await self._reload(checkpoint, index)

    async def _reload(self, checkpoint: str, index: str) -> dict:
        start = time.time()
        try:
            version = await asyncio.to_thread(make_version, checkpoint, index, self.cfg.model)
        except Exception:
            _swap_metric("failed")
            raise
        old = self.active
        if version.hash == old:
            _swap_metric("unchanged")
            return {"changed": False, "active": version.to_dict(), "seconds": 0.0}
        self.versions[version.hash] = version
        self.wanted = [old, version.hash]
        try:
            await self._wait(
                lambda: self._all_hold(version.hash),
                self.cfg.reload.load_timeout_s,
                "load",
                failed=lambda: self._load_error(version.hash, start),
            )
        except (SwapError, TimeoutError) as err:
            # Nothing flipped: requests stay on the old version; replicas drop the new one.
            self.wanted = [old]
            self.versions.pop(version.hash, None)
            _swap_metric("failed")
            self.history.append(
                {
                    "changed": False,
                    "failed": True,
                    "old": old,
                    "new": version.hash,
                    "error": str(err),
                    "seconds": round(time.time() - start, 2),
                }
            )
            log.error("hot swap %s -> %s failed: %s", old[:12], version.hash[:12], err)
            raise
        loaded = time.time()
        self.active = version.hash  # the atomic flip: new requests are pinned to the new version
        self._persist()
        drained = True
        try:
            await self._wait(
                lambda: self._drained(old, version.hash, loaded), self.cfg.reload.drain_timeout_s, "drain"
            )
        except TimeoutError:
            drained = False  # in-flight old requests still work: replicas reload on demand
        self.wanted = [version.hash]
        self.versions = {version.hash: version}
        record = {
            "changed": True,
            "old": old,
            "new": version.hash,
            "active": version.to_dict(),
            "load_seconds": round(loaded - start, 2),
            "seconds": round(time.time() - start, 2),
            "drained": drained,
        }
        self.history.append(record)
        _swap_metric("done")
        log.info("hot swap %s -> %s in %.1f s", old[:12], version.hash[:12], record["seconds"])
        return record

    def _load_error(self, digest: str, since: float) -> str | None:
        """The first load error a live stage replica reported for ``digest`` since
        ``since`` (an older report may predate this reload), as a message to raise."""
        for stage in STAGES:
            for r in self._live(stage, since):
                err = (r.get("errors") or {}).get(digest)
                if err and err.get("t", 0.0) >= since:
                    return (
                        f"hot swap: {stage} replica (pid {r.get('pid')}) could not load version "
                        f"{digest[:12]}: {err.get('error')}"
                    )
        return None

    def _all_hold(self, digest: str) -> bool:
        for stage in STAGES:
            live = self._live(stage)
            if not live or any(digest not in r["held"] for r in live):
                return False
        return True

    def _drained(self, old: str, new: str, since: float) -> bool:
        live = self._live("ingress", since)
        everyone = self._live("ingress")
        if len(live) < len(everyone):
            return False
        return all(r.get("active") == new and r.get("inflight", {}).get(old, 0) == 0 for r in live)

    async def _wait(
        self,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        failed: Callable[[], str | None] | None = None,
    ) -> None:
        """Poll until ``ready()``; raise SwapError as soon as ``failed()`` names an error,
        TimeoutError after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while not ready():
            error = failed() if failed is not None else None
            if error:
                raise SwapError(error)
            if time.time() > deadline:
                raise TimeoutError(
                    f"hot swap: replicas did not finish the {what} step within {timeout} s; "
                    f"raise reload.{'load' if what == 'load' else 'drain'}_timeout_s or check the replica logs"
                )
            await asyncio.sleep(self.cfg.reload.poll_interval_s)


def replica_name() -> str:
    """This Serve replica's unique id (falls back to the pid outside Serve)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica
        return f"pid-{os.getpid()}"


def initial_version(control, cfg: ServeJobConfig) -> Version:
    """The version a starting replica loads first: the active one (it may differ from the
    config after a hot swap, and the config's files may be gone), else the config's."""

    def ask() -> dict:
        return control.state.remote().result(timeout_s=60)

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # never block on the replica's loop
            return Version.from_dict(pool.submit(ask).result(timeout=90)["active"])
    except Exception as err:
        log.warning("control unreachable (%s); starting on the configured version", err)
        return make_version(cfg.checkpoint, cfg.index, cfg.model)


class ReplicaSync:
    """Background heartbeat of a stage replica: reports what it holds, loads wanted
    versions in a loader thread, drops unwanted ones once a wanted one is held.

    Every step of the loop is guarded, so no exception ends the thread (``alive()`` is
    what the stage's ``check_health`` asks). A failed load is retried after a capped
    exponential back-off and its error travels in the heartbeat (``errors``) until the
    version loads or stops being wanted. ``extra()`` adds fields to each heartbeat (queue
    depth, engine requests).
    """

    def __init__(
        self,
        control,
        stage: str,
        cache: VersionCache,
        interval_s: float,
        extra: Callable[[], dict] | None = None,
    ):
        self.control, self.stage, self.cache, self.interval = control, stage, cache, interval_s
        self.extra = extra
        self.name = replica_name()
        self.ticks = 0  # completed loop iterations (tests and diagnostics)
        self.tick_errors = 0  # iterations that raised (logged, loop goes on)
        self._loading: str | None = None
        self._errors: dict[str, dict] = {}  # hash -> {"error", "t", "attempts"}
        self._retry_at: dict[str, float] = {}  # hash -> monotonic time of the next attempt
        self._lock = threading.Lock()  # _errors / _retry_at: loader thread vs sync thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"imprag-sync-{stage}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def errors(self) -> dict[str, dict]:
        with self._lock:
            return {h: dict(e) for h, e in self._errors.items()}

    def _run(self) -> None:
        delay = 0.0  # the first heartbeat goes out at once: readiness needs it
        while not self._stop.wait(delay):
            delay = self.interval
            try:
                self._tick()
            except Exception as err:  # whatever it was, the next tick tries again
                self.tick_errors += 1
                log.warning("%s: version sync step failed: %s: %s", self.stage, type(err).__name__, err)
            finally:
                self.ticks += 1

    def _tick(self) -> None:
        extra = {"pid": os.getpid(), "loading": self._loading, "errors": self.errors()}
        if self.extra is not None:
            extra.update(self.extra())
        try:
            state = self.control.report.remote(self.name, self.stage, self.cache.held(), extra).result(
                timeout_s=30
            )
        except Exception as err:  # control restarting: try again next tick
            log.warning("%s: control report failed: %s", self.stage, err)
            return
        wanted = [Version.from_dict(v) for v in state["wanted"]]
        wanted_hashes = {v.hash for v in wanted}
        with self._lock:  # a version no longer wanted takes its errors with it
            for digest in [h for h in self._errors if h not in wanted_hashes]:
                self._errors.pop(digest, None)
                self._retry_at.pop(digest, None)
        held = set(self.cache.held())
        missing = [v for v in wanted if v.hash not in held]
        if missing and self._loading is None:
            now = time.monotonic()
            with self._lock:
                due = [v for v in missing if self._retry_at.get(v.hash, 0.0) <= now]
            if due:
                self._loading = due[0].hash
                threading.Thread(target=self._load, args=(due[0],), name="imprag-load", daemon=True).start()
        if not missing:
            self.cache.keep_only(wanted_hashes)

    def _load(self, version: Version) -> None:
        try:
            self.cache.get(version)
        except Exception as err:  # reported in the heartbeat, retried after a back-off
            with self._lock:
                attempts = self._errors.get(version.hash, {}).get("attempts", 0) + 1
                backoff = min(LOAD_RETRY_MAX_S, LOAD_RETRY_BASE_S * 2 ** (attempts - 1))
                self._errors[version.hash] = {
                    "error": f"{type(err).__name__}: {err}",
                    "t": time.time(),
                    "attempts": attempts,
                }
                self._retry_at[version.hash] = time.monotonic() + backoff
            log.error(
                "%s: loading %s failed (attempt %d, next in %.1f s): %s",
                self.stage,
                version.hash[:12],
                attempts,
                backoff,
                err,
            )
        else:
            with self._lock:
                self._errors.pop(version.hash, None)
                self._retry_at.pop(version.hash, None)
        finally:
            self._loading = None

    def stop(self) -> None:
        self._stop.set()
