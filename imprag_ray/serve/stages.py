"""The two inference stages as Serve replica classes (DESIGN §1 "Inference", §2).

``RetrievalStage``: stage 1 only — embeddings + layers 0..b of the checkpoint, the
tokenizer, the FAISS index (single or in parts, through
:func:`imprag_ray.index.parts.load_index`; refused unless its manifest names the
checkpoint; ``search.nprobe`` / ``search.ef_search`` override the manifest's search
settings) and the corpus texts the index ids point into. Requests are batched dynamically
(``@serve.batch``): one bottom-layer forward and one FAISS search per batch and version; a
request that fails inside a batch fails alone (the batch is re-run request by request).

``GenerationStage``: the full model inside a generation engine (``torch`` or ``vllm``,
:func:`imprag_ray.engine.build_engine`) through its asyncio API (``agenerate`` /
``astream``): every request is one task in the replica's event loop, the engine batches
concurrent requests itself (continuous batching in vLLM, step batching in the torch
engine), no thread is held per request or per token. Serve cancels the replica task when
the caller goes away (client disconnect, ingress cancel); the cancellation reaches the
engine call, which aborts the engine request. The payload's ``request_id`` is the engine
request id and tags every log line.

Both hold loaded versions in a :class:`VersionCache` and answer with the hash they used.
Both export their queue depth (requests in the replica) and the retrieval stage its batch
latency; generated tokens and time to first token are recorded by the ingress, which sees
them reach the client. Both fail ``check_health`` when their version-sync thread or their
engine is dead. The deployments' options (replicas, resources, batching) are applied in
:mod:`imprag_ray.serve.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from imprag_ray.config.loader import from_dict
from imprag_ray.config.serve_schema import BatchingSection, ServeJobConfig
from imprag_ray.serve.control import ReplicaSync, initial_version, replica_name
from imprag_ray.serve.metrics import metrics
from imprag_ray.serve.versions import Version, VersionCache, VersionMismatchError

log = logging.getLogger("ray.serve")


def _setup_threads(cfg: ServeJobConfig) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)


def _device() -> str:
    """The bottom layers go to the replica's GPU when it was given one (ray_actor_options)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _set_batching(method: Any, batching: BatchingSection) -> None:
    method.set_max_batch_size(batching.max_batch_size)
    method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)


def request_id(request: dict) -> str:
    """The ingress's id of a stage payload (a fresh one for callers that send none)."""
    return str(request.get("request_id") or f"stage-{uuid.uuid4().hex[:16]}")


def _error(what: str, err: BaseException) -> dict:
    """A per-request stage error: the ingress turns it into an HTTP error; ``error_type``
    tells a bad request (``EngineError``) from a server fault."""
    return {"error": f"{what} failed: {err}", "error_type": type(err).__name__}


def per_version(
    requests: list[dict],
    load: Callable[[Version], Any],
    run: Callable[[Any, list[dict]], list[dict]],
    what: str,
) -> list[dict]:
    """Run a replica batch version by version (hot swap: a batch may mix versions).

    ``load(version)`` gives that version's state (a failure fails that version's
    requests); ``run(state, requests)`` returns one dict per request. When ``run`` raises
    on a group, each of its requests is re-run alone, so a bad request fails only itself.
    """
    groups: dict[str, list[int]] = {}
    out: list[dict | None] = [None] * len(requests)
    versions: dict[str, Version] = {}
    for i, r in enumerate(requests):
        try:
            version = Version.from_dict(r["version"])
        except Exception as err:  # a malformed payload fails alone
            out[i] = _error(what, err)
            continue
        versions[version.hash] = version
        groups.setdefault(version.hash, []).append(i)
    for digest, members in groups.items():
        try:
            state = load(versions[digest])
        except Exception as err:  # the version does not load: its requests fail, the rest live
            log.error("%s: version %s failed to load: %s", what, digest[:12], err)
            for i in members:
                out[i] = _error(what, err)
            continue
        try:
            results = run(state, [requests[i] for i in members])
        except Exception:
            results = []
            for i in members:  # find the culprit(s): one request at a time
                try:
                    results.extend(run(state, [requests[i]]))
                except Exception as err:
                    log.warning("[%s] %s failed: %s", request_id(requests[i]), what, err)
                    results.append(_error(what, err))
        for i, res in zip(members, results, strict=True):
            out[i] = res
    return [r if r is not None else _error(what, RuntimeError("no result")) for r in out]


