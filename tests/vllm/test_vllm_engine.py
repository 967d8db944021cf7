"""VLLMEngine (vLLM on CPU, out-of-tree ImpRAG model) against the torch reference engine.

One engine for the module (vLLM starts in ~30-60 s on 2 cores). It runs with
``max_num_batched_tokens=64`` so every request with passages (region C = k * l_max =
144 slots + prompt) is prefilled in chunks, with prefix caching on and a KV cache small
enough that requests get preempted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from imprag_ray.bench.engines import run_engines_bench
from imprag_ray.data.readers import read_corpus
from imprag_ray.data.tokenized import PassageStore, encode_prompt_text
from imprag_ray.engine import EngineError, GenerationRequest, RequestAbortedError, Sampling, build_engine
from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
from imprag_ray.model.imprag import ImpRAGModel

pytestmark = pytest.mark.vllm

MAX_NEW = 8
BATCHED_TOKENS = 64
# ~192 slots of KV (2 KiB per token: 4 layers x K,V x 2 heads x 32 x fp32): eight running
# requests of ~170-270 slots each do not fit, so the batched test also runs through
# preemption and recomputation.
KV_CACHE_GIB = 12 * 128 * 2048 / 2**30


@pytest.fixture(scope="module")
def ckpt(tiny_world, tmp_path_factory) -> Path:
    """The tests' tiny shape with 32-wide heads (a size vLLM's CPU attention kernel takes)
    and the tiny world's tokenizer; the reload test writes next to it."""
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import llama_like
    from tests.world import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("vllm_ckpt") / "a"
    texts = [format_passage(p) for p in iter_corpus(tiny_world["world"] / "corpus.jsonl")]
    init_checkpoint(llama_like(**{**TINY_OVERRIDES, "head_dim": 32}), texts, out, seed=0, vocab_size=1500)
    return out


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = build_engine(
        "vllm",
        str(ckpt),
        max_num_seqs=8,
        max_num_batched_tokens=BATCHED_TOKENS,
        kv_cache_gib=KV_CACHE_GIB,
        max_model_len=512,
        disable_log_stats=False,  # per-request stats: preemptions are counted
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(ckpt):
    return build_engine("torch", str(ckpt), device="cpu", max_batch_size=8)


@pytest.fixture(scope="module")
def requests_(tiny_world, ckpt) -> list[GenerationRequest]:
    """24 prompts: 0..k passages (some empty, some cut short, some filling the region
    exactly), PAD in the region, four closed-book."""
    tok = load_tokenizer(ckpt)
    passages = read_corpus(tiny_world["world"] / "corpus.jsonl")[:80]
    model_k, l_max = 3, 48
    store = PassageStore(passages, tok, l_max)
    out = []
    for i in range(24):
        prompt = tuple(encode_prompt_text(tok, f"Q: what is known about {passages[i].title}? A:", 40))
        if i % 6 == 5:
            pas = None  # closed book
        else:
            count = i % (model_k + 1)
            chosen = [tuple(store.tokens[p.id]) for p in passages[2 * i : 2 * i + count]]
            if i % 4 == 1 and chosen:
                chosen[0] = chosen[0][: 5 + i]  # a short passage
            if i % 7 == 3:
                chosen.append(())  # an empty passage slot
            if i % 8 == 7:  # k passages of exactly l_max tokens: a region without PAD
                both = [store.tokens[p.id] for p in passages[40 + i : 46 + i]]
                chosen = [tuple((both[2 * j] + both[2 * j + 1])[:l_max]) for j in range(model_k)]
            pas = tuple(chosen[:model_k])
        out.append(GenerationRequest(prompt, pas, Sampling(MAX_NEW), f"r{i}"))
    return out


def _ref(reference, reqs):
    return [r.token_ids for r in reference.generate(reqs)]


def test_requests_cover_the_layout(requests_, engine):
    with_passages = [r for r in requests_ if r.passages is not None]
    assert len(with_passages) >= 20
    lengths = {sum(map(len, r.passages)) for r in with_passages}
    assert 0 in lengths and max(lengths) == engine.num_passages * engine.max_passage_tokens
    assert any(0 < n < engine.num_passages * engine.max_passage_tokens for n in lengths)  # PAD slots
    assert any(r.passages is None for r in requests_)
    # every request with passages is longer than one scheduler step: chunked prefill
    c = engine.num_passages * engine.max_passage_tokens
    assert all(c + len(r.prompt_ids) > BATCHED_TOKENS for r in with_passages)
    assert engine._llm.vllm_config.scheduler_config.max_num_batched_tokens == BATCHED_TOKENS


def test_batched_greedy_equals_torch_engine(engine, reference, requests_):
    results = engine.generate(requests_)  # one call: vLLM batches all 24
    expected = _ref(reference, requests_)
    assert [r.request_id for r in results] == [r.request_id for r in requests_]
    mismatches = [
        (r.request_id, r.token_ids, e) for r, e in zip(results, expected, strict=True) if r.token_ids != e
    ]
    assert not mismatches, mismatches
    # C = 144 slots: 16-slot blocks, so vLLM's paged kernel runs passage tokens and the
    # prompt outside layers b..t; prompt tokens in b..t take the gather path
    assert engine._llm.vllm_config.cache_config.block_size == 16
    stats = engine.attention_stats()
    assert stats["kernel_rows"] > 0 and stats["gather_rows"] > 0, stats
    for res in results:
        assert res.finish_reason == ("stop" if len(res.token_ids) < MAX_NEW else "length")
    # the passages matter (else equality would prove little about the reader mask)
    same_prompt = [
        GenerationRequest(requests_[1].prompt_ids, p, Sampling(MAX_NEW))
        for p in (None, requests_[1].passages, requests_[2].passages, requests_[3].passages)
    ]
    outs = [r.token_ids for r in engine.generate(same_prompt)]
    assert outs == _ref(reference, same_prompt)
    assert len({tuple(o) for o in outs}) > 1


def test_preemption_keeps_outputs_exact(engine, reference, requests_):
    """6 requests growing past 2 blocks each (region + prompt ~160 tokens, +110 new) do not
    fit 12 blocks together: vLLM preempts some and recomputes them (passage flags too)."""
    reqs = [GenerationRequest(r.prompt_ids, r.passages, Sampling(110)) for r in requests_ if r.passages][:6]
    before = engine.preemptions
    results = [r.token_ids for r in engine.generate(reqs)]
    assert engine.preemptions > before
    assert results == _ref(reference, reqs)


def test_prefix_cache_hits_keep_outputs_exact(engine, reference, requests_):
    full = [r for r in requests_ if r.passages and sum(map(len, r.passages)) > 0][:4]
    before = engine.cached_prompt_tokens
    # same passages, new prompts: the passage region (>= one 128-token block) is reused
    new_prompts = [
        GenerationRequest((*r.prompt_ids[:-1], r.prompt_ids[1]), r.passages, Sampling(MAX_NEW)) for r in full
    ]
    first = engine.generate(full)
    second = engine.generate(new_prompts)
    assert engine.cached_prompt_tokens - before >= 128 * len(full)
    assert [r.token_ids for r in first] == _ref(reference, full)
    assert [r.token_ids for r in second] == _ref(reference, new_prompts)


def test_stream_equals_generate_and_threads_share_the_engine(engine, reference, requests_):
    reqs = requests_[:6]
    expected = _ref(reference, reqs)
    streamed: dict[int, list[int]] = {}
    chunks_seen: dict[int, int] = {}

    def consume(i: int) -> None:
        chunks = list(engine.stream(reqs[i]))
        chunks_seen[i] = len(chunks)
        streamed[i] = [t for c in chunks for t in c]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(reqs))]
    generated: list = []
    threads.append(threading.Thread(target=lambda: generated.extend(engine.generate(requests_[6:12]))))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert [streamed[i] for i in range(len(reqs))] == expected
    assert max(chunks_seen.values()) > 1  # incremental, not one final chunk
    assert [r.token_ids for r in generated] == _ref(reference, requests_[6:12])


