"""Joint training on Ray Train (imprag_ray.pipelines.train): cross-worker in-batch
negatives and their gradients, the ray: config section, two real nodes vs one worker,
a killed worker resuming from its last checkpoint, --resume of a stopped run, metrics
JSONL / TensorBoard / PNG."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from imprag_ray.config.loader import ConfigError, load_config
from imprag_ray.config.schema import TrainJobConfig
from tests.world import job_dict

# ----------------------------------------------------------- gather gradients
D, R, SEED = 6, 3, 7
POOL_SIZES = (4, 2)  # rows of the passage pool on rank 0 / rank 1 (uneven on purpose)


class _TwoTower(torch.nn.Module):
    """Stands in for ImpRAGModel: forward = query embeddings, embed_passages = pool."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(5, D)
        self.p = torch.nn.Linear(5, D)

    def forward(self, x):  # shares the passage tower's weights, as ImpRAG's bottom layers do
        return self.q(x) + self.p(x)

    def embed_passages(self, y):
        return self.p(y)


def _data():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2 * R, 5, generator=g)  # queries: R per rank
    y = torch.randn(sum(POOL_SIZES), 5, generator=g)  # pool rows, rank 0 first
    m = sum(POOL_SIZES)
    positive = torch.zeros(2 * R, m, dtype=torch.bool)
    for i in range(2 * R):  # each query has one positive, on either rank's pool
        positive[i, (3 * i + 1) % m] = True
    return x, y, positive, ~positive