class _Inflight:
    """Requests in a stage replica (waiting for a batch, loading, or being generated),
    exported as the ``imprag_queue_depth{stage}`` gauge."""

    def __init__(self, stage: str):
        self.stage = stage
        self.ids: dict[str, float] = {}  # request id -> arrival (monotonic)
        self._n = 0

    @contextlib.contextmanager
    def track(self, rid: str) -> Iterator[None]:
        key = rid if rid not in self.ids else f"{rid}#{uuid.uuid4().hex[:6]}"
        self.ids[key] = time.monotonic()
        self._publish()
        try:
            yield
        finally:
            self.ids.pop(key, None)
            self._publish()

    def __len__(self) -> int:
        return len(self.ids)

    def _publish(self) -> None:
        try:
            metrics().queue_depth(self.stage, len(self.ids))
        except Exception as err:  # metrics must never fail a request
            log.debug("queue depth not recorded: %s", err)


@dataclass
class RetrievalState:
    model: Any  # ImpRAGModel with layers 0..b only
    tokenizer: Any
    index: Any  # PassageIndex
    version: Version


def load_retrieval_state(cfg: ServeJobConfig, version: Version, corpus: dict) -> RetrievalState:
    """What a retrieval replica holds for one version: bottom layers, tokenizer, index."""
    from imprag_ray.index.parts import load_index
    from imprag_ray.index.store import check_corpus
    from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
    from imprag_ray.serve.versions import check_expectation, load_bottom_model

    if checkpoint_hash(version.checkpoint) != version.hash:
        raise VersionMismatchError(f"{version.checkpoint} changed on disk since version {version.hash[:12]}")
    check_expectation(version.checkpoint, cfg.model)
    # the corpus must be the one the index was built from (its ids name these passages)
    check_corpus(version.index, cfg.corpus)
    model = load_bottom_model(version.checkpoint, cfg.model.dtype).to(_device())
    index = load_index(
        version.index,
        checkpoint_hash=version.hash,
        retrieval_layer=model.b,
        post_rope=model.imprag_config.post_rope,
        nprobe=cfg.search.nprobe,
        ef_search=cfg.search.ef_search,
    )
    unknown = [pid for pid in index.ids[:1000] if pid not in corpus]
    if unknown:
        raise VersionMismatchError(
            f"index {version.index} names passages missing from corpus {cfg.corpus} "
            f"(e.g. {unknown[0]!r}); serve the corpus the index was built from"
        )
    return RetrievalState(model, load_tokenizer(version.checkpoint), index, version)


def search_passages(state: RetrievalState, corpus: dict, requests: list[dict]) -> list[dict]:
    """One bottom-layer forward and one FAISS search for a batch of {prompt_ids, top_k}
    requests -> per request {hash, passages: [{id, title, score, token_ids}]}."""
    import torch

    from imprag_ray.data.templates import format_passage

    model = state.model
    width = max(len(r["prompt_ids"]) for r in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)  # [B, L]
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, : len(r["prompt_ids"])] = torch.tensor(r["prompt_ids"])
        mask[i, : len(r["prompt_ids"])] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        query = model.encode_prompt(ids.to(device), mask.to(device)).query_embedding  # [B, h_kv * d_h]
    depth = max(r["top_k"] for r in requests)
    found, scores = state.index.search(query.float().cpu().numpy(), depth)
    results = []
    for i, r in enumerate(requests):
        passages = []
        for pid, score in zip(found[i][: r["top_k"]], scores[i].tolist(), strict=False):
            p = corpus[pid]
            tokens = state.tokenizer(format_passage(p), add_special_tokens=False)["input_ids"][: model.l_max]
            passages.append({"id": pid, "title": p.title, "score": float(score), "token_ids": tokens})
        results.append({"hash": state.version.hash, "passages": passages})
    return results


