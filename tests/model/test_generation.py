"""Cached reference engine vs uncached greedy recomputation with the full forward."""

from __future__ import annotations

import pytest
import torch

from imprag_ray.model.generation import select_next
from tests.model.test_imprag_exact import PASSAGE_LENS, PROMPT_LENS, make_batch, wrap


def uncached_greedy(model, ids, mask, p_ids, p_mask, steps, eos=None):
    """One row at a time: re-run the whole forward on prompt + generated tokens."""
    rows = []
    for i in range(ids.shape[0]):
        seq = ids[i, : int(mask[i].sum())].tolist()
        out = []
        for _ in range(steps):
            x = torch.tensor([seq])
            pi = None if p_ids is None else p_ids[i : i + 1]
            pm = None if p_mask is None else p_mask[i : i + 1]
            tok = int(model(x, torch.ones_like(x), pi, pm).logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
            if eos is not None and tok == eos:
                break
        rows.append(out)
    return rows


@pytest.mark.parametrize("with_passages", [True, False])
@pytest.mark.parametrize("b,t", [(1, 3), (2, 4), (0, 5)])
def test_cached_generate_equals_uncached_recomputation(llama, b, t, with_passages):
    model = wrap(llama, b, t)
    gen = torch.Generator().manual_seed(7 + b)
    ids, mask, p_ids, p_mask, *_ = make_batch(
        gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    if not with_passages:
        p_ids = p_mask = None
    with torch.no_grad():
        cached = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=8)
        ref = uncached_greedy(model, ids, mask, p_ids, p_mask, 8)
    assert cached.shape == (3, 8)
    assert cached.tolist() == ref


def test_generate_reuses_the_stage1_state_and_stops_at_eos(llama):
    model = wrap(llama, 2, 4)
    gen = torch.Generator().manual_seed(11)
    ids, mask, p_ids, p_mask, *_ = make_batch(
        gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    with torch.no_grad():
        free = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=6)
        eos = int(free[1, 2])  # make row 1 finish at its third token
        state = model.encode_prompt(ids, mask, num_passages=3)
        calls = []
        orig = model.encode_prompt
        model.encode_prompt = lambda *a, **k: calls.append(1) or orig(*a, **k)
        out = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=6, prompt_state=state,
                             eos_token_id=eos, pad_token_id=0)
        del model.encode_prompt
    assert calls == []  # stage 1 was not recomputed
    ref = uncached_greedy(model, ids, mask, p_ids, p_mask, 6, eos=eos)
    for i, row in enumerate(ref):
        assert out[i, : len(row)].tolist() == row
        assert set(out[i, len(row):].tolist()) <= {0}


def test_prompt_state_for_other_passage_count_is_refused(llama):
    model = wrap(llama, 1, 3)
    ids = torch.randint(3, 90, (1, 4))
    state = model.encode_prompt(ids, torch.ones_like(ids), num_passages=2)
    with pytest.raises(ValueError, match="num_passages=0"):
        model.generate(ids, torch.ones_like(ids), prompt_state=state, max_new_tokens=2)


def test_sampling_respects_top_k_and_is_seeded():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    picks = [int(select_next(logits, do_sample=True, top_k=2, generator=g1)) for _ in range(50)]
    again = [int(select_next(logits, do_sample=True, top_k=2, generator=g2)) for _ in range(50)]
    assert set(picks) == {1, 2} and picks == again
    nucleus = {int(select_next(logits, do_sample=True, top_p=0.3, generator=g1)) for _ in range(30)}
    assert nucleus == {1}


def test_generation_stops_at_any_of_several_eos_ids(llama):
    """eos_token_id may be a list (Llama-3 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>):
    each row stops at the first of them it emits; other rows go on unchanged."""
    model = wrap(llama, 2, 4)
    gen = torch.Generator().manual_seed(11)
    ids, mask, p_ids, p_mask, *_ = make_batch(gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3)
    with torch.no_grad():
        free = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=6)
        stops = [int(free[0, 1]), int(free[1, 3])]  # two different ids end two rows
        out = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=6, eos_token_id=stops, pad_token_id=0)
    assert stops[0] != stops[1]
    for i, row in enumerate(free.tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        assert out[i, :end].tolist() == row[:end]
        assert set(out[i, end:].tolist()) <= {0}
    assert out.shape[1] <= 6
