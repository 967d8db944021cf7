"""Collectives of distributed ImpRAG training (torch only; no Ray, no recipe imports).

The warmup NCE of arXiv 2506.02279 §3.2 scores each query against the passages of the
whole global batch ("in-batch negatives gathered across all workers", DESIGN §1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllGather(torch.autograd.Function):
    """All-gather whose backward hands each rank the sum, over all ranks, of the gradients
    on its own part (public collectives only: all_gather forward, all_reduce backward, which
    gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> tuple[Tensor, ...]:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None]:
        total = torch.stack(grads)
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank], None


def all_gather_rows(local: Tensor, group=None) -> tuple[Tensor, int]:
    """Concatenate every rank's ``local`` rows ([M_r, d], M_r may differ), differentiably.

    Rows are padded to the largest M_r for the collective and trimmed after. The
    backward pass sums, for each rank's rows, the gradients every rank's loss put on
    them, so with DDP's gradient averaging each step's update equals that of one process
    holding the global batch.

    Returns:
        (all rows [sum_r M_r, d], offset of this rank's rows in it)
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    top = max(sizes)
    if local.shape[0] < top:
        local = torch.cat([local, local.new_zeros(top - local.shape[0], *local.shape[1:])])
    parts = _AllGather.apply(local, group)  # world x [top, d], differentiable
    rows = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
    return rows, sum(sizes[:rank])


class DistributedModel:
    """Calls go through the DDP wrapper (so gradients are averaged); every other
    attribute (``embed_passages``, ``write_files``, ``k``, ...) is the ImpRAG model's."""

    def __init__(self, wrapped: torch.nn.Module, module: torch.nn.Module):
        self.wrapped, self.module = wrapped, module

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)
