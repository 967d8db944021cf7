"""Stand-in stage deployments for the ingress tests that need a stage to hang, be slow,
fail or die mid-stream on demand (tests/serve/test_http_hardening.py).

No model: the behaviour is chosen by the request's ``max_tokens`` (one of the ``MODE_*``
values below); every other value answers ``TOKENS`` at once. Each replica records what
it saw per request id (payloads, start and cancel times), read back through ``seen``.
"""

from __future__ import annotations

import asyncio
import time

MODE_HANG = 50  # never answers (until cancelled)
MODE_SLOW = 40  # answers after SLOW_S
MODE_FAIL = 45  # fails with SECRET in its error text
MODE_REPLAY_SAME = 30  # stream: dies after 3 tokens, the replay repeats them
MODE_REPLAY_DIVERGE = 31  # stream: dies after 3 tokens, the replay differs from the 3rd on
SLOW_S = 0.8  # a queued request still ends well within the 3 s timeout of the test app
SECRET = "SECRET-DETAIL /srv/internal/engine.py line 42"
TOKENS = [100, 101, 102, 103, 104]


def _entry(log: dict, payload: dict) -> dict:
    rid = payload["request_id"]
    entry = log.setdefault(rid, {"payloads": [], "started": [], "cancelled": []})
    entry["payloads"].append(payload)
    entry["started"].append(time.time())
    return entry


class FakeRetrieval:
    """Answers no passages, with the request's version."""

    def __init__(self, cfg: dict, control):
        self.log: dict[str, dict] = {}

    async def retrieve(self, payload: dict) -> dict:
        _entry(self.log, payload)
        return {"hash": payload["version"]["hash"], "passages": []}

    async def seen(self, rid: str) -> dict | None:
        return self.log.get(rid)


class FakeGeneration:
    """``generate`` / ``stream`` with the behaviours of the module docstring."""

    def __init__(self, cfg: dict, control):
        self.log: dict[str, dict] = {}

    async def generate(self, payload: dict) -> dict:
        entry = _entry(self.log, payload)
        mode = payload["sampling"]["max_tokens"]
        try:
            if mode == MODE_HANG:
                await asyncio.sleep(3600)
            if mode == MODE_SLOW:
                await asyncio.sleep(SLOW_S)
        except asyncio.CancelledError:
            entry["cancelled"].append(time.time())
            raise
        if mode == MODE_FAIL:
            return {"error": f"generation failed: {SECRET}"}
        return {"hash": payload["version"]["hash"], "token_ids": TOKENS, "finish_reason": "length"}

    async def stream(self, payload: dict):
        from ray.serve.exceptions import ReplicaUnavailableError

        entry = _entry(self.log, payload)
        mode, attempt = payload["sampling"]["max_tokens"], len(entry["payloads"])
        digest = payload["version"]["hash"]
        try:
            if mode == MODE_HANG:
                await asyncio.sleep(3600)
            if mode in (MODE_REPLAY_SAME, MODE_REPLAY_DIVERGE):
                if attempt == 1:  # as a replica that dies after sending 3 tokens
                    yield {"hash": digest, "token_ids": TOKENS[:2]}
                    yield {"hash": digest, "token_ids": TOKENS[2:3]}
                    await asyncio.sleep(0.05)
                    raise ReplicaUnavailableError("fake-replica")
                replay = TOKENS if mode == MODE_REPLAY_SAME else [*TOKENS[:2], 7, 8, 9]
                yield {"hash": digest, "token_ids": replay[:2]}
                yield {"hash": digest, "token_ids": replay[2:]}
                return
            if mode == MODE_FAIL:
                yield {"hash": digest, "token_ids": TOKENS[:1]}
                raise RuntimeError(SECRET)
            yield {"hash": digest, "token_ids": TOKENS[:2]}
            yield {"hash": digest, "token_ids": TOKENS[2:]}
        except asyncio.CancelledError:
            entry["cancelled"].append(time.time())
            raise

    async def seen(self, rid: str) -> dict | None:
        return self.log.get(rid)
