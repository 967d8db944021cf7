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


def encode_prompt_text(tokenizer, text: str, max_tokens: int) -> list[int]:
    """``<s>`` + prompt tokens, left-truncated (the need is usually at the end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    keep = max_tokens - 1
    return [tokenizer.bos_token_id] + (ids[-keep:] if keep > 0 else [])
