"""Two-stage prediction: stop ids, exact search without FAISS, closed book."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imprag_ray.eval.predict import ExactSearch, decode_answer, encode_corpus, model_stop_ids, predict


@pytest.fixture(scope="module")
def setup(tiny_world):
    from imprag_ray.data.readers import read_corpus, read_tasks
    from imprag_ray.data.tokenized import PassageStore
    from imprag_ray.model.checkpoint import load_tokenizer
    from imprag_ray.model.imprag import ImpRAGModel

    model = ImpRAGModel.from_pretrained(tiny_world["ckpt"]).eval()
    tok = load_tokenizer(tiny_world["ckpt"])
    store = PassageStore(read_corpus(tiny_world["world"] / "corpus.jsonl")[:60], tok, model.l_max)
    examples = read_tasks(tiny_world["world"] / "dev/qa.jsonl", "qa")[:3]
    return model, tok, store, examples


def test_decode_answer_cuts_at_the_first_of_any_stop_id(setup):
    _, tok, _, _ = setup
    words = tok("red fish", add_special_tokens=False)["input_ids"]
    tokens = [*words, 7, *words, 9]
    assert decode_answer(tok, tokens, [9, 7]) == tok.decode(words).strip()
    assert decode_answer(tok, [*words, tok.eos_token_id, *words]) == tok.decode(words).strip()  # default: eos


def test_predict_stops_at_any_of_its_stop_ids(setup):
    from imprag_ray.data.templates import format_prompt
    from imprag_ray.data.tokenized import encode_prompt_text

    model, tok, store, examples = setup
    assert model_stop_ids(model, tok) == [tok.eos_token_id]  # the tiny checkpoint: one eos
    prompt = torch.tensor([encode_prompt_text(tok, format_prompt(examples[0]), 80)])
    with torch.no_grad():
        free = model.generate(prompt, torch.ones_like(prompt), max_new_tokens=6)[0].tolist()
    stop = free[2]
    cut = free[: free.index(stop)]
    pred = predict(
        model, tok, store, examples[:1], index=None, top_k=3, max_new_tokens=6, stop_ids=[10**6, stop]
    )[0]
    assert pred["prediction"] == tok.decode(cut, skip_special_tokens=True).strip()
    assert pred["retrieved"] == []  # closed book


def test_exact_search_without_faiss_matches_faiss(setup):
    from imprag_ray.index.flat import DenseIndex

    model, _, store, _ = setup
    index = encode_corpus(model, store, batch_size=16)
    emb = index.index.reconstruct_n(0, len(index))
    torch_index = ExactSearch(index.ids, emb)
    queries = np.random.default_rng(0).standard_normal((4, emb.shape[1])).astype(np.float32)
    ids_f, scores_f = DenseIndex(index.ids, emb).search(queries, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 job evaluates under autocast
        ids_t, scores_t = torch_index.search(queries, 5)
    assert ids_t == ids_f and scores_t.dtype == np.float32
    np.testing.assert_allclose(scores_t, scores_f, rtol=1e-5, atol=1e-5)
    subset = encode_corpus(model, store, ids=store.order[10:20])
    assert subset.ids == store.order[10:20]
    np.testing.assert_allclose(subset.index.reconstruct_n(0, 10), emb[10:20], rtol=1e-5, atol=1e-6)
