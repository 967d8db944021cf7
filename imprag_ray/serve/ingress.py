"""HTTP ingress: the OpenAI-compatible API in front of the two stages.

Per request: check the API key, read the body up to ``limits.max_request_bytes`` (413 as
soon as it is passed, chunked bodies included), parse and validate
(:mod:`imprag_ray.serve.api`), pin the request to the active version, tokenise the raw
prompt like training does (:func:`imprag_ray.data.tokenized.encode_prompt_text`; inside
the checkpoint's chat template as one user turn when ``chat_template: true``), call the
retrieval stage, then the generation stage, and answer with the passages and the version
hash both stages used.

Every request has one id: Serve's request id (the client's ``x-request-id`` when it sends
one; the proxy returns it in the ``x-request-id`` response header). It is the response's
``id`` (``cmpl-<id>`` / ``chatcmpl-<id>``), the ``request_id`` of both stage payloads and
the ``request_id`` of every log line of the request.

Failure handling: each stage or Control call has a timeout (``timeouts``) after which the
call is cancelled and the client gets a 504; a stage whose queue is full
(``max_queued_requests``) gives a 503; a client that disconnects cancels the stage call it
was waiting on. A stage call whose replica died (process killed, node lost) is retried on
another replica until ``retry.deadline_s``; a stream that is replayed that way must repeat
the tokens already sent (a sampled request without a seed gets one drawn here), or it ends
with an error event instead of splicing two samples. Server faults answer a generic 500
naming the request id; the details go to the log.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import ClientDisconnect

from imprag_ray.config.loader import from_dict
from imprag_ray.config.serve_schema import ServeJobConfig
from imprag_ray.serve import api
from imprag_ray.serve.control import replica_name
from imprag_ray.serve.versions import Version, VersionCache

log = logging.getLogger("ray.serve")
RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "retrieve": "/v1/retrieve"}


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


def serve_request_id() -> str:
    """This request's Serve request id (the client's ``x-request-id`` when it sent one)."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # outside a Serve request
        rid = ""
    return rid or uuid.uuid4().hex


class StageError(RuntimeError):
    """A stage answered with an error or with another version than the request's."""


class ReplayDiverged(StageError):
    """A stream replayed on another replica differs from the tokens already sent."""


