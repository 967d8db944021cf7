"""The app with ``engine.kind: vllm`` (vLLM on CPU, out-of-tree ImpRAG model) next to the
torch app: greedy completions through HTTP equal the in-process torch reference engine
for 24 prompts sent concurrently (batched in vLLM, chunked prefill, prefix-cache hits on
the second round), streaming included; 64 concurrent streams on its one generation
replica all finish, each with the reference's text."""

from __future__ import annotations

import asyncio
import time

import pytest

from imprag_ray.bench.serve import prompt_for
from tests.serve.conftest import API_KEY, MODEL, OVERRIDES, ROOT, LocalReference, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

APP = "imprag-vllm"
PROMPTS = [prompt_for(i) for i in range(24)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vllm_app(serve_app):
    from ray import serve

    from imprag_ray.bench.serve import wait_ready
    from imprag_ray.serve.app import build_application, load_serve_config

    w = serve_app
    overrides = [o for o in OVERRIDES if not o.startswith("deployments.")]
    cfg = load_serve_config(
        ROOT / "jobs/serve_tiny_synth.yaml",
        [
            f"checkpoint={w['checkpoint']}",
            f"index={w['index']}",
            f"corpus={w['corpus']}",
            f"app_name={APP}",
            *overrides,
            "engine={kind: vllm, options: {max_num_seqs: 8, max_num_batched_tokens: 64, kv_cache_gib: 0.25,"
            " max_model_len: 512}}",
            "deployments.ingress.ray_actor_options.num_cpus=0.05",
            "deployments.retrieval.ray_actor_options.num_cpus=0.05",
            "deployments.ingress.max_ongoing_requests=100",
            "deployments.generation.ray_actor_options.num_cpus=0.2",
            # one replica takes every stream of the 64-stream test at once (vLLM queues
            # what max_num_seqs does not run)
            "deployments.generation.autoscaling_config={min_replicas: 1, max_replicas: 1}",
            "deployments.generation.max_ongoing_requests=80",
        ],
    )
    serve.run(build_application(cfg), name=APP, route_prefix="/vllm")
    url = w["url"] + "/vllm"
    try:
        asyncio.run(wait_ready(url, timeout_s=180))
        yield {**w, "url": url}
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(serve_app):
    w = serve_app
    return LocalReference(w["checkpoint"], w["index"], w["corpus"], w["cfg"].limits.max_prompt_tokens)


@pytest.fixture(scope="module")
def expected(reference) -> list[tuple[str, list[str]]]:
    """(text, passage ids) of the torch reference for each of PROMPTS."""
    return [reference.complete(p, MAX_TOKENS) for p in PROMPTS]


async def _complete_all(url: str, prompts: list[str]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(
        base_url=url, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as c:
        sem = asyncio.Semaphore(8)

        async def one(prompt: str) -> dict:
            async with sem:
                resp = await c.post(
                    "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS}
                )
                assert resp.status_code == 200, resp.text
                return resp.json()

        return await asyncio.gather(*(one(p) for p in prompts))


def test_vllm_app_greedy_completions_equal_the_torch_reference(vllm_app, expected):
    from ray import serve

    for round_ in range(2):  # the second round reuses cached prefixes (same passages, same prompts)
        bodies = asyncio.run(_complete_all(vllm_app["url"], PROMPTS))
        mismatches = [
            (p, b["choices"][0]["text"], text)
            for p, b, (text, _) in zip(PROMPTS, bodies, expected, strict=True)
            if b["choices"][0]["text"] != text
        ]
        assert not mismatches, f"round {round_}: {len(mismatches)} of {len(PROMPTS)} differ: {mismatches[:3]}"
        for b, (_, pids) in zip(bodies, expected, strict=True):
            assert [p["id"] for p in b["retrieved_passages"]] == pids
            assert b["checkpoint_hash"] == vllm_app["hash_a"]
    info = serve.get_deployment_handle("GenerationStage", app_name=APP).info.remote().result(timeout_s=60)
    (stats,) = info["engines"].values()
    print(f"\nvLLM app: {len(PROMPTS)} prompts x 2 rounds equal the torch reference; engine stats {stats}")
    assert stats["kind"] == "vllm" and stats["cached_prompt_tokens"] > 0


def test_vllm_app_streams_the_same_tokens(vllm_app, reference):
    import openai

    api = openai.OpenAI(base_url=vllm_app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    for prompt in PROMPTS[:3]:
        text, _ = reference.complete(prompt, MAX_TOKENS)
        chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        chat = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS
        )
        assert chat.choices[0].message.content == text


async def _streams(url: str, n: int) -> list[tuple[int, str, float]]:
    """``n`` concurrent completion streams (prompt ``i % len(PROMPTS)``) through the
    ``openai`` client: (i, text, seconds to the end of the stream) each."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i: int) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, stream=True
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return i, text, time.perf_counter() - t0

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_vllm_app_64_concurrent_streams_on_one_replica_all_finish(vllm_app, expected):
    from ray import serve

    states = serve.status().applications[APP].deployments["GenerationStage"].replica_states
    assert states.get("RUNNING") == 1
    t0 = time.perf_counter()
    results = asyncio.run(_streams(vllm_app["url"], 64))
    wall = time.perf_counter() - t0
    seconds = sorted(r[2] for r in results)
    print(
        f"\nvLLM app: 64 concurrent streams on one replica done in {wall:.1f} s; per stream "
        f"min {seconds[0]:.1f} s, median {seconds[32]:.1f} s, max {seconds[-1]:.1f} s"
    )
    assert len(results) == 64 and seconds[-1] < 120, seconds[-1]
    wrong = [(i, text) for i, text, _ in results if text != expected[i % len(PROMPTS)][0]]
    assert not wrong, f"{len(wrong)} of 64 streams differ from the reference: {wrong[:3]}"
    handle = serve.get_deployment_handle("GenerationStage", app_name=APP)

    def idle() -> bool:
        info = handle.info.remote().result(timeout_s=60)
        return not info["inflight"] and not info["running"]

    wait_for(idle, 30, what="the vLLM replica to have no request left")
