"""The torch reference engine behind the GenerationEngine interface."""

from __future__ import annotations

import shutil

import pytest
import torch

from imprag_ray.data.readers import read_corpus
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.engine import EngineError, GenerationRequest, Sampling, build_engine
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
