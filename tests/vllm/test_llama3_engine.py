"""VLLMEngine on an ImpRAG checkpoint of an instruct micro Llama-3 (28 layers, b=7, t=19,
GQA, head_dim != hidden / heads, llama3 RoPE scaling, tied embeddings, config.json
max_position_embeddings 131072, no pad token, three eos ids).

With default options the engine used to sit at max_model_len 131072 with a 0.5 GiB KV
cache (vLLM refused to start: one such sequence needs 1.75 GiB); it now sizes itself from
the request budget. Two engines (~30-60 s each to start on 2 cores): the instruct
checkpoint (answers end at ``<|eot_id|>``, after very few tokens) and the base one, whose
random model never stops, for token-exactness over whole answers on this architecture.
"""

from __future__ import annotations

import json

import pytest

from imprag_ray.engine import build_engine
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.vllm_plugin.engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_TOKENS
from tests.engine.llama3_imprag import L_MAX, K, chat_and_raw_requests, imprag_checkpoint, reference_tokens

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]  # + the micro snapshot build (1-3 min)

MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt(tiny_world, tmp_path_factory):
    return imprag_checkpoint(tmp_path_factory, tiny_world["world"] / "corpus.jsonl")


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = build_engine("vllm", str(ckpt))  # default options
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(ckpt):
    eng = build_engine("torch", str(ckpt), device="cpu")
    yield eng
    eng.close()


def test_default_options_size_the_engine_from_the_request_budget(engine, ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    assert hf["max_position_embeddings"] == 131072 and hf.get("pad_token_id") is None
    assert engine.max_model_len == K * L_MAX + DEFAULT_MAX_PROMPT_TOKENS + DEFAULT_MAX_NEW_TOKENS
    config = engine._llm.vllm_config
    scheduler = config.scheduler_config
    assert scheduler.max_num_seqs <= scheduler.max_num_batched_tokens  # vLLM's chunked-prefill rule
    assert scheduler.max_num_batched_tokens >= engine.max_model_len  # a whole request per step
    kv = config.cache_config.kv_cache_memory_bytes
    per_token = 28 * 2 * 2 * 32 * 4  # layers x (K, V) x KV heads x head_dim x fp32
    assert engine.max_model_len * per_token <= kv <= 32 * 8 * 128 * per_token  # one .. max_num_seqs sequences


def test_greedy_stops_at_eot_and_equals_the_torch_engine(engine, reference, ckpt, tiny_world):
    eot = load_tokenizer(ckpt).convert_tokens_to_ids("<|eot_id|>")
    assert engine.stop_token_ids == reference.stop_token_ids and eot in engine.stop_token_ids
    requests = chat_and_raw_requests(ckpt, tiny_world["world"] / "corpus.jsonl", MAX_NEW)
    got, want = engine.generate(requests), reference.generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for req, res in zip(requests, got, strict=True):
        assert res.finish_reason == "stop" and len(res.token_ids) < MAX_NEW, (req.request_id, res)
        raw = reference_tokens(reference.model, req, MAX_NEW)
        assert raw[len(res.token_ids)] == eot  # the token that ended the answer
    # the PAD slots of a region only partly filled (k * l_max slots) need no pad token id
    assert any(r.passages and sum(map(len, r.passages)) < K * L_MAX for r in requests)
    streamed = [t for chunk in engine.stream(requests[1]) for t in chunk]
    assert streamed == got[1].token_ids


def test_base_checkpoint_greedy_tokens_equal_the_torch_engine(tiny_world, tmp_path_factory):
    """Whole MAX_NEW-token answers (the base model never emits its eos): GQA with head_dim
    32, llama3 RoPE scaling at passage / prompt positions, tied embeddings, PAD slots."""
    corpus = tiny_world["world"] / "corpus.jsonl"
    base = imprag_checkpoint(tmp_path_factory, corpus, instruct=False)
    requests = chat_and_raw_requests(base, corpus, MAX_NEW, chat=False)
    reference = build_engine("torch", str(base), device="cpu")
    want = reference.generate(requests)
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_NEW for r in want)
    assert len({tuple(r.token_ids) for r in want}) > 1
    with build_engine("vllm", str(base)) as engine:
        got = engine.generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
