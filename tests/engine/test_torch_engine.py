"""The torch reference engine behind the GenerationEngine interface."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import torch

from imprag_ray.data.readers import read_corpus
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.engine import EngineError, GenerationRequest, RequestAbortedError, Sampling, build_engine
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.model.imprag import ImpRAGModel


@pytest.fixture(scope="module")
def engine(tiny_world):
    eng = build_engine("torch", str(tiny_world["ckpt"]), device="cpu", max_batch_size=3)
    yield eng
    eng.close()


def _requests(tiny_world, n=5, with_passages=True, max_new_tokens=6):
    tok = load_tokenizer(tiny_world["ckpt"])
    passages = read_corpus(tiny_world["world"] / "corpus.jsonl")[:20]
    store = PassageStore(passages, tok, 48)
    out = []
    for i in range(n):
        prompt = tuple([tok.bos_token_id] + tok(f"question {i} about " + passages[i].title)["input_ids"])
        pas = tuple(tuple(store.tokens[p.id]) for p in passages[i : i + 1 + i % 3]) if with_passages else None
        out.append(GenerationRequest(prompt, pas, Sampling(max_new_tokens=max_new_tokens), f"r{i}"))
    return out


def _reference(model: ImpRAGModel, req: GenerationRequest, eos: int) -> list[int]:
    ids = torch.tensor([req.prompt_ids])
    mask = torch.ones_like(ids)
    p_ids = p_mask = None
    if req.passages is not None:
        p_ids = torch.zeros(1, model.k, model.l_max, dtype=torch.long)
        p_mask = torch.zeros_like(p_ids)
        for j, p in enumerate(req.passages):
            p_ids[0, j, : len(p)] = torch.tensor(p)
            p_mask[0, j, : len(p)] = 1
    new = model.generate(
        ids, mask, p_ids, p_mask, max_new_tokens=req.sampling.max_new_tokens, eos_token_id=eos
    )[0].tolist()
    return new[: new.index(eos)] if eos in new else new


@pytest.mark.parametrize("with_passages", [True, False])
def test_batched_greedy_equals_one_by_one_reference(engine, tiny_world, with_passages):
    reqs = _requests(tiny_world, with_passages=with_passages)
    results = engine.generate(reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert res.token_ids == _reference(engine.model, req, engine.eos_token_id)
        if len(res.token_ids) < 6:
            assert res.finish_reason == "stop"


def test_stream_yields_the_same_tokens(engine, tiny_world):
    req = _requests(tiny_world, n=2)[1]
    streamed = [t for chunk in engine.stream(req) for t in chunk]
    assert streamed == engine.generate([req])[0].token_ids


def test_mixed_sampling_and_modes_in_one_call(engine, tiny_world):
    a, b = _requests(tiny_world, n=2)
    c = _requests(tiny_world, n=1, with_passages=False, max_new_tokens=3)[0]
    sampled = GenerationRequest(a.prompt_ids, a.passages, Sampling(4, temperature=1.0, seed=7))
    res = engine.generate([a, c, sampled, b])
    assert len(res[1].token_ids) <= 3
    again = engine.generate([sampled])[0]
    assert again.token_ids == res[2].token_ids  # seeded sampling is reproducible


def test_bad_requests_are_refused(engine, tiny_world):
    req = _requests(tiny_world, n=1)[0]
    too_many = GenerationRequest(req.prompt_ids, tuple([(1, 2)] * (engine.num_passages + 1)))
    with pytest.raises(EngineError, match="num_passages"):
        engine.generate([too_many])
    too_long = GenerationRequest(req.prompt_ids, ((1,) * (engine.max_passage_tokens + 1),))
    with pytest.raises(EngineError, match="max_passage_tokens"):
        engine.generate([too_long])
    with pytest.raises(EngineError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(EngineError, match="prompt_ids"):
        GenerationRequest(())
    with pytest.raises(EngineError, match="engine kind"):
        build_engine("nope", str(tiny_world["ckpt"]))


def test_reload_swaps_weights_and_hash(tiny_world, tmp_path):
    eng = build_engine("torch", str(tiny_world["ckpt"]), device="cpu")
    req = _requests(tiny_world, n=1)[0]
    old_hash = eng.checkpoint_hash
    other = tmp_path / "other"
    shutil.copytree(tiny_world["ckpt"], other)
    model = ImpRAGModel.from_pretrained(other)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(other)
    new_hash = eng.reload(str(other))
    assert eng.checkpoint_hash == new_hash != old_hash
    assert eng.generate([req])[0].token_ids == _reference(model.eval(), req, eng.eos_token_id)


# ---------------------------------------------------------------- asyncio API
# One engine for the async tests: batches of up to 32, and a scheduler that waits 50 ms
# for a batch to fill, so requests started together by one event loop share a batch.
@pytest.fixture(scope="module")
def aengine(tiny_world):
    eng = build_engine("torch", str(tiny_world["ckpt"]), device="cpu", max_batch_size=32, batch_wait_s=0.05)
    yield eng
    eng.close()


def _mixed(tiny_world, n: int, max_new: tuple[int, ...] = (2, 3, 4)) -> list[GenerationRequest]:
    """n greedy requests over 8 distinct prompts (half closed book) with budgets cycling
    through ``max_new``; ids repeat (two live requests share each id)."""
    base = _requests(tiny_world, n=4) + _requests(tiny_world, n=4, with_passages=False)
    return [
        GenerationRequest(
            base[i % 8].prompt_ids,
            base[i % 8].passages,
            Sampling(max_new[i % len(max_new)]),
            f"s{i % (n // 2)}",
        )
        for i in range(n)
    ]


async def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_64_concurrent_astreams_finish_and_equal_generate(aengine, tiny_world):
    reqs = _mixed(tiny_world, 64)
    expected = [r.token_ids for r in aengine.generate(reqs)]
    took: dict[int, float] = {}
    seen_ids: list[list[str]] = []

    async def consume(i: int) -> list[int]:
        start = time.monotonic()
        out = [t async for chunk in aengine.astream(reqs[i]) for t in chunk]
        took[i] = time.monotonic() - start
        return out

    async def main() -> list[list[int]]:
        tasks = [asyncio.create_task(consume(i)) for i in range(len(reqs))]
        await _wait_for(lambda: len(aengine.running()) > 8, what="requests queued")
        seen_ids.append(aengine.running())
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)

    streamed = asyncio.run(main())
    assert streamed == expected
    assert len(took) == 64 and max(took.values()) < 120, sorted(took.values())[-3:]
    assert len(set(seen_ids[0])) == len(seen_ids[0])  # duplicate request ids got unique engine ids
    assert aengine.running() == []


def test_cancel_and_early_close_stop_decoding(aengine, tiny_world):
    """Cancelled / closed requests leave running() at once and the worker stops stepping
    them: every tiny-world request decodes to its budget when left alone."""
    base = _requests(tiny_world, n=2)
    long_a = GenerationRequest(base[0].prompt_ids, base[0].passages, Sampling(64), "long-a")
    long_b = GenerationRequest(base[1].prompt_ids, base[1].passages, Sampling(64), "long-b")
    short = GenerationRequest(base[1].prompt_ids, base[1].passages, Sampling(10), "short")
    probe = GenerationRequest(base[0].prompt_ids, None, Sampling(1), "probe")

    async def main():
        # 1) a cancelled agenerate
        before = aengine.decode_steps
        task = asyncio.create_task(aengine.agenerate(long_a))
        await _wait_for(lambda: aengine.decode_steps >= before + 2, what="decoding to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert aengine.running() == []
        await aengine.agenerate(probe)  # the worker runs one batch at a time: the cancelled one is over
        cancelled_steps = aengine.decode_steps - before - 1

        # 2) an astream closed early, batched with a request that goes on
        before = aengine.decode_steps
        stream = aengine.astream(long_b)
        other = asyncio.create_task(aengine.agenerate(short))
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        assert aengine.running() in ([], ["short"])
        short_result = await other
        assert aengine.running() == []
        await aengine.agenerate(probe)
        return cancelled_steps, aengine.decode_steps - before - 1, first, short_result

    cancelled_steps, shared_steps, first, short_result = asyncio.run(main())
    assert cancelled_steps < 20  # not 64
    assert shared_steps < 20  # long-b stopped after its stream closed (not at 64); short ran 10
    head = aengine.generate([GenerationRequest(long_b.prompt_ids, long_b.passages, Sampling(2))])[0]
    assert [t for c in first for t in c] == head.token_ids
    # the surviving row, decoded on after its neighbour left the KV-cached batch, is exact
    assert short_result.token_ids == aengine.generate([short])[0].token_ids
    assert short_result.finish_reason == "length" and len(short_result.token_ids) == 10


def test_abort_by_id_and_close_fail_the_waiting_callers(tiny_world):
    eng = build_engine("torch", str(tiny_world["ckpt"]), device="cpu", batch_wait_s=0.05)
    req = _requests(tiny_world, n=1)[0]

    async def main():
        stream = eng.astream(GenerationRequest(req.prompt_ids, req.passages, Sampling(64), "op"))
        assert await anext(stream)
        eng.abort("op")
        with pytest.raises(RequestAbortedError, match="op"):
            await anext(stream)
        eng.check_health()  # serving: healthy
        before = eng.decode_steps
        pending = asyncio.create_task(eng.agenerate(GenerationRequest(req.prompt_ids, None, Sampling(64))))
        await _wait_for(lambda: eng.decode_steps > before, what="decoding to start")
        await asyncio.to_thread(eng.close)
        with pytest.raises(RequestAbortedError, match="closed"):
            await pending
        with pytest.raises(EngineError, match="closed"):
            await eng.agenerate(req)

    asyncio.run(main())
    assert not eng._worker.is_alive() and eng.running() == []
    with pytest.raises(EngineError, match="closed"):
        eng.check_health()  # the generation replica's health probe fails: Serve restarts it


def _bad_seed(req: GenerationRequest) -> GenerationRequest:
    """A request whose seed bypassed Sampling's own check (as a caller building the frozen
    dataclass by other means could)."""
    sampling = Sampling(3, temperature=1.0, seed=1)
    object.__setattr__(sampling, "seed", 2**64)
    return GenerationRequest(req.prompt_ids, req.passages, sampling, "bad")


def test_a_bad_seed_fails_only_its_own_request(aengine, tiny_world):
    with pytest.raises(EngineError, match="seed"):
        Sampling(temperature=1.0, seed=2**64)
    with pytest.raises(EngineError, match="seed"):
        Sampling(seed=-1)
    Sampling(seed=2**63 - 1)
    good = _mixed(tiny_world, 8)[:7]
    reqs = [*good[:3], _bad_seed(good[0]), *good[3:]]

    async def main():
        return await asyncio.gather(*(aengine.agenerate(r) for r in reqs), return_exceptions=True)

    out = asyncio.run(main())
    errors = [o for o in out if isinstance(o, BaseException)]
    assert len(errors) == 1 and isinstance(out[3], EngineError) and "seed" in str(out[3])
    assert [o.token_ids for o in out if not isinstance(o, BaseException)] == [
        r.token_ids for r in aengine.generate(good)
    ]


def test_seeded_sampling_is_the_same_alone_and_batched(aengine, tiny_world):
    a = _requests(tiny_world, n=1)[0]

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(
            a.prompt_ids, a.passages, Sampling(6, temperature=1.0, seed=seed), f"seed{seed}"
        )

    others = [
        *_mixed(tiny_world, 8)[:5],
        sampled(8),
        GenerationRequest(a.prompt_ids, a.passages, Sampling(4, 0.7)),
    ]

    async def alone():
        return await aengine.agenerate(sampled(7))

    async def amid():
        return await asyncio.gather(aengine.agenerate(sampled(7)), *(aengine.agenerate(r) for r in others))

    first = asyncio.run(alone()).token_ids
    batched = asyncio.run(amid())
    assert batched[0].token_ids == first
    assert batched[6].token_ids != first  # another seed samples other tokens
    assert aengine.generate([sampled(7)])[0].token_ids == first
