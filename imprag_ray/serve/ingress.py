"""HTTP ingress: the OpenAI-compatible API in front of the two stages.

Per request: check the API key and size, parse and validate (:mod:`imprag_ray.serve.api`),
pin the request to the active version, tokenise the raw prompt like training does
(:func:`imprag_ray.data.tokenized.encode_prompt_text`; inside the checkpoint's chat
template as one user turn when ``chat_template: true``), call the retrieval stage, then
the generation stage, and answer with the passages and the version hash both stages
used. A stage call whose replica died (process killed, node lost) is retried on another
replica until ``retry.deadline_s``; Serve restores the dead replica meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from imprag_ray.config.loader import from_dict
from imprag_ray.config.serve_schema import ServeJobConfig
from imprag_ray.serve import api
from imprag_ray.serve.control import replica_name
from imprag_ray.serve.versions import Version, VersionCache

log = logging.getLogger("ray.serve")
RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


@functools.lru_cache(maxsize=8)
def _checkpoint_k(checkpoint: str) -> int:
    """k (passage slots) of a checkpoint: the most passages its reader takes."""
    from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME

    return int(json.loads((Path(checkpoint) / IMPRAG_CONFIG_NAME).read_text()).get("num_passages", 10))


def prompt_ids(tokenizer, parsed: api.ParsedRequest, max_prompt_tokens: int, chat: bool) -> list[int]:
    """The prompt's token ids (``<s>`` + text, or the chat template around it), refused with
    a 400 when longer than ``max_prompt_tokens`` (the template's tokens count too)."""
    from imprag_ray.data.tokenized import encode_prompt_text

    field = "messages" if parsed.kind == "chat" else "prompt"
    too_long = api.APIError(
        400,
        f"the prompt is longer than max_prompt_tokens={max_prompt_tokens} tokens; shorten it",
        field,
        "prompt_too_long",
    )
    try:  # one token over the limit tells a prompt that was cut from one that fits
        ids = encode_prompt_text(tokenizer, parsed.prompt, max_prompt_tokens + 1, chat=chat)
    except ValueError:  # the chat template alone does not fit
        raise too_long from None
    if len(ids) > max_prompt_tokens:
        raise too_long
    return ids


class StageError(RuntimeError):
    """A stage answered with an error or with another version than the request's."""


class Ingress:
    """FastAPI routes bound to handles of Control, RetrievalStage and GenerationStage."""

    def __init__(self, cfg: dict, control, retrieval, generation):
        self.cfg = from_dict(ServeJobConfig, cfg)
        self.control, self.retrieval, self.generation = control, retrieval, generation
        self.api_key = self.cfg.auth.api_key
        if self.cfg.auth.api_key_env:
            self.api_key = os.environ.get(self.cfg.auth.api_key_env) or None
            if self.api_key is None:
                raise ValueError(
                    f"auth.api_key_env: environment variable {self.cfg.auth.api_key_env} is not set"
                )
        self.tokenizers = VersionCache(functools.partial(self._load_tokenizer, self.cfg.chat_template))
        self.active: Version | None = None
        self.inflight: Counter[str] = Counter()
        self.name = replica_name()
        self.counts = Counter()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="imprag-ingress-sync", daemon=True).start()

    # ------------------------------------------------------------ versioning
    @staticmethod
    def _load_tokenizer(chat: bool, version: Version):
        from imprag_ray.model.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(version.checkpoint)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"chat_template: true, but the tokenizer of {version.checkpoint} has no chat template; "
                "set chat_template: false (a base snapshot) or serve an instruct checkpoint"
            )
        return tokenizer

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.reload.poll_interval_s):
            try:
                extra = {"active": self.active.hash if self.active else None, "inflight": dict(self.inflight)}
                state = self.control.report.remote(self.name, "ingress", [], extra).result(timeout_s=30)
            except Exception as err:  # try again next tick
                log.warning("ingress: control report failed: %s", err)
                continue
            version = Version.from_dict(state["active"])
            if self.active is None or version.hash != self.active.hash:
                self.tokenizers.get(version)  # ready before the first request pinned to it
                self.active = version  # one assignment: requests read it once, at arrival

    async def _version(self) -> Version:
        if self.active is None:
            state = await self.control.state.remote()
            self.active = Version.from_dict(state["active"])
        return self.active

    # ---------------------------------------------------------------- checks
    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise api.APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                "authorization",
                "invalid_api_key",
            )

    async def _body(self, request: Request) -> dict:
        self._check_auth(request)
        length = request.headers.get("content-length")
        limit = self.cfg.limits.max_request_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise api.APIError(
                413,
                f"request body is {length} bytes > max_request_bytes={limit}",
                "body",
                "request_too_large",
            )
        return api.parse_json_body(await request.body(), self.cfg.limits)

    def _prompt_ids(self, tokenizer, parsed: api.ParsedRequest) -> list[int]:
        return prompt_ids(tokenizer, parsed, self.cfg.limits.max_prompt_tokens, self.cfg.chat_template)

    # ----------------------------------------------------------- stage calls
    async def _retry(self, call, what: str):
        retry = self.cfg.retry
        deadline = time.monotonic() + retry.deadline_s
        for attempt in range(retry.max_attempts):
            try:
                return await call()
            except RETRYABLE as err:
                if attempt + 1 == retry.max_attempts or time.monotonic() > deadline:
                    raise
                self.counts[f"retried_{what}"] += 1
                log.warning("%s call failed (%s); retrying on another replica", what, type(err).__name__)
                await asyncio.sleep(retry.backoff_s * (attempt + 1))
        raise AssertionError("unreachable")

    async def _retrieve(self, version: Version, prompt_ids: list[int], top_k: int) -> dict:
        payload = {"version": version.to_dict(), "prompt_ids": prompt_ids, "top_k": top_k}
        result = await self._retry(lambda: self.retrieval.retrieve.remote(payload), "retrieval")
        self._check_stage(result, version, "retrieval")
        return result

    async def _generate(self, version: Version, prompt_ids, passages, parsed: api.ParsedRequest) -> dict:
        payload = self._gen_payload(version, prompt_ids, passages, parsed)
        result = await self._retry(lambda: self.generation.generate.remote(payload), "generation")
        self._check_stage(result, version, "generation")
        return result

    @staticmethod
    def _gen_payload(version: Version, prompt_ids, passages, parsed: api.ParsedRequest) -> dict:
        sampling = {
            "max_tokens": parsed.max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "seed": parsed.seed,
        }
        return {
            "version": version.to_dict(),
            "prompt_ids": prompt_ids,
            "passages": [p["token_ids"] for p in passages],
            "sampling": sampling,
        }

    @staticmethod
    def _check_stage(result: dict, version: Version, stage: str) -> None:
        if "error" in result:
            raise StageError(result["error"])
        if result["hash"] != version.hash:
            raise StageError(
                f"{stage} served version {result['hash'][:12]} for a {version.hash[:12]} request"
            )

    # ------------------------------------------------------------ handlers
    async def handle(self, request: Request, kind: str):
        try:
            data = await self._body(request)
            parsed = api.parse_request(data, kind, self.cfg.limits, self.cfg.model_name)
            version = await self._version()
            self.inflight[version.hash] += 1
        except api.APIError as err:
            self.counts[f"http_{err.status}"] += 1
            return JSONResponse(err.body(), status_code=err.status)
        response = None
        try:
            response = await self._serve(parsed, version)
            return response
        except api.APIError as err:
            self.counts[f"http_{err.status}"] += 1
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # a server fault: 500 JSON, server stays up
            log.exception("request failed")
            self.counts["http_500"] += 1
            return JSONResponse(
                api.APIError(500, f"{type(err).__name__}: {err}", None, "server_error").body(),
                status_code=500,
            )
        finally:
            if not isinstance(response, StreamingResponse):  # a stream releases it when done
                self.inflight[version.hash] -= 1

    async def _serve(self, parsed: api.ParsedRequest, version: Version):
        tokenizer = await asyncio.to_thread(self.tokenizers.get, version)
        prompt_ids = self._prompt_ids(tokenizer, parsed)
        k = min(self.cfg.top_k or 10_000, _checkpoint_k(version.checkpoint))
        retrieved = await self._retrieve(version, prompt_ids, parsed.top_k or k)
        passages = retrieved["passages"]
        if parsed.kind == "retrieve":
            return JSONResponse(
                {
                    "object": "retrieval",
                    "model": self.cfg.model_name,
                    "retrieved_passages": api.passages_field(passages),
                    "checkpoint_hash": version.hash,
                }
            )
        if parsed.stream:
            return StreamingResponse(
                self._stream(parsed, version, tokenizer, prompt_ids, passages), media_type="text/event-stream"
            )
        result = await self._generate(version, prompt_ids, passages, parsed)
        text = tokenizer.decode(result["token_ids"], skip_special_tokens=True)  # raw, as OpenAI
        body = api.chat_body if parsed.kind == "chat" else api.completion_body
        req_id = api.new_id("chatcmpl" if parsed.kind == "chat" else "cmpl")
        return JSONResponse(
            body(
                req_id,
                self.cfg.model_name,
                text,
                result["finish_reason"],
                len(prompt_ids),
                len(result["token_ids"]),
                passages,
                version.hash,
            )
        )

    async def _stream(self, parsed, version: Version, tokenizer, prompt_ids, passages):
        req_id = api.new_id("chatcmpl" if parsed.kind == "chat" else "cmpl")
        extra = {"retrieved_passages": api.passages_field(passages), "checkpoint_hash": version.hash}
        detok = api.IncrementalDetokenizer(tokenizer)
        payload = self._gen_payload(version, prompt_ids, passages, parsed)
        model = self.cfg.model_name
        try:
            yield api.sse(api.stream_chunk(parsed.kind, req_id, model, "", None, extra, first=True))
            count = 0
            async for tokens in self._stream_tokens(payload, version):
                count += len(tokens)
                text = detok.push(tokens)
                if text:
                    yield api.sse(api.stream_chunk(parsed.kind, req_id, model, text, None))
            tail = detok.flush()
            finish = "length" if count >= parsed.max_tokens else "stop"
            yield api.sse(
                api.stream_chunk(parsed.kind, req_id, model, tail, finish, {"checkpoint_hash": version.hash})
            )
            yield api.sse("[DONE]")
        except Exception as err:  # headers are gone: report in-band, then end
            log.exception("stream failed")
            self.counts["stream_error"] += 1
            yield api.sse(api.APIError(500, f"{type(err).__name__}: {err}", None, "server_error").body())
            yield api.sse("[DONE]")
        finally:
            self.inflight[version.hash] -= 1

    async def _stream_tokens(self, payload: dict, version: Version):
        """Token chunks; a replica death mid-stream restarts on another replica and skips
        the tokens already sent (greedy decoding is deterministic; sampling uses the seed)."""
        emitted, attempts = 0, 0
        while True:
            seen = 0
            try:
                gen = self.generation.options(stream=True).stream.remote(payload)
                async for chunk in gen:
                    if chunk["hash"] != version.hash:
                        raise StageError(f"generation streamed version {chunk['hash'][:12]}")
                    tokens = chunk["token_ids"]
                    new = tokens[max(0, emitted - seen) :]
                    seen += len(tokens)
                    if new:
                        emitted += len(new)
                        yield new
                return
            except RETRYABLE:
                attempts += 1
                self.counts["retried_stream"] += 1
                if attempts >= self.cfg.retry.max_attempts:
                    raise
                await asyncio.sleep(self.cfg.retry.backoff_s * attempts)

    async def healthz(self) -> dict:
        stages = await self.control.status.remote()
        version = await self._version()
        return {
            "status": "ok",
            "model": self.cfg.model_name,
            "checkpoint_hash": version.hash,
            "checkpoint": version.checkpoint,
            "index": version.index,
            "engine": self.cfg.engine.kind,
            "replicas": {
                stage: [
                    {"replica": r.get("pid"), "held": r["held"], "loading": r.get("loading")} for r in reps
                ]
                for stage, reps in stages["replicas"].items()
                if stage != "ingress"
            },
            "ingress": {"replica": self.name, "counts": dict(self.counts), "inflight": dict(self.inflight)},
            "swaps": stages["history"],
        }


def make_ingress_class():
    """The FastAPI-bound Serve ingress class (routes call into :class:`Ingress`)."""
    app = FastAPI(title="imprag-ray", docs_url=None, redoc_url=None)

    @serve.ingress(app)
    class IngressDeployment(Ingress):
        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self.handle(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self.handle(request, "chat")

        @app.post("/v1/retrieve")
        async def retrieve(self, request: Request):
            return await self.handle(request, "retrieve")

        @app.get("/v1/models")
        async def models(self, request: Request):
            try:
                self._check_auth(request)
            except api.APIError as err:
                return JSONResponse(err.body(), status_code=err.status)
            version = await self._version()
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.cfg.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "imprag-ray",
                        "checkpoint_hash": version.hash,
                    }
                ],
            }

        @app.get("/healthz")
        async def health(self):
            return await self.healthz()

    return IngressDeployment
