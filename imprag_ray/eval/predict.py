"""Two-stage ImpRAG inference over task examples (Ray-free; DESIGN §1 "Inference").

Stage 1 runs the bottom layers on the prompt -> query embedding -> exact search over
the corpus embeddings -> top-k passage ids. Stage 2 reuses the stage-1 state, reads
the k passages in the middle layers and decodes greedily. The same function also runs
closed-book (no passages) and with externally given rankings (explicit-query
baselines such as BM25 over the whole prompt).

Inputs are built on the CPU and moved to the device of the model's weights; outputs come
back to the CPU. Exact search uses FAISS when it is installed, else a torch matmul (a
machine with torch only, e.g. ``imprag_ray.bench.gpu_check``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from imprag_ray.data.records import RETRIEVAL_FORMATS, TaskExample
from imprag_ray.data.templates import format_prompt
from imprag_ray.data.tokenized import PassageStore, encode_prompt_text
from imprag_ray.model.imprag import ImpRAGModel


class ExactSearch:
    """Exact inner-product search in torch over passage embeddings [M, d]: the same
    ``ids`` / ``search`` as :class:`imprag_ray.index.flat.DenseIndex`, without FAISS."""

    def __init__(self, ids: Sequence[str], embeddings: np.ndarray):
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids but {embeddings.shape[0]} embeddings")
        self.ids = list(ids)
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))  # [M, d]

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k passage ids per query (best first) and their scores [Q, k]."""
        k = min(k, len(self.ids))
        with torch.autocast("cpu", enabled=False):  # exact fp32 scores, also inside a bf16 job's autocast
            scores = torch.from_numpy(np.asarray(queries, dtype=np.float32)) @ self.embeddings.T  # [Q, M]
        top, idx = scores.topk(k, dim=1)
        return [[self.ids[j] for j in row] for row in idx.tolist()], top.numpy()


def exact_index(ids: Sequence[str], embeddings: np.ndarray):
    """A FAISS ``DenseIndex`` over ``embeddings`` [M, d], or :class:`ExactSearch` where FAISS
    is not installed."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return ExactSearch(ids, embeddings)
    from imprag_ray.index.flat import DenseIndex

    return DenseIndex(ids, embeddings)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_corpus(
    model: ImpRAGModel, store: PassageStore, batch_size: int = 128, ids: Sequence[str] | None = None
):
    """Embed the passages ``ids`` (default: the whole store) with the current bottom layers
    -> an exact index (:func:`exact_index`)."""
    ids = list(store.order if ids is None else ids)
    device = _device(model)
    by_len = sorted(range(len(ids)), key=lambda i: len(store.tokens[ids[i]]))  # less padding
    out = np.zeros((len(ids), model.embedding_dim), dtype=np.float32)
    for start in range(0, len(by_len), batch_size):
        rows = by_len[start : start + batch_size]
        tok, mask = store.tensor([ids[i] for i in rows])  # [n, l_max] each
        width = max(int(mask.sum(1).max()), 1)
        emb = model.embed_passages(tok[:, :width].to(device), mask[:, :width].to(device))
        out[rows] = emb.float().cpu().numpy()
    return exact_index(ids, out)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if pad_id is None:
        raise ValueError(
            "the tokenizer has no pad token; load it with "
            "imprag_ray.model.checkpoint.load_tokenizer (it adds one)"
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def model_stop_ids(model: ImpRAGModel, tokenizer) -> list[int]:
    """Ids that end an answer: the model's generation-config and config eos ids (a list
    in Llama-3 instruct snapshots) and the tokenizer's eos, deduplicated."""
    lm = model.lm
    ids: list[int] = []
    for eos in (
        getattr(getattr(lm, "generation_config", None), "eos_token_id", None),
        getattr(lm.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if eos is not None:
            ids += [int(i) for i in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
    return list(dict.fromkeys(ids))


def decode_answer(tokenizer, tokens: list[int], stop_ids: Sequence[int] | None = None) -> str:
    """Text of generated tokens up to the first stop id (default: the tokenizer's eos)."""
    stops = set(stop_ids) if stop_ids is not None else {tokenizer.eos_token_id}
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


def _passage_tensors(store: PassageStore, retrieved: list[list[str]], top_k: int):
    """The first ``top_k`` retrieved passages of each row -> ids/mask [B, top_k, l_max]."""
    p_ids = torch.zeros(len(retrieved), top_k, store.l_max, dtype=torch.long)
    p_mask = torch.zeros_like(p_ids)
    for i, pids in enumerate(retrieved):
        tok, m = store.tensor(pids[:top_k])
        p_ids[i, : len(tok)], p_mask[i, : len(tok)] = tok, m
    return p_ids, p_mask


@torch.no_grad()
def predict(
    model: ImpRAGModel,
    tokenizer,
    store: PassageStore,
    examples: Sequence[TaskExample],
    *,
    index,
    top_k: int,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    max_prompt_tokens: int = 128,
    rankings: Callable[[Sequence[TaskExample]], list[list[str]]] | None = None,
    search_depth: int | None = None,
    stop_ids: Sequence[int] | None = None,
    chat: bool = False,
) -> list[dict]:
    """Predictions ``{"id", "prediction", "retrieved", "scores"}`` for each example.

    ``index`` (a DenseIndex / :class:`ExactSearch`, or None) and ``rankings`` both None ->
    closed book (the base LLM path, no passages). ``rankings`` (a function of the batch)
    replaces the model's own retrieval. ``search_depth`` (>= top_k): how many ids to
    retrieve and report (for recall@k with k > top_k); only the first ``top_k`` are read.
    ``stop_ids``: ids that end an answer (default :func:`model_stop_ids`); ``chat``: prompts
    in the tokenizer's chat template (``data.chat_template``).
    """
    depth = max(search_depth or top_k, top_k)
    stops = list(stop_ids) if stop_ids is not None else model_stop_ids(model, tokenizer)
    device = _device(model)
    model.eval()
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        prompts = [
            encode_prompt_text(tokenizer, format_prompt(ex), max_prompt_tokens, chat=chat) for ex in batch
        ]
        ids, mask = (t.to(device) for t in _pad(prompts, tokenizer.pad_token_id))  # [B, L]
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
                retrieved, sc = index.search(state.query_embedding.float().cpu().numpy(), depth)
                scores = sc.tolist()
            p_ids, p_mask = (t.to(device) for t in _passage_tensors(store, retrieved, top_k))
        new = model.generate(
            ids,
            mask,
            p_ids,
            p_mask,
            max_new_tokens=max_new_tokens,
            prompt_state=state,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )  # [B, T]
        for i, ex in enumerate(batch):
            out.append(
                {
                    "id": ex.id,
                    "prediction": decode_answer(tokenizer, new[i].tolist(), stops),
                    "retrieved": list(retrieved[i]),
                    "scores": [float(s) for s in scores[i]],
                }
            )
    return out
