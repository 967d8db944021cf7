"""ray.strategy: fsdp: the real recipe on 2 gloo ranks, FSDP2-sharded, against DDP.

Two warmup steps and one distillation step, with a rank whose batches have no retrieval
rows or no passages at all (the padded module calls), must give the same losses and the
same updated weights as DDP; the checkpoint written under FSDP loads with
``ImpRAGModel.from_pretrained`` and holds the gathered weights; resuming from it under
FSDP continues exactly like the run that wrote it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path

import pytest
import torch
import yaml

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from tests.world import job_dict


def _sources(recipe) -> dict[int, list[int]]:
    ret = [i for i, item in enumerate(recipe.items) if item.retrieval]
    non = [i for i, item in enumerate(recipe.items) if not item.context]
    return {"ret": ret, "non": non}


def _order(recipe, rank: int):
    """rank 0: retrieval rows only; rank 1: epoch 0 = a batch without retrieval rows or
    passages, then a mixed one; epoch 1 (distill) = no retrieval rows."""
    s = _sources(recipe)
    ret, non = s["ret"], s["non"]
    if rank == 0:
        return lambda epoch: ret[epoch * 8 : epoch * 8 + 8]
    return lambda epoch: (non[:4] + ret[20:22] + non[4:6]) if epoch == 0 else non[8:12]


def _steps(recipe, rank: int) -> list[dict]:
    recipe.example_source = _order(recipe, rank)
    batches = list(itertools.islice(recipe.epoch_batches(0), 2)) + list(
        itertools.islice(recipe.epoch_batches(1), 1)
    )
    return [recipe.train_step(b) for b in batches]


def _fsdp_rank_main(rank: int, init_file: str, out_dir: str, job: str) -> None:
    import torch.distributed as dist

    from imprag_ray.pipelines.fsdp import full_optimizer_state, full_state
    from imprag_ray.pipelines.train_collectives import DistributedModel, all_gather_rows
    from imprag_ray.pipelines.train_worker import DistributedRecipe

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = load_config(TrainJobConfig, job, ["train.batch_size=4", f"output_dir={out_dir}/run"])
    group = dist.new_group()

    def recipe(resume=None):
        r = DistributedRecipe(
            cfg, rank=rank, world_size=2, gather=lambda x: all_gather_rows(x, group), group=group
        )
        r.setup(resume_from=resume)
        return r

    out: dict = {}
    # DDP reference
    ddp = recipe()
    inner = ddp.model
    ddp.model = DistributedModel(
        torch.nn.parallel.DistributedDataParallel(
            inner, forward_sync_buffers=False, find_unused_parameters=True
        ),
        inner,
    )
    out["ddp_metrics"] = _steps(ddp, rank)
    out["ddp_params"] = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    out["ddp_opt"] = ddp.optimizer.state_dict()
    # FSDP
    fsdp = recipe()
    fsdp.shard()
    out["local_numel"] = sum(p.to_local().numel() for p in fsdp.model.parameters())
    out["numel"] = sum(p.numel() for p in fsdp.model.parameters())
    out["fsdp_metrics"] = _steps(fsdp, rank)
    out["fsdp_params"] = full_state(fsdp.model)
    out["fsdp_opt"] = copy.deepcopy(full_optimizer_state(fsdp.optimizer))  # later steps mutate "step"
    ckpt = Path(out_dir) / "ckpt"
    out["saved"] = str(fsdp.save_checkpoint(ckpt))
    # resume: one more step, from the checkpoint and in the run that wrote it
    dist.barrier()
    resumed = recipe(resume=ckpt)
    resumed.shard()
    batch = next(iter(fsdp.epoch_batches(1)))
    out["continued_metrics"] = fsdp.train_step(batch)
    out["continued_params"] = full_state(fsdp.model)
    resumed.example_source = fsdp.example_source
    out["resumed_step"] = resumed.step
    out["resumed_metrics"] = resumed.train_step(next(iter(resumed.epoch_batches(1))))
    out["resumed_params"] = full_state(resumed.model)
    # rank-0 evaluation inside the gathered context (the other rank waits in the gather)
    with fsdp.unwrapped():
        if rank == 0:
            out["dev"] = fsdp.evaluate("dev", limit=4, write=False)
    dist.barrier()
    torch.save(out, Path(out_dir) / f"fsdp{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tiny_world, tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("fsdp")
    d = job_dict(tmp, tiny_world["world"], tiny_world["ckpt"])
    for spec in d["data"]["train"]:
        spec["limit"] = 40  # a short setup: teacher ranking of 40 QA items
    d["data"]["dev"] = [{**d["data"]["dev"][0], "limit": 4}]
    # per-example J_gen: FSDP's pad row (no labels) must drop out of the mean, as under DDP
    d["train"]["gen_loss_average"] = "example"
    (tmp / "job.yaml").write_text(yaml.safe_dump(d))
    args = (str(tmp / "init"), str(tmp), str(tmp / "job.yaml"))
    mp.start_processes(_fsdp_rank_main, args=args, nprocs=2, start_method="spawn")
    return [torch.load(tmp / f"fsdp{r}.pt", weights_only=False) for r in (0, 1)]


def test_fsdp_steps_match_ddp(fsdp_run):
    """Same per-rank losses and grad norms, and the same updated weights (gathered) and
    optimizer state, as DDP; each rank holds about half the parameters."""
    r0, r1 = fsdp_run
    for r in (r0, r1):
        assert r["local_numel"] < 0.6 * r["numel"]
        for ddp_m, fsdp_m in zip(r["ddp_metrics"], r["fsdp_metrics"], strict=True):
            assert ddp_m.keys() == fsdp_m.keys()
            for key in ddp_m:
                assert fsdp_m[key] == pytest.approx(ddp_m[key], rel=1e-4, abs=1e-6), key
    # the padded paths ran: rank 1 had steps without retrieval rows, warmup and distill
    assert all("j_ret" in m for m in r0["fsdp_metrics"])
    assert ["j_ret" in m for m in r1["fsdp_metrics"]] == [False, True, False]
    ddp, got = r0["ddp_params"], r0["fsdp_params"]
    assert got.keys() == ddp.keys()
    for name, value in ddp.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for key, entry in r0["ddp_opt"]["state"].items():
        for n, v in entry.items():
            torch.testing.assert_close(r0["fsdp_opt"]["state"][key][n], v, rtol=1e-4, atol=1e-6)


def test_fsdp_checkpoint_loads_and_resumes(fsdp_run):
    from imprag_ray.model.imprag import ImpRAGModel

    r0, r1 = fsdp_run
    assert r1["saved"] == "None"  # rank 0 writes the checkpoint
    loaded = ImpRAGModel.from_pretrained(r0["saved"])
    state = loaded.state_dict()
    for name, value in r0["fsdp_params"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert r0["resumed_step"] == 3
    for key in ("loss", "j_gen", "grad_norm", "lr"):
        assert r0["resumed_metrics"][key] == pytest.approx(r0["continued_metrics"][key], rel=1e-5), key
    for name, value in r0["continued_params"].items():
        torch.testing.assert_close(r0["resumed_params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert r0["dev"]["qa"]["format"] == "qa" and r0["dev"]["qa"]


def _fsdp_bf16_rank_main(rank: int, init_file: str, out_dir: str, job: str) -> None:
    """A model.dtype: bfloat16 job under FSDP on 2 gloo ranks: one warmup and one
    distillation step, then a checkpoint."""
    import torch.distributed as dist

    from imprag_ray.pipelines.train_collectives import all_gather_rows
    from imprag_ray.pipelines.train_worker import DistributedRecipe

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = load_config(
        TrainJobConfig, job, ["train.batch_size=4", "model.dtype=bfloat16", f"output_dir={out_dir}/run"]
    )
    group = dist.new_group()
    recipe = DistributedRecipe(
        cfg, rank=rank, world_size=2, gather=lambda x: all_gather_rows(x, group), group=group
    )
    recipe.setup()
    recipe.shard()
    recipe.example_source = _order(recipe, rank)
    out: dict = {"param_dtypes": sorted({str(p.dtype) for p in recipe.model.parameters()})}
    ids = torch.tensor([[1, 5, 7, 9]])  # the same module calls on both ranks
    with torch.no_grad():
        out["logits_dtype"] = str(recipe.model(ids, torch.ones_like(ids)).logits.dtype)
    batch = next(iter(recipe.epoch_batches(0)))
    out["autocast_is_noop"] = isinstance(recipe.autocast(), contextlib.nullcontext)
    out["metrics"] = [recipe.train_step(batch), recipe.train_step(next(iter(recipe.epoch_batches(1))))]
    out["grad_dtypes"] = sorted({str(p.grad.dtype) for p in recipe.model.parameters() if p.grad is not None})
    out["saved"] = str(recipe.save_checkpoint(Path(out_dir) / "ckpt"))
    dist.barrier()
    torch.save(out, Path(out_dir) / f"bf16-{rank}.pt")
    dist.destroy_process_group()


def test_fsdp_bf16_job_computes_in_bf16_with_fp32_masters(tiny_world, tmp_path):
    """model.dtype: bfloat16 is the one switch (on CPU/gloo too): FSDP2 all-gathers the
    fp32 master shards as bf16 for compute (MixedPrecisionPolicy), reduces fp32 gradients,
    and rank 0 writes a bf16 checkpoint."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    d = job_dict(tmp_path, tiny_world["world"], tiny_world["ckpt"])
    for spec in d["data"]["train"]:
        spec["limit"] = 40
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(d))
    args = (str(tmp_path / "init"), str(tmp_path), str(tmp_path / "job.yaml"))
    mp.start_processes(_fsdp_bf16_rank_main, args=args, nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"bf16-{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert r["param_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]
        assert r["logits_dtype"] == "torch.bfloat16" and r["autocast_is_noop"]
        assert all(m["loss"] == m["loss"] and abs(m["loss"]) < 1e4 for m in r["metrics"])
    assert r1["saved"] == "None"
    weights = load_file(Path(r0["saved"]) / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


def test_ray_train_run_with_fsdp(ray_local, tiny_world, tmp_path):
    """``ray.strategy: fsdp`` through Ray Train: 2 workers (gloo), a warmup and a
    distillation epoch, dev evaluation in each, checkpoints that load, final eval."""
    import json

    from imprag_ray.model.imprag import ImpRAGModel
    from imprag_ray.pipelines.train import read_metrics, train_ray

    d = job_dict(tmp_path, tiny_world["world"], tiny_world["ckpt"], steps_per_epoch=2, epochs=2)
    for spec in d["data"]["train"]:
        spec["limit"] = 40
    d["output_dir"] = str(tmp_path / "out")
    d["data"]["dev"] = [{**d["data"]["dev"][0], "limit": 4}]
    d["data"]["eval"] = d["data"]["eval"][:1]
    d["eval"]["limit"] = 4
    d["ray"] = {"num_workers": 2, "strategy": "fsdp"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(d))
    run = train_ray(load_config(TrainJobConfig, tmp_path / "job.yaml"), echo=None)
    epochs = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r.get("event") == "epoch"]
    assert [r["step"] for r in epochs] == [2, 4] and all("qa" in r["dev"] for r in epochs)
    assert set(run.eval) == {"qa"} and run.checkpoint.endswith("epoch-002")
    model = ImpRAGModel.from_pretrained(Path(run.run_dir) / "epoch-002")
    assert model.num_layers == 4
    state = torch.load(Path(run.run_dir) / "epoch-002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["optimizer"]["state"]) == len(list(model.parameters()))
    assert (
        json.loads((Path(run.run_dir) / "epoch-002" / "job_config.json").read_text())["ray"]["strategy"]
        == "fsdp"
    )