def test_seeded_sampling_is_reproducible(engine, requests_):
    """Seeded requests are chunk-prefilled too (vLLM-CPU's generator rewind is patched)."""
    r = requests_[2]

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(r.prompt_ids, r.passages, Sampling(12, temperature=1.5, seed=seed))

    a, b, c = (x.token_ids for x in engine.generate([sampled(3), sampled(3), sampled(4)]))
    alone = engine.generate([sampled(3)])[0].token_ids
    assert a == b == alone and a != c


def test_stream_can_be_abandoned(engine, requests_):
    it = engine.stream(GenerationRequest(requests_[0].prompt_ids, requests_[0].passages, Sampling(64)))
    next(it)
    it.close()  # aborts the request in vLLM; the engine keeps serving
    assert engine.generate(requests_[:1])[0].token_ids


def test_bad_requests_are_refused(engine, requests_):
    r = requests_[0]
    too_many = tuple(((5,),) * (engine.num_passages + 1))
    with pytest.raises(EngineError, match="num_passages"):
        engine.generate([GenerationRequest(r.prompt_ids, too_many)])
    with pytest.raises(EngineError, match="max_passage_tokens"):
        engine.generate([GenerationRequest(r.prompt_ids, ((7,) * (engine.max_passage_tokens + 1),))])
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.generate([GenerationRequest((1, 10**6), None)])
    with pytest.raises(EngineError, match="max_model_len"):
        list(engine.stream(GenerationRequest((1,) * 600, None)))


