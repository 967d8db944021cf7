"""The OpenAI-compatible API of the running app: shapes, exactness vs the in-process
reference, the openai client (completions, chat, streaming), bad input -> 4xx JSON."""

from __future__ import annotations

import json

import pytest

from imprag_ray.bench.serve import prompt_for
from tests.serve.conftest import API_KEY, MODEL, LocalReference

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(serve_app):
    w = serve_app
    return LocalReference(w["checkpoint"], w["index"], w["corpus"], serve_app["cfg"].limits.max_prompt_tokens)


def test_status_reports_the_hash_each_stage_serves(client, serve_app):
    body = client.get("/v1/status").json()
    assert body["status"] == "ok" and body["checkpoint_hash"] == serve_app["hash_a"]
    assert body["engine"] == "torch"
    assert len(body["replicas"]["retrieval"]) >= 1 and len(body["replicas"]["generation"]) == 2
    for stage in ("retrieval", "generation"):
        for replica in body["replicas"][stage]:
            assert replica["held"] == [serve_app["hash_a"]]


def test_models_lists_the_served_model(client, serve_app):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["checkpoint_hash"] == serve_app["hash_a"]


def test_completions_equal_the_in_process_two_stage_reference(client, reference, serve_app):
    """Retrieval (bottom-layers-only replica vs full model) and greedy generation (batched
    in the generation stage vs one request at a time here) give the same ids and text."""
    for i in range(6):
        prompt = prompt_for(i)
        body = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 10}
        ).json()
        text, pids = reference.complete(prompt, 10)
        assert body["object"] == "text_completion" and body["model"] == MODEL
        assert [p["id"] for p in body["retrieved_passages"]] == pids
        assert body["choices"][0]["text"] == text
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] == len(reference.prompt_ids(prompt))
        assert body["checkpoint_hash"] == serve_app["hash_a"]


def test_retrieve_returns_top_k_with_scores_and_titles(client, reference):
    prompt = prompt_for(3)
    body = client.post("/v1/retrieve", json={"prompt": prompt, "top_k": 5}).json()
    pids, scores, _ = reference.retrieve(prompt, 5)
    got = body["retrieved_passages"]
    assert [p["id"] for p in got] == pids
    assert [p["score"] for p in got] == pytest.approx(scores, abs=1e-4)
    assert all(p["title"] == reference.corpus[p["id"]].title for p in got)
    assert [p["score"] for p in got] == sorted((p["score"] for p in got), reverse=True)


def test_openai_client_completions_chat_and_streaming(serve_app):
    import openai

    api = openai.OpenAI(base_url=serve_app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    prompt = prompt_for(1)
    full = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.model_extra["checkpoint_hash"] == serve_app["hash_a"]
    assert len(full.model_extra["retrieved_passages"]) == 3

    chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True))
    assert chunks[0].model_extra["retrieved_passages"] == full.model_extra["retrieved_passages"]
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text  # greedy: same tokens
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason

    messages = [{"role": "user", "content": prompt}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == full.choices[0].text  # one message = the raw prompt
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == chat.choices[0].message.content


def test_sse_stream_ends_with_done(client):
    body = {"model": MODEL, "prompt": prompt_for(2), "max_tokens": 6, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert "retrieved_passages" in first and first["checkpoint_hash"]


GOOD = {"model": MODEL, "prompt": "Q: hi A:", "max_tokens": 4}
BAD = [
    ("malformed-json", "/v1/completions", b'{"prompt": ', None, 400, "body"),
    ("not-an-object", "/v1/completions", b"[1, 2]", None, 400, "body"),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, None, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {**GOOD, "prompt": "   "}, None, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {**GOOD, "prompt": 42}, None, 400, "prompt"),
    ("max-tokens-string", "/v1/completions", {**GOOD, "max_tokens": "8"}, None, 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {**GOOD, "max_tokens": 0}, None, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", {**GOOD, "max_tokens": -3}, None, 400, "max_tokens"),
    ("max-tokens-over-limit", "/v1/completions", {**GOOD, "max_tokens": 33}, None, 400, "max_tokens"),
    ("temperature-type", "/v1/completions", {**GOOD, "temperature": "hot"}, None, 400, "temperature"),
    ("stream-type", "/v1/completions", {**GOOD, "stream": "yes"}, None, 400, "stream"),
    ("prompt-too-many-chars", "/v1/completions", {**GOOD, "prompt": "x" * 601}, None, 400, "prompt"),
    (
        "prompt-too-many-tokens",
        "/v1/completions",
        {**GOOD, "prompt": "Q: " + "Vel Dra Ko " * 50},
        None,
        400,
        "prompt",
    ),
    ("body-too-large", "/v1/completions", {**GOOD, "pad": "y" * 5000}, None, 413, "body"),
    ("unknown-model", "/v1/completions", {**GOOD, "model": "gpt-4"}, None, 404, "model"),
    ("chat-missing-messages", "/v1/chat/completions", {"model": MODEL}, None, 400, "messages"),
    ("chat-empty-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400, "messages"),
    (
        "chat-content-type",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": 3}]},
        None,
        400,
        "messages[0].content",
    ),
    ("retrieve-top-k", "/v1/retrieve", {"prompt": "x", "top_k": 0}, None, 400, "top_k"),
    ("wrong-api-key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "authorization"),
    ("no-api-key", "/v1/completions", GOOD, {"Authorization": ""}, 401, "authorization"),
]


@pytest.mark.parametrize("name, path, body, headers, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error_naming_the_field(client, name, path, body, headers, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = client.post(path, headers=headers or {}, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"]
    assert client.get("/healthz").json()["status"] == "ok"  # the server stays up


def test_prompt_of_many_tokens_but_few_chars_is_refused_by_token_count(client):
    resp = client.post("/v1/completions", json={**GOOD, "prompt": "Q: " + "Vel Dra Ko " * 50})
    assert "max_prompt_tokens=160" in resp.json()["error"]["message"]
