"""The engine interface shared by the torch reference engine and the vLLM engine.

A request carries token ids only (tokenisation happens in the caller, which also owns
the template): the prompt (``<s>`` + prompt tokens) and the retrieved passages, each
already truncated to the checkpoint's ``max_passage_tokens``. ``passages=None`` means
closed book (the base LLM: prompt at positions 0..L-1); a tuple (possibly shorter than
k, possibly with empty passages) means the prompt sits after a region of
``k * l_max`` position slots, the first ``sum(len(p))`` of them holding the passages
packed in order (DESIGN §1).

Two ways to call an engine:

* synchronous, for batch pipelines and tests: ``generate(requests)`` and ``stream(request)``;
* asyncio-native, for the Serve generation stage: ``agenerate(request)`` and
  ``astream(request)`` run in the caller's event loop without a thread per request; the
  engine batches concurrent requests itself. Cancelling an ``agenerate`` task or closing an
  ``astream`` early aborts the request (the engine stops stepping it); ``abort(id)`` does
  the same from anywhere, ``running()`` lists the requests still queued or being stepped.

A request that fails validation (``check_request``) raises :class:`EngineError` from its
own call only; requests batched with it are unaffected.
"""

from __future__ import annotations

import abc
import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ENGINE_KINDS = ("torch", "vllm")
# Sampling seeds: non-negative and within a signed 64-bit integer (torch.Generator.manual_seed
# and vLLM's per-request generators take no more).
MAX_SEED = 2**63 - 1


class EngineError(ValueError):
    """A request the engine cannot serve (too many passages, passage too long, ...)."""


class RequestAbortedError(EngineError):
    """The request was aborted (``abort(request_id)``) or the engine closed before it finished."""


def check_seed(seed: object) -> None:
    """Raise EngineError unless ``seed`` is None or an int in [0, MAX_SEED]."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EngineError(f"seed must be an integer or None, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise EngineError(f"seed must be in [0, 2**63 - 1], got {seed}")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise EngineError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    passages: tuple[tuple[int, ...], ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise EngineError("prompt_ids must not be empty")


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens, the stop id excluded
    finish_reason: Literal["stop", "length"]  # "stop": a stop id (any eos id) was generated
    request_id: str = ""


class GenerationEngine(abc.ABC):
    """Stage-2 generation over one checkpoint. Subclasses: ``TorchEngine``, ``VLLMEngine``."""

    kind: str = ""

    @property
    @abc.abstractmethod
    def checkpoint_hash(self) -> str:
        """:func:`imprag_ray.model.checkpoint.checkpoint_hash` of the weights now served."""

    @property
    @abc.abstractmethod
    def num_passages(self) -> int:
        """k: the number of passage slots of the checkpoint."""

    @property
    @abc.abstractmethod
    def max_passage_tokens(self) -> int:
        """l_max."""

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    def stop_token_ids(self) -> list[int]:
        """Every id that ends generation (the stop id is not part of the result)."""
        return [] if self.eos_token_id is None else [self.eos_token_id]

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a batch of requests, results in request order. Raises EngineError
        before generating anything when any request is invalid."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        """Yield new token ids as they are decoded (EOS excluded); ends when done. Closing
        the iterator early aborts the request."""

    @abc.abstractmethod
    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        """Generate for one request in the caller's event loop; concurrent calls are batched
        by the engine. Cancelling the awaiting task aborts the request. Raises EngineError
        (this request only) when it is invalid, RequestAbortedError when it was aborted."""

    @abc.abstractmethod
    def astream(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        """An async generator in the caller's event loop yielding new token ids as they are
        decoded (stop id excluded). No thread is held per stream. Closing it early
        (``aclose()``, ``break`` then garbage collection, or cancellation of the consuming
        task) aborts the request. Errors as :meth:`agenerate`, raised from iteration."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop generating for the live request with this engine id (see :meth:`running`);
        its caller gets RequestAbortedError. Unknown or finished ids are ignored."""

    @abc.abstractmethod
    def running(self) -> list[str]:
        """Engine ids of the requests queued or being stepped: the request's ``request_id``,
        an assigned unique id when it was empty, or ``<request_id>#<n>`` when a live request
        already had that id."""

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise (EngineError) when the engine cannot serve: closed, or its worker thread /
        event loop is gone. Serve's health probe of a generation replica calls it."""

    @abc.abstractmethod
    def reload(self, checkpoint_dir: str) -> str:
        """Load new weights from a checkpoint directory of the same architecture without
        restarting; returns the new checkpoint hash."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes / memory."""

    def check_request(self, request: GenerationRequest) -> None:
        # Sampling validates the seed too; checked again here because the engine must not
        # fail a whole batch on a request that bypassed the dataclass check.
        check_seed(request.sampling.seed)
        if request.passages is None:
            return
        if len(request.passages) > self.num_passages:
            raise EngineError(
                f"{len(request.passages)} passages > the checkpoint's num_passages={self.num_passages}"
            )
        for i, p in enumerate(request.passages):
            if len(p) > self.max_passage_tokens:
                raise EngineError(
                    f"passage {i} has {len(p)} tokens > max_passage_tokens={self.max_passage_tokens}"
                )


def engine_request_id(wanted: str, live: Collection[str]) -> str:
    """The engine id of a new request: ``wanted``, a fresh unique id when it is empty, or
    ``wanted#<n>`` when a live request already uses ``wanted`` (so two live requests with
    the same id never share results or aborts)."""
    if not wanted:
        return f"req-{uuid.uuid4().hex}"
    rid, n = wanted, 1
    while rid in live:
        rid, n = f"{wanted}#{n}", n + 1
    return rid


def checkpoint_stop_ids(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The stop ids of a checkpoint: every eos id of generation_config.json (else
    config.json) plus the eos of its tokenizer, when it has one saved next to it
    (:func:`imprag_ray.model.checkpoint.stop_token_ids`)."""
    from imprag_ray.model.checkpoint import load_tokenizer, stop_token_ids

    path = Path(checkpoint_dir)
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = load_tokenizer(path)
    return stop_token_ids(path, tokenizer)


def cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> tuple[list[int], bool]:
    """``tokens`` up to (not including) the first stop id, and whether one was found."""
    stop_set = set(stops)
    for i, t in enumerate(tokens):
        if t in stop_set:
            return list(tokens[:i]), True
    return list(tokens), False


# What an engine hands a waiting caller: ("tokens", list[int]) while streaming, then exactly
# one of ("done", GenerationResult) or ("error", EngineError).
Item = tuple[str, Any]


def loop_deliver(loop: asyncio.AbstractEventLoop, out: asyncio.Queue) -> Callable[[Item], None]:
    """Deliver items into ``out`` from any thread, in the caller's ``loop`` (RuntimeError
    once that loop is closed): how engine threads feed ``agenerate`` / ``astream``."""

    def deliver(item: Item) -> None:
        loop.call_soon_threadsafe(out.put_nowait, item)

    return deliver


def build_engine(kind: str, checkpoint_dir: str, **options) -> GenerationEngine:
    """``kind`` in ENGINE_KINDS; options go to the engine's constructor."""
    if kind == "torch":
        from imprag_ray.engine.torch_engine import TorchEngine

        return TorchEngine(checkpoint_dir, **options)
    if kind == "vllm":
        from imprag_ray.vllm_plugin.engine import VLLMEngine  # the only vLLM-importing package

        return VLLMEngine(checkpoint_dir, **options)
    raise EngineError(f"engine kind must be one of {ENGINE_KINDS}, got {kind!r}")
