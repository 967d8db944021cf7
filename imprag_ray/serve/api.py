"""OpenAI-compatible request parsing and response shapes (no Ray, no FastAPI).

Every user mistake becomes an :class:`APIError` with an HTTP status and the name of the
offending field (OpenAI's ``error.param``), so the ingress answers 4xx JSON and stays up:
hostile JSON included (integers of thousands of digits, NaN / Infinity / overflowing
floats, lone surrogates, nesting deep enough to exhaust the parser's recursion). Parameters
the server does not implement are refused by name; OpenAI parameters it does not implement
pass only at their neutral value (``n: 1``, ``logprobs: null``, ``presence_penalty: 0``,
...), so clients that send their defaults still work.

The API takes raw prompt text (no template): the caller writes ``Q: ... A:`` itself if it
wants the paper's formats. A chat request's prompt is its messages' contents joined by
newlines, in order (the tiny models have no chat template). ``stop`` (a string or up to
four) ends the text before the first match (:class:`StopMatcher`, which holds back a
stream's text while it could still be the start of a stop string).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from imprag_ray.config.serve_schema import LimitsSection

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256  # characters per stop string
MAX_SEED = 2**63 - 1
MAX_JSON_INT_DIGITS = 40  # longer integer literals are out of range of every parameter


class APIError(Exception):
    """A request the server refuses: HTTP status, message, offending field (and headers,
    e.g. ``Retry-After`` on a 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {
            "error": {
                "message": _printable(self.message),
                "type": kind,
                "param": None if self.param is None else _printable(self.param),
                "code": self.code,
            }
        }


def _printable(text: str) -> str:
    """``text`` that UTF-8 can encode: a lone surrogate echoed from a request (a key name)
    becomes ``\\udXXX`` instead of failing the response's encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def server_error(request_id: str) -> APIError:
    """The 500 a client sees for a server fault: no exception text, the request id to quote
    (the log has the details under that id)."""
    return APIError(
        500,
        f"internal server error; the server log has the details under request id {request_id}",
        None,
        "server_error",
    )


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # "completion" | "chat" | "retrieve"
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    top_k: int | None  # /v1/retrieve only
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


class BadNumber:
    """A JSON number no parameter accepts (NaN, +-Infinity, an overflowing float, an
    integer longer than ``MAX_JSON_INT_DIGITS``): kept as a marker while parsing, so the
    parameter that holds it is named in the 400 instead of failing the whole body."""

    def __init__(self, text: str):
        self.text = text[:24] + ("..." if len(text) > 24 else "")


def _parse_int(text: str) -> int | BadNumber:
    # int() of > 4300 digits raises ValueError (CPython's int-digit limit) and costs
    # quadratic time below it; no parameter needs more than a few digits.
    return int(text) if len(text.lstrip("-")) <= MAX_JSON_INT_DIGITS else BadNumber(text)


def _parse_float(text: str) -> float | BadNumber:
    value = float(text)
    return value if math.isfinite(value) else BadNumber(text)


def parse_json_body(raw: bytes, limits: LimitsSection) -> dict:
    """The JSON object of a request body (413 over ``max_request_bytes``, 400 otherwise)."""
    if len(raw) > limits.max_request_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes > max_request_bytes={limits.max_request_bytes}",
            "body",
            "request_too_large",
        )
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=BadNumber)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(
            400, f"malformed JSON body: {err}; send a JSON object", "body", "malformed_json"
        ) from None
    except RecursionError:  # [[[[... under the size limit
        raise APIError(400, "the JSON body is nested too deeply", "body", "malformed_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", "body")
    return data


def _typed(data: dict, key: str, types: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, BadNumber):
        raise APIError(400, f"'{key}' must be {what}, got {value.text} (out of range)", key, "invalid_value")
    if isinstance(value, bool) and bool not in types:
        raise APIError(400, f"'{key}' must be {what}, got a boolean", key, "invalid_type")
    if not isinstance(value, types):
        raise APIError(400, f"'{key}' must be {what}, got {type(value).__name__}", key, "invalid_type")
    return value


def _number(data: dict, key: str, default: float) -> float:
    value = float(_typed(data, key, (int, float), "a number", default))
    if not math.isfinite(value):  # an int beyond float's range
        raise APIError(400, f"'{key}' must be a finite number", key, "invalid_value")
    return value


def _text(value: str, param: str) -> str:
    """``value`` if UTF-8 can encode it (JSON can carry lone surrogates such as ``\\ud800``,
    which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"'{param}' is not valid Unicode (a lone surrogate); send UTF-8 text", param, "invalid_value"
        ) from None
    return value


def _prompt_of(data: dict, kind: str) -> str:
    if kind == "chat":
        messages = data.get("messages")
        if messages is None:
            raise APIError(400, "'messages' is required: a list of {role, content}", "messages", "missing")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            if not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}].role must be a string", f"messages[{i}].role")
            _text(m["role"], f"messages[{i}].role")
            parts.append(_text(m["content"], f"messages[{i}].content"))
        prompt = "\n".join(parts)
    else:
        if "prompt" not in data or data["prompt"] is None:
            raise APIError(400, "'prompt' is required: the raw prompt text", "prompt", "missing")
        prompt = data["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # the openai client may send a one-element list
        if not isinstance(prompt, str):
            raise APIError(
                400, f"'prompt' must be a string, got {type(prompt).__name__}", "prompt", "invalid_type"
            )
        _text(prompt, "prompt")
    if not prompt.strip():
        raise APIError(
            400, "the prompt is empty; send some text", "messages" if kind == "chat" else "prompt", "empty"
        )
    return prompt


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# Parameters each route implements.
_SUPPORTED = {
    "completion": {"prompt", "max_completion_tokens"},
    "chat": {"messages", "max_completion_tokens"},
    "retrieve": {"prompt", "top_k"},
}
_COMMON = {"model", "user"}  # ``user``: an end-user id for the caller's records; ignored
_GENERATION = {"max_tokens", "temperature", "top_p", "seed", "n", "stream", "stream_options", "stop"}

# OpenAI parameters this server does not implement: accepted only at the neutral value the
# openai client (or a caller's defaults) may send, refused otherwise, naming the parameter.
_NEUTRAL: dict[str, tuple[Any, str]] = {
    "logprobs": (lambda v: v is None or v is False, "null or false"),
    "top_logprobs": (lambda v: v is None or _is_zero(v), "null or 0"),
    "best_of": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1), "1"),
    "echo": (lambda v: v is None or v is False, "false"),
    "presence_penalty": (lambda v: v is None or _is_zero(v), "0"),
    "frequency_penalty": (lambda v: v is None or _is_zero(v), "0"),
    "logit_bias": (lambda v: v is None or v == {}, "null or {}"),
    "suffix": (lambda v: v is None or v == "", "null or an empty string"),
    "tools": (lambda v: v is None or v == [], "null or []"),
    "tool_choice": (lambda v: v is None or v in ("none", "auto"), "null, 'none' or 'auto'"),
    "functions": (lambda v: v is None or v == [], "null or []"),
    "function_call": (lambda v: v is None or v in ("none", "auto"), "null, 'none' or 'auto'"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "a boolean (there are no tools)"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "null or {'type': 'text'}"),
    "store": (lambda v: v is None or v is False, "false"),
    "metadata": (lambda v: v is None or v == {}, "null or {}"),
    "service_tier": (lambda v: v is None or v in ("auto", "default"), "null, 'auto' or 'default'"),
    "modalities": (lambda v: v is None or v == ["text"], "null or ['text']"),
    "prediction": (lambda v: v is None, "null"),
    "audio": (lambda v: v is None, "null"),
    "reasoning_effort": (lambda v: v is None, "null"),
    "web_search_options": (lambda v: v is None, "null"),
}


