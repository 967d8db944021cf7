"""Tokenised views of the corpus and prompts shared by training, indexing and inference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from imprag_ray.data.records import Passage
from imprag_ray.data.templates import format_passage


class PassageStore:
    """Token ids of every corpus passage ("title: text", truncated to l_max)."""

    def __init__(self, passages: Sequence[Passage], tokenizer, l_max: int):
        self.passages = {p.id: p for p in passages}
        self.order = [p.id for p in passages]
        self.l_max = l_max
        texts = [format_passage(p) for p in passages]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        self.tokens = {pid: tok[:l_max] for pid, tok in zip(self.order, ids, strict=False)}

    def __len__(self) -> int:
        return len(self.order)

    def tensor(self, ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded [len(ids), l_max] token ids and mask (pad id 0 is masked)."""
        out = torch.zeros(len(ids), self.l_max, dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, pid in enumerate(ids):
            tok = self.tokens[pid]
            out[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
            mask[i, : len(tok)] = 1
        return out, mask


def encode_prompt_text(tokenizer, text: str, max_tokens: int, *, chat: bool = False) -> list[int]:
    """``<s>`` + prompt tokens, left-truncated (the need is usually at the end).

    ``chat=True`` wraps the text as one user turn of the tokenizer's chat template, with the
    assistant header after it (instruct snapshots); the template's head (bos, headers) is kept
    and the user text is left-truncated inside it.
    """
    if chat:
        return _chat_prompt(tokenizer, text, max_tokens)
    return prompt_from_ids(
        tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"] if text else [], max_tokens
    )


def prompt_from_ids(tokenizer, ids: Sequence[int], max_tokens: int) -> list[int]:
    """``<s>`` + the prompt text's token ids, left-truncated to ``max_tokens`` in all."""
    keep = max_tokens - 1
    return [tokenizer.bos_token_id] + (list(ids[-keep:]) if keep > 0 else [])


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids (no special tokens) of many texts in one batched tokenizer call: a call per
    text costs Python overhead that dominates at a training mix of millions of examples."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _chat_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.chat_template is true but the checkpoint's tokenizer has no chat "
            "template; set data.chat_template: false for a base snapshot"
        )
    marker = "\x00IMPRAG_USER\x00"
    # Render around a marker so the user text is tokenised on its own and can be truncated.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    head, tail = rendered.split(marker)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    body = tokenizer(text.strip(), add_special_tokens=False)["input_ids"] if text.strip() else []
    keep = max_tokens - len(head_ids) - len(tail_ids)
    if keep <= 0:
        raise ValueError(
            f"max_prompt_tokens={max_tokens} leaves no room for the chat template's "
            f"{len(head_ids) + len(tail_ids)} tokens; raise data.max_prompt_tokens"
        )
    return head_ids + body[-keep:] + tail_ids
