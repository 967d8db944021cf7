"""Two-stage ImpRAG inference over task examples (Ray-free; DESIGN §1 "Inference").

Stage 1 runs the bottom layers on the prompt -> query embedding -> exact search over
the corpus embeddings -> top-k passage ids. Stage 2 reuses the stage-1 state, reads
the k passages in the middle layers and decodes greedily. The same function also runs
closed-book (no passages) and with externally given rankings (explicit-query
baselines such as BM25 over the whole prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from imprag_ray.data.records import RETRIEVAL_FORMATS, TaskExample
from imprag_ray.data.templates import format_prompt
from imprag_ray.data.tokenized import PassageStore, encode_prompt_text
from imprag_ray.index.flat import DenseIndex
from imprag_ray.model.imprag import ImpRAGModel


@torch.no_grad()
def encode_corpus(model: ImpRAGModel, store: PassageStore, batch_size: int = 128) -> DenseIndex:
    """Embed every passage with the current bottom layers -> a :class:`DenseIndex`."""
    ids = store.order
    by_len = sorted(range(len(ids)), key=lambda i: len(store.tokens[ids[i]]))  # less padding
    out = np.zeros((len(ids), model.embedding_dim), dtype=np.float32)
    for start in range(0, len(by_len), batch_size):
        rows = by_len[start : start + batch_size]
        tok, mask = store.tensor([ids[i] for i in rows])
        width = max(int(mask.sum(1).max()), 1)
        emb = model.embed_passages(tok[:, :width], mask[:, :width])
        out[rows] = emb.float().numpy()
    return DenseIndex(ids, out)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def decode_answer(tokenizer, tokens: list[int]) -> str:
    """Text of generated tokens up to the first ``</s>``."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def predict(
    model: ImpRAGModel,
    tokenizer,
    store: PassageStore,
    examples: Sequence[TaskExample],
    *,
    index: DenseIndex | None,
    top_k: int,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    max_prompt_tokens: int = 128,
    rankings: Callable[[Sequence[TaskExample]], list[list[str]]] | None = None,
    search_depth: int | None = None,
) -> list[dict]:
    """Predictions ``{"id", "prediction", "retrieved", "scores"}`` for each example.

    index=None and rankings=None -> closed book (the base LLM path, no passages).
    ``rankings`` (a function of the batch) replaces the model's own retrieval.
    ``search_depth`` (>= top_k): how many ids to retrieve and report (for recall@k with
    k > top_k); only the first ``top_k`` are read.
    """
    depth = max(search_depth or top_k, top_k)
    model.eval()
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        prompts = [encode_prompt_text(tokenizer, format_prompt(ex), max_prompt_tokens) for ex in batch]
        ids, mask = _pad(prompts, tokenizer.pad_token_id)
        use_passages = (index is not None or rankings is not None) and all(
            ex.format in RETRIEVAL_FORMATS for ex in batch
        )
        retrieved: list[list[str]] = [[] for _ in batch]
        scores: list[list[float]] = [[] for _ in batch]
        state = model.encode_prompt(ids, mask, num_passages=top_k if use_passages else 0)
        p_ids = p_mask = None
        if use_passages:
            if rankings is not None:
                retrieved = [list(r[:depth]) for r in rankings(batch)]
            else:
                retrieved, sc = index.search(state.query_embedding.float().numpy(), depth)
                scores = sc.tolist()
            p_ids = torch.zeros(len(batch), top_k, store.l_max, dtype=torch.long)
            p_mask = torch.zeros_like(p_ids)
            for i, pids in enumerate(retrieved):
                tok, m = store.tensor(pids[:top_k])
                p_ids[i, : len(tok)], p_mask[i, : len(tok)] = tok, m
        new = model.generate(
            ids,
            mask,
            p_ids,
            p_mask,
            max_new_tokens=max_new_tokens,
            prompt_state=state,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, ex in enumerate(batch):
            out.append(
                {
                    "id": ex.id,
                    "prediction": decode_answer(tokenizer, new[i].tolist()),
                    "retrieved": list(retrieved[i]),
                    "scores": [float(s) for s in scores[i]],
                }
            )
    return out