def _check_parameters(data: dict, kind: str) -> None:
    """400 for the first (sorted) parameter the route does not implement."""
    allowed = _SUPPORTED[kind] | _COMMON | (set() if kind == "retrieve" else _GENERATION)
    for key in sorted(data, key=str):
        if key in allowed:
            continue
        neutral = _NEUTRAL.get(key) if kind != "retrieve" else None
        if neutral is None:
            raise APIError(
                400,
                f"'{key}' is not a parameter this server supports; remove it",
                key,
                "unsupported_parameter",
            )
        accepts, shown = neutral
        if not accepts(data[key]):
            raise APIError(
                400,
                f"'{key}' is not supported by this server (it accepts only {shown}); remove it",
                key,
                "unsupported_parameter",
            )


def _stop_of(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP:
        raise APIError(
            400, f"'stop' takes at most {MAX_STOP} strings, got {len(items)}", "stop", "invalid_value"
        )
    for s in items:
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise APIError(
                400, f"each 'stop' string must have 1..{MAX_STOP_CHARS} characters", "stop", "invalid_value"
            )
        _text(s, "stop")
    return tuple(items)


def parse_request(data: dict, kind: str, limits: LimitsSection, model_name: str) -> ParsedRequest:
    """Validate an OpenAI-style body (``kind``: completion | chat | retrieve)."""
    _check_parameters(data, kind)
    prompt = _prompt_of(data, kind)
    field = "messages" if kind == "chat" else "prompt"
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} characters > max_prompt_chars={limits.max_prompt_chars}; shorten it",
            field,
            "prompt_too_long",
        )
    model = _typed(data, "model", (str,), "a string")
    if kind != "retrieve" and model is not None and model != model_name:
        raise APIError(
            404, f"unknown model {model!r}; this server serves {model_name!r}", "model", "model_not_found"
        )
    _text(_typed(data, "user", (str,), "a string", ""), "user")
    max_tokens = _typed(data, "max_completion_tokens", (int,), "an integer")
    key = "max_completion_tokens"
    if data.get("max_tokens") is not None:
        max_tokens, key = _typed(data, "max_tokens", (int,), "an integer"), "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 0 < max_tokens <= limits.max_tokens:
        raise APIError(
            400, f"'{key}' must be in 1..{limits.max_tokens}, got {max_tokens}", key, "invalid_value"
        )
    temperature = _number(data, "temperature", 0.0)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(
            400, f"'temperature' must be in [0, 2], got {temperature}", "temperature", "invalid_value"
        )
    top_p = _number(data, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    seed = _typed(data, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise APIError(400, f"'seed' must be in [0, 2**63-1], got {seed}", "seed", "invalid_value")
    n = _typed(data, "n", (int,), "an integer", 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one completion per request), got {n}", "n", "invalid_value")
    stream = _typed(data, "stream", (bool,), "true or false", False)
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "'stream_options' needs 'stream': true", "stream_options", "invalid_value")
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        for k in options:
            if k != "include_usage":
                raise APIError(
                    400,
                    f"'stream_options.{k}' is not supported",
                    f"stream_options.{k}",
                    "unsupported_parameter",
                )
        include_usage = _typed(options, "include_usage", (bool,), "true or false", False)
    stop = _stop_of(data)
    top_k = _typed(data, "top_k", (int,), "an integer") if kind == "retrieve" else None
    if top_k is not None and not 0 < top_k <= 100:
        raise APIError(400, f"'top_k' must be in 1..100, got {top_k}", "top_k", "invalid_value")
    return ParsedRequest(
        kind, prompt, max_tokens, temperature, top_p, seed, stream, top_k, stop, include_usage
    )


def new_id(prefix: str, request_id: str | None = None) -> str:
    """The response id: ``<prefix>-<request id>`` (a random id when there is none)."""
    return f"{prefix}-{request_id or uuid.uuid4().hex[:24]}"


def passages_field(passages: list[dict]) -> list[dict]:
    return [{"id": p["id"], "title": p["title"], "score": p["score"]} for p in passages]


def completion_body(
    req_id: str,
    model: str,
    text: str,
    finish: str,
    n_prompt: int,
    n_gen: int,
    passages: list[dict],
    version: str,
) -> dict:
    return {
        "id": req_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
        "retrieved_passages": passages_field(passages),
        "checkpoint_hash": version,
    }


def chat_body(
    req_id: str,
    model: str,
    text: str,
    finish: str,
    n_prompt: int,
    n_gen: int,
    passages: list[dict],
    version: str,
) -> dict:
    body = completion_body(req_id, model, text, finish, n_prompt, n_gen, passages, version)
    body["object"] = "chat.completion"
    body["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    ]
    return body


def stream_chunk(
    kind: str,
    req_id: str,
    model: str,
    text: str,
    finish: str | None,
    extra: dict | None = None,
    first: bool = False,
) -> dict:
    """One SSE chunk; the first carries the retrieved passages and the version (``extra``)."""
    if kind == "chat":
        delta: dict = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": req_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        **(extra or {}),
    }


def usage_chunk(kind: str, req_id: str, model: str, n_prompt: int, n_gen: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    body = stream_chunk(kind, req_id, model, "", None)
    body["choices"] = []
    body["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
    return body


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


class IncrementalDetokenizer:
    """Text deltas of a growing token list (waits while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def push(self, new_tokens: list[int]) -> str:
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent) :], text
        return delta


class StopMatcher:
    """Cuts a growing text before the first stop string.

    ``push(delta)`` returns the text that is safe to send: text that could still be the
    start of a stop string is held back until the next delta decides. Once a stop string
    is complete, the text before it is released and ``stopped`` is set; ``flush()``
    releases what is held when the generation ends without a match.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        # A match cannot start before ``sent``: text that could begin one was held back.
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        for k in range(min(len(self.text) - self.sent, self.longest - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


class TextStream:
    """Generated token chunks -> text deltas, cut at the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(stops)
        self.tokens = 0  # tokens taken in, up to the chunk that completed a stop string

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def push(self, tokens: list[int]) -> str:
        if self.stopped:
            return ""
        self.tokens += len(tokens)
        return self.stop.push(self.detok.push(tokens))

    def flush(self) -> str:
        return "" if self.stopped else self.stop.push(self.detok.flush()) + self.stop.flush()


def cut_at_stop(tokenizer, token_ids: list[int], stops: tuple[str, ...]) -> tuple[str, int, bool]:
    """A finished generation's text up to the first stop string: (text, tokens used, stopped)."""
    if not stops:
        return tokenizer.decode(token_ids, skip_special_tokens=True), len(token_ids), False
    stream = TextStream(tokenizer, stops)
    parts = []
    for t in token_ids:
        parts.append(stream.push([t]))
        if stream.stopped:
            return "".join(parts), stream.tokens, True
    parts.append(stream.flush())
    return "".join(parts), len(token_ids), False
