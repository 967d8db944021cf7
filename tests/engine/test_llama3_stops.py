"""The torch engine on an ImpRAG checkpoint of an instruct Llama-3 snapshot: answers end at
``<|eot_id|>``, the last of the three eos ids of generation_config.json (an engine that
only knows the first, ``<|end_of_text|>``, never stops)."""

from __future__ import annotations

import json

import pytest

from imprag_ray.engine import build_engine
from imprag_ray.model.checkpoint import load_tokenizer
from tests.engine.llama3_imprag import chat_and_raw_requests, imprag_checkpoint, reference_tokens
from tests.llama3_micro import read_generation_eos

# the session's first user builds the micro snapshot (1-3 min on a loaded 2-core box)
pytestmark = pytest.mark.timeout(900)
MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt(tiny_world, tmp_path_factory):
    return imprag_checkpoint(tmp_path_factory, tiny_world["world"] / "corpus.jsonl")


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = build_engine("torch", str(ckpt), device="cpu")
    yield eng
    eng.close()


def test_stop_ids_are_every_eos_id_of_generation_config(engine, ckpt):
    eos = read_generation_eos(ckpt)
    eot = load_tokenizer(ckpt).convert_tokens_to_ids("<|eot_id|>")
    assert len(eos) == 3 and eos[-1] == eot != eos[0]
    assert engine.stop_token_ids[:3] == eos
    assert json.loads((ckpt / "config.json").read_text()).get("pad_token_id") is None  # as Meta's files


def test_greedy_generation_stops_at_eot(engine, ckpt, tiny_world):
    eot = load_tokenizer(ckpt).convert_tokens_to_ids("<|eot_id|>")
    requests = chat_and_raw_requests(ckpt, tiny_world["world"] / "corpus.jsonl", MAX_NEW)
    results = engine.generate(requests)
    for req, res in zip(requests, results, strict=True):
        assert res.finish_reason == "stop" and len(res.token_ids) < MAX_NEW, (req.request_id, res)
        raw = reference_tokens(engine.model, req, MAX_NEW)  # decoded on, past every stop id
        n = len(res.token_ids)
        assert raw[:n] == res.token_ids and raw[n] == eot, (req.request_id, raw)
    assert any(r.passages is not None for r in requests) and any(r.passages is None for r in requests)
    streamed = [t for chunk in engine.stream(requests[1]) for t in chunk]
    assert streamed == results[1].token_ids
