"""The torch reference engine behind :class:`GenerationEngine` (exact; CPU or GPU).

Generation of a row ends at the first of the checkpoint's stop ids
(:func:`imprag_ray.model.checkpoint.stop_token_ids`: every eos id of generation_config.json,
e.g. Llama-3 instruct's ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, plus the
tokenizer's eos); the stop id itself is not returned.

One scheduler thread owns the model. Every entry point (``generate``, ``stream``,
``agenerate``, ``astream``) queues jobs for it; it takes the oldest queued job plus the
queued jobs of the same passage mode (closed book or with passages: the two have different
position offsets), up to ``max_batch_size``, and decodes them as one KV-cached batch
(:func:`imprag_ray.model.generation.generate_steps`). Rows may differ in sampling settings
and ``max_new_tokens``; each sampled row draws from its own ``torch.Generator`` (seeded
from the request's seed), so a seeded request gives the same tokens alone or batched. A row
that stops, spends its budget or is aborted leaves the KV-cached batch at the next step;
the batch ends when no row is left. Jobs queued while a batch runs wait for the next batch
(no joining a running batch).

Tokens and results go back to the caller through its own queue: an ``asyncio.Queue`` fed
with ``loop.call_soon_threadsafe`` for the async entry points (no thread per request on
the caller's side), a ``queue.Queue`` for the synchronous ones. No lock is held across a
yield to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import torch

from imprag_ray.engine.base import (
    EngineError,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Item,
    RequestAbortedError,
    checkpoint_stop_ids,
    engine_request_id,
    loop_deliver,
)
from imprag_ray.model.checkpoint import checkpoint_hash
from imprag_ray.model.generation import generate_steps, select_next
from imprag_ray.model.imprag import ImpRAGModel


class _Job:
    """One request in the scheduler: its engine id, where its output goes, its state."""

    def __init__(
        self, request: GenerationRequest, rid: str, deliver: Callable[[Item], None], stream: bool, device
    ):
        self.request = request
        self.id = rid
        self.deliver = deliver  # thread-safe; raises RuntimeError once the caller's loop is closed
        self.stream = stream  # deliver each token as it is decoded (else the result only)
        self.tokens: list[int] = []
        self.done = False  # settled (finished, failed or aborted); set under the scheduler lock
        s = request.sampling
        self.generator: torch.Generator | None = None
        if not s.greedy and s.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(s.seed)

    @property
    def closed_book(self) -> bool:
        return self.request.passages is None


class _Scheduler:
    """The job queue shared by callers and the worker thread (no reference to the engine,
    so an engine nobody holds can be collected; its finalizer closes the scheduler)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: list[_Job] = []  # queued, oldest first
        self.live: dict[str, _Job] = {}  # queued or being stepped, by engine id
        self.closed = False

    def submit(self, jobs: list[_Job]) -> None:
        with self.cond:
            if self.closed:
                raise EngineError("the engine is closed")
            self.pending.extend(jobs)
            self.live.update((j.id, j) for j in jobs)
            self.cond.notify_all()

    def settle(self, job: _Job, item: Item) -> None:
        """Hand the job its final item (once: later calls are ignored) and forget it."""
        with self.cond:
            if job.done:
                return
            job.done = True
            self.live.pop(job.id, None)
            if job in self.pending:
                self.pending.remove(job)
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                job.deliver(item)

    def next_batch(self, max_batch_size: int, wait_s: float) -> list[_Job] | None:
        """Block for queued jobs; take the oldest and the queued jobs of its passage mode,
        after waiting up to ``wait_s`` for the batch to fill. None once closed."""
        with self.cond:
            while True:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return None
                deadline = time.monotonic() + wait_s
                while self.pending and not self.closed:
                    mode = self.pending[0].closed_book
                    batch = [j for j in self.pending if j.closed_book == mode][:max_batch_size]
                    left = deadline - time.monotonic()
                    if len(batch) >= max_batch_size or left <= 0:
                        for j in batch:
                            self.pending.remove(j)
                        return batch
                    self.cond.wait(left)  # woken by each submit; the head may be aborted meanwhile

    def close(self) -> list[_Job]:
        """Stop taking jobs; returns the live ones (for the caller to fail)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            return list(self.live.values())


def _worker_main(scheduler: _Scheduler, engine_ref: weakref.ref) -> None:
    """The scheduler thread: holds the engine only while a batch runs."""
    while True:
        engine = engine_ref()
        if engine is None:
            return
        max_batch_size, wait_s = engine.max_batch_size, engine.batch_wait_s
        del engine  # not held while idle
        batch = scheduler.next_batch(max_batch_size, wait_s)
        engine = engine_ref()
        if batch is None or engine is None:
            return
        try:
            engine._run_batch(batch)
        except Exception as e:  # a failed forward fails its batch, never the thread
            for job in batch:
                scheduler.settle(job, ("error", EngineError(f"generation failed: {e!r}")))
        del engine


def _close_jobs(scheduler: _Scheduler) -> None:
    for job in scheduler.close():
        scheduler.settle(job, ("error", RequestAbortedError(f"request {job.id}: the engine was closed")))


class TorchEngine(GenerationEngine):
    """Batches concurrent requests of the same passage mode; greedy is exact.

    Args:
        checkpoint_dir: HF-format ImpRAG checkpoint.
        dtype / device: of the model (device default: CUDA when available).
        max_batch_size: most requests decoded together.
        batch_wait_s: how long the scheduler waits for a batch to fill once a request is
            queued (requests arriving together from many callers share one batch).
    """

    kind = "torch"

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.002,
    ):
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        # Held by the worker while it steps a batch and by reload: weights never change
        # under a running batch. Callers never hold it.
        self._model_lock = threading.Lock()
        self.decode_steps = 0  # decoding steps run (all batches): shows that aborts stop work
        self._load(checkpoint_dir)
        self._scheduler = _Scheduler()
        self._worker = threading.Thread(
            target=_worker_main,
            args=(self._scheduler, weakref.ref(self)),
            name="imprag-torch-engine",
            daemon=True,
        )
        self._worker.start()
        # an engine dropped without close() still fails its waiters and ends the thread
        self._finalizer = weakref.finalize(self, _close_jobs, self._scheduler)

    def _load(self, checkpoint_dir: str) -> None:
        model = ImpRAGModel.from_pretrained(checkpoint_dir, dtype=self.dtype).to(self.device).eval()
        self._stops = checkpoint_stop_ids(checkpoint_dir)
        self._eos = self._stops[0] if self._stops else None
        pad = model.lm.config.pad_token_id  # fills masked columns only: any id works
        self._pad = (self._eos if pad is None else pad) or 0
        self._hash = checkpoint_hash(checkpoint_dir)
        self._vocab = int(model.lm.config.vocab_size)
        self.model = model

    # -------------------------------------------------------------- properties
    @property
    def checkpoint_hash(self) -> str:
        return self._hash

    @property
    def num_passages(self) -> int:
        return self.model.k

    @property
    def max_passage_tokens(self) -> int:
        return self.model.l_max

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stops)

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        # an id outside the embedding table would fail the forward of the whole batch
        fields = [("prompt_ids", request.prompt_ids)]
        fields += [(f"passage {i}", p) for i, p in enumerate(request.passages or ())]
        for name, ids in fields:
            bad = [t for t in ids if not 0 <= t < self._vocab]
            if bad:
                raise EngineError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {self._vocab})")

    # -------------------------------------------------------------- submission
    def _jobs(
        self, requests: Sequence[GenerationRequest], deliver: Sequence[Callable[[Item], None]], stream: bool
    ) -> list[_Job]:
        """Validate every request, then queue them together (all or none)."""
        for r in requests:
            self.check_request(r)
        with self._scheduler.cond:
            taken = set(self._scheduler.live)
            jobs = []
            for r, d in zip(requests, deliver, strict=True):
                rid = engine_request_id(r.request_id, taken)
                taken.add(rid)
                jobs.append(_Job(r, rid, d, stream, self.device))
            self._scheduler.submit(jobs)  # re-entrant: the condition's lock is an RLock
        return jobs

    def _result(self, job: _Job, stopped: bool) -> GenerationResult:
        return GenerationResult(
            list(job.tokens), "stop" if stopped else "length", job.request.request_id or job.id
        )

    def abort(self, request_id: str) -> None:
        with self._scheduler.cond:
            job = self._scheduler.live.get(request_id)
        if job is not None:
            self._abort(job)

    def _abort(self, job: _Job) -> None:
        self._scheduler.settle(job, ("error", RequestAbortedError(f"request {job.id} was aborted")))

    def running(self) -> list[str]:
        with self._scheduler.cond:
            return list(self._scheduler.live)

    # -------------------------------------------------------------- decoding
    def _tensors(self, requests: Sequence[GenerationRequest]):
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            mask[i, : len(r.prompt_ids)] = 1
        p_ids = p_mask = None
        if requests[0].passages is not None:
            k, l_max = self.num_passages, self.max_passage_tokens
            p_ids = torch.zeros(len(requests), k, l_max, dtype=torch.long)
            p_mask = torch.zeros_like(p_ids)
            for i, r in enumerate(requests):
                for j, p in enumerate(r.passages or ()):
                    p_ids[i, j, : len(p)] = torch.tensor(p, dtype=torch.long)
                    p_mask[i, j, : len(p)] = 1
            p_ids, p_mask = p_ids.to(self.device), p_mask.to(self.device)
        return ids.to(self.device), mask.to(self.device), p_ids, p_mask

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Decode one batch on the worker thread, delivering tokens and results."""
        settle = self._scheduler.settle
        rows = [j for j in jobs if not j.done]  # the batch's rows, in generate_steps' order
        if not rows:
            return
        with self._model_lock:
            stops = set(self._stops)
            ids, mask, p_ids, p_mask = self._tensors([j.request for j in rows])

            def keep_rows() -> torch.Tensor | None:
                # before each step: settled rows (stopped, budget spent, aborted) leave the batch
                nonlocal rows
                keep = [i for i, j in enumerate(rows) if not j.done]
                if len(keep) == len(rows):
                    return None
                rows = [rows[i] for i in keep]
                return torch.tensor(keep, dtype=torch.long)

            def sampler(logits: torch.Tensor) -> torch.Tensor:
                token = logits.argmax(dim=-1)  # greedy rows
                for i, job in enumerate(rows):
                    s = job.request.sampling
                    if not s.greedy:  # the row's own generator: draws independent of the batch
                        token[i] = select_next(
                            logits[i : i + 1],
                            do_sample=True,
                            temperature=s.temperature,
                            top_k=s.top_k,
                            top_p=s.top_p,
                            generator=job.generator,
                        )[0]
                return token

            steps = generate_steps(
                self.model,
                ids,
                mask,
                p_ids,
                p_mask,
                max_new_tokens=max(j.request.sampling.max_new_tokens for j in rows),
                eos_token_id=None,  # stops are per row here, with several stop ids
                pad_token_id=self._pad,
                sampler=sampler,
                keep_rows=keep_rows,
            )
            try:
                for token in steps:
                    self.decode_steps += 1
                    for job, t in zip(rows, token.tolist(), strict=True):
                        if job.done:
                            continue
                        if t in stops:
                            settle(job, ("done", self._result(job, stopped=True)))
                            continue
                        job.tokens.append(t)
                        if job.stream:
                            try:
                                job.deliver(("tokens", [t]))
                            except RuntimeError:  # the caller's loop is closed
                                self._abort(job)
                                continue
                        if len(job.tokens) >= job.request.sampling.max_new_tokens:
                            settle(job, ("done", self._result(job, stopped=False)))
                    if all(j.done for j in rows):
                        break
            finally:
                steps.close()
            for job in rows:  # defensive: decoding ended before a row's budget
                settle(job, ("done", self._result(job, stopped=False)))

    # -------------------------------------------------------------- synchronous API
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        outs: list[queue.Queue] = [queue.Queue() for _ in requests]
        jobs = self._jobs(requests, [q.put for q in outs], stream=False)
        results = []
        try:
            for q in outs:
                kind, payload = q.get()
                if kind == "error":
                    raise payload
                results.append(payload)
        finally:
            for job in jobs:  # after an error: the others stop too
                if not job.done:
                    self._abort(job)
        return results

    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        out: queue.Queue = queue.Queue()
        (job,) = self._jobs([request], [out.put], stream=True)  # errors raise here, not mid-stream
        return self._consume(job, out)

    def _consume(self, job: _Job, out: queue.Queue) -> Iterator[list[int]]:
        try:
            while True:
                kind, payload = out.get()
                if kind == "tokens":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            if not job.done:  # closed early: stop decoding it
                self._abort(job)

    # -------------------------------------------------------------- asyncio API
    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        (job,) = self._jobs([request], [loop_deliver(loop, out)], stream=False)
        try:
            kind, payload = await out.get()
        finally:
            if not job.done:  # cancelled while waiting
                self._abort(job)
        if kind == "error":
            raise payload
        return payload

    async def astream(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        (job,) = self._jobs([request], [loop_deliver(loop, out)], stream=True)
        try:
            while True:
                kind, payload = await out.get()
                if kind == "tokens":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            if not job.done:  # aclose(), garbage collection or cancellation
                self._abort(job)

    # -------------------------------------------------------------- lifecycle
    def reload(self, checkpoint_dir: str) -> str:
        """Swap weights between batches: a running batch finishes on the old weights."""
        with self._model_lock:
            self._load(checkpoint_dir)
        return self._hash

    def check_health(self) -> None:
        if self._scheduler.closed:
            raise EngineError("torch engine: closed")
        if not self._worker.is_alive():
            raise EngineError("torch engine: the scheduler thread is dead")

    def close(self) -> None:
        """Fail queued and running requests (RequestAbortedError) and stop the worker
        thread (idempotent)."""
        self._finalizer()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=30)
