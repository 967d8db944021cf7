"""The two inference stages as Serve replica classes (DESIGN §1 "Inference", §2).

``RetrievalStage``: stage 1 only — embeddings + layers 0..b of the checkpoint, the
tokenizer, the FAISS index (single or in parts, through
:func:`imprag_ray.index.parts.load_index`; refused unless its manifest names the
checkpoint; ``search.nprobe`` / ``search.ef_search`` override the manifest's search
settings) and the corpus texts the index ids point into. Requests are batched dynamically
(``@serve.batch``): one bottom-layer forward and one FAISS search per batch and version.

``GenerationStage``: the full model inside a generation engine (``torch`` or ``vllm``,
:func:`imprag_ray.engine.build_engine`), batched the same way; streaming yields tokens.

Both hold loaded versions in a :class:`VersionCache` and answer with the hash they used.
The deployments' options (replicas, resources, batching) are applied in
:mod:`imprag_ray.serve.app`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from ray import serve

from imprag_ray.config.loader import from_dict
from imprag_ray.config.serve_schema import BatchingSection, ServeJobConfig
from imprag_ray.serve.control import ReplicaSync, initial_version, replica_name
from imprag_ray.serve.versions import Version, VersionCache, VersionMismatchError


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


def per_version(requests: list[dict], run, what: str) -> list[dict]:
    """Run a replica batch version by version (hot swap: a batch may mix versions).

    ``run(version, requests_of_that_version)`` returns one dict per request; an error is
    returned per request of that version, so the batch's other requests still succeed.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r["version"]["hash"], []).append(i)
    out: list[dict] = [{} for _ in requests]
    for members in groups.values():
        version = Version.from_dict(requests[members[0]]["version"])
        try:
            results = run(version, [requests[i] for i in members])
        except Exception as err:  # returned per request, the batch's others live
            results = [{"error": f"{what} failed: {err}"} for _ in members]
        for i, res in zip(members, results, strict=True):
            out[i] = res
    return out


@dataclass
class RetrievalState:
    model: Any  # ImpRAGModel with layers 0..b only
    tokenizer: Any
    index: Any  # PassageIndex
    version: Version


def load_retrieval_state(cfg: ServeJobConfig, version: Version, corpus: dict) -> RetrievalState:
    """What a retrieval replica holds for one version: bottom layers, tokenizer, index."""
    from imprag_ray.index.parts import load_index
    from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
    from imprag_ray.serve.versions import check_expectation, load_bottom_model

    if checkpoint_hash(version.checkpoint) != version.hash:
        raise VersionMismatchError(f"{version.checkpoint} changed on disk since version {version.hash[:12]}")
    check_expectation(version.checkpoint, cfg.model)
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
        _set_batching(self.retrieve, self.cfg.deployments.retrieval.batching)
        self.sync = ReplicaSync(control, "retrieval", self.cache, self.cfg.reload.poll_interval_s)

    def _load(self, version: Version) -> RetrievalState:
        return load_retrieval_state(self.cfg, version, self.corpus)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def retrieve(self, requests: list[dict]) -> list[dict]:
        """Batched: each request is {version, prompt_ids, top_k}."""
        return await asyncio.to_thread(self._retrieve, requests)

    def _retrieve(self, requests: list[dict]) -> list[dict]:
        return per_version(
            requests, lambda version, reqs: self._search(self.cache.get(version), reqs), "retrieval"
        )

    def _search(self, state: RetrievalState, requests: list[dict]) -> list[dict]:
        return search_passages(state, self.corpus, requests)

    async def info(self) -> dict:
        return {
            "stage": "retrieval",
            "replica": replica_name(),
            "pid": os.getpid(),
            "held": self.cache.held(),
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
    """Prompt ids + passage ids -> generated ids, with the engine of the request's version."""

    def __init__(self, cfg: dict, control):
        self.cfg = from_dict(ServeJobConfig, cfg)
        _setup_threads(self.cfg)
        self.cache = VersionCache(self._load, on_drop=lambda engine: engine.close())
        self.cache.get(initial_version(control, self.cfg))
        _set_batching(self.generate, self.cfg.deployments.generation.batching)
        self.sync = ReplicaSync(control, "generation", self.cache, self.cfg.reload.poll_interval_s)

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
    def _request(r: dict):
        from imprag_ray.engine import GenerationRequest, Sampling

        s = r["sampling"]
        sampling = Sampling(
            max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"]
        )
        passages = None if r["passages"] is None else tuple(tuple(p) for p in r["passages"])
        return GenerationRequest(tuple(r["prompt_ids"]), passages, sampling, r.get("request_id", ""))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[dict]) -> list[dict]:
        """Batched: each request is {version, prompt_ids, passages, sampling, request_id}."""
        return await asyncio.to_thread(self._generate, requests)

    def _generate(self, requests: list[dict]) -> list[dict]:
        def run(version: Version, reqs: list[dict]) -> list[dict]:
            engine = self.cache.get(version)
            return [
                {"hash": engine.checkpoint_hash, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
                for g in engine.generate([self._request(r) for r in reqs])
            ]

        return per_version(requests, run, "generation")

    async def stream(self, request: dict):
        """Yields {"hash", "token_ids"} chunks as tokens are decoded."""
        version = Version.from_dict(request["version"])
        engine = await asyncio.to_thread(self.cache.get, version)
        steps = engine.stream(self._request(request))
        try:
            while True:
                chunk = await asyncio.to_thread(next, steps, None)
                if chunk is None:
                    return
                yield {"hash": engine.checkpoint_hash, "token_ids": list(chunk)}
        finally:
            await asyncio.to_thread(steps.close)

    async def info(self) -> dict:
        engines = {h: self.cache.peek(h) for h in self.cache.held()}
        stats = {
            h[:12]: {"kind": e.kind, "cached_prompt_tokens": getattr(e, "cached_prompt_tokens", None)}
            for h, e in engines.items()
            if e is not None
        }
        return {
            "stage": "generation",
            "replica": replica_name(),
            "pid": os.getpid(),
            "held": self.cache.held(),
            "engines": stats,
        }