def _full_batch_grads():
    from imprag_ray.model.losses import multi_positive_nce

    torch.manual_seed(0)
    model = _TwoTower()
    x, y, positive, negative = _data()
    loss = multi_positive_nce(model(x) @ model.embed_passages(y).T, positive, negative)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from imprag_ray.model.losses import multi_positive_nce
    from imprag_ray.pipelines.train_collectives import DistributedModel, all_gather_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    inner = _TwoTower()
    ddp = torch.nn.parallel.DistributedDataParallel(
        inner, forward_sync_buffers=False, find_unused_parameters=True
    )
    model = DistributedModel(ddp, inner)
    group = dist.new_group()
    x, y, positive, negative = _data()
    lo = sum(POOL_SIZES[:rank])
    pool = model.embed_passages(y[lo : lo + POOL_SIZES[rank]])
    rows, offset = all_gather_rows(pool, group)
    queries = model(x[rank * R : (rank + 1) * R])
    mine = slice(rank * R, (rank + 1) * R)
    loss = multi_positive_nce(queries @ rows.T, positive[mine], negative[mine])
    loss.backward()
    # A rank with no rows of its own still joins forward and backward of the gather.
    if rank == 0:
        extra = torch.ones(1, D, requires_grad=True)
        got, _ = all_gather_rows(extra, group)
        (got[0] @ torch.ones(D) * 0).backward()
        summary_extra = got.shape[0]
    else:
        nothing = torch.zeros(0, D, requires_grad=True)
        got, _ = all_gather_rows(nothing, group)
        got.sum().backward()
        summary_extra = got.shape[0]
    torch.save(
        {
            "offset": offset,
            "rows": rows.detach(),
            "extra_rows": summary_extra,
            "grads": {n: p.grad.clone() for n, p in inner.named_parameters()},
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_cross_worker_negatives_and_gradients_match_one_full_batch(tmp_path):
    """2 gloo processes, uneven pools: every query scores all 6 passages, and DDP's
    averaged gradient equals the gradient of one process holding the whole batch."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ref = _full_batch_grads()
    torch.manual_seed(0)
    model = _TwoTower()
    _, y, _, _ = _data()
    expected_rows = model.embed_passages(y).detach()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["offset"] == sum(POOL_SIZES[:rank])
        torch.testing.assert_close(got["rows"], expected_rows)  # other ranks' negatives, in order
        assert got["extra_rows"] == 1  # rank 1 contributed no rows, rank 0 one
        for name, grad in ref.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6)


def _recipe_rank_main(rank: int, init_file: str, out_dir: str, job: str) -> None:
    import itertools

    import torch.distributed as dist

    from imprag_ray.pipelines.train_collectives import DistributedModel, all_gather_rows
    from imprag_ray.pipelines.train_worker import DistributedRecipe

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = load_config(TrainJobConfig, job, ["train.batch_size=4", f"output_dir={out_dir}/run"])
    group = dist.new_group()
    recipe = DistributedRecipe(
        cfg, rank=rank, world_size=2, gather=lambda x: all_gather_rows(x, group), group=group
    )
    recipe.setup()
    # rank 0 reads only retrieval examples, rank 1 none: rank 1 must still join the gather
    wanted = [i for i, item in enumerate(recipe.items) if item.retrieval == (rank == 0)]
    recipe.example_source = lambda epoch: wanted[:8]
    inner = recipe.model
    ddp = torch.nn.parallel.DistributedDataParallel(
        inner, forward_sync_buffers=False, find_unused_parameters=True
    )
    recipe.model = DistributedModel(ddp, inner)
    # two steps: DDP's second forward is where a collective used to deadlock
    metrics = [recipe.train_step(b) for b in itertools.islice(recipe.epoch_batches(0), 2)]
    checksum = sum(float(p.double().sum()) for p in inner.parameters())
    torch.save({"metrics": metrics, "checksum": checksum}, Path(out_dir) / f"recipe{rank}.pt")
    dist.destroy_process_group()


def test_worker_without_retrieval_rows_joins_the_gather(tiny_world, tmp_path):
    """Real recipe on 2 gloo ranks, warmup stage: rank 1's batches have no retrieval
    rows. Both ranks finish two steps (no deadlock) with identical weights."""
    import torch.multiprocessing as mp

    d = job_dict(tmp_path, tiny_world["world"], tiny_world["ckpt"])
    for spec in d["data"]["train"]:
        spec["limit"] = 40  # a short setup: teacher ranking of 40 QA items
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(d))
    args = (str(tmp_path / "init"), str(tmp_path), str(tmp_path / "job.yaml"))
    mp.start_processes(_recipe_rank_main, args=args, nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"recipe{r}.pt") for r in (0, 1))
    assert all("j_ret" in m for m in r0["metrics"]) and not any("j_ret" in m for m in r1["metrics"])
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)  # DDP kept them in sync


# ---------------------------------------------------------------- the config
def _job(tiny_world, out: Path, ray: dict | None = None, **train) -> TrainJobConfig:
    d = job_dict(out, tiny_world["world"], tiny_world["ckpt"], **train)
    d["output_dir"] = str(out)
    d["data"]["dev"] = [{"path": str(tiny_world["world"] / "dev/qa.jsonl"), "format": "qa", "limit": 8}]
    d["data"]["eval"] = d["data"]["eval"][:1]  # qa only: keeps the rank-0 eval short
    d["eval"]["limit"] = 8
    d["ray"] = ray or {}
    path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    return load_config(TrainJobConfig, path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ray.num_workers=0", "ray.num_workers"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
        ("ray.resources_per_worker={CPU: 2}", "ray.resources_per_worker.CPU"),
        ("ray.resources_per_worker={node_0: -1}", "ray.resources_per_worker.node_0"),
        ("ray.placement_strategy=EVERYWHERE", "ray.placement_strategy"),
        ("ray.strategy=zero3", "ray.strategy"),
        ("ray.max_failures=-2", "ray.max_failures"),
        ("ray.num_to_keep=0", "ray.num_to_keep"),
        ("ray.run_name=a/b", "ray.run_name"),
    ],
)
def test_ray_section_errors_name_the_key(tiny_world, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, tiny_world["job"], [override])
    assert err.value.key == key


def test_cross_section_checks(tiny_world):
    from imprag_ray.pipelines.train import check_ray_config

    cfg = load_config(TrainJobConfig, tiny_world["job"], ["ray.num_workers=3"])  # batch 8
    with pytest.raises(ConfigError) as err:
        check_ray_config(cfg)
    assert err.value.key == "train.batch_size" and "multiple of 3" in str(err.value)
    check_ray_config(load_config(TrainJobConfig, tiny_world["job"], ["ray.strategy=fsdp"]))  # accepted
    # bf16 is model.dtype's job on every strategy and device; ray.fsdp_bf16 is gone
    check_ray_config(
        load_config(TrainJobConfig, tiny_world["job"], ["ray.strategy=fsdp", "model.dtype=bfloat16"])
    )
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, tiny_world["job"], ["ray.fsdp_bf16=true"])
    assert err.value.key == "ray.fsdp_bf16"


# ------------------------------------------------------------ helpers (Ray)
def _rows(out: Path) -> list[dict]:
    from imprag_ray.pipelines.train import read_metrics

    return read_metrics(out / "metrics.jsonl")


def _epochs(out: Path) -> list[dict]:
    return [r for r in _rows(out) if r.get("event") == "epoch"]


def _assert_checkpoints_load(run_dir: Path, names: list[str]) -> None:
    from imprag_ray.model.imprag import ImpRAGModel

    assert sorted(p.name for p in run_dir.glob("epoch-*")) == names
    for name in names:
        ckpt = run_dir / name
        model = ImpRAGModel.from_pretrained(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert state["epoch"] == int(name.split("-")[1]) and state["step"] > 0
        assert {"optimizer", "scheduler"} <= set(state) and model.b == 1
    # no temp / partial dirs in storage or in the local checkpoint dir (Ray's own marker aside)
    local = (
        Path(json.loads((run_dir / names[-1] / "job_config.json").read_text())["output_dir"]) / "checkpoints"
    )
    found = [*run_dir.parent.rglob("*"), *local.rglob("*")]
    leftovers = [
        p.name
        for p in found
        if p.name != ".validate_storage_marker" and (p.name.startswith(".") or "tmp" in p.name)
    ]
    assert leftovers == [], leftovers


# ------------------------------------------------ acceptance 1: two real nodes
@pytest.mark.multinode
def test_two_workers_on_two_nodes_match_one_worker(ray_two_nodes, tiny_world, tmp_path):
    """2 workers (one per node, SPREAD) vs 1 worker, same global batch 8: per-epoch
    loss and dev recall agree within tolerance."""
    from imprag_ray.pipelines.train import train_ray

    train = dict(epochs=2, warmup_epochs=1, steps_per_epoch=4, lr=3e-3, warmup_steps=1)
    runs = {}
    for workers in (2, 1):
        out = tmp_path / f"w{workers}"
        cfg = _job(tiny_world, out, {"num_workers": workers, "placement_strategy": "SPREAD"}, **train)
        runs[workers] = (out, train_ray(cfg, echo=None))
    out2, run2 = runs[2]
    nodes = [json.loads((out2 / f"workers/rank-{r}.json").read_text())["node_id"] for r in (0, 1)]
    assert nodes[0] != nodes[1] and sorted(nodes) == sorted(ray_two_nodes.node_ids())
    two, one = _epochs(out2), _epochs(runs[1][0])
    assert [r["step"] for r in two] == [r["step"] for r in one] == [4, 8]  # same steps of batch 8
    for a, b in zip(two, one, strict=True):
        # mean over ALL workers' batches; the data order differs, so equal up to batch noise
        assert abs(a["mean_j_gen"] - b["mean_j_gen"]) < 0.3, (a, b)
        assert abs(a["mean_loss"] - b["mean_loss"]) < 0.15 * b["mean_loss"], (a, b)
    assert two[-1]["mean_j_gen"] < two[0]["mean_j_gen"] + 0.05  # training went somewhere sane
    for k in ("recall@1", "recall@10"):
        assert abs(two[-1]["dev"]["qa"][k] - one[-1]["dev"]["qa"][k]) <= 0.25
    assert set(run2.eval) == {"qa"} and run2.checkpoint.endswith("epoch-002")
    _assert_checkpoints_load(Path(run2.run_dir), ["epoch-001", "epoch-002"])


# ---------------------------------------------- acceptance 2: a worker killed
def _kill_when(out: Path, rank: int, ready, done: threading.Event, record: dict) -> None:
    """SIGKILL training worker ``rank`` once ``ready(metric rows)`` holds."""
    while not done.is_set():
        try:
            rows = _rows(out)
        except (FileNotFoundError, json.JSONDecodeError):
            rows = []
        if ready(rows):
            info = json.loads((out / f"workers/rank-{rank}.json").read_text())
            os.kill(info["pid"], signal.SIGKILL)
            record.update(info, killed_after_step=max(r.get("step", 0) for r in rows))
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faulted_run(tiny_world, tmp_path_factory):
    """A 2-worker, 3-epoch run on local Ray whose rank-1 worker is SIGKILLed in epoch 3
    (after two checkpoints were reported); ``max_failures: 1`` lets it resume."""
    from imprag_ray.pipelines.train import train_ray
    from tests.conftest import _connect

    _connect("local", num_cpus=2, include_dashboard=False, address="local")
    out = tmp_path_factory.mktemp("faulted") / "run"
    cfg = _job(tiny_world, out, {"num_workers": 2, "max_failures": 1}, epochs=3, warmup_epochs=1)

    def ready(rows):  # two checkpoints reported, and a step of the third epoch done
        return any(r.get("event") is None and r.get("epoch") == 2 for r in rows)

    done, record = threading.Event(), {}
    killer = threading.Thread(target=_kill_when, args=(out, 1, ready, done, record), daemon=True)
    killer.start()
    try:
        run = train_ray(cfg, echo=None)
    finally:
        done.set()
    return {"out": out, "run": run, "killed": record, "config": out.parent / f"{out.name}.yaml"}


def test_killed_worker_resumes_from_last_checkpoint(faulted_run):
    out, run, killed = faulted_run["out"], faulted_run["run"], faulted_run["killed"]
    assert killed, "the worker was never killed"
    setups = [r for r in _rows(out) if r.get("event") == "setup"]
    assert len(setups) == 2 and setups[0]["resumed_from"] is None
    resumed = setups[1]
    assert resumed["resumed_from"].endswith(f"epoch-{resumed['start_epoch']:03d}")
    assert resumed["start_epoch"] >= 1 and resumed["start_step"] == 3 * resumed["start_epoch"]
    assert resumed["start_step"] < killed["killed_after_step"]  # work after the checkpoint is redone
    after = [r for r in _rows(out) if r["time"] > resumed["time"] and "loss" in r]
    assert after[0]["step"] == resumed["start_step"] + 1  # continued, not restarted
    assert _epochs(out)[-1]["epoch"] == 3 and run.checkpoint.endswith("epoch-003")
    _assert_checkpoints_load(Path(run.run_dir), ["epoch-001", "epoch-002", "epoch-003"])
    assert json.loads((out / "workers/rank-1.json").read_text())["pid"] != killed["pid"]


# ------------------------------ --resume of a stopped run; metrics artefacts
def test_resume_of_a_stopped_run_and_its_metrics_files(faulted_run, tmp_path):
    """The finished 3-epoch run is refused without --resume, then extended to 4 epochs."""
    from imprag_ray.cli import main

    out, cfg = faulted_run["out"], str(faulted_run["config"])
    assert main(["train", "--config", cfg, "train.epochs=4"]) == 2  # exists: refused
    assert (
        main(["train", "--config", cfg, "train.epochs=4", "--resume", "--json", str(tmp_path / "f.json")])
        == 0
    )
    setups = [r for r in _rows(out) if r.get("event") == "setup"]
    assert len(setups) == 3 and setups[2]["start_epoch"] == 3 and setups[2]["start_step"] == 9
    assert setups[2]["resumed_from"].endswith("epoch-003")
    assert _epochs(out)[-1]["epoch"] == 4
    assert set(json.loads((tmp_path / "f.json").read_text())) == {"qa"}
    _assert_checkpoints_load(
        Path(faulted_run["run"].run_dir), ["epoch-001", "epoch-002", "epoch-003", "epoch-004"]
    )

    steps = [r for r in _rows(out) if "loss" in r and r.get("event") is None]
    assert sorted({r["step"] for r in steps}) == list(range(1, 13))
    assert all(0 < r["loss"] < 50 and r["j_gen"] > 0 for r in steps)
    epochs = _epochs(out)
    assert all(e["train_tokens"] > 0 and e["train_tokens_per_s"] > 0 for e in epochs)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    loss = events.Scalars("train/loss")
    assert sorted({e.step for e in loss}) == list(range(1, 13))
    assert [e.value for e in loss if e.step == 12] == pytest.approx([steps[-1]["loss"]], rel=1e-5)
    assert "epoch/dev/qa/recall@1" in events.Tags()["scalars"]

    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 200 and len(png) > 10_000
