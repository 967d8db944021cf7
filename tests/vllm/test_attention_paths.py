"""The ImpRAG attention backend's two paths (vLLM's paged CPU kernel, the gather path)
against a dense float64 reference of the reader mask, without an engine: a hand-built
step of chunked prefill and decode rows over a paged cache."""

from __future__ import annotations

import pytest
import torch

from imprag_ray.vllm_plugin.attention import (
    ImpRAGAttentionImpl,
    ImpRAGMetadata,
    TokenFlags,
    kernel_isa,
)
from imprag_ray.vllm_plugin.layout import PAD, REGION, visibility

pytestmark = pytest.mark.vllm

H_Q, H_KV, D, BS = 4, 2, 32, 16
C = 64  # region: 4 blocks


def _requests():
    """(passage tokens or None for closed book, sequence length before the probe step,
    new tokens in the probe step)."""
    return [
        (40, 30, 50),  # prefill chunk: passages 30..39, PAD 40..63, prompt 64..79
        (10, 100, 1),  # decoding, reads 10 passage tokens
        (None, 20, 1),  # closed book, decoding
        (0, 70, 1),  # passages=[]: a region of PAD only
        (64, 64, 5),  # a region without PAD, first prompt chunk
        (None, 0, 12),  # closed book, whole prompt at once
    ]


def _flags(plen: int | None, length: int) -> torch.Tensor:
    f = torch.zeros(length, dtype=torch.int8)
    if plen is not None:
        f[: min(C, length)] = REGION
        f[plen:C] = REGION | PAD
    return f


class _Step:
    """Runs a set of token rows of several requests through one impl, as vLLM would."""

    def __init__(self, impl_kwargs: dict, reader: bool):
        self.flags = TokenFlags()
        self.impl = ImpRAGAttentionImpl(
            H_Q, D, D**-0.5, H_KV, reader=reader, flags=self.flags, region=C, **impl_kwargs
        )
        self.cache = torch.zeros(64, H_KV, BS, 2 * D)
        # block tables: request r owns blocks 10r+1 .. 10r+9 in a shuffled order
        gen = torch.Generator().manual_seed(0)
        self.block_table = torch.stack(
            [torch.randperm(9, generator=gen) + 10 * r + 1 for r in range(6)]
        ).int()

    def run(self, items: list[tuple[int, torch.Tensor, torch.Tensor]], q, k, v) -> torch.Tensor:
        """items: (request, positions, flags) of each request's new tokens, in order."""
        positions = torch.cat([p for _, p, _ in items])
        flags = torch.cat([f for _, _, f in items])
        reqs = [r for r, _, _ in items]
        bt = self.block_table[reqs]
        slots = torch.cat([bt[i, p // BS].long() * BS + p % BS for i, (_, p, _) in enumerate(items)])
        counts = torch.tensor([len(p) for _, p, _ in items])
        meta = ImpRAGMetadata(
            num_actual_tokens=len(positions),
            slot_mapping=slots,
            block_table=bt,
            query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        )
        self.flags.current, self.flags.positions = flags, positions
        keep = ((flags & PAD) == 0).nonzero().squeeze(1)  # the model never runs PAD slots
        self.flags.rows = keep
        out = torch.zeros(len(keep), H_Q, D)
        self.impl.forward(None, q[keep], k[keep], v[keep], self.cache, meta, out)
        full = torch.zeros(len(positions), H_Q, D)
        full[keep] = out
        return full


@pytest.mark.parametrize("reader", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_both_paths_equal_the_dense_reader_mask(kernel, reader):
    if kernel and kernel_isa(torch.float32, BS, D) is None:
        pytest.fail("vLLM's CPU attention kernel is not available for fp32, head size 32, blocks of 16")
    step = _Step({"use_kernel": kernel}, reader)
    gen = torch.Generator().manual_seed(1)
    reqs = _requests()
    total = [n + new for _, n, new in reqs]
    keys = [torch.randn(t, H_KV, D, generator=gen) for t in total]
    values = [torch.randn(t, H_KV, D, generator=gen) for t in total]
    queries = [torch.randn(t, H_Q, D, generator=gen) for t in total]
    flags = [_flags(plen, t) for (plen, _, _), t in zip(reqs, total, strict=True)]

    def items(part):
        out = []
        for r, (_, n, new) in enumerate(reqs):
            pos = torch.arange(n) if part == "before" else torch.arange(n, n + new)
            if len(pos):
                out.append((r, pos, flags[r][pos]))
        return out

    def cat(tensors, its):
        return torch.cat([tensors[r][p] for r, p, _ in its])

    before = items("before")  # the earlier steps: fill the cache
    step.run(before, cat(queries, before), cat(keys, before), cat(values, before))
    probe = items("probe")
    got = step.run(probe, cat(queries, probe), cat(keys, probe), cat(values, probe))

    row = 0
    for r, pos, f in probe:
        t = total[r]
        k_idx = torch.arange(t)
        mask = visibility(
            pos.unsqueeze(1),
            f.unsqueeze(1),
            k_idx.unsqueeze(0),
            flags[r].unsqueeze(0),
            torch.ones(1, t, dtype=torch.bool),
            reader=reader,
        )  # [Q, K]
        q = queries[r][pos].double().view(len(pos), H_KV, H_Q // H_KV, D)
        s = torch.einsum("qhgd,khd->qhgk", q, keys[r].double()) * D**-0.5
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        ref = torch.einsum("qhgk,khd->qhgd", s.softmax(-1), values[r].double()).reshape(len(pos), H_Q, D)
        real = (f & PAD) == 0  # PAD rows are never run, never read
        diff = (got[row : row + len(pos)][real].double() - ref[real]).abs().max().item()
        assert diff < 1e-5, (r, kernel, reader, diff)
        row += len(pos)
    stats = step.flags.stats
    if kernel:
        assert stats["kernel_rows"] > 0
        # only prompt rows of requests with passages in a reader layer need the gather path
        assert (stats["gather_rows"] > 0) == reader
    else:
        assert stats["kernel_rows"] == 0 and stats["gather_rows"] > 0
