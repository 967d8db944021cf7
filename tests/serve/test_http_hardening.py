"""The HTTP surface under hostile or unlucky traffic, over real HTTP against real Serve.

Against the shared app (tests/serve/conftest.py): a chunked body over the size limit,
hostile JSON, unsupported parameters, ``stop``, the status routes, request ids.

Against a second small app ("hardening", route prefix /hardening) whose stages are the
stand-ins of :mod:`tests.serve.fake_stages`: a stage that hangs (504, the call cancelled),
a full stage queue (503), a client that disconnects (the call cancelled), a server fault
(generic 500), a stream replayed after a replica death (same tokens: seamless; other
tokens: an error event, never a splice).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from imprag_ray.bench.serve import prompt_for
from tests.serve import fake_stages as fake
from tests.serve.conftest import API_KEY, MODEL, ROOT, wait_for

pytestmark = pytest.mark.timeout(600)

GOOD = {"model": MODEL, "prompt": "Q: hi A:", "max_tokens": 4}
HARD = "hardening"
HARD_TIMEOUT_S = 3.0  # timeouts.generation_s of the hardening app


def _error(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    return resp.json()["error"]


# ------------------------------------------------------------ no server
@pytest.mark.parametrize(
    "stops, deltas, sent, stopped",
    [
        (("abc",), ["xa", "b", "c", "tail"], ["x", "", "", ""], True),  # held back, then cut
        (("abc",), ["xa", "bz"], ["x", "abz"], False),  # a false start is released
        (("abc", "yz"), ["1ab", "9y", "z!"], ["1", "ab9", ""], True),  # the earliest match wins
        (("\n",), ["a\nb"], ["a"], True),
        ((), ["ab", "c"], ["ab", "c"], False),
    ],
)
def test_stop_matcher_holds_back_possible_starts_and_cuts_at_the_first_match(stops, deltas, sent, stopped):
    from imprag_ray.serve.api import StopMatcher

    matcher = StopMatcher(stops)
    assert [matcher.push(d) for d in deltas] == sent
    assert matcher.stopped == stopped
    if not stopped:
        assert "".join(sent) + matcher.flush() == "".join(deltas)


def test_ingress_sync_thread_survives_every_error_and_health_fails_once_it_is_gone(tmp_path):
    """Control unreachable, then a state that does not parse: the thread logs and goes on;
    ``check_health`` fails only once the thread has ended."""
    from imprag_ray.config.loader import load_config, to_dict
    from imprag_ray.config.serve_schema import ServeJobConfig
    from imprag_ray.serve.ingress import Ingress

    calls = []

    class Answer:
        def __init__(self, n):
            self.n = n

        def result(self, timeout_s=None):
            if self.n % 2 == 0:
                raise ConnectionError("control unreachable")
            return {"active": {"not": "a version"}}  # Version.from_dict raises

    class Report:
        def remote(self, *args):
            calls.append(args)
            return Answer(len(calls))

    class Control:
        report = Report()

    cfg = load_config(
        ServeJobConfig,
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={tmp_path}",
            f"index={tmp_path}",
            f"corpus={tmp_path}/c.jsonl",
            "reload.poll_interval_s=0.01",
        ],
    )
    ingress = Ingress(to_dict(cfg), Control(), None, None)
    try:
        wait_for(lambda: len(calls) >= 6, 30, 0.05, "six sync ticks")
        ingress.check_health()  # both kinds of failure seen, the thread lives
    finally:
        ingress._stop.set()
    ingress._sync.join(10)
    with pytest.raises(RuntimeError, match="sync thread"):
        ingress.check_health()


# ------------------------------------------------------------ the shared app
def test_chunked_body_over_the_limit_is_refused_before_it_is_read_whole(serve_app):
    """1 MiB sent in chunks without Content-Length against the 4 KiB limit: the 413 comes
    back while the client is still sending, after a small part of the body."""
    limit = serve_app["cfg"].limits.max_request_bytes
    total, piece = 1 << 20, b"x" * 8192
    sock = socket.create_connection(("127.0.0.1", serve_app["port"]), timeout=60)
    received, answered = bytearray(), threading.Event()

    def read() -> None:  # the answer as soon as it arrives, before any connection reset
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
                answered.set()
                if b"request_too_large" in received:
                    return
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        while sent < total and not answered.is_set():
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:  # the server closed the connection: it has answered
                break
            sent += len(piece)
            time.sleep(0.02)  # 1 MiB would take > 2.5 s
        assert answered.wait(30), "no answer"
        reader.join(10)
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 413"), bytes(received[:200])
    assert b'"param":"body"' in received.replace(b" ", b"")
    assert sent < total // 4, f"the client sent {sent} bytes before the 413 (limit {limit})"


HOSTILE = [
    ("lone-surrogate-prompt", "/v1/completions", b'{"prompt": "Q: \\ud800 A:"}', "prompt"),
    (
        "lone-surrogate-message",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi \\udfff"}]}',
        "messages[0].content",
    ),
    ("lone-surrogate-stop", "/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("deep-nesting", "/v1/completions", b'{"prompt": "x", "a": ' + b"[" * 1900 + b"]" * 1900 + b"}", "body"),
    ("seed-negative", "/v1/completions", b'{"prompt": "x", "seed": -1}', "seed"),
    ("seed-over-2-63", "/v1/completions", b'{"prompt": "x", "seed": 9223372036854775808}', "seed"),
    ("temperature-overflow", "/v1/completions", b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    ("temperature-nan", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("top-p-infinity", "/v1/completions", b'{"prompt": "x", "top_p": -Infinity}', "top_p"),
    ("max-tokens-float-overflow", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    (
        "max-tokens-3000-digits",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": ' + b"9" * 3000 + b"}",
        "max_tokens",
    ),
    ("top-k-huge", "/v1/retrieve", b'{"prompt": "x", "top_k": ' + b"7" * 60 + b"}", "top_k"),
    ("stop-five-strings", "/v1/completions", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ("stop-not-strings", "/v1/completions", b'{"prompt": "x", "stop": [1]}', "stop"),
]


@pytest.mark.parametrize("name, path, raw, param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_is_a_400_naming_the_parameter(client, name, path, raw, param):
    resp = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert _error(resp)["param"] == param


UNSUPPORTED = [
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/completions", {"logit_bias": {"100": 5}}, "logit_bias"),
    ("/v1/completions", {"suffix": " end"}, "suffix"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/retrieve", {"max_tokens": 4}, "max_tokens"),
]


@pytest.mark.parametrize("path, extra, param", UNSUPPORTED, ids=[f"{u[0][4:]}-{u[2]}" for u in UNSUPPORTED])
def test_unsupported_parameter_is_a_400_naming_it(client, path, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    resp = client.post(path, json={**body, **extra})
    assert resp.status_code == 400, resp.text
    error = _error(resp)
    assert error["param"] == param and param in error["message"]


def test_openai_client_with_neutral_values_succeeds(serve_app):
    import openai

    api = openai.OpenAI(base_url=serve_app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "n": 1,
        "user": "u-1",
        "seed": 7,
    }
    full = api.completions.create(
        model=MODEL,
        prompt=prompt_for(0),
        max_tokens=4,
        best_of=1,
        echo=False,
        logprobs=None,
        suffix=None,
        **neutral,
    )
    assert full.choices[0].finish_reason in ("stop", "length")
    chat = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt_for(0)}],
        max_completion_tokens=4,
        logprobs=False,
        response_format={"type": "text"},
        store=False,
        **neutral,
    )
    assert chat.choices[0].message.content == full.choices[0].text
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=prompt_for(0),
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def _greedy_text(client, prompt: str, max_tokens: int = 16) -> str:
    return client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    ).json()["choices"][0]["text"]


def _streamed(client, body: dict) -> tuple[str, str]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_stop_cuts_the_text_before_the_first_stop_string(client):
    """Stop strings taken from what the tiny model generates greedily: the text ends right
    before the first match, finish_reason "stop", streaming and not."""
    text = next(t for i in range(8) if len(t := _greedy_text(client, prompt_for(i))) >= 8)
    prompt = next(prompt_for(i) for i in range(8) if _greedy_text(client, prompt_for(i)) == text)
    cases = [text[3:6], ["never-generated-stop", text[5:7]]]
    for stop in cases:
        first = min(text.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "stop": stop}
        full = client.post("/v1/completions", json=body).json()
        assert full["choices"][0]["text"] == text[:first], stop
        assert full["choices"][0]["finish_reason"] == "stop"
        assert full["usage"]["completion_tokens"] < 16
        streamed, finish = _streamed(client, body)
        assert (streamed, finish) == (text[:first], "stop"), stop
    unmatched = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "stop": "never-generated-stop"}
    assert client.post("/v1/completions", json=unmatched).json()["choices"][0]["text"] == text
    assert _streamed(client, unmatched)[0] == text  # held-back text is released at the end


def test_healthz_is_liveness_only_and_status_needs_the_key(serve_app, client):
    health = httpx.get(serve_app["url"] + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    anonymous = httpx.get(serve_app["url"] + "/v1/status", timeout=30)
    assert anonymous.status_code == 401 and _error(anonymous)["param"] == "authorization"
    status = client.get("/v1/status").json()
    assert {"checkpoint_hash", "checkpoint", "index", "engine", "replicas", "ingress", "swaps"} <= set(status)
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(serve_app["url"] + path, timeout=30).status_code == 404, path


def test_readyz_is_200_when_every_stage_replica_holds_the_active_version(serve_app):
    def ready():
        resp = httpx.get(serve_app["url"] + "/readyz", timeout=30)
        return resp if resp.status_code == 200 else None

    resp = wait_for(ready, 120, 0.5, "/readyz 200")
    assert resp.json() == {"status": "ready"}


def test_request_id_is_the_response_id_and_header_and_a_sent_one_is_honoured(client):
    resp = client.post("/v1/completions", json=GOOD)
    rid = resp.headers["x-request-id"]
    assert resp.json()["id"] == f"cmpl-{rid}"
    chat = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"x-request-id": "client-chosen-42"},
    )
    assert chat.headers["x-request-id"] == "client-chosen-42"
    assert chat.json()["id"] == "chatcmpl-client-chosen-42"
    with client.stream(
        "POST", "/v1/completions", json={**GOOD, "stream": True}, headers={"x-request-id": "s-7"}
    ) as r:
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
    assert r.headers["x-request-id"] == "s-7" and first["id"] == "cmpl-s-7"


# --------------------------------------------------------- the hardening app
@pytest.fixture(scope="module")
def hard(serve_app):
    """The app with stand-in stages: generation runs one request at a time with a queue
    of one and a 3 s timeout; the body limit is 16 KiB."""
    import ray.cloudpickle
    from ray import serve

    from imprag_ray.serve.app import build_application, load_serve_config

    ray.cloudpickle.register_pickle_by_value(fake)  # the replicas need not import tests/
    w = serve_app
    cfg = load_serve_config(
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"app_name={HARD}",
            f"auth.api_key={API_KEY}",
            "limits={max_request_bytes: 16384, max_tokens: 64, default_max_tokens: 4}",
            "deployments.ingress={ray_actor_options: {num_cpus: 0.05}, max_ongoing_requests: 16}",
            "deployments.retrieval={ray_actor_options: {num_cpus: 0.01}}",
            "deployments.generation={ray_actor_options: {num_cpus: 0.01}, max_ongoing_requests: 1,"
            " max_queued_requests: 1}",
            f"timeouts={{generation_s: {HARD_TIMEOUT_S}, retrieval_s: 10, control_s: 10}}",
            "retry={max_attempts: 3, deadline_s: 20, backoff_s: 0.05}",
        ],
    )
    app = build_application(cfg, retrieval_cls=fake.FakeRetrieval, generation_cls=fake.FakeGeneration)
    serve.run(app, name=HARD, route_prefix=f"/{HARD}")
    url = f"{w['url']}/{HARD}"
    try:
        # One request first: the ingress loads the tokenizer and the version on first use,
        # which must not count against the timings below.
        warm = httpx.post(
            url + "/v1/completions",
            json={"prompt": "hi"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        assert warm.status_code == 200, warm.text
        yield {"url": url, "checkpoint": w["checkpoint"]}
    finally:
        serve.delete(HARD)
        ray.cloudpickle.unregister_pickle_by_value(fake)


@pytest.fixture()
def hclient(hard):
    with httpx.Client(base_url=hard["url"], timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def _seen(stage: str, rid: str) -> dict | None:
    from ray import serve

    return serve.get_deployment_handle(stage, app_name=HARD).seen.remote(rid).result(timeout_s=30)


def _decode(hard, ids: list[int]) -> str:
    from imprag_ray.model.checkpoint import load_tokenizer

    return load_tokenizer(hard["checkpoint"]).decode(ids, skip_special_tokens=True)


def test_stage_payloads_carry_the_request_id(hclient, hard):
    resp = hclient.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, headers={"x-request-id": "pay-1"}
    )
    assert resp.status_code == 200 and resp.json()["id"] == "cmpl-pay-1"
    assert resp.json()["choices"][0]["text"] == _decode(hard, fake.TOKENS)
    for stage in ("RetrievalStage", "GenerationStage"):
        assert _seen(stage, "pay-1")["payloads"][0]["request_id"] == "pay-1", stage


def test_integer_of_5000_digits_is_a_400_naming_the_parameter(hclient):
    raw = b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"  # int() refuses > 4300 digits
    resp = hclient.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["param"] == "max_tokens"


def test_server_fault_is_a_generic_500_with_the_request_id(hclient):
    body = {"prompt": "hi", "max_tokens": fake.MODE_FAIL}
    resp = hclient.post("/v1/completions", json=body, headers={"x-request-id": "fault-1"})
    assert resp.status_code == 500
    error = _error(resp)
    assert "fault-1" in error["message"] and "SECRET" not in resp.text and "Error" not in error["message"]
    with hclient.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_error"
    assert not any("SECRET" in e or "Traceback" in e for e in events)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_hanging_generation_is_a_504_within_the_timeout_and_is_cancelled(hclient, stream):
    rid = f"hang-{stream}"
    t0 = time.monotonic()
    resp = hclient.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": fake.MODE_HANG, "stream": stream},
        headers={"x-request-id": rid},
    )
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504 and _error(resp)["code"] == "timeout", resp.text
    assert "timeouts.generation_s" in _error(resp)["message"]
    assert HARD_TIMEOUT_S <= elapsed < HARD_TIMEOUT_S + 8  # slack for a loaded 2-core box
    wait_for(lambda: _seen("GenerationStage", rid)["cancelled"], 10, 0.2, "the stage call cancelled")


def test_full_generation_queue_is_a_503(hclient):
    """One running, one queued: a third concurrent request is refused at once."""

    def post(i: int) -> httpx.Response:
        return hclient.post("/v1/completions", json={"prompt": "hi", "max_tokens": fake.MODE_SLOW})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert _error(refused)["code"] == "overloaded" and refused.headers["retry-after"] == "1"


def test_client_disconnect_cancels_the_generation(hard):
    rid = "gone-1"
    with (
        httpx.Client(base_url=hard["url"], headers={"Authorization": f"Bearer {API_KEY}"}) as c,
        pytest.raises(httpx.ReadTimeout),  # the client gives up and closes the connection
    ):
        c.post(
            "/v1/completions",
            json={"prompt": "hi", "max_tokens": fake.MODE_HANG},
            headers={"x-request-id": rid},
            timeout=0.5,
        )
    entry = wait_for(
        lambda: (e := _seen("GenerationStage", rid)) and e["cancelled"] and e,
        10,
        0.2,
        "the stage call cancelled",
    )
    # Cancelled by the disconnect, not by the 3 s timeout.
    assert entry["cancelled"][0] - entry["started"][0] < HARD_TIMEOUT_S - 0.5


def _stream_events(hclient, body: dict, rid: str) -> list:
    with hclient.stream(
        "POST", "/v1/completions", json={**body, "stream": True}, headers={"x-request-id": rid}
    ) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_replayed_stream_that_repeats_the_sent_tokens_continues_seamlessly(hclient, hard):
    """A sampled request without a seed: the ingress draws one, so the replay after the
    replica death is the same sample (the stand-in repeats the tokens)."""
    body = {"prompt": "hi", "max_tokens": fake.MODE_REPLAY_SAME, "temperature": 0.8}
    events = _stream_events(hclient, body, "replay-same")
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _decode(hard, fake.TOKENS)
    payloads = _seen("GenerationStage", "replay-same")["payloads"]
    seeds = [p["sampling"]["seed"] for p in payloads]
    assert len(seeds) == 2 and seeds[0] is not None and seeds[0] == seeds[1]


def test_replayed_stream_that_differs_ends_with_an_error_not_a_splice(hclient, hard):
    body = {"prompt": "hi", "max_tokens": fake.MODE_REPLAY_DIVERGE, "temperature": 0.8}
    events = _stream_events(hclient, body, "replay-diverge")
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_replay_mismatch" and "replay-diverge" in error["message"]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert _decode(hard, fake.TOKENS[:3]).startswith(text)  # only what the first replica sent


def test_readyz_is_503_while_no_stage_replica_reports(hard):
    resp = httpx.get(hard["url"] + "/readyz", timeout=30)
    assert resp.status_code == 503
    assert resp.json()["status"] == "not ready" and resp.json()["reasons"]
