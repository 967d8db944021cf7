"""The fixed passage-region layout that lets vLLM run ImpRAG's reader (DESIGN §1).

A request with passages is sent to vLLM as ONE token sequence

    [ passages packed in order | PAD up to C = k * l_max | prompt | generated ]

so vLLM's default positions are already the paper's: passage tokens at 0..|P|-1, prompt
token i at C + i. A closed-book request (``passages=None``) is the prompt alone at
0..L-1 (C = 0 for that request). The attention rule then depends on two per-token
facts only, which travel *inside the token ids* so that chunked prefill, preemption
and prefix caching (all keyed by token ids) keep them without extra state:

    id < V            prompt / generated token (V = the model's vocabulary size)
    V <= id < 2V      real passage token ``id - V`` (in the region)
    id == 2V          PAD slot of the region (masked for every query)

No vLLM import here: the engine encodes with it, the vLLM model decodes with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

REGION = 1  # flag bit: the token lies in the passage region
PAD = 2  # flag bit: the token is a PAD slot of the region (never attended to)


def region_length(num_passages: int, max_passage_tokens: int) -> int:
    """C = k * l_max: slots reserved for the passages of every request with passages."""
    return num_passages * max_passage_tokens


def encode_request(
    prompt_ids: Sequence[int],
    passages: Sequence[Sequence[int]] | None,
    *,
    vocab_size: int,
    num_passages: int,
    max_passage_tokens: int,
) -> list[int]:
    """The token sequence vLLM sees for one request (see the module docstring).

    Args:
        prompt_ids: the prompt (``<s>`` + prompt tokens), ids < ``vocab_size``.
        passages: up to k passages of at most l_max tokens each, or None (closed book).
    Raises:
        ValueError: a token id outside the vocabulary, too many or too long passages.
    """
    _check_ids(prompt_ids, vocab_size, "prompt_ids")
    if passages is None:
        return list(prompt_ids)
    if len(passages) > num_passages:
        raise ValueError(f"{len(passages)} passages > num_passages={num_passages}")
    region: list[int] = []
    for i, passage in enumerate(passages):
        if len(passage) > max_passage_tokens:
            raise ValueError(
                f"passage {i} has {len(passage)} tokens > max_passage_tokens={max_passage_tokens}"
            )
        _check_ids(passage, vocab_size, f"passages[{i}]")
        region.extend(int(t) + vocab_size for t in passage)
    c = region_length(num_passages, max_passage_tokens)
    region.extend([2 * vocab_size] * (c - len(region)))
    return region + list(prompt_ids)


def _check_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def decode_ids(input_ids: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Split encoded ids [T] into model token ids [T] and per-token flags [T] (int8,
    bits REGION / PAD). PAD slots get token id 0: their states are never read."""
    region = input_ids >= vocab_size  # [T]
    pad = input_ids >= 2 * vocab_size  # [T]
    ids = torch.where(region, input_ids - vocab_size, input_ids)
    ids = torch.where(pad, torch.zeros_like(ids), ids)
    flags = region.to(torch.int8) * REGION + pad.to(torch.int8) * PAD
    return ids, flags


def visibility(
    q_index: Tensor,
    q_flags: Tensor,
    k_index: Tensor,
    k_flags: Tensor,
    k_valid: Tensor,
    *,
    reader: bool,
) -> Tensor:
    """Which keys each query may attend to (DESIGN §1 on the fixed-region layout).

    Shapes broadcast: q_* [..., Q, 1], k_* [..., 1, K] -> [..., Q, K] bool.
    ``q_index`` / ``k_index`` are sequence indices (= positions); ``k_valid`` marks keys
    that exist. A key is visible if it exists, is causal, is not PAD, and either the
    layer is a reader layer (b..t) or the key is not a passage token seen by a
    non-passage query. Every query also sees itself, so no softmax row is empty.
    """
    visible = (k_index <= q_index) & k_valid & ((k_flags & PAD) == 0)
    if not reader:
        k_region = (k_flags & REGION) != 0
        q_region = (q_flags & REGION) != 0
        visible = visible & ~(k_region & ~q_region)
    return visible | ((k_index == q_index) & k_valid)
