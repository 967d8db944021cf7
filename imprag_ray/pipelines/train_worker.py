"""The Ray Train worker side of ``imprag train``: a thin loop around the Ray-free recipe.

Each worker rebuilds the job config, runs :class:`~imprag_ray.train.recipe.ImpRAGRecipe`
on its rank, and adds only what distribution needs (arXiv 2506.02279 §3.2, DESIGN §1-2):

* examples come from this worker's Ray Data shard (``get_dataset_shard("train")``);
* the warmup NCE sees every worker's in-batch passages through a differentiable
  all-gather, so each worker's gradient includes the terms other workers' queries put
  on its passages (see :func:`all_gather_rows`);
* DDP (``ray.train.torch.prepare_model``) averages the gradients, or with
  ``ray.strategy: fsdp`` FSDP2 shards the model (:mod:`imprag_ray.pipelines.fsdp`, wrapped
  here; all ranks make the same module calls, and join evaluation and saving);
* ``model.dtype: bfloat16`` is mixed precision on every path: fp32 master weights with the
  recipe's bf16 autocast (local, DDP, and rank-0 work on a gathered copy), or FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on the sharded model;
* rank 0 saves checkpoints (HF + optimizer/scheduler state, atomically) and reports them
  as ``ray.train.Checkpoint``; a restarted worker group resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from imprag_ray.config.loader import from_dict
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.io import write_json_atomic
from imprag_ray.model.losses import response_nll
from imprag_ray.pipelines.train_collectives import DistributedModel, all_gather_rows
from imprag_ray.train.batching import Batch
from imprag_ray.train.local import JsonlLogger
from imprag_ray.train.recipe import ImpRAGRecipe

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WORKERS_DIR = "workers"  # rank-R.json: pid and node of each live worker (fault tests use it)


class DistributedRecipe(ImpRAGRecipe):
    """The recipe on one of several workers: batches on this worker's device, and every
    worker joins the in-batch-negative gather whenever any worker's batch has retrieval
    rows (collectives must be entered by all ranks)."""

    def __init__(
        self, *args, group=None, device: torch.device | None = None, shard_after_setup: bool = False, **kwargs
    ):
        super().__init__(*args, device=device, **kwargs)
        self.group = group
        # FSDP: setup leaves the full model (and a resumed full optimizer state) on the CPU;
        # shard() moves only this rank's shards to the device (a full fp32 Adam state of an 8B
        # model would not fit one GPU next to the model).
        self.shard_after_setup = shard_after_setup
        self.timed_tokens, self.timed_seconds = 0, 0.0  # this epoch's train steps only
        self.fsdp = False  # set by shard()
        self._sharded: torch.nn.Module | None = (
            None  # the FSDP-sharded model (self.model, except in gathered())
        )

    # ------------------------------------------------------------------ FSDP
    def shard(self) -> None:
        """FSDP2-shard the model (see :mod:`imprag_ray.pipelines.fsdp`; bf16 compute with
        fp32 gradient reduction for a ``model.dtype: bfloat16`` job) and rebuild the
        optimizer and scheduler over the sharded parameters, keeping their state (a
        resumed run's full optimizer state is sharded like the parameters)."""
        from imprag_ray.pipelines.fsdp import load_full_optimizer_state, shard_model

        full_opt, sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        shard_model(self.model, self.device, bf16=self.bf16)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        load_full_optimizer_state(self.optimizer, full_opt)
        self.scheduler.load_state_dict(sched)
        self.fsdp, self._sharded = True, self.model

    def _place_model(self) -> None:
        if not self.shard_after_setup:
            super()._place_model()

    def autocast(self):
        """The sharded model computes in bf16 through FSDP's MixedPrecisionPolicy (no
        autocast on top); everything else (DDP, the gathered copy) as the recipe."""
        if self.fsdp and self.model is self._sharded:
            return contextlib.nullcontext()
        return super().autocast()

    @contextlib.contextmanager
    def gathered(self):
        """All ranks: gather the full weights; rank 0 runs the body on an unsharded copy
        (self.model is swapped for it there), the others just wait for it."""
        from imprag_ray.pipelines.fsdp import full_state, plain_copy

        state = full_state(self.model)
        sharded = self.model
        if self.rank == 0:
            self.model = plain_copy(sharded, state, self.device)
        del state
        try:
            yield
        finally:
            self.model = sharded

    def save_checkpoint(self, out_dir=None):
        """DDP/local: rank 0 only. FSDP: all ranks (gathers), rank 0 writes the same
        files as DDP (HF weights, plain optimizer state); others return None."""
        if not self.fsdp:
            return super().save_checkpoint(out_dir)
        from types import SimpleNamespace

        from imprag_ray.pipelines.fsdp import full_optimizer_state

        opt = full_optimizer_state(self.optimizer)
        with self.gathered():
            if self.rank != 0:
                return None
            optimizer = self.optimizer
            self.optimizer = SimpleNamespace(state_dict=lambda: opt)
            try:
                return super().save_checkpoint(out_dir)
            finally:
                self.optimizer = optimizer

    def _any(self, *flags: bool) -> list[bool]:
        """For each flag: is it set on any rank (one all-reduce)."""
        t = torch.tensor([int(f) for f in flags], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]

    def _fsdp_train_step(self, batch: Batch) -> dict[str, float]:
        """The recipe's step, with every rank making the same module calls (FSDP's
        collectives run per call): a pad row that reads one passage token (labels
        ignored, so J is unchanged), and zero-weight stand-ins for the retrieval loss on a
        rank whose batch has no retrieval rows while another's has."""
        tc = self.cfg.train
        mine = bool(batch.retrieval.any()) and not self.closed_book
        anyone, passages = self._any(mine, batch.passage_ids is not None)
        if passages:
            batch = _with_pad_row(batch, self.tokenizer.pad_token_id or 0, self.model.k)
        self.model.train()
        out = self.model(
            batch.input_ids,
            batch.attention_mask,
            batch.passage_ids,
            batch.passage_mask,
            query_index=batch.query_index,
        )
        j_gen = response_nll(out.logits, batch.labels, tc.gen_loss_average)  # the pad row has no labels
        metrics = {"j_gen": j_gen.item()}
        loss = j_gen
        if mine:
            j_ret, ret_metrics = self.retrieval_loss(out.query_embedding[batch.retrieval], batch)
            loss = loss + tc.lambda_ret * j_ret
            metrics.update(ret_metrics)
        elif anyone:
            # The same retrieval loss, graph and collectives as the busy ranks (FSDP's
            # backward collectives follow the autograd order), on the pad row, weight 0.
            # The dummy passage stays local: the gather sends no rows (as under DDP).
            idle, gather = _idle_retrieval_batch(batch), self.gather
            self.gather = lambda x: (torch.cat([x, gather(x[:0])[0]]), 0)
            try:
                j_ret, _ = self.retrieval_loss(out.query_embedding[idle.retrieval], idle)
            finally:
                self.gather = gather
            loss = loss + 0.0 * j_ret
        return self.apply_gradients(loss, metrics)

    def teacher_logliks(self, batch: Batch) -> Tensor:
        out = super().teacher_logliks(batch)
        if self.fsdp and self.world_size > 1:
            self._pad_teacher_calls(-(-int((batch.candidates >= 0).sum()) // 64))
        return out

    @torch.no_grad()
    def _pad_teacher_calls(self, mine: int) -> None:
        """Run dummy teacher forwards until this rank made as many as the busiest rank."""
        t = torch.tensor([mine], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.eval()
        for _ in range(int(t.item()) - mine):
            self.model(ids, torch.ones_like(ids), ids.view(1, 1, 1), torch.ones_like(ids).view(1, 1, 1))
        self.model.train(was_training)

    def train_step(self, batch: Batch) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self._train_step(batch)
        self.timed_seconds += time.perf_counter() - start
        self.timed_tokens += int(batch.attention_mask.sum())
        return metrics

    def _train_step(self, batch: Batch) -> dict[str, float]:
        if self.fsdp:
            return self._fsdp_train_step(batch)
        if self.world_size > 1 and batch.stage == "warmup" and not self.closed_book:
            mine = bool(batch.retrieval.any())
            anyone = torch.tensor([int(mine)], device=self.device)
            dist.all_reduce(anyone, op=dist.ReduceOp.MAX, group=self.group)
            if anyone.item() and not mine:
                # Contribute zero rows; forward and backward of the gather still run here.
                nothing = torch.zeros(
                    0,
                    self.model.embedding_dim,
                    device=self.device,
                    dtype=self.compute_dtype,
                    requires_grad=True,
                )
                rows, _ = self.gather(nothing)
                # Zero gradient for every rank's rows: the gather's backward sums what each
                # rank puts on them (rows.sum() here used to add 1 to the other ranks' rows).
                (0.0 * rows.sum()).backward()
        return super().train_step(batch)

    @contextlib.contextmanager
    def unwrapped(self):
        """The plain model for rank-local work (evaluation): no DDP, no collectives.
        Under FSDP all ranks must enter (the weights are gathered; rank 0 gets them)."""
        if self.fsdp:
            with self.gathered():
                yield
            return
        model = self.model
        self.model = getattr(model, "module", model) if isinstance(model, DistributedModel) else model
        try:
            yield
        finally:
            self.model = model


def _with_pad_row(batch: Batch, pad_id: int, k: int) -> Batch:
    """``batch`` plus one row that reads a one-token passage and has no labels: it makes
    every rank run the passage layers whatever its batch holds, and adds nothing to J
    (its labels are all -100, it trains no retrieval). A batch without passage tensors
    gets k empty passage slots per row (its prompts then sit at positions k * l_max + i,
    as in any batch with passages: RoPE attention depends only on relative positions)."""

    def row(t: Tensor, fill) -> Tensor:
        return torch.cat([t, torch.full_like(t[:1], fill)])

    ids = row(batch.input_ids, pad_id)
    mask = row(batch.attention_mask, 0)
    mask[-1, 0] = 1
    p_ids, p_mask = batch.passage_ids, batch.passage_mask
    if p_ids is None:
        p_ids = torch.full((ids.shape[0] - 1, k, 1), pad_id, dtype=ids.dtype, device=ids.device)
        p_mask = torch.zeros_like(p_ids)
    p_mask = row(p_mask, 0)
    p_mask[-1, 0, 0] = 1
    return replace(
        batch,
        input_ids=ids,
        attention_mask=mask,
        labels=row(batch.labels, -100),
        query_index=row(batch.query_index, 0),
        retrieval=row(batch.retrieval, False),
        passage_ids=row(p_ids, pad_id),
        passage_mask=p_mask,
    )


def _idle_retrieval_batch(batch: Batch) -> Batch:
    """A padded ``batch`` whose pad row (the last) is its one retrieval row, with one
    one-token pool passage as its positive and candidate."""
    tokens = batch.input_ids[-1:, :1].clone()  # [1, 1]: the pad token
    retrieval = torch.zeros_like(batch.retrieval)
    retrieval[-1] = True
    one = torch.ones(1, 1, dtype=torch.bool, device=tokens.device)
    return replace(
        batch,
        retrieval=retrieval,
        pool_ids=["<pad>"],
        pool_tokens=tokens,
        pool_mask=torch.ones_like(tokens),
        positive=one,
        negative=~one,
        candidates=torch.zeros(1, 1, dtype=torch.long, device=tokens.device),
    )


# --------------------------------------------------------------------- logging
class RankZeroLogger:
    """Metric rows -> ``metrics.jsonl`` + TensorBoard scalars (rank 0 only)."""

    def __init__(self, out: Path, echo: Callable[[str], None] | None = print):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = JsonlLogger(out / METRICS_NAME, echo)
        self.tb = SummaryWriter(str(out / TENSORBOARD_DIR))

    def __call__(self, row: dict) -> None:
        self.jsonl(row)
        step = int(row.get("step", 0))
        prefix = row.get("event", "train")
        for key, value in _flatten(row).items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key not in ("step", "epoch")
            ):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def _flatten(row: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------- the loop
def _shard_source(shard, seed: int, rank: int, n_items: int) -> Callable[[int], list[int]]:
    """epoch -> item indices of this worker's Ray Data shard, in a seeded order."""

    def order(epoch: int) -> list[int]:
        ids = [int(i) for b in shard.iter_batches(batch_size=4096, batch_format="numpy") for i in b["item"]]
        if ids and max(ids) >= n_items:
            raise ValueError(
                f"the training dataset names example {max(ids)} but this worker read {n_items}; "
                "the data.train files changed between the driver and the workers"
            )
        random.Random(seed * 1000 + epoch * 101 + rank).shuffle(ids)
        return ids

    return order


def _mean_across_workers(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Means over all workers of the metrics every worker has (e.g. loss, j_gen)."""
    keys = ("loss", "j_gen")
    if world == 1 or not all(k in values for k in keys):
        return {k: values[k] for k in keys if k in values}
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def _throughput(recipe: DistributedRecipe, world: int, device: torch.device) -> dict[str, float]:
    """Prompt + target tokens of all workers per second of train steps (the slowest
    worker's time; setup, evaluation and checkpoints excluded)."""
    tokens = torch.tensor([float(recipe.timed_tokens)], dtype=torch.float64, device=device)
    seconds = torch.tensor([recipe.timed_seconds], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(tokens)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return {
        "train_tokens": int(tokens.item()),
        "train_seconds": seconds.item(),
        "train_tokens_per_s": tokens.item() / max(seconds.item(), 1e-9),
    }


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config = {"job": to_dict(TrainJobConfig)}``."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainJobConfig, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(cfg.output_dir)
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    write_json_atomic(
        out / WORKERS_DIR / f"rank-{rank}.json",
        {
            "rank": rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        },
    )
    group = dist.new_group() if world > 1 else None  # own group: gather never interleaves with DDP
    log = RankZeroLogger(out) if rank == 0 else None
    local_cfg = replace(cfg, train=replace(cfg.train, batch_size=cfg.train.batch_size // world))
    recipe = DistributedRecipe(
        local_cfg,
        rank=rank,
        world_size=world,
        log=log,
        gather=(lambda x: all_gather_rows(x, group)) if world > 1 else None,
        group=group,
        device=device,
        shard_after_setup=cfg.ray.strategy == "fsdp" and world > 1,
    )
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt else contextlib.nullcontext(None) as resume_dir:
        recipe.setup(resume_from=resume_dir)
    recipe.example_source = _shard_source(
        ray.train.get_dataset_shard("train"), cfg.seed, rank, len(recipe.items)
    )
    _wrap_model(recipe, cfg, world)
    if log:
        log(
            {
                "event": "setup",
                "world_size": world,
                "items": len(recipe.items),
                "steps_per_epoch": recipe.steps_per_epoch,
                "resumed_from": str(ckpt.path) if ckpt else None,
                "start_epoch": recipe.epoch,
                "start_step": recipe.step,
            }
        )
    _run_epochs(recipe, cfg, rank, world, device, log)
    if log:
        log.close()


def _wrap_model(recipe: DistributedRecipe, cfg: TrainJobConfig, world: int) -> None:
    import ray.train.torch

    model = recipe.model
    if cfg.ray.strategy == "fsdp":
        # Our own FSDP2 wrap (prepare_model wraps FSDP only on CUDA), CPU/gloo and GPU/NCCL.
        if world > 1:
            recipe.shard()  # (one worker: the plain model, already on its device)
        return
    # No collective may run inside DDP's forward: workers call the model a different
    # number of times (teacher scoring, rank-0 eval) and a worker with no retrieval rows
    # joins the in-batch gather before its forward. So no buffer broadcast, and
    # find_unused_parameters=True, which also skips the one-off bucket rebuild (a
    # broadcast in the second forward).
    kwargs = {"forward_sync_buffers": False, "find_unused_parameters": True}
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)
    if wrapped is not model:
        recipe.model = DistributedModel(wrapped, model)  # type: ignore[assignment]


def _run_epochs(recipe, cfg: TrainJobConfig, rank: int, world: int, device, log) -> None:
    import ray.train

    tc = cfg.train
    # Under FSDP all ranks join evaluation and saving (the weights are gathered; rank 0
    # evaluates/writes); under DDP rank 0 does them alone.
    joins = rank == 0 or recipe.fsdp
    eval_fn = None
    if joins and tc.eval_every and cfg.data.dev:

        def eval_fn():
            with recipe.unwrapped():
                if log:
                    log(
                        {
                            "event": "dev",
                            "epoch": recipe.epoch,
                            "step": recipe.step,
                            "metrics": recipe.evaluate("dev"),
                        }
                    )

    while recipe.epoch < tc.epochs:
        stage = recipe.stage(recipe.epoch)
        recipe.timed_tokens, recipe.timed_seconds = 0, 0.0
        means = recipe.train_epoch(eval_fn)
        row = {
            "epoch": recipe.epoch,
            "step": recipe.step,
            "stage": stage,
            **{f"mean_{k}": v for k, v in _mean_across_workers(means, world, device).items()},
            **_throughput(recipe, world, device),
        }
        due = recipe.epoch % tc.save_every_epochs == 0 or recipe.epoch == tc.epochs
        name = f"epoch-{recipe.epoch:03d}" if due else None
        checkpoint = None
        if joins and due:
            saved = recipe.save_checkpoint(Path(cfg.output_dir) / "checkpoints" / str(name))
            if rank == 0:
                checkpoint = ray.train.Checkpoint.from_directory(saved)
        if joins and cfg.data.dev:
            with recipe.unwrapped():
                if rank == 0:
                    row["dev"] = recipe.evaluate("dev")
        if log:
            log({"event": "epoch", **row})
        ray.train.report(
            row, checkpoint=checkpoint, checkpoint_dir_name=name, delete_local_checkpoint_after_upload=False
        )
    final: dict = {}
    if joins and cfg.data.eval:
        with recipe.unwrapped():
            if rank == 0:
                final = recipe.evaluate("eval")
    if log:
        log({"event": "eval", "epoch": recipe.epoch, "step": recipe.step, "metrics": final})
    ray.train.report({"epoch": recipe.epoch, "step": recipe.step, "eval": final})