class RetrievalStage:
    """Prompt token ids -> top-k passages (id, title, score, token ids) of one version."""

    def __init__(self, cfg: dict, control):
        from imprag_ray.data.readers import iter_corpus

        self.cfg = from_dict(ServeJobConfig, cfg)
        _setup_threads(self.cfg)
        self.corpus = {p.id: p for p in iter_corpus(self.cfg.corpus)}
        self.cache = VersionCache(self._load)
        self.cache.get(initial_version(control, self.cfg))
        _set_batching(self._retrieve_batch, self.cfg.deployments.retrieval.batching)
        self.inflight = _Inflight("retrieval")
        self.sync = ReplicaSync(
            control,
            "retrieval",
            self.cache,
            self.cfg.reload.poll_interval_s,
            extra=lambda: {"inflight": len(self.inflight)},
        )

    def _load(self, version: Version) -> RetrievalState:
        return load_retrieval_state(self.cfg, version, self.corpus)

    async def retrieve(self, request: dict) -> dict:
        """One request {version, prompt_ids, top_k, request_id}, batched with concurrent ones."""
        with self.inflight.track(request_id(request)):
            return await self._retrieve_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _retrieve_batch(self, requests: list[dict]) -> list[dict]:
        # One thread per batch (not per request): the forward and the search block.
        return await asyncio.to_thread(self._retrieve, requests)

    def _retrieve(self, requests: list[dict]) -> list[dict]:
        return per_version(requests, self.cache.get, self._search, "retrieval")

    def _search(self, state: RetrievalState, requests: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        results = search_passages(state, self.corpus, requests)
        metrics().retrieval_latency(time.perf_counter() - t0)
        return results

    def check_health(self) -> None:
        """Serve's health probe: a replica whose version sync died is restarted."""
        if not self.sync.alive():
            raise RuntimeError("retrieval: the version sync thread is dead")

    async def info(self) -> dict:
        return {
            "stage": "retrieval",
            "replica": replica_name(),
            "pid": os.getpid(),
            "held": self.cache.held(),
            "inflight": len(self.inflight),
            "load_errors": self.sync.errors(),
        }


def engine_options(cfg: ServeJobConfig) -> dict[str, Any]:
    """``engine.options`` plus what the job implies: the torch engine's dtype, and for vLLM
    the request budget (``limits``) that sizes its ``max_model_len`` (options win)."""
    options = dict(cfg.engine.options)
    if cfg.engine.kind == "torch":
        options.setdefault("dtype", cfg.model.dtype)
    else:
        options.setdefault("max_prompt_tokens", cfg.limits.max_prompt_tokens)
        options.setdefault("max_new_tokens", cfg.limits.max_tokens)
    return options


class GenerationStage:
    """Prompt ids + passage ids -> generated ids, with the engine of the request's version.

    No ``@serve.batch`` here: each request awaits the engine's ``agenerate`` / ``astream``
    and the engine batches whatever is in flight, so cancelling one request (Serve cancels
    its task when the caller is gone) aborts that request alone.
    """

    def __init__(self, cfg: dict, control):
        self.cfg = from_dict(ServeJobConfig, cfg)
        _setup_threads(self.cfg)
        self.cache = VersionCache(self._load, on_drop=lambda engine: engine.close())
        self.cache.get(initial_version(control, self.cfg))
        self.inflight = _Inflight("generation")
        self.sync = ReplicaSync(
            control,
            "generation",
            self.cache,
            self.cfg.reload.poll_interval_s,
            extra=lambda: {"inflight": len(self.inflight), "running": self._running()},
        )

    def _load(self, version: Version):
        from imprag_ray.engine import build_engine
        from imprag_ray.serve.versions import check_expectation

        check_expectation(version.checkpoint, self.cfg.model)
        engine = build_engine(self.cfg.engine.kind, version.checkpoint, **engine_options(self.cfg))
        if engine.checkpoint_hash != version.hash:
            engine.close()
            raise VersionMismatchError(
                f"{version.checkpoint} changed on disk since version {version.hash[:12]}"
            )
        return engine

    @staticmethod
    def _request(r: dict, rid: str):
        from imprag_ray.engine import GenerationRequest, Sampling

        s = r["sampling"]
        sampling = Sampling(
            max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"]
        )
        passages = None if r["passages"] is None else tuple(tuple(p) for p in r["passages"])
        return GenerationRequest(tuple(r["prompt_ids"]), passages, sampling, rid)

    async def _engine(self, request: dict):
        """The engine of the request's version; a version not held yet (a replica started
        mid-swap) loads on demand in a thread, so the event loop keeps serving."""
        version = Version.from_dict(request["version"])
        engine = self.cache.peek(version.hash)
        if engine is None:
            engine = await asyncio.to_thread(self.cache.get, version)
        return engine

    async def generate(self, request: dict) -> dict:
        """{version, prompt_ids, passages, sampling, request_id} -> {hash, token_ids,
        finish_reason, request_id}, or {error, error_type} for this request alone."""
        rid = request_id(request)
        with self.inflight.track(rid):
            try:
                engine = await self._engine(request)
                result = await engine.agenerate(self._request(request, rid))
            except asyncio.CancelledError:
                # The caller is gone; the cancelled agenerate has aborted the engine request.
                log.info("[%s] generation cancelled by the caller", rid)
                raise
            except Exception as err:
                log.warning("[%s] generation failed: %s: %s", rid, type(err).__name__, err)
                return {**_error("generation", err), "request_id": rid}
            return {
                "hash": engine.checkpoint_hash,
                "token_ids": list(result.token_ids),
                "finish_reason": result.finish_reason,
                "request_id": rid,
            }

    async def stream(self, request: dict):
        """Yields {"hash", "token_ids"} chunks as tokens are decoded. Errors are raised (the
        ingress reports them in-band); closing or cancelling the stream aborts the request."""
        rid = request_id(request)
        with self.inflight.track(rid):
            engine = await self._engine(request)
            steps = engine.astream(self._request(request, rid))
            count = 0
            try:
                async for chunk in steps:
                    count += len(chunk)
                    yield {"hash": engine.checkpoint_hash, "token_ids": list(chunk)}
            except asyncio.CancelledError:
                log.info("[%s] stream cancelled by the caller after %d tokens", rid, count)
                raise
            except GeneratorExit:
                log.info("[%s] stream closed by the caller after %d tokens", rid, count)
                raise
            except Exception as err:
                log.warning("[%s] stream failed after %d tokens: %s: %s", rid, count, type(err).__name__, err)
                raise
            finally:
                await steps.aclose()  # a no-op when done; else aborts the engine request

    def _engines(self) -> dict[str, Any]:
        return {h: e for h in self.cache.held() if (e := self.cache.peek(h)) is not None}

    def _running(self) -> list[str]:
        """Engine ids of the requests the held engines still step (queued or decoding)."""
        ids: list[str] = []
        for engine in self._engines().values():
            with contextlib.suppress(Exception):  # a closing engine: nothing to report
                ids.extend(engine.running())
        return ids

    def check_health(self) -> None:
        """Serve's health probe: a replica whose version sync died, or whose engine closed
        or lost its worker, is restarted."""
        if not self.sync.alive():
            raise RuntimeError("generation: the version sync thread is dead")
        for digest, engine in self._engines().items():
            try:
                engine.check_health()
            except Exception as err:
                raise RuntimeError(f"generation: the engine of version {digest[:12]}: {err}") from err

    async def info(self) -> dict:
        engines = self._engines()
        stats = {
            h[:12]: {
                "kind": e.kind,
                "cached_prompt_tokens": getattr(e, "cached_prompt_tokens", None),
                "running": list(e.running()),
            }
            for h, e in engines.items()
        }
        return {
            "stage": "generation",
            "replica": replica_name(),
            "pid": os.getpid(),
            "held": self.cache.held(),
            "inflight": sorted(self.inflight.ids),
            "running": self._running(),
            "engines": stats,
            "load_errors": self.sync.errors(),
        }
