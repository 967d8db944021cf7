"""Turn task examples + teacher rankings into training tensors (Ray-free).

A training item is a prompt (``<s>`` + template text, or with ``chat=True`` the template text
as one user turn of the tokenizer's chat template), a target (answer + the tokenizer's eos) and,
for retrieval formats, the teacher's passage ids: the top-k read in context, the
positives and hard negatives for warmup NCE, the candidates for self-distillation.
Retrieval-free items (instruction tasks, plain corpus text) carry no passages.
Reading items (``make_reading_item``) carry the gold passage among random others in the
reader's context but no retrieval labels: they train the reader (J_gen) only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from imprag_ray.data.records import RETRIEVAL_FORMATS, TaskExample
from imprag_ray.data.templates import format_prompt, format_target
from imprag_ray.data.tokenized import PassageStore, encode_prompt_text, encode_texts, prompt_from_ids


@dataclass
class Item:
    """One tokenised training example."""

    prompt: list[int]
    target: list[int]
    context: list[str]  # passage ids read in context (empty = no retrieval)
    positives: list[str]
    hard_negatives: list[str]
    candidates: list[str]
    near: list[str] = field(default_factory=list)  # teacher ranks < hard-negative range start

    @property
    def retrieval(self) -> bool:
        """Trains the retriever (J_ret): has passages in context and teacher labels."""
        return bool(self.context) and bool(self.positives)


def make_item(
    example: TaskExample,
    tokenizer,
    ranking: Sequence[str] | None,
    *,
    k: int,
    num_positives: int,
    hard_negative_ranks: tuple[int, int],
    num_hard_negatives: int,
    num_candidates: int,
    max_prompt_tokens: int,
    max_target_tokens: int,
    rng: random.Random,
    shuffle_context: bool = False,
    chat: bool = False,
    encoded: tuple[list[int] | None, list[int]] | None = None,
) -> Item:
    """Tokenise one example; ``ranking`` = teacher passage ids (retrieval formats only).

    ``shuffle_context`` puts the teacher's top-k in random order in the reader's context:
    the teacher's best passage is then not always first, as at inference, where the
    model's own retrieval decides the order. ``chat`` (``data.chat_template``) wraps the
    prompt in the tokenizer's chat template; ``corpus_text`` items stay plain LM text.
    ``encoded``: the token ids of the prompt text (None: not given) and of the target text,
    as :func:`make_items` computes them in batches.
    """
    prompt_text, target_text, chat = item_texts(example, chat)
    if encoded is not None and encoded[0] is not None and not chat:
        prompt = prompt_from_ids(tokenizer, encoded[0], max_prompt_tokens)
    else:
        prompt = encode_prompt_text(tokenizer, prompt_text, max_prompt_tokens, chat=chat)
    if encoded is not None:
        target = encoded[1][: max_target_tokens - 1]
    else:
        target = tokenizer(target_text, add_special_tokens=False)["input_ids"][: max_target_tokens - 1]
    target = [*target, tokenizer.eos_token_id]
    if example.format not in RETRIEVAL_FORMATS or not ranking:
        return Item(prompt, target, [], [], [], [])
    lo, hi = hard_negative_ranks
    pool = list(ranking[lo:hi])
    hard = rng.sample(pool, min(num_hard_negatives, len(pool)))
    context = list(ranking[:k])
    if shuffle_context:
        rng.shuffle(context)
    return Item(
        prompt,
        target,
        context=context,
        positives=list(ranking[:num_positives]),
        hard_negatives=hard,
        candidates=list(ranking[:num_candidates]),
        near=list(ranking[:lo]),
    )


def item_texts(example: TaskExample, chat: bool) -> tuple[str, str, bool]:
    """(prompt text, target text, chat) of a training item: ``corpus_text`` items are plain
    LM text (no prompt, never a chat turn)."""
    if example.format == "corpus_text":
        return "", example.answers[0], False
    return format_prompt(example), format_target(example.answers[0]), chat


def make_items(
    examples: Sequence[TaskExample],
    tokenizer,
    rankings: dict[str, list[str]],
    *,
    rng: random.Random,
    chat: bool = False,
    **item_args,
) -> list[Item]:
    """:func:`make_item` of every example (``rankings.get(ex.id)`` each, one ``rng`` in
    order), with the prompt and target texts tokenised in two batched calls."""
    texts = [item_texts(ex, chat) for ex in examples]
    plain = [i for i, (_, _, c) in enumerate(texts) if not c]  # chat prompts: one by one
    prompt_ids: list[list[int] | None] = [None] * len(texts)
    for i, ids in zip(plain, encode_texts(tokenizer, [texts[i][0] for i in plain]), strict=True):
        prompt_ids[i] = ids
    target_ids = encode_texts(tokenizer, [t for _, t, _ in texts])
    return [
        make_item(ex, tokenizer, rankings.get(ex.id), rng=rng, chat=chat, encoded=(p, t), **item_args)
        for ex, p, t in zip(examples, prompt_ids, target_ids, strict=True)
    ]


def make_reading_item(
    example: TaskExample,
    tokenizer,
    others: Sequence[str],
    *,
    k: int,
    max_prompt_tokens: int,
    max_target_tokens: int,
    rng: random.Random,
    chat: bool = False,
    gold: str | None = None,
) -> Item:
    """A reader-only item: the example's gold passage (``gold``, default its first provenance
    id) plus k-1 passages drawn from ``others`` in random order in the reader's context; no
    retrieval labels (J_gen only).

    Reading with the gold passage at hand is the easy case of what retrieval-format items
    need; it teaches the middle layers to copy from the passages early (measured: without
    it the tiny model learns the answer type but not to read).
    """
    gold = gold or (example.provenance[0] if example.provenance else None)
    if gold is None:
        raise ValueError(f"example {example.id!r} has no provenance; a reading item needs its gold passage")
    item = make_item(
        example,
        tokenizer,
        None,
        k=k,
        num_positives=0,
        hard_negative_ranks=(0, 0),
        num_hard_negatives=0,
        num_candidates=0,
        max_prompt_tokens=max_prompt_tokens,
        max_target_tokens=max_target_tokens,
        rng=rng,
        chat=chat,
    )
    pool = [pid for pid in rng.sample(list(others), min(len(others), k)) if pid != gold][: k - 1]
    item.context = [gold, *pool]
    rng.shuffle(item.context)
    return item


@dataclass
class Batch:
    """Tensors of one training step.

    input_ids/attention_mask/labels: [B, L] (prompt + target, labels -100 on the prompt);
    query_index: [B] last prompt token; passage_ids/passage_mask: [B, k, l_max] context
    (rows without context read no passage); retrieval: [B] bool, rows that train J_ret; pool_ids: passage ids of the step's passage pool, deduplicated
    (warmup: positives + hard negatives of all retrieval rows; distill: candidates) with
    tokens pool_tokens/pool_mask [M, l_max]; positive / negative: [R, M] bool for the R
    retrieval rows (a passage the teacher ranks above the hard-negative range is neither:
    it may well be relevant); candidates: [R, C] indices into the pool (-1 = none).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    query_index: Tensor
    passage_ids: Tensor | None
    passage_mask: Tensor | None
    retrieval: Tensor
    items: list[Item]
    pool_ids: list[str]
    pool_tokens: Tensor
    pool_mask: Tensor
    positive: Tensor
    negative: Tensor
    candidates: Tensor
    stage: str = "warmup"

    def to(self, device: torch.device) -> Batch:
        """This batch with every tensor on ``device`` (itself when already there)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors = {k: v for k, v in tensors.items() if isinstance(v, Tensor) and v.device != device}
        return replace(self, **{k: v.to(device) for k, v in tensors.items()}) if tensors else self


def collate(
    items: Sequence[Item],
    store: PassageStore,
    k: int,
    pad_id: int,
    with_passages: bool,
    stage: str = "warmup",
) -> Batch:
    """Right-pad a list of items into a :class:`Batch` for ``stage`` (warmup / distill)."""
    bsz = len(items)
    length = max(len(it.prompt) + len(it.target) for it in items)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    mask = torch.zeros(bsz, length, dtype=torch.long)
    labels = torch.full((bsz, length), -100, dtype=torch.long)
    for i, it in enumerate(items):
        seq = it.prompt + it.target
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(it.prompt) : len(seq)] = torch.tensor(it.target)
    query_index = torch.tensor([len(it.prompt) - 1 for it in items])
    retrieval = torch.tensor([it.retrieval and with_passages for it in items], dtype=torch.bool)
    passage_ids = passage_mask = None
    if with_passages and any(it.context for it in items):
        passage_ids = torch.zeros(bsz, k, store.l_max, dtype=torch.long)
        passage_mask = torch.zeros_like(passage_ids)
        for i, it in enumerate(items):
            if it.context:
                tok, m = store.tensor(it.context[:k])
                passage_ids[i, : len(tok)], passage_mask[i, : len(tok)] = tok, m
    rows = [it for it, r in zip(items, retrieval.tolist(), strict=False) if r]
    pool: dict[str, int] = {}
    for it in rows:
        for pid in it.positives + it.hard_negatives if stage == "warmup" else it.candidates:
            pool.setdefault(pid, len(pool))
    pool_ids = list(pool)
    pool_tokens, pool_mask = store.tensor(pool_ids)
    positive = torch.zeros(len(rows), len(pool_ids), dtype=torch.bool)
    negative = torch.ones(len(rows), len(pool_ids), dtype=torch.bool)
    n_cand = max((len(it.candidates) for it in rows), default=0)
    candidates = torch.full((len(rows), n_cand), -1, dtype=torch.long)
    for r, it in enumerate(rows):
        positive[r, [pool[p] for p in it.positives if p in pool]] = True
        negative[r, [pool[p] for p in set(it.near + it.positives) if p in pool]] = False
        if stage != "warmup":
            candidates[r, : len(it.candidates)] = torch.tensor([pool[p] for p in it.candidates])
    return Batch(
        input_ids,
        mask,
        labels,
        query_index,
        passage_ids,
        passage_mask,
        retrieval,
        list(items),
        pool_ids,
        pool_tokens,
        pool_mask,
        positive,
        negative,
        candidates,
        stage,
    )