class _Metrics:
    """:func:`imprag_ray.serve.metrics.metrics` of this replica; recording never fails a request.

    The ingress records requests (route, status, latency), time to first token and
    retries; generated tokens are counted where they are generated (the generation stage),
    so a replayed stream or the tokens past a stop string are not counted twice or lost.
    """

    def __getattr__(self, name: str):
        def record(*args: Any) -> None:
            try:
                from imprag_ray.serve.metrics import metrics

                getattr(metrics(), name)(*args)
            except Exception as err:
                log.debug("metric %s not recorded: %s", name, err)

        return record


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
        self.counts: Counter[str] = Counter()
        self.metrics = _Metrics()
        self._stop = threading.Event()
        self._sync = threading.Thread(target=self._poll, name="imprag-ingress-sync", daemon=True)
        self._sync.start()

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
        """The sync thread: report to Control, follow its active version. Nothing may end
        it (``check_health`` restarts a replica whose thread died)."""
        while not self._stop.wait(self.cfg.reload.poll_interval_s):
            try:
                self._sync_once()
            except Exception as err:  # try again next tick
                log.warning("ingress: version sync failed (%s: %s); retrying", type(err).__name__, err)

    def _sync_once(self) -> None:
        extra = {"active": self.active.hash if self.active else None, "inflight": dict(self.inflight)}
        state = self.control.report.remote(self.name, "ingress", [], extra).result(
            timeout_s=self.cfg.timeouts.control_s
        )
        version = Version.from_dict(state["active"])
        if self.active is None or version.hash != self.active.hash:
            self.tokenizers.get(version)  # ready before the first request pinned to it
            self.active = version  # one assignment: requests read it once, at arrival

    def check_health(self) -> None:
        """Serve's health probe: a replica whose sync thread died is restarted."""
        if not self._sync.is_alive():
            raise RuntimeError("ingress: the version sync thread is dead")

    async def _version(self) -> Version:
        if self.active is None:
            state = await self._control(self.control.state.remote())
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
        """The JSON body, read chunk by chunk: 413 as soon as ``max_request_bytes`` is
        passed (a chunked body has no Content-Length to check first)."""
        self._check_auth(request)
        limit = self.cfg.limits.max_request_bytes
        too_large = api.APIError(
            413, f"request body is over max_request_bytes={limit}", "body", "request_too_large"
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise api.APIError(
                400, "the client closed the connection before the whole body", "body", "client_disconnected"
            ) from None
        return api.parse_json_body(b"".join(chunks), self.cfg.limits)

    def _prompt_ids(self, tokenizer, parsed: api.ParsedRequest) -> list[int]:
        return prompt_ids(tokenizer, parsed, self.cfg.limits.max_prompt_tokens, self.cfg.chat_template)

    # ----------------------------------------------------------- stage calls
    async def _call(self, response, timeout: float, what: str):
        """Await a DeploymentResponse for at most ``timeout`` s (``what``: its timeouts key).

        A timeout or a cancelled caller (the client went away) cancels the call, so the
        stage frees its slot; a full stage queue is a 503."""
        try:
            return await asyncio.wait_for(_result(response), timeout)
        except TimeoutError:
            response.cancel()
            raise api.APIError(
                504, f"no answer within timeouts.{what}={timeout:g} s; try again later", None, "timeout"
            ) from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError:
            raise _overloaded() from None

    async def _control(self, response):
        return await self._call(response, self.cfg.timeouts.control_s, "control_s")

    async def _retry(self, call, stage: str, rid: str):
        """``call()`` again on another replica when its replica died, until
        ``retry.max_attempts`` or ``retry.deadline_s``."""
        retry = self.cfg.retry
        deadline = time.monotonic() + retry.deadline_s
        for attempt in range(retry.max_attempts):
            try:
                return await call()
            except RETRYABLE as err:
                wait = retry.backoff_s * (attempt + 1)
                if attempt + 1 == retry.max_attempts or time.monotonic() + wait > deadline:
                    raise
                self._retried(stage, rid, err)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _retried(self, stage: str, rid: str, err: BaseException) -> None:
        self.counts[f"retried_{stage}"] += 1
        self.metrics.retry(stage)
        _log(
            logging.WARNING,
            rid,
            "%s call failed (%s); retrying on another replica",
            stage,
            type(err).__name__,
        )

    async def _retrieve(self, version: Version, prompt_ids: list[int], top_k: int, rid: str) -> dict:
        payload = {"version": version.to_dict(), "prompt_ids": prompt_ids, "top_k": top_k, "request_id": rid}
        timeout = self.cfg.timeouts.retrieval_s
        result = await self._retry(
            lambda: self._call(self.retrieval.retrieve.remote(payload), timeout, "retrieval_s"),
            "retrieval",
            rid,
        )
        self._check_stage(result, version, "retrieval")
        return result

    async def _generate(self, payload: dict, version: Version, rid: str) -> dict:
        timeout = self.cfg.timeouts.generation_s
        result = await self._retry(
            lambda: self._call(self.generation.generate.remote(payload), timeout, "generation_s"),
            "generation",
            rid,
        )
        self._check_stage(result, version, "generation")
        return result

    @staticmethod
    def _gen_payload(version: Version, prompt_ids, passages, parsed: api.ParsedRequest, rid: str) -> dict:
        seed = parsed.seed
        if seed is None and parsed.temperature > 0:
            # A replay (replica death) must draw the same sample: fix the seed here.
            seed = secrets.randbits(63)
        sampling = {
            "max_tokens": parsed.max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "seed": seed,
        }
        return {
            "version": version.to_dict(),
            "prompt_ids": prompt_ids,
            "passages": [p["token_ids"] for p in passages],
            "sampling": sampling,
            "request_id": rid,
        }

    @staticmethod
    def _check_stage(result: dict, version: Version, stage: str) -> None:
        if "error" in result:
            if result.get("error_type") == "EngineError":  # the request, not the server
                raise api.APIError(400, str(result["error"])[:500], None, "engine_refused")
            raise StageError(result["error"])
        if result["hash"] != version.hash:
            raise StageError(
                f"{stage} served version {result['hash'][:12]} for a {version.hash[:12]} request"
            )

    # ------------------------------------------------------------ handlers
    @staticmethod
    def _error(err: api.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def _done(self, route: str, status: int, t0: float) -> None:
        self.counts[f"http_{status}"] += 1
        self.metrics.request(route, status, time.monotonic() - t0)

    async def handle(self, request: Request, kind: str):
        route, rid, t0 = ROUTES[kind], serve_request_id(), time.monotonic()
        version: Version | None = None
        status, streaming = 500, False
        try:
            data = await self._body(request)
            parsed = api.parse_request(data, kind, self.cfg.limits, self.cfg.model_name)
            pinned = await self._version()
            self.inflight[pinned.hash] += 1
            version = pinned
            response = await self._serve(parsed, version, rid, t0)
            streaming = isinstance(response, StreamingResponse)
            status = response.status_code
            return response
        except api.APIError as err:
            status = err.status
            if status >= 500:
                _log(logging.WARNING, rid, "%s answered %d: %s", route, status, err.message)
            return self._error(err)
        except asyncio.CancelledError:
            status = 499  # the client went away; the stage call it waited on is cancelled
            _log(logging.INFO, rid, "%s cancelled: the client disconnected", route)
            raise
        except Exception:  # a server fault: generic 500 JSON, details in the log
            _log(logging.ERROR, rid, "%s failed", route, exc_info=True)
            return self._error(api.server_error(rid))
        finally:
            if not streaming:  # a stream releases its version and records itself when done
                if version is not None:
                    self.inflight[version.hash] -= 1
                self._done(route, status, t0)

    async def _serve(self, parsed: api.ParsedRequest, version: Version, rid: str, t0: float):
        tokenizer = await asyncio.to_thread(self.tokenizers.get, version)
        prompt_ids = self._prompt_ids(tokenizer, parsed)
        k = min(self.cfg.top_k or 10_000, _checkpoint_k(version.checkpoint))
        retrieved = await self._retrieve(version, prompt_ids, parsed.top_k or k, rid)
        passages = retrieved["passages"]
        if parsed.kind == "retrieve":
            return JSONResponse(
                {
                    "id": api.new_id("retrieval", rid),
                    "object": "retrieval",
                    "model": self.cfg.model_name,
                    "retrieved_passages": api.passages_field(passages),
                    "checkpoint_hash": version.hash,
                }
            )
        payload = self._gen_payload(version, prompt_ids, passages, parsed, rid)
        route = ROUTES[parsed.kind]
        if parsed.stream:
            # The first token is awaited before the headers go out, so a hung, overloaded
            # or failing generation stage still gets a real HTTP status (504/503/500).
            tokens = self._stream_tokens(payload, version, rid)
            try:
                first = await anext(tokens, None)
            except BaseException:
                await tokens.aclose()
                raise
            self.metrics.ttft(route, time.monotonic() - t0)
            seed = payload["sampling"]["seed"]
            body = self._stream(
                parsed, version, tokenizer, prompt_ids, passages, tokens, first, rid, t0, seed
            )
            return StreamingResponse(body, media_type="text/event-stream")
        result = await self._generate(payload, version, rid)
        elapsed = time.monotonic() - t0
        self.metrics.ttft(route, elapsed)  # the whole text arrives at once
        self.metrics.tokens(len(result["token_ids"]), elapsed)
        text, used, stopped = api.cut_at_stop(tokenizer, result["token_ids"], parsed.stop)
        body = api.chat_body if parsed.kind == "chat" else api.completion_body
        return JSONResponse(
            body(
                api.new_id("chatcmpl" if parsed.kind == "chat" else "cmpl", rid),
                self.cfg.model_name,
                text,
                "stop" if stopped else result["finish_reason"],
                len(prompt_ids),
                used,
                passages,
                version.hash,
            )
        )

    async def _stream(
        self, parsed, version: Version, tokenizer, prompt_ids, passages, tokens, first, rid, t0, seed
    ):
        """The SSE body: passages first (and, for a sampled request, the seed it is drawn
        with: a seeded request repeats the text), then text deltas cut at the first stop string."""
        route, model = ROUTES[parsed.kind], self.cfg.model_name
        req_id = api.new_id("chatcmpl" if parsed.kind == "chat" else "cmpl", rid)
        extra = {"retrieved_passages": api.passages_field(passages), "checkpoint_hash": version.hash}
        if seed is not None:
            extra["seed"] = seed
        text = api.TextStream(tokenizer, parsed.stop)
        status, count = 200, 0
        try:
            yield api.sse(api.stream_chunk(parsed.kind, req_id, model, "", None, extra, first=True))
            chunk = first
            while chunk is not None:
                count += len(chunk)
                delta = text.push(chunk)
                if delta:
                    yield api.sse(api.stream_chunk(parsed.kind, req_id, model, delta, None))
                if text.stopped:
                    break  # the finally closes the stage stream: the generation stops
                chunk = await anext(tokens, None)
            tail = text.flush()
            finish = "stop" if text.stopped or count < parsed.max_tokens else "length"
            yield api.sse(
                api.stream_chunk(parsed.kind, req_id, model, tail, finish, {"checkpoint_hash": version.hash})
            )
            if parsed.include_usage:
                yield api.sse(api.usage_chunk(parsed.kind, req_id, model, len(prompt_ids), count))
            yield api.sse("[DONE]")
        except ReplayDiverged as err:  # headers are gone: report in-band, then end
            status = 502
            _log(logging.WARNING, rid, "stream ended: %s", err)
            self.counts["stream_replay_mismatch"] += 1
            message = (
                "the generation replica failed mid-stream and its replay differed from the text "
                f"already sent; the stream ends here (request id {rid}); retry the request"
            )
            yield api.sse(api.APIError(502, message, None, "stream_replay_mismatch").body())
            yield api.sse("[DONE]")
        except api.APIError as err:  # a stalled or overloaded stage mid-stream
            status = err.status
            _log(logging.WARNING, rid, "stream ended with %d: %s", err.status, err.message)
            yield api.sse(err.body())
            yield api.sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            _log(logging.INFO, rid, "stream cancelled: the client disconnected after %d tokens", count)
            raise
        except Exception:
            status = 500
            _log(logging.ERROR, rid, "stream failed after %d tokens", count, exc_info=True)
            self.counts["stream_error"] += 1
            yield api.sse(api.server_error(rid).body())
            yield api.sse("[DONE]")
        finally:
            await tokens.aclose()  # a no-op when the stage stream ended, else cancels it
            self.inflight[version.hash] -= 1
            self.metrics.tokens(count, time.monotonic() - t0)
            self._done(route, status, t0)

    async def _stream_tokens(self, payload: dict, version: Version, rid: str):
        """Token chunks of the generation stage's stream. A replica death restarts the
        stream on another replica (until ``retry.max_attempts`` / ``retry.deadline_s``); the
        replay must repeat the tokens already sent (greedy decoding, or the seed fixed in
        the payload), else :class:`ReplayDiverged`. Each chunk must come within
        ``timeouts.generation_s`` (504); closing this generator cancels the stage stream."""
        retry, timeout = self.cfg.retry, self.cfg.timeouts.generation_s
        deadline = time.monotonic() + retry.deadline_s
        sent: list[int] = []
        attempt = 0
        while True:
            stream = self.generation.options(stream=True).stream.remote(payload)
            seen: list[int] = []  # tokens of this attempt
            finished = False
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(anext(stream), timeout)
                    except StopAsyncIteration:
                        finished = True
                        return
                    except TimeoutError:
                        raise api.APIError(
                            504,
                            f"no generated token within timeouts.generation_s={timeout:g} s; try again later",
                            None,
                            "timeout",
                        ) from None
                    except BackPressureError:
                        raise _overloaded() from None
                    if "error" in chunk:
                        raise StageError(chunk["error"])
                    if chunk["hash"] != version.hash:
                        raise StageError(f"generation streamed version {chunk['hash'][:12]}")
                    before = len(seen)
                    seen.extend(chunk["token_ids"])
                    overlap = min(len(seen), len(sent))
                    if before < overlap and seen[before:overlap] != sent[before:overlap]:
                        raise ReplayDiverged(
                            f"replay attempt {attempt} differs from the {len(sent)} tokens already sent "
                            f"at token {next(i for i in range(before, overlap) if seen[i] != sent[i])}"
                        )
                    new = seen[max(before, len(sent)) :]
                    if new:
                        sent.extend(new)
                        yield new
            except RETRYABLE as err:
                attempt += 1
                wait = retry.backoff_s * attempt
                if attempt >= retry.max_attempts or time.monotonic() + wait > deadline:
                    raise
                self._retried("generation_stream", rid, err)
                await asyncio.sleep(wait)
            finally:
                if not finished:
                    stream.cancel()

    # ------------------------------------------------------- status routes
    async def readiness(self) -> dict:
        """Ready when every live retrieval and generation replica holds the active version
        (and each stage has one)."""
        status = await self._control(self.control.status.remote())
        active = status["active"]["hash"]
        reasons = []
        for stage in ("retrieval", "generation"):
            live = status["replicas"].get(stage, [])
            holding = sum(1 for r in live if active in r.get("held", []))
            if not live:
                reasons.append(f"no live {stage} replica")
            elif holding < len(live):
                reasons.append(
                    f"{len(live) - holding} of {len(live)} {stage} replicas do not hold the active version"
                )
        return {"ready": not reasons, "reasons": reasons}

    async def status(self) -> dict:
        """What ``/v1/status`` answers (authenticated): version, replicas, counts, swaps."""
        stages = await self._control(self.control.status.remote())
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

    async def guarded(self, request: Request, route: str, auth: bool, answer) -> JSONResponse:
        """A GET route: optional API key, ``answer()`` -> (status, body), errors as JSON."""
        rid, t0, status = serve_request_id(), time.monotonic(), 500
        try:
            if auth:
                self._check_auth(request)
            status, body = await answer()
            return JSONResponse(body, status_code=status)
        except api.APIError as err:
            status = err.status
            return self._error(err)
        except Exception:
            _log(logging.ERROR, rid, "%s failed", route, exc_info=True)
            return self._error(api.server_error(rid))
        finally:
            self._done(route, status, t0)

    async def models(self) -> tuple[int, dict]:
        version = await self._version()
        return 200, {
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

    async def ready(self) -> tuple[int, dict]:
        try:
            state = await self.readiness()
        except api.APIError as err:  # Control does not answer: not ready
            return 503, {"status": "not ready", "reasons": [f"control: {err.message}"]}
        if state["ready"]:
            return 200, {"status": "ready"}
        return 503, {"status": "not ready", "reasons": state["reasons"]}


async def _result(response):
    return await response


def _overloaded() -> api.APIError:
    return api.APIError(
        503,
        "the server is at capacity (a stage's queue is full); retry shortly",
        None,
        "overloaded",
        {"Retry-After": "1"},
    )


def _log(level: int, rid: str, msg: str, *args: Any, exc_info: bool = False) -> None:
    """An ingress log line tagged with the request id (Serve's formatter prints it; the
    JSON encoding has it as ``request_id``)."""
    log.log(level, msg, *args, exc_info=exc_info, extra={"request_id": rid})


def make_ingress_class():
    """The FastAPI-bound Serve ingress class (routes call into :class:`Ingress`).

    No OpenAPI schema or docs pages: the API is documented in the README, and the schema
    would list the routes to anyone without a key."""
    app = FastAPI(title="imprag-ray", docs_url=None, redoc_url=None, openapi_url=None)

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
        async def list_models(self, request: Request):
            return await self.guarded(request, "/v1/models", True, self.models)

        @app.get("/v1/status")
        async def status_route(self, request: Request):
            async def answer():
                return 200, await self.status()

            return await self.guarded(request, "/v1/status", True, answer)

        @app.get("/healthz")
        async def health(self, request: Request):
            # Liveness only: this replica's event loop answers. No key, no details.
            async def answer():
                return 200, {"status": "ok"}

            return await self.guarded(request, "/healthz", False, answer)

        @app.get("/readyz")
        async def readyz(self, request: Request):
            return await self.guarded(request, "/readyz", False, self.ready)

    return IngressDeployment
