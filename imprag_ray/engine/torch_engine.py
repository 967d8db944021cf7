"""The torch reference engine behind :class:`GenerationEngine` (exact; CPU or GPU).

Generation of a row ends at the first of the checkpoint's stop ids
(:func:`imprag_ray.model.checkpoint.stop_token_ids`: every eos id of generation_config.json,
e.g. Llama-3 instruct's ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, plus the
tokenizer's eos); the stop id itself is not returned.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator, Sequence

import torch

from imprag_ray.engine.base import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Sampling,
    checkpoint_stop_ids,
    cut_at_stop,
)
from imprag_ray.model.checkpoint import checkpoint_hash
from imprag_ray.model.generation import generate_steps
from imprag_ray.model.imprag import ImpRAGModel


class TorchEngine(GenerationEngine):
    """Batches requests that share sampling settings and passage mode; greedy is exact."""

    kind = "torch"

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 32,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()  # one forward at a time (replicas are single-model)
        self._load(checkpoint_dir)

    def _load(self, checkpoint_dir: str) -> None:
        model = ImpRAGModel.from_pretrained(checkpoint_dir, dtype=self.dtype).to(self.device).eval()
        self._stops = checkpoint_stop_ids(checkpoint_dir)
        self._eos = self._stops[0] if self._stops else None
        pad = model.lm.config.pad_token_id  # fills masked columns only: any id works
        self._pad = (self._eos if pad is None else pad) or 0
        self._hash = checkpoint_hash(checkpoint_dir)
        self.model = model

    # -------------------------------------------------------------- properties
    @property
    def checkpoint_hash(self) -> str:
        return self._hash

    @property
    def num_passages(self) -> int:
        return self.model.k

    @property
    def max_passage_tokens(self) -> int:
        return self.model.l_max

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stops)

    # -------------------------------------------------------------- generation
    def _tensors(self, requests: Sequence[GenerationRequest]):
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            mask[i, : len(r.prompt_ids)] = 1
        p_ids = p_mask = None
        if requests[0].passages is not None:
            k, l_max = self.num_passages, self.max_passage_tokens
            p_ids = torch.zeros(len(requests), k, l_max, dtype=torch.long)
            p_mask = torch.zeros_like(p_ids)
            for i, r in enumerate(requests):
                for j, p in enumerate(r.passages or ()):
                    p_ids[i, j, : len(p)] = torch.tensor(p, dtype=torch.long)
                    p_mask[i, j, : len(p)] = 1
            p_ids, p_mask = p_ids.to(self.device), p_mask.to(self.device)
        return ids.to(self.device), mask.to(self.device), p_ids, p_mask

    def _steps(self, requests: Sequence[GenerationRequest]) -> Iterator[torch.Tensor]:
        """Next tokens [B] per step until every row has emitted a stop id (or the budget
        is spent); a row's tokens after its stop id are meaningless (cut by the caller)."""
        stops = torch.tensor(self._stops, dtype=torch.long, device=self.device)  # [S]
        finished = None
        steps = self._raw_steps(requests)
        try:
            for token in steps:  # [B]
                yield token
                hit = torch.isin(token, stops)
                finished = hit if finished is None else finished | hit
                if bool(finished.all()):
                    return
        finally:
            steps.close()  # no decoding step after every row has stopped

    def _raw_steps(self, requests: Sequence[GenerationRequest]) -> Generator[torch.Tensor, None, None]:
        s: Sampling = requests[0].sampling
        gen = None
        if not s.greedy and s.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(s.seed)
        ids, mask, p_ids, p_mask = self._tensors(requests)
        # Stop ids are handled in _steps (generate_steps knows one eos id); rows are
        # independent, so a finished row's further tokens change no other row.
        yield from generate_steps(
            self.model,
            ids,
            mask,
            p_ids,
            p_mask,
            max_new_tokens=s.max_new_tokens,
            do_sample=not s.greedy,
            temperature=s.temperature if not s.greedy else 1.0,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_token_id=None,
            pad_token_id=self._pad,
            generator=gen,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for r in requests:
            self.check_request(r)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.sampling, r.passages is None), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch_size):
                chunk = members[start : start + self.max_batch_size]
                with self._lock:
                    steps = list(self._steps([requests[i] for i in chunk]))
                tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in chunk]
                for row, i in zip(tokens, chunk, strict=True):
                    results[i] = self._result(row, requests[i])
        return [r for r in results if r is not None]

    def _result(self, row: list[int], request: GenerationRequest) -> GenerationResult:
        tokens, stopped = cut_at_stop(row, self._stops)
        return GenerationResult(tokens, "stop" if stopped else "length", request.request_id)

    def stream(self, request: GenerationRequest) -> Iterator[list[int]]:
        self.check_request(request)
        with self._lock:
            for token in self._steps([request]):
                t = int(token[0])
                if t in self._stops:
                    return
                yield [t]

    def reload(self, checkpoint_dir: str) -> str:
        with self._lock:
            self._load(checkpoint_dir)
        return self._hash
