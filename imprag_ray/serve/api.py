"""OpenAI-compatible request parsing and response shapes (no Ray, no FastAPI).

Every user mistake becomes an :class:`APIError` with an HTTP status and the name of the
offending field (OpenAI's ``error.param``), so the ingress answers 4xx JSON and stays up.
The API takes raw prompt text (no template): the caller writes ``Q: ... A:`` itself if it
wants the paper's formats. A chat request's prompt is its messages' contents joined by
newlines, in order (the tiny models have no chat template).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from imprag_ray.config.serve_schema import LimitsSection


class APIError(Exception):
    """A request the server refuses: HTTP status, message, offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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


def parse_json_body(raw: bytes, limits: LimitsSection) -> dict:
    if len(raw) > limits.max_request_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes > max_request_bytes={limits.max_request_bytes}",
            "body",
            "request_too_large",
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(
            400, f"malformed JSON body: {err}; send a JSON object", "body", "malformed_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", "body")
    return data


def _typed(data: dict, key: str, types: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise APIError(400, f"'{key}' must be {what}, got a boolean", key, "invalid_type")
    if not isinstance(value, types):
        raise APIError(400, f"'{key}' must be {what}, got {type(value).__name__}", key, "invalid_type")
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
            parts.append(m["content"])
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
    if not prompt.strip():
        raise APIError(
            400, "the prompt is empty; send some text", "messages" if kind == "chat" else "prompt", "empty"
        )
    return prompt


def parse_request(data: dict, kind: str, limits: LimitsSection, model_name: str) -> ParsedRequest:
    """Validate an OpenAI-style body (``kind``: completion | chat | retrieve)."""
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
    max_tokens = _typed(data, "max_completion_tokens", (int,), "an integer")
    max_tokens = _typed(data, "max_tokens", (int,), "an integer", max_tokens)
    key = "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 0 < max_tokens <= limits.max_tokens:
        raise APIError(
            400, f"'max_tokens' must be in 1..{limits.max_tokens}, got {max_tokens}", key, "invalid_value"
        )
    temperature = float(_typed(data, "temperature", (int, float), "a number", 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise APIError(
            400, f"'temperature' must be in [0, 2], got {temperature}", "temperature", "invalid_value"
        )
    top_p = float(_typed(data, "top_p", (int, float), "a number", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    seed = _typed(data, "seed", (int,), "an integer")
    n = _typed(data, "n", (int,), "an integer", 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one completion per request), got {n}", "n", "invalid_value")
    stream = _typed(data, "stream", (bool,), "true or false", False)
    top_k = _typed(data, "top_k", (int,), "an integer") if kind == "retrieve" else None
    if top_k is not None and not 0 < top_k <= 100:
        raise APIError(400, f"'top_k' must be in 1..100, got {top_k}", "top_k", "invalid_value")
    return ParsedRequest(kind, prompt, max_tokens, temperature, top_p, seed, stream, top_k)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


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
