"""Micro Llama-3 snapshots (tests/llama3_micro.py) and ImpRAG checkpoints made from them,
built once per test session and shared by tests/engine, tests/vllm, tests/pipelines and
tests/serve.

The ImpRAG checkpoint is the snapshot's weights (fp32) + ``imprag_config.json`` (the
paper's b=7, t=19 for a 28-layer Llama-3.2; a small l_max and k so the passage region
stays short) + the snapshot's tokenizer files and generation_config.json (three eos ids
for an instruct snapshot). Like a real Llama-3, config.json has no ``pad_token_id``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

B, T, L_MAX, K = 7, 19, 16, 2
_BUILT: dict[tuple, Path] = {}


def corpus_texts(corpus: str | Path) -> list[str]:
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.templates import format_passage

    return [format_passage(p) for p in iter_corpus(corpus)]


def snapshot(tmp_path_factory, corpus: str | Path, *, instruct: bool) -> Path:
    """The micro Llama-3 snapshot (instruct or base) whose tokenizer learnt ``corpus``."""
    from tests.llama3_micro import build_snapshot

    key = ("snapshot", str(corpus), instruct)
    if key not in _BUILT:
        out = tmp_path_factory.mktemp("llama3_instruct" if instruct else "llama3_base")
        _BUILT[key] = build_snapshot(out / "snapshot", corpus_texts(corpus), instruct=instruct)
    return _BUILT[key]


def imprag_checkpoint(tmp_path_factory, corpus: str | Path, *, instruct: bool = True) -> Path:
    """An ImpRAG checkpoint (b=7, t=19, l_max=16, k=2) of the micro Llama-3 snapshot."""
    from imprag_ray.model.imprag import ImpRAGModel

    key = ("imprag", str(corpus), instruct)
    if key not in _BUILT:
        snap = snapshot(tmp_path_factory, corpus, instruct=instruct)
        out = tmp_path_factory.mktemp("llama3_imprag") / "ckpt"
        out.mkdir()
        model = ImpRAGModel.from_pretrained(
            snap, retrieval_layer=B, reader_last_layer=T, max_passage_tokens=L_MAX, num_passages=K
        )
        model.write_files(out)  # fp32 weights, config.json, generation_config.json, imprag_config.json
        for f in snap.iterdir():
            if f.is_file() and not (out / f.name).exists():  # tokenizer files, chat template
                shutil.copy(f, out / f.name)
        _BUILT[key] = out
    return _BUILT[key]


def chat_and_raw_requests(ckpt: Path, corpus: str | Path, max_new_tokens: int, n: int = 8, chat: bool = True):
    """``n`` greedy requests: chat-template (``chat``: 3 of 4) and raw prompts, closed book
    and with 1..k passages (cut short, so the region holds PAD slots). The prompts are
    those the micro snapshot was taught to answer in a few tokens and ``<|eot_id|>``."""
    from imprag_ray.data.readers import read_corpus
    from imprag_ray.data.templates import format_passage
    from imprag_ray.data.tokenized import PassageStore, encode_prompt_text
    from imprag_ray.engine import GenerationRequest, Sampling
    from imprag_ray.model.checkpoint import load_tokenizer

    tok = load_tokenizer(ckpt)
    passages = read_corpus(corpus)[: 4 * n]
    store = PassageStore(passages, tok, L_MAX)
    out = []
    for i in range(n):
        turn = chat and i % 4 != 3
        text = format_passage(passages[i])[:200]
        prompt = tuple(encode_prompt_text(tok, text if turn else f"Q: {text} A:", 96, chat=turn))
        chosen = None
        if i % 2:
            chosen = tuple(
                tuple(store.tokens[p.id])[: L_MAX - i % 3] for p in passages[2 * i : 2 * i + 1 + i % K]
            )
        out.append(GenerationRequest(prompt, chosen, Sampling(max_new_tokens), f"r{i}"))
    return out


def reference_tokens(model, request, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the Ray-free model with NO stop id: what follows the engine's
    answer shows which token ended it."""
    import torch

    from imprag_ray.model.generation import generate

    ids = torch.tensor([request.prompt_ids])  # [1, L]
    p_ids = p_mask = None
    if request.passages is not None:
        p_ids = torch.zeros(1, model.k, model.l_max, dtype=torch.long)  # [1, k, l_max]
        p_mask = torch.zeros_like(p_ids)
        for j, p in enumerate(request.passages):
            p_ids[0, j, : len(p)] = torch.tensor(p)
            p_mask[0, j, : len(p)] = 1
    out = generate(model, ids, torch.ones_like(ids), p_ids, p_mask, max_new_tokens=max_new_tokens)
    return out[0].tolist()
