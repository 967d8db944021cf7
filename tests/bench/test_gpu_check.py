"""``make gpu-check``'s script, end to end on CPU at a micro shape, as the GPU box runs it:
torch + transformers only (Ray, vLLM, FAISS, bm25s and pyarrow are blocked), one JSON object
on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "vllm", "faiss", "bm25s", "pyarrow")
# Each blocked package imports as if it were not installed.
RUN = (
    "import sys, runpy\n"
    f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
    "runpy.run_module('imprag_ray.bench.gpu_check', run_name='__main__')\n"
)


def test_gpu_check_runs_every_phase_on_cpu_without_ray_vllm_faiss(tmp_path):
    args = [
        "--shape",
        "micro",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--passages",
        "120",
        "--corpus-sample",
        "40",
        "--eval-examples",
        "4",
        "--out",
        str(tmp_path / "work"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    report = json.loads(proc.stdout)  # stdout is the one JSON object
    assert proc.returncode == 0, (report.get("findings"), proc.stderr[-3000:])
    assert report["ok"] is True and report["findings"] == []
    assert {"shape", "device", "torch", "phases", "attention", "checks", "total_seconds"} <= report.keys()
    assert report["shape"]["layers"] == 28 and (report["shape"]["b"], report["shape"]["t"]) == (7, 19)
    phases = report["phases"]
    assert list(phases) == ["setup", "warmup", "distill", "evaluate", "save", "resume"]
    for record in phases.values():
        assert record["status"] == "ok" and record["seconds"] >= 0 and "peak_memory_gib" in record
    assert phases["setup"]["param_dtype"] == "torch.float32"  # fp32 masters, bf16 compute
    for name in ("warmup", "distill"):
        assert len(phases[name]["step_seconds"]) == 2 and phases[name]["stage"] == name
        assert report["attention"][name] == ["flash_cpu", "flash_cpu_backward"]
    assert report["attention"]["evaluate"] == ["flash_cpu"]
    assert phases["evaluate"]["sub_corpus"] is True and phases["evaluate"]["corpus_size"] >= 40
    assert report["checks"] == {
        "saved_weight_dtype": "BF16",
        "resumed_step": 4,
        "resumed_step_matches": True,
        "optimizer_state_on_param_device": True,
    }


def test_a_failed_phase_is_reported_and_later_phases_are_skipped():
    import torch

    from imprag_ray.bench.gpu_check import Probe

    probe = Probe(torch.device("cpu"))
    probe.run("setup", lambda record: record.update(x=1))

    def oom(record):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    probe.run("warmup", oom)
    probe.run("distill", lambda record: None)
    assert probe.phases["setup"]["status"] == "ok" and probe.phases["setup"]["x"] == 1
    assert probe.phases["warmup"]["status"] == "out_of_memory"
    assert probe.phases["distill"]["status"] == "skipped"
    assert probe.findings == ["warmup: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"]