def test_bench_engines_on_the_running_engine(engine, ckpt):
    report = run_engines_bench(ckpt, requests=4, max_new_tokens=4, prompt_tokens=8, vllm_engine=engine)
    assert report["greedy_exact_match"] == 1.0
    assert report["passages_per_request"] == engine.num_passages
    for kind in ("torch", "vllm"):
        assert report[kind]["generated_tokens"] > 0 and report[kind]["tokens_per_s"] > 0
    assert report["ratio_vllm_over_torch"] == pytest.approx(
        report["vllm"]["tokens_per_s"] / report["torch"]["tokens_per_s"], rel=1e-2
    )


def test_plain_engine_is_stock_llama_on_the_passages_as_text_and_compare_plain_times_it(
    engine, ckpt, requests_
):
    """``plain=True`` serves the checkpoint as stock vLLM Llama: its greedy tokens are
    transformers' on ``passages + prompt``; ``bench engines --compare-plain`` times it."""
    from transformers import AutoModelForCausalLM

    reqs = [*[r for r in requests_ if r.passages and sum(map(len, r.passages))][:3], requests_[5]]
    plain = build_engine("vllm", str(ckpt), plain=True, max_num_seqs=4, kv_cache_gib=0.05, max_model_len=512)
    try:
        got = [r.token_ids for r in plain.generate(reqs)]
        assert plain.attention_stats() == {}
        report = run_engines_bench(
            ckpt,
            requests=4,
            max_new_tokens=4,
            prompt_tokens=8,
            vllm_engine=engine,
            compare_plain=True,
            plain_engine=plain,
        )
    finally:
        plain.close()
    lm = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for req, tokens in zip(reqs, got, strict=True):
        ids = [t for p in req.passages or () for t in p] + list(req.prompt_ids)
        with torch.no_grad():
            out = lm.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids) :]
        stops = set(plain.stop_token_ids)
        want = next((out[:i].tolist() for i, t in enumerate(out.tolist()) if t in stops), out.tolist())
        assert tokens == want, req.request_id
    assert report["plain_vllm"]["generated_tokens"] > 0
    assert report["ratio_vllm_over_plain_vllm"] == pytest.approx(
        report["vllm"]["tokens_per_s"] / report["plain_vllm"]["tokens_per_s"], rel=1e-2
    )


def test_reload_serves_exactly_the_new_checkpoint(engine, ckpt, requests_, tmp_path):
    model = ImpRAGModel.from_pretrained(ckpt)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    new_dir = tmp_path / "b"
    model.save_pretrained(new_dir)
    reqs = requests_[:8]
    old = [r.token_ids for r in engine.generate(reqs)]

    new_hash = engine.reload(str(new_dir))
    assert new_hash == checkpoint_hash(new_dir) == engine.checkpoint_hash != checkpoint_hash(ckpt)
    now = [r.token_ids for r in engine.generate(reqs)]
    assert now == _ref(build_engine("torch", str(new_dir), device="cpu"), reqs)
    assert now != old

    bad = tmp_path / "bad"
    shutil.copytree(new_dir, bad)
    cfg = (bad / "imprag_config.json").read_text().replace('"num_passages": 3', '"num_passages": 4')
    (bad / "imprag_config.json").write_text(cfg)
    with pytest.raises(EngineError, match="num_passages"):
        engine.reload(str(bad))
    tied = tmp_path / "tied"
    shutil.copytree(new_dir, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(EngineError, match="tied embeddings"):
        engine.reload(str(tied))
    assert engine.checkpoint_hash == new_hash
    assert engine.checkpoint_hash == new_hash


# ---------------------------------------------------------------- asyncio API
def _distinct(requests_, max_new: int) -> list[GenerationRequest]:
    """8 requests: 4 with passages, 4 closed book (the same prompts)."""
    with_p = [r for r in requests_ if r.passages][:4]
    return [
        GenerationRequest(r.prompt_ids, p, Sampling(max_new), f"d{i}")
        for i, (r, p) in enumerate([(r, r.passages) for r in with_p] + [(r, None) for r in with_p])
    ]


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.1f} s waiting for {what}"
        await asyncio.sleep(0.01)


