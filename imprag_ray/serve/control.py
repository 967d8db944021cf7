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

    async def status(self) -> dict:
        """Active version, wanted versions, live replicas per stage and the swap history."""
        live = {s: self._live(s) for s in (*STAGES, "ingress")}
        return {**self._state(), "replicas": live, "history": list(self.history), "control_pid": os.getpid()}

    async def reload(self, checkpoint: str, index: str) -> dict:
        """Swap both stages to (checkpoint, index) under traffic; see the module docstring."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            return await self._reload(checkpoint, index)

    async def _reload(self, checkpoint: str, index: str) -> dict:
        start = time.time()
        version = await asyncio.to_thread(make_version, checkpoint, index, self.cfg.model)
        old = self.active
        if version.hash == old:
            return {"changed": False, "active": version.to_dict(), "seconds": 0.0}
        self.versions[version.hash] = version
        self.wanted = [old, version.hash]
        try:
            await self._wait(lambda: self._all_hold(version.hash), self.cfg.reload.load_timeout_s, "load")
        except TimeoutError:
            self.wanted = [old]
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
        log.info("hot swap %s -> %s in %.1f s", old[:12], version.hash[:12], record["seconds"])
        return record

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

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
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
    versions in a loader thread, drops unwanted ones once a wanted one is held."""

    def __init__(self, control, stage: str, cache: VersionCache, interval_s: float):
        self.control, self.stage, self.cache, self.interval = control, stage, cache, interval_s
        self.name = replica_name()
        self._loading: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"imprag-sync-{stage}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                extra = {"pid": os.getpid(), "loading": self._loading}
                state = self.control.report.remote(self.name, self.stage, self.cache.held(), extra).result(
                    timeout_s=30
                )
            except Exception as err:  # control restarting: try again next tick
                log.warning("%s: control report failed: %s", self.stage, err)
                continue
            wanted = [Version.from_dict(v) for v in state["wanted"]]
            missing = [v for v in wanted if v.hash not in self.cache.held()]
            if missing and self._loading is None:
                self._loading = missing[0].hash
                threading.Thread(target=self._load, args=(missing[0],), daemon=True).start()
            if not missing:
                self.cache.keep_only({v.hash for v in wanted})

    def _load(self, version: Version) -> None:
        try:
            self.cache.get(version)
        except Exception as err:  # reported through the missing hash
            log.error("%s: loading %s failed: %s", self.stage, version.hash[:12], err)
        finally:
            self._loading = None

    def stop(self) -> None:
        self._stop.set()
