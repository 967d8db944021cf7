"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus one
``ray start --address`` per extra node, each raylet with its own CPUs and a custom
resource (``node_0``, ``node_1``, ...) so work can be pinned to a node.

Every port is chosen free and every node gets the cluster's own ``--temp-dir``, so
several clusters (and other tests' local Ray instances) can coexist; teardown kills
exactly the processes whose command line names that temp dir (never ``ray stop``,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


@dataclass
class LocalCluster:
    address: str
    temp_dir: str
    nodes: int
    env: dict = field(default_factory=dict)
    dashboard_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    def processes(self) -> list[int]:
        """Pids of the cluster's processes: those whose command line names its temp dir, and
        their descendants (Ray renames some children, e.g. ``ray::DashboardAgent``, and the
        client server names only the address)."""
        import psutil

        pids: set[int] = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if self.temp_dir in cmdline or re.search(rf"--address=\S+:{self.port}\b", cmdline):
                    pids.add(proc.info["pid"])
                    pids.update(child.pid for child in proc.children(recursive=True))
        return sorted(pids)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self) -> None:
        import psutil

        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while time.time() < deadline and any(psutil.pid_exists(p) for p in pids):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_args(temp_dir: str) -> list[str]:
    return [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]


@contextlib.contextmanager
def local_cluster(
    cpus_per_node: tuple[int, ...] = (1, 1), object_store_mb: int = 200, dashboard: bool = False
) -> Iterator[LocalCluster]:
    """Start ``len(cpus_per_node)`` raylets (the first is the head) and yield the cluster.

    The caller connects with ``ray.init(address=cluster.address)``. With ``dashboard``, the
    head also runs the dashboard + job server at ``cluster.dashboard_url``.
    """
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: unix socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Token auth switches itself on when ~/.ray/auth_token exists; a loopback test cluster
    # runs without it (drivers connecting to it need the same setting: set here too).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # As if started from an activated venv: job entrypoints' `python` is this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    cluster = LocalCluster(address, temp_dir, len(cpus_per_node), env, free_port() if dashboard else 0)
    store = str(object_store_mb * 1024 * 1024)
    try:
        for i, cpus in enumerate(cpus_per_node):
            head = ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
            if dashboard:
                head += [
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={cluster.dashboard_port}",
                ]
            else:
                head.append("--include-dashboard=false")
            role = head if i == 0 else [f"--address={address}"]
            cmd = [
                _ray_bin(),
                "start",
                *role,
                *_node_args(temp_dir),
                f"--num-cpus={cpus}",
                f"--resources={json.dumps({f'node_{i}': 1})}",
                f"--object-store-memory={store}",
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        _wait_for_nodes(address, len(cpus_per_node))
        yield cluster
    finally:
        cluster.stop()


def _wait_for_nodes(address: str, n: int, timeout: float = 60.0) -> None:
    code = (
        "import ray, time, sys\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"t = time.time() + {timeout}\n"
        f"while sum(x['Alive'] for x in ray.nodes()) < {n}:\n"
        "    if time.time() > t: sys.exit(1)\n"
        "    time.sleep(0.5)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout + 30)