def test_64_concurrent_astreams_finish_and_equal_generate(engine, requests_):
    """64 streams in one event loop (8 run at once: max_num_seqs=8); each equals generate."""
    distinct = _distinct(requests_, 4)
    expected = [r.token_ids for r in engine.generate(distinct)]
    # ids repeat: two live requests share each id
    reqs = [
        GenerationRequest(distinct[i % 8].prompt_ids, distinct[i % 8].passages, Sampling(4), f"s{i % 32}")
        for i in range(64)
    ]
    took: dict[int, float] = {}

    async def consume(i: int) -> list[int]:
        start = time.monotonic()
        out = [t async for chunk in engine.astream(reqs[i]) for t in chunk]
        took[i] = time.monotonic() - start
        return out

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(consume(i) for i in range(64))), timeout=300)

    streamed = asyncio.run(main())
    assert streamed == [expected[i % 8] for i in range(64)]
    assert len(took) == 64 and max(took.values()) < 240
    assert engine.running() == []


def test_cancelled_and_closed_requests_are_aborted(engine, requests_):
    """A cancelled agenerate, a stream closed early and abort(id) end their vLLM requests long
    before their 300-token budget (gauged by the stream's own token pace)."""
    r = next(r for r in requests_ if r.passages)
    long = GenerationRequest(r.prompt_ids, r.passages, Sampling(300))
    unfinished = engine._llm.output_processor.get_num_unfinished_requests
    engine.check_health()  # the engine core and its loop thread are alive

    async def main() -> list[float]:
        waits = []
        # a stream closed early; its pace bounds how long 300 tokens would take
        stream = engine.astream(long)
        await anext(stream)
        start = time.monotonic()
        for _ in range(3):
            await anext(stream)
        pace = (time.monotonic() - start) / 3
        t0 = time.monotonic()
        await stream.aclose()
        await _wait_for(lambda: not engine.running() and unfinished() == 0, 60, "the closed stream's abort")
        waits.append((time.monotonic() - t0) / pace)
        # a cancelled agenerate
        task = asyncio.create_task(engine.agenerate(long))
        await _wait_for(lambda: unfinished() == 1, 60, "the request to start")
        await asyncio.sleep(3 * pace)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(
            lambda: not engine.running() and unfinished() == 0, 60, "the cancelled request's abort"
        )
        waits.append((time.monotonic() - t0) / pace)
        # abort(id) by an operator: the caller hears RequestAbortedError
        stream = engine.astream(GenerationRequest(long.prompt_ids, long.passages, long.sampling, "op-1"))
        await anext(stream)
        assert engine.running() == ["op-1"]
        engine.abort("op-1")
        with pytest.raises(RequestAbortedError, match="op-1"):
            while True:
                await anext(stream)
        assert engine.running() == []
        await _wait_for(lambda: unfinished() == 0, 60, "vLLM to drop the aborted request")
        return waits

    waits = asyncio.run(main())
    assert max(waits) < 100, waits


def test_bad_seed_fails_alone_and_seeded_sampling_ignores_batchmates(engine, requests_):
    distinct = _distinct(requests_, 4)
    r = distinct[1]
    seeded = GenerationRequest(r.prompt_ids, r.passages, Sampling(8, temperature=1.5, seed=3), "seeded")
    bad_sampling = Sampling(3, temperature=1.0, seed=1)
    object.__setattr__(bad_sampling, "seed", 2**64)  # bypasses Sampling's own check
    bad = GenerationRequest(r.prompt_ids, r.passages, bad_sampling, "bad")
    good = distinct[:6]

    async def alone():
        return await engine.agenerate(seeded)

    async def batched():
        reqs = [*good[:3], bad, seeded, *good[3:]]
        return await asyncio.gather(*(engine.agenerate(x) for x in reqs), return_exceptions=True)

    first = asyncio.run(alone()).token_ids
    out = asyncio.run(batched())
    assert isinstance(out[3], EngineError) and "seed" in str(out[3])
    assert not any(isinstance(o, BaseException) for i, o in enumerate(out) if i != 3), out
    assert out[4].token_ids == first
    assert [o.token_ids for o in out[:3] + out[5:]] == [x.token_ids for x in engine.generate(good)]
