"""``VLLMEngine``: the :class:`~imprag_ray.engine.GenerationEngine` on vLLM (AsyncLLM).

One ``AsyncLLM`` runs on a private event-loop thread; ``generate`` and ``stream`` may
be called from any number of threads at once, ``agenerate`` and ``astream`` from any
event loop (tokens reach the caller's loop through ``call_soon_threadsafe``, no thread per
request), and all their requests meet in vLLM's continuous batching. Cancelling a call
(or closing its stream) aborts its request in vLLM. Requests are laid out as in
:mod:`imprag_ray.vllm_plugin.layout` and run by the out-of-tree
``ImpRAGLlamaForCausalLM``; greedy tokens equal the torch reference engine's in fp32. ``reload`` swaps weights in the running engine.

Sizes the engine from the job, not from the checkpoint's context length (131072 for
Llama-3.x, whose KV cache alone would need GiBs per sequence):

* ``max_model_len`` = k * l_max + ``max_prompt_tokens`` + ``max_new_tokens`` (the request
  budget the job passes: batch ``data.max_prompt_tokens`` + ``max_new_tokens``, serve
  ``limits``), capped by the model's ``max_position_embeddings``;
* ``max_num_batched_tokens`` = a whole request per step (max_model_len, at most 8192) and
  at least ``max_num_seqs`` (vLLM 0.32's rule with chunked prefill, which is always on);
* the KV cache: ``kv_cache_gib`` when given; on CPU else ``VLLM_CPU_KVCACHE_SPACE`` (vLLM
  reads it) or room for ``max_num_seqs`` full sequences within a quarter of the memory
  available now; on GPU vLLM's ``gpu_memory_utilization``.

Generation stops at any of the checkpoint's stop ids (every eos id of
generation_config.json, as Llama-3 instruct lists three). PAD slots of the passage region
are marked in the token ids themselves (:mod:`.layout`), so no pad token id is needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from imprag_ray.engine.base import (
    EngineError,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Item,
    RequestAbortedError,
    Sampling,
    checkpoint_stop_ids,
    cut_at_stop,
    engine_request_id,
    loop_deliver,
)
from imprag_ray.model.checkpoint import checkpoint_hash
from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME
from imprag_ray.vllm_plugin import ARCHITECTURE, register
from imprag_ray.vllm_plugin.layout import encode_request, region_length

T = TypeVar("T")
GiB = 1 << 30
# Request budget when the caller gives none (the Serve app's default limits).
DEFAULT_MAX_PROMPT_TOKENS = 512
DEFAULT_MAX_NEW_TOKENS = 256
MAX_AUTO_BATCHED_TOKENS = 8192  # prefill chunk cap of the automatic max_num_batched_tokens
CPU_KV_SHARE = 0.25  # at most this share of the memory available now for an automatic CPU KV cache
CPU_BLOCK_SIZE = 128  # vLLM-CPU's default KV block size
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "half": 2, "float": 4}
# config.json keys that must not change across reload (the engine's shapes depend on them)
_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


class _Live:
    """A request between submission and its end: its engine id (also vLLM's request id),
    where its output goes, and its producer task on the engine loop."""

    def __init__(self, rid: str, deliver: Callable[[Item], None]):
        self.id = rid
        self.deliver = deliver
        self.future: concurrent.futures.Future | None = None
        self.aborted = False
        self.ended = False  # its final item was delivered (set under the engine's live lock)


def region_block_size(region: int) -> int:
    """The KV block size for a passage region of ``region`` slots: the largest of 128, 64,
    32, 16 that divides it, so that the prompt starts on a block boundary and the attention
    backend runs vLLM's paged kernel over the prompt keys alone (16 when none divides)."""
    return next((b for b in (128, 64, 32, 16) if region % b == 0), 16)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{path} not found: checkpoint_dir must be an ImpRAG checkpoint directory"
        ) from None


