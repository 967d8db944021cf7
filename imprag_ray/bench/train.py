"""``imprag bench train``: training tokens/s of Ray Train with 1 vs N workers.

Same model, same data, same GLOBAL batch (``train.batch_size``) for every worker count:
N workers each take batch/N examples per step, so the step does the same work and the
ratio of tokens/s is the data-parallel speed-up (DDP gradient all-reduce and the
cross-worker in-batch-negative gather included). Without ``--config`` a synthetic world
and a small random checkpoint are built in a temp dir. Each run trains ``--epochs``
epochs of ``--steps`` steps in the warmup stage; tokens/s (prompt + target tokens of all
workers per second of train steps, the slowest worker's clock) is taken from the last
epoch, so start-up, first-iteration costs, checkpoints and evaluation are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def _synthetic_job(root: Path, preset_overrides: dict[str, Any]) -> Path:
    """World + small random checkpoint + a job YAML (no dev/eval sets)."""
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.synth import synthesize
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import llama_like

    world = root / "world"
    synthesize(world, seed=1, n_passages=400)
    ckpt = root / "init"
    texts = [format_passage(p) for p in iter_corpus(world / "corpus.jsonl")]
    init_checkpoint(llama_like(**preset_overrides), texts, ckpt, seed=0, vocab_size=1500)
    job = {
        "name": "bench-train",
        "output_dir": str(root / "run"),
        "threads": 1,
        "model": {"path": str(ckpt)},
        "data": {
            "corpus": str(world / "corpus.jsonl"),
            "train": [
                {"path": str(world / "train/qa.jsonl"), "format": "qa"},
                {"path": str(world / "train/instruction.jsonl"), "format": "instruction"},
            ],
            "max_prompt_tokens": 80,
            "max_target_tokens": 40,
        },
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


PRESET = dict(
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    retrieval_layer=1,
    reader_last_layer=2,
    max_passage_tokens=48,
    num_passages=3,
)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from imprag_ray.config.loader import load_config
    from imprag_ray.config.schema import TrainJobConfig
    from imprag_ray.pipelines.local_ray import init_local_ray
    from imprag_ray.pipelines.train import read_metrics, train_ray

    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="imprag-bench-train-") as tmp:
        root = Path(tmp)
        job = args.config or _synthetic_job(root, PRESET)
        started = not ray.is_initialized()
        if started:
            if args.address:
                ray.init(address=args.address, include_dashboard=False, logging_level="ERROR")
            else:
                init_local_ray(num_cpus=max(workers))
        results: dict[str, Any] = {}
        try:
            for n in workers:
                out = root / f"run-{n}"
                overrides = [
                    f"output_dir={out}",
                    f"ray.num_workers={n}",
                    "ray.run_name=bench",
                    f"ray.storage_path={out / 'ray'}",
                    f"train.batch_size={args.batch}",
                    f"train.epochs={args.epochs}",
                    f"train.warmup_epochs={args.epochs}",
                    f"train.steps_per_epoch={args.steps}",
                    "train.log_every=1000",
                    "data.dev=[]",
                    "data.eval=[]",
                    *args.overrides,
                ]
                cfg = load_config(TrainJobConfig, job, overrides)
                t0 = time.perf_counter()
                train_ray(cfg, echo=None)
                wall = time.perf_counter() - t0
                last = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "epoch"][-1]
                results[str(n)] = {
                    "tokens_per_s": round(last["train_tokens_per_s"], 1),
                    "step_s": round(last["train_seconds"] / args.steps, 4),
                    "tokens_per_step": last["train_tokens"] / args.steps,
                    "run_wall_s": round(wall, 1),
                }
        finally:
            if started:
                ray.shutdown()
    base = results[str(workers[0])]["tokens_per_s"]
    return {
        "bench": "train",
        "workers": results,
        "speedup_vs_first": {n: round(r["tokens_per_s"] / base, 3) for n, r in results.items()},
        "global_batch": args.batch,
        "steps_timed": args.steps,
        "model": str(args.config) if args.config else f"random llama_like({PRESET})",
        "host_cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def cmd_bench_train(args: argparse.Namespace) -> int:
    from imprag_ray.config.loader import ConfigError

    if args.batch <= 0 or args.steps <= 0 or args.epochs <= 0:
        raise ConfigError("bench", "--batch, --steps and --epochs must be > 0")
    result = run_bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from imprag_ray.data.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def add_parser(bsub) -> None:
    p = bsub.add_parser("train", help="training tokens/s with 1 vs N Ray Train workers (same global batch)")
    p.add_argument("--config", type=Path, default=None, help="job YAML (default: a synthetic tiny job)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2")
    p.add_argument("--batch", type=int, default=16, help="global batch (divisible by each worker count)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (the last epoch)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; only the last one is timed")
    p.add_argument("--address", default=None, help="Ray cluster (default: an embedded local Ray)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key.sub=value for the job")
    p.set_defaults(func=cmd_bench_train)
