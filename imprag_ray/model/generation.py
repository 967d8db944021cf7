"""Reference generation engine: batched, KV-cached ImpRAG decoding in plain PyTorch.

It is the correctness oracle for faster engines (vLLM). Per request, the passage KV of
layers b..t is computed once (:meth:`ImpRAGModel.encode_passage_kv`) and reused at
every step; the stage-1 bottom-layer pass of the prompt (a :class:`PromptState`, e.g.
the one computed for retrieval) is reused, not recomputed.

Right-padded prompts of different lengths decode together: generated token s of row i
sits at position ``offset + len_i + s``; the PAD columns between a short prompt and its
generated tokens stay masked in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
from torch import Tensor

from imprag_ray.model.attention import LayerKV, PassageKV
from imprag_ray.model.imprag import ImpRAGModel, PromptState


def select_next(
    logits: Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick next tokens from logits [B, V] -> [B] (greedy, or sampling with
    temperature / top-k / top-p)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: ImpRAGModel, input_ids: Tensor, attention_mask: Tensor, *args, **kwargs) -> Tensor:
    """Decode up to ``max_new_tokens`` new tokens per row -> [B, T] (T <= max_new_tokens).

    Arguments as :func:`generate_steps`, which yields the same tokens one step at a time.
    """
    return torch.stack(list(generate_steps(model, input_ids, attention_mask, *args, **kwargs)), dim=1)


@torch.no_grad()
def generate_steps(
    model: ImpRAGModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    passage_ids: Tensor | None = None,
    passage_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prompt_state: PromptState | None = None,
    passage_kv: PassageKV | None = None,
    sampler: Callable[[Tensor], Tensor] | None = None,
    keep_rows: Callable[[], Tensor | None] | None = None,
) -> Generator[Tensor, None, None]:
    """Yield the next token of every row, [B], once per decoding step (streaming).

    Rows that emitted ``eos_token_id`` (one id, or several: a row stops at any of them, as
    at Llama-3's ``<|eot_id|>`` / ``<|end_of_text|>``) are filled with ``pad_token_id``
    afterwards; decoding stops early once every row has finished.

    Args:
        input_ids / attention_mask: right-padded prompts [B, L].
        passage_ids / passage_mask: [B, k, l_max] retrieved passages (optional).
        prompt_state: the stage-1 state from ``model.encode_prompt`` (reused if given;
            it must have been encoded for the same number of passages).
        passage_kv: precomputed passage KV (else computed here from passage_ids).
        sampler: picks the next tokens from logits [B', V] -> [B'] instead of
            :func:`select_next` with the sampling arguments (an engine with per-row
            settings or per-row random generators).
        keep_rows: called before each decoding step after the first; returns the indices
            (into the rows of the last yielded token) of the rows to go on with, or None
            to keep every row. Dropped rows leave the KV-cached batch (no more compute for
            them); later yields hold the kept rows only, in the given order. An empty
            selection ends decoding.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    n = 0 if passage_ids is None else passage_ids.shape[1]
    if passage_kv is not None and passage_ids is None:
        n = model.k
    state = prompt_state or model.encode_prompt(input_ids, attention_mask, num_passages=n)
    if state.offset != n * model.l_max:
        raise ValueError(
            f"prompt_state was encoded for offset {state.offset} but the request has {n} "
            f"passages (offset {n * model.l_max}); call encode_prompt(num_passages={n})"
        )
    if passage_kv is None and passage_ids is not None:
        if passage_mask is None:
            raise ValueError("passage_mask is required with passage_ids")
        passage_kv = model.encode_passage_kv(passage_ids, passage_mask)
    stop = _stop_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.lm.config.pad_token_id
        pad_token_id = stop[0] if pad_token_id is None and stop else pad_token_id
        pad_token_id = 0 if pad_token_id is None else pad_token_id

    h, cache = model.continue_prompt(state, passage_kv)  # h: [B, L, D]
    bsz = h.shape[0]
    rows = torch.arange(bsz, device=h.device)
    lengths = state.valid.long().sum(dim=1)  # [B]
    logits = model.lm_logits(h[rows, lengths - 1])  # [B, V]
    cache_valid = state.valid
    finished = torch.zeros(bsz, dtype=torch.bool, device=h.device)
    stop_ids = torch.tensor(stop, dtype=torch.long, device=h.device)  # [S]
    sample_args = dict(
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    for step in range(max_new_tokens):
        token = sampler(logits) if sampler is not None else select_next(logits, **sample_args)  # [B]
        if stop:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished = finished | torch.isin(token, stop_ids)
        yield token
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        keep = keep_rows() if keep_rows is not None else None
        if keep is not None:
            if keep.numel() == 0:
                break
            keep = keep.to(h.device)
            token, lengths, finished = token[keep], lengths[keep], finished[keep]
            cache = [LayerKV(c.keys[keep], c.values[keep]) for c in cache]
            cache_valid = cache_valid[keep]
            if passage_kv is not None:
                layers = [LayerKV(c.keys[keep], c.values[keep]) for c in passage_kv.layers]
                passage_kv = PassageKV(layers, passage_kv.mask[keep])
            bsz = token.shape[0]
        positions = (state.offset + lengths + step).unsqueeze(1)  # [B, 1]
        new_valid = torch.ones(bsz, 1, dtype=torch.bool, device=h.device)
        x = model.decoder.embed_tokens(token.unsqueeze(1))  # [B, 1, D]
        x, new_kv = model.run_layers(
            x, positions, new_valid, 0, model.num_layers,
            past=cache, past_valid=cache_valid, passage_kv=passage_kv,
        )
        cache = [
            LayerKV(torch.cat([c.keys, n_.keys], 2), torch.cat([c.values, n_.values], 2))
            for c, n_ in zip(cache, new_kv, strict=False)
        ]
        cache_valid = torch.cat([cache_valid, new_valid], dim=1)
        logits = model.lm_logits(x[:, 0])


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """``eos_token_id`` as a list of ids (empty: decode to ``max_new_tokens``)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, Sequence):
        return [int(i) for i in eos_token_id]
    return [int(eos_token_id)]