def kv_bytes_per_token(hf_config: dict, dtype: str) -> int:
    """KV-cache bytes one token takes over all layers (K and V, every KV head)."""
    heads = int(hf_config["num_attention_heads"])
    head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    size = DTYPE_BYTES.get(str(dtype).replace("torch.", ""), 4)
    return int(hf_config["num_hidden_layers"]) * 2 * kv_heads * head_dim * size


def derive_max_model_len(
    hf_config: dict, region: int, max_prompt_tokens: int | None, max_new_tokens: int | None
) -> int:
    """Passage region + prompt + generated tokens, capped by the model's context length."""
    want = (
        region + (max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS) + (max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    )
    limit = hf_config.get("max_position_embeddings")
    return min(want, int(limit)) if limit else want


def derive_batched_tokens(given: int | None, max_model_len: int, max_num_seqs: int) -> int:
    """``max_num_batched_tokens``: the given value (checked against vLLM's rule), else one
    whole request per scheduler step, capped at MAX_AUTO_BATCHED_TOKENS."""
    if given is None:
        return max(max_num_seqs, min(max_model_len, MAX_AUTO_BATCHED_TOKENS))
    if given < max_num_seqs:
        raise EngineError(
            f"max_num_batched_tokens={given} < max_num_seqs={max_num_seqs}: vLLM needs room for one "
            "token of every running sequence per step; raise max_num_batched_tokens or lower max_num_seqs"
        )
    return given


def auto_cpu_kv_cache_bytes(per_token: int, max_model_len: int, max_num_seqs: int, available: int) -> int:
    """KV cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens (whole blocks),
    at most CPU_KV_SHARE of ``available`` bytes, at least one full sequence."""
    blocks = -(-max_model_len // CPU_BLOCK_SIZE) + 1  # + 1: a partly filled block
    per_seq = blocks * CPU_BLOCK_SIZE * per_token
    cap = int(available * CPU_KV_SHARE)
    if per_seq > cap:
        raise EngineError(
            f"one sequence of max_model_len={max_model_len} needs {per_seq / GiB:.2f} GiB of KV cache, more "
            f"than {CPU_KV_SHARE:.0%} of the {available / GiB:.1f} GiB of memory available; lower the "
            "request budget (max_prompt_tokens / max_new_tokens, or max_model_len) or set kv_cache_gib"
        )
    return max(per_seq, min(per_seq * max_num_seqs, cap))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _kv_cache_bytes(
    kv_cache_gib: float | None, hf: dict, dtype: str, max_model_len: int, max_num_seqs: int
) -> int | None:
    """``kv_cache_memory_bytes`` for vLLM, or None to let vLLM size it (GPU:
    gpu_memory_utilization; CPU with VLLM_CPU_KVCACHE_SPACE set: that many GiB)."""
    if kv_cache_gib is not None:
        return int(kv_cache_gib * GiB)
    if not _on_cpu() or os.environ.get("VLLM_CPU_KVCACHE_SPACE", ""):
        return None
    import psutil

    per_token = kv_bytes_per_token(hf, dtype)
    return auto_cpu_kv_cache_bytes(per_token, max_model_len, max_num_seqs, psutil.virtual_memory().available)


def _ensure_plugin_visible() -> None:
    """vLLM's spawned processes find the model through the entry point and must be able
    to import imprag_ray; fail early with the fix instead of deep inside vLLM."""
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "imprag_ray.vllm_plugin:register" not in names:
        raise EngineError(
            "the imprag-ray vllm.general_plugins entry point is not installed in this Python "
            "environment; install the project (`make venv`, or `pip install --no-deps .`)"
        )
    root = str(Path(__file__).resolve().parents[2])  # the directory holding imprag_ray/
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in [str(Path(p).resolve()) for p in paths]:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


class VLLMEngine(GenerationEngine):
    """ImpRAG generation on vLLM; exact (fp32 greedy) against :class:`TorchEngine`.

    Args:
        checkpoint_dir: HF-format ImpRAG checkpoint (config.json + imprag_config.json).
        dtype: model and KV-cache dtype.
        max_num_seqs / max_num_batched_tokens: vLLM's scheduler limits (a prompt longer
            than ``max_num_batched_tokens`` is prefilled in chunks); default for the
            latter: see the module docstring.
        enable_prefix_caching: reuse KV of shared prefixes (e.g. the same passages).
        kv_cache_gib: memory reserved for the KV cache (default: sized from the device).
        max_model_len: longest sequence (region + prompt + output); default: k * l_max +
            ``max_prompt_tokens`` + ``max_new_tokens``.
        max_prompt_tokens / max_new_tokens: the request budget (defaults 512 / 256).
        enforce_eager: keep True: the ImpRAG attention backend has no CUDA-graph support.
        plain: run the checkpoint as stock vLLM Llama (its own attention backend) with the
            passages as a plain token prefix (``passages[0] + ... + prompt``): the baseline of
            ``imprag bench engines --compare-plain``, not ImpRAG's reader.
        engine_args: any further ``vllm.AsyncEngineArgs`` field (e.g. gpu_memory_utilization).
    """

    kind = "vllm"

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "float32",
        max_num_seqs: int = 32,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float | None = None,
        max_model_len: int | None = None,
        max_prompt_tokens: int | None = None,
        max_new_tokens: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        plain: bool = False,
        **engine_args: Any,
    ):
        path = Path(checkpoint_dir)
        self.plain = plain
        self._imprag = _read_json(path / IMPRAG_CONFIG_NAME)
        self._hf = _read_json(path / "config.json")
        if self._hf.get("model_type") != "llama":
            raise EngineError(
                f"the vLLM engine supports Llama checkpoints, got model_type={self._hf.get('model_type')!r}"
            )
        self._k = int(self._imprag.get("num_passages", 10))
        self._l_max = int(self._imprag["max_passage_tokens"])
        self._vocab = int(self._hf["vocab_size"])
        self._stops = checkpoint_stop_ids(path)
        self._eos = self._stops[0] if self._stops else None
        self._hash = checkpoint_hash(path)
        _ensure_plugin_visible()
        # The plugin is written against vLLM's V1 model runner; 0.32 picks V2 on CUDA unless told
        # (VLLM_USE_V2_MODEL_RUNNER, read in vllm/config/vllm.py). Spawned workers inherit it.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        register()  # this process too (the entry point covers vLLM's own processes)

        from vllm import AsyncEngineArgs

        if max_model_len is None:
            region = region_length(self._k, self._l_max)
            max_model_len = derive_max_model_len(self._hf, region, max_prompt_tokens, max_new_tokens)
        max_num_batched_tokens = derive_batched_tokens(max_num_batched_tokens, max_model_len, max_num_seqs)
        kv_bytes = None  # vLLM sizes the cache from engine_args' own memory setting, if any
        if kv_cache_gib is not None or not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(
            engine_args
        ):
            kv_bytes = _kv_cache_bytes(kv_cache_gib, self._hf, dtype, max_model_len, max_num_seqs)

        overrides: dict[str, Any] = (
            {}
            if plain
            else {
                "architectures": [ARCHITECTURE],
                "imprag_retrieval_layer": int(self._imprag["retrieval_layer"]),
                "imprag_reader_last_layer": int(self._imprag["reader_last_layer"]),
                "imprag_max_passage_tokens": self._l_max,
                "imprag_num_passages": self._k,
            }
        )
        options: dict[str, Any] = {
            "model": str(path),
            "dtype": dtype,
            "skip_tokenizer_init": True,  # requests are token ids; ids >= V encode the region
            "hf_overrides": overrides,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enable_chunked_prefill": True,
            "enable_prefix_caching": enable_prefix_caching,
            "max_model_len": max_model_len,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "worker_extension_cls": "imprag_ray.vllm_plugin.worker.ImpRAGWorkerExtension",
            "disable_log_stats": True,  # engine_args may set False: then preemptions are counted
        }
        if kv_bytes is not None:
            options["kv_cache_memory_bytes"] = kv_bytes
        if not plain:
            options["block_size"] = region_block_size(region_length(self._k, self._l_max))
        try:
            args = AsyncEngineArgs(**{**options, **engine_args})
        except TypeError as e:  # an unknown engine option
            raise EngineError(f"vLLM engine options: {e}; see vllm.AsyncEngineArgs for valid ones") from None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imprag-vllm-loop", daemon=True)
        self._thread.start()
        self._reload_lock = threading.Lock()
        self._closed = False
        self._accepting = True  # False from the start of close(): new requests are refused
        self._live_lock = threading.Lock()
        self._live: dict[str, _Live] = {}  # submitted and not yet ended, by engine id
        # Summed over finished requests (updated on the loop thread only): prompt tokens
        # served from the prefix cache; preemptions (only with disable_log_stats=False).
        self.cached_prompt_tokens = 0
        self.preemptions = 0
        try:
            self._llm: Any = self._call(self._start(args))
        except BaseException:
            self._stop_loop()
            raise
        self.max_model_len = int(self._llm.model_config.max_model_len)

    async def _start(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise EngineError("the engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -------------------------------------------------------------- properties
    @property
    def checkpoint_hash(self) -> str:
        return self._hash

    @property
    def num_passages(self) -> int:
        return self._k

    @property
    def max_passage_tokens(self) -> int:
        return self._l_max

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stops)

    # -------------------------------------------------------------- generation
    def _prepare(self, request: GenerationRequest, *, delta: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.check_request(request)
        try:
            if self.plain:
                ids = [int(t) for p in request.passages or () for t in p] + list(request.prompt_ids)
            else:
                ids = encode_request(
                    request.prompt_ids,
                    request.passages,
                    vocab_size=self._vocab,
                    num_passages=self._k,
                    max_passage_tokens=self._l_max,
                )
        except ValueError as e:
            raise EngineError(str(e)) from None
        if len(ids) >= self.max_model_len:
            region = len(ids) - len(request.prompt_ids)
            raise EngineError(
                f"prompt_ids: {len(request.prompt_ids)} tokens after a passage region of {region} "
                f"do not fit max_model_len={self.max_model_len}; shorten the prompt or start the engine "
                "with a larger max_prompt_tokens (or max_model_len)"
            )
        s: Sampling = request.sampling
        params = SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            stop_token_ids=list(self._stops),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )
        return {"prompt_token_ids": ids}, params

    def _account(self, out) -> None:
        if out.finished:
            self.cached_prompt_tokens += out.num_cached_tokens or 0
            if out.metrics is not None:
                self.preemptions += out.metrics.num_preemptions

    def _strip(self, tokens: Sequence[int]) -> tuple[list[int], bool]:
        """Tokens before the first stop id (vLLM returns the stop id itself), and whether
        one was generated."""
        return cut_at_stop(tokens, self._stops)

    # Every entry point runs a request as one producer task on the engine's loop
    # (:meth:`_produce`), which hands tokens and the result to the caller through
    # ``deliver`` (an asyncio queue of the caller's loop, or a thread-safe queue).
    # Cancelling the producer is the one way to abort: AsyncLLM.generate aborts the
    # request in vLLM when its consumer is cancelled.
    def _submit(self, request: GenerationRequest, deliver: Callable[[Item], None], *, stream: bool) -> _Live:
        prompt, params = self._prepare(request, delta=stream)  # bad input raises here, for this request only
        with self._live_lock:
            if not self._accepting:
                raise EngineError("the engine is closed")
            live = _Live(engine_request_id(request.request_id, self._live), deliver)
            self._live[live.id] = live
        future = asyncio.run_coroutine_threadsafe(
            self._produce(live, request, prompt, params, stream), self._loop
        )
        # Cancelling the future ends the request for its caller at once (running() drops it;
        # vLLM's abort follows on the loop), also when its task never ran _produce.
        future.add_done_callback(lambda f: self._end(live, ("error", self._aborted(live))))
        with self._live_lock:
            live.future = future
            aborted = live.aborted
        if aborted:  # abort(id) came before the producer was scheduled
            future.cancel()
        return live

    def _aborted(self, live: _Live) -> RequestAbortedError:
        why = "the engine was closed" if not self._accepting else "was aborted"
        return RequestAbortedError(f"request {live.id} {why}")

    def _end(self, live: _Live, item: Item) -> None:
        """Forget the request (gone from running() before its caller hears the end) and
        hand the caller its final item, once."""
        with self._live_lock:
            if live.ended:
                return
            live.ended = True
            self._live.pop(live.id, None)
        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
            live.deliver(item)

    async def _produce(self, live: _Live, request: GenerationRequest, prompt: dict, params, stream: bool):
        tokens: list[int] = []
        stopped = False
        item: Item = ("error", EngineError(f"request {live.id}: generation ended without a result"))
        try:
            async for out in self._llm.generate(prompt, params, live.id):
                self._account(out)
                if stopped:
                    continue
                row, stopped = self._strip(out.outputs[0].token_ids)  # the full output or a delta
                tokens.extend(row)
                if stream and row:
                    live.deliver(("tokens", row))
            result = GenerationResult(tokens, "stop" if stopped else "length", request.request_id or live.id)
            item = ("done", result)
        except asyncio.CancelledError:
            item = ("error", self._aborted(live))
            raise
        except Exception as e:
            item = ("error", EngineError(f"request {live.id}: generation failed: {e!r}"))
        finally:
            self._end(live, item)

    def abort(self, request_id: str) -> None:
        with self._live_lock:
            live = self._live.get(request_id)
        if live is not None:
            self._cancel(live)

    def running(self) -> list[str]:
        with self._live_lock:
            return list(self._live)

    def _cancel(self, live: _Live) -> None:
        with self._live_lock:
            live.aborted = True
            future = live.future
        if future is not None:
            future.cancel()  # cancels the producer task on the engine loop

    # -------------------------------------------------------------- synchronous API
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for r in requests:  # refuse bad input before anything runs
            self._prepare(r, delta=False)
        outs: list[queue.Queue] = [queue.Queue() for _ in requests]
        lives: list[_Live] = []
        results = []
        try:
            lives.extend(self._submit(r, q.put, stream=False) for r, q in zip(requests, outs, strict=True))
            for q in outs:
                kind, payload = q.get()
                if kind == "error":
                    raise payload
                results.append(payload)
        finally:
            if len(results) < len(requests):  # after an error: the others stop too
                for live in lives:
                    self._cancel(live)
        return results

    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        out: queue.Queue = queue.Queue()
        live = self._submit(request, out.put, stream=True)  # errors raise here, not mid-stream
        return self._consume(live, out)

    def _consume(self, live: _Live, out: queue.Queue) -> Iterator[list[int]]:
        finished = False
        try:
            while True:
                kind, payload = out.get()
                if kind == "tokens":
                    yield payload
                    continue
                finished = True
                if kind == "error":
                    raise payload
                return
        finally:
            if not finished:
                self._cancel(live)  # the consumer went away: abort the request in vLLM

    # -------------------------------------------------------------- asyncio API
    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        out: asyncio.Queue = asyncio.Queue()
        live = self._submit(request, loop_deliver(asyncio.get_running_loop(), out), stream=False)
        try:
            kind, payload = await out.get()
        except BaseException:  # cancelled while waiting
            self._cancel(live)
            raise
        if kind == "error":
            raise payload
        return payload

    async def astream(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        out: asyncio.Queue = asyncio.Queue()
        live = self._submit(request, loop_deliver(asyncio.get_running_loop(), out), stream=True)
        finished = False
        try:
            while True:
                kind, payload = await out.get()
                if kind == "tokens":
                    yield payload
                    continue
                finished = True
                if kind == "error":
                    raise payload
                return
        finally:
            if not finished:  # aclose(), garbage collection or cancellation
                self._cancel(live)

    # ------------------------------------------------------------------ weights
    def reload(self, checkpoint_dir: str) -> str:
        """Push the weights of ``checkpoint_dir`` (same architecture and ImpRAG settings)
        into the running engine. In-flight requests finish on the old weights, new ones
        wait and run on the new weights; the prefix cache is emptied."""
        path = Path(checkpoint_dir)
        hf, imprag = _read_json(path / "config.json"), _read_json(path / IMPRAG_CONFIG_NAME)
        if hf.get("tie_word_embeddings"):
            # vLLM's layer-wise in-place reload commits a layer once all its weights arrived;
            # a tied LM head gets none of its own, and greedy outputs after such a reload were
            # the old checkpoint's (measured on vLLM-CPU 0.32). Refuse rather than serve stale
            # weights under the new checkpoint hash.
            raise EngineError(
                f"{path}: hot reload of a checkpoint with tied embeddings (tie_word_embeddings) is "
                "not supported by the vLLM engine; start a new engine for it (the Serve app's "
                "`imprag serve reload` does: every checkpoint version gets its own engine)"
            )
        changed = [k for k in _SHAPE_KEYS if hf.get(k) != self._hf.get(k)]
        changed += [
            k
            for k in ("retrieval_layer", "reader_last_layer", "max_passage_tokens", "num_passages")
            if imprag.get(k) != self._imprag.get(k)
        ]
        if changed:
            raise EngineError(
                f"{path}: {changed} differ from the served checkpoint; reload needs the same "
                "architecture (start a new engine for another shape)"
            )
        new_hash = checkpoint_hash(path)
        stops = checkpoint_stop_ids(path)
        with self._reload_lock:
            self._call(self._swap(str(path.resolve())))
            self._hash = new_hash
            self._stops, self._eos = stops, (stops[0] if stops else None)
        return new_hash

    async def _swap(self, source: str) -> None:
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._llm.collective_rpc("imprag_load_weights", args=(source,))
            await self._llm.reset_prefix_cache()
        finally:
            await self._llm.resume_generation()

    def attention_stats(self) -> dict[str, int]:
        """How the ImpRAG attention ran since start-up, summed over workers and layers:
        query rows (and calls) through vLLM's paged CPU kernel and through the gather path
        (prompt tokens reading the passage region, or every query where the kernel is not
        available). Empty for a ``plain`` engine."""
        if self.plain:
            return {}
        per_worker = self._call(self._llm.collective_rpc("imprag_attention_stats"))
        total: dict[str, int] = {}
        for stats in per_worker:
            for key, value in stats.items():
                total[key] = total.get(key, 0) + int(value)
        return total

    # ---------------------------------------------------------------- shutdown
    def check_health(self) -> None:
        if self._closed:
            raise EngineError("vLLM engine: closed")
        if not self._thread.is_alive() or self._loop.is_closed():
            raise EngineError("vLLM engine: its event-loop thread is dead")
        errored = getattr(self._llm, "errored", False)  # AsyncLLM: its engine core died
        if errored:
            raise EngineError("vLLM engine: the engine core died (AsyncLLM.errored)")

    def close(self) -> None:
        """Fail the requests still running (RequestAbortedError), shut the vLLM engine
        processes down and stop the loop thread (idempotent)."""
        if self._closed:
            return
        with self._live_lock:
            self._accepting = False
            futures = [f for f in (live.future for live in self._live.values()) if f is not None]
        for f in futures:  # each caller hears RequestAbortedError now (the future's done callback)
            f.cancel()
        try:
            llm = getattr(self, "_llm", None)
            if llm is not None:
                self._call(self._shutdown(llm))
                self._llm = None  # collected now, not in AsyncLLM.__del__ at interpreter exit
        finally:
            self._closed = True
            self._stop_loop()

    async def _shutdown(self, llm) -> None:
        llm.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
