"""``imprag train`` on Ray Train: a ``TorchTrainer`` around the Ray-free ImpRAG recipe.

The driver side (arXiv 2506.02279 §3.2; DESIGN §2 "training"): the ``ray:`` section of
the job (:class:`~imprag_ray.config.schema.RayTrainConfig`) becomes ``ScalingConfig`` /
``RunConfig`` / ``FailureConfig`` / ``CheckpointConfig``; the training examples go to the
workers as a Ray Data dataset split into one shard per worker; the worker loop is
:func:`imprag_ray.pipelines.train_worker.train_loop_per_worker`.

Outputs: checkpoints (HF weights + tokenizer + optimizer/scheduler state) under
``<storage_path>/<run_name>/epoch-NNN``; ``<output_dir>/metrics.jsonl``, TensorBoard
events under ``<output_dir>/tensorboard`` and ``<output_dir>/training_curves.png``.

Index staleness: see :class:`~imprag_ray.config.schema.RayTrainConfig` (nothing the
training loss reads comes from a stale index; evaluation re-encodes the corpus).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imprag_ray.config.loader import ConfigError, to_dict
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.pipelines.train_worker import METRICS_NAME, train_loop_per_worker
from imprag_ray.train.recipe import read_task_files

CURVES_NAME = "training_curves.png"


@dataclass(frozen=True)
class RayTrainRun:
    """What a finished ``train_ray`` call produced."""

    eval: dict  # final metrics on data.eval ({} when none)
    checkpoint: str | None  # latest checkpoint (storage path or URI)
    run_dir: str  # <storage_path>/<run_name>
    metrics: str  # metrics.jsonl
    curves: str | None  # training_curves.png


def check_ray_config(cfg: TrainJobConfig) -> None:
    """Checks that need more than one section; each error names the key and the fix."""
    rc, tc = cfg.ray, cfg.train
    if tc.batch_size % rc.num_workers:
        raise ConfigError(
            "train.batch_size",
            f"the global batch ({tc.batch_size}) must divide evenly over ray.num_workers "
            f"({rc.num_workers}); use a multiple of {rc.num_workers}",
        )


def storage_and_name(cfg: TrainJobConfig) -> tuple[str, str]:
    """(storage_path, run name): defaults ``<output_dir>/ray_results`` and the job name."""
    storage = cfg.ray.storage_path or str(Path(cfg.output_dir).resolve() / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return storage, cfg.ray.run_name or cfg.name


def run_checkpoints(storage: str, name: str) -> list[str]:
    """Names of the complete ``epoch-*`` checkpoints of a run (any pyarrow filesystem)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    base = f"{root.rstrip('/')}/{name}"
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch-")
    )
    done = fs.get_file_info([f"{base}/{n}/trainer_state.pt" for n in names])
    return [n for n, info in zip(names, done, strict=True) if info.type == pafs.FileType.File]


def build_trainer(cfg: TrainJobConfig):
    """The ``TorchTrainer`` for a job (Ray must be initialised: the dataset is created here)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_ray_config(cfg)
    rc = cfg.ray
    storage, name = storage_and_name(cfg)
    # The examples, in the order the recipe builds its items: each worker's shard says
    # which of them it trains on (the recipe tokenises and ranks them locally).
    rows = [
        {"item": i, "id": ex.id}
        for i, ex in enumerate(ex for _, exs in read_task_files(cfg.data.train) for ex in exs)
    ]
    if len(rows) < rc.num_workers:
        raise ConfigError(
            "ray.num_workers", f"{rc.num_workers} workers but only {len(rows)} training examples"
        )
    dataset = ray.data.from_items(rows)
    scaling = ScalingConfig(
        num_workers=rc.num_workers,
        use_gpu=rc.use_gpu,
        resources_per_worker={"CPU": rc.cpus_per_worker, **rc.resources_per_worker},
        placement_strategy=rc.placement_strategy,
    )
    run = RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=rc.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=rc.num_to_keep),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg)},
        scaling_config=scaling,
        run_config=run,
        datasets={"train": dataset},
    )


def train_ray(
    cfg: TrainJobConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> RayTrainRun:
    """Train ``cfg`` on Ray Train and return the final metrics and checkpoint.

    Connects to ``address`` (or ``RAY_ADDRESS``) when given, joins an already connected
    Ray, and otherwise starts an embedded local Ray for the duration of the call.

    Args:
        resume: continue a stopped run from its latest checkpoint. Without it a run
            whose storage already holds checkpoints is refused (Ray would resume it
            silently).

    Raises:
        ConfigError: bad ``ray:`` settings; FileExistsError: the run exists, no ``resume``.
    """
    import ray

    from imprag_ray.pipelines.local_ray import init_local_ray

    check_ray_config(cfg)
    storage, name = storage_and_name(cfg)
    done = run_checkpoints(storage, name)
    if done and not resume:
        raise FileExistsError(
            f"run {name!r} already has checkpoints ({done[-1]}) under {storage}; pass --resume to "
            "continue it, or set ray.run_name / output_dir for a new run"
        )
    if resume and echo:
        echo(
            f"resuming {name} from {done[-1]}"
            if done
            else f"no checkpoint of {name} under {storage}; starting fresh"
        )
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="ERROR")
        else:
            init_local_ray()
        started = True
    try:
        result = build_trainer(cfg).fit()
    finally:
        if started:
            ray.shutdown()
    out = Path(cfg.output_dir)
    curves = plot_curves(out / METRICS_NAME, out / CURVES_NAME)
    # Result.metrics belong to the last checkpoint; the final eval comes after it.
    evals = [r for r in read_metrics(out / METRICS_NAME) if r.get("event") == "eval"]
    return RayTrainRun(
        eval=evals[-1]["metrics"] if evals else {},
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        run_dir=f"{storage.rstrip('/')}/{name}",
        metrics=str(out / METRICS_NAME),
        curves=str(curves) if curves else None,
    )


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """Training curves (loss, J_gen, J_ret per step; dev recall / EM per epoch) as a PNG."""
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r for r in rows if "event" not in r and "loss" in r]
    dev = [r for r in rows if r.get("event") == "epoch" and r.get("dev")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "j_gen", "j_ret"):
        pts = [(r["step"], r[key]) for r in steps if key in r]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), label=key, marker=".", linewidth=1)
    axes[0].set(xlabel="step", ylabel="nats", title="training losses (rank 0)")
    axes[0].legend()
    for r_task in sorted({t for r in dev for t in r["dev"]}):
        for metric in ("em", "recall@1"):
            pts = [(r["epoch"], r["dev"][r_task].get(metric)) for r in dev if r_task in r["dev"]]
            pts = [(e, v) for e, v in pts if isinstance(v, (int, float))]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), label=f"{r_task} {metric}", marker="o")
    axes[1].set(xlabel="epoch", ylabel="score", title="dev")
    if dev:
        axes[1].legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, png)
    return png
