"""ImpRAG attention for vLLM: a custom attention backend with a pure-PyTorch impl.

It runs the reader mask of DESIGN §1 on the fixed-region layout of
:mod:`imprag_ray.vllm_plugin.layout` over vLLM's paged KV cache. Correctness first:
every request gathers its keys/values through its block table and attends with
``scaled_dot_product_attention`` in fp32 under the mask of
:func:`~imprag_ray.vllm_plugin.layout.visibility`. Decoding requests of a step are
batched into one call; each prefill chunk is one call.

Per-slot token flags (REGION / PAD) are kept in a small int8 tensor next to the KV cache
and written at ``slot_mapping`` together with K/V, so chunked prefill, preemption and
prefix-cache hits see the same flags as the forward that wrote the slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from imprag_ray.vllm_plugin.layout import visibility

BACKEND_PATH = "imprag_ray.vllm_plugin.attention.ImpRAGAttentionBackend"


class TokenFlags:
    """Shared by the model and all its attention layers (one model per worker process).

    ``current``: flags [T] of the tokens of the running forward (set by the model);
    ``slots``: flags of every KV-cache slot, written where K/V are written.
    """

    def __init__(self) -> None:
        self.current: Tensor | None = None
        self.slots: Tensor | None = None

    def slot_store(self, num_slots: int, device: torch.device) -> Tensor:
        if self.slots is None or self.slots.numel() != num_slots:
            self.slots = torch.zeros(num_slots, dtype=torch.int8, device=device)
        return self.slots


class ImpRAGAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the impl also writes the slot flags
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # registered to this class by imprag_ray.vllm_plugin.register()

    @staticmethod
    def get_impl_cls() -> type[ImpRAGAttentionImpl]:
        return ImpRAGAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[ImpRAGMetadataBuilder]:
        return ImpRAGMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # per layer [num_blocks, h_kv, block_size, 2 * d_h]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class _Group:
    """Queries attended in one SDPA call: R requests, Q queries, K keys each."""

    reqs: Tensor  # [R] request index (row of the block table)
    rows: Tensor  # [R, Q] token indices into this step's query tensor
    q_index: Tensor  # [R, Q] sequence index of each query
    k_index: Tensor  # [R, K] sequence index of each key
    k_valid: Tensor  # [R, K] key exists (decode rows are padded to the longest)
    k_slot: Tensor | None = None  # [R, K] KV-cache slot of each key (set on first use)
    masks: dict[bool, Tensor] = field(default_factory=dict)  # reader? -> [R, 1, Q, K]


@dataclass
class ImpRAGMetadata(AttentionMetadata):
    num_actual_tokens: int
    slot_mapping: Tensor  # [T] slot of each new token
    block_table: Tensor  # [num_reqs, max_blocks]
    query_start_loc: list[int]
    seq_lens: list[int]
    groups: list[_Group] | None = None  # built by the first layer of the step


class ImpRAGMetadataBuilder(AttentionMetadataBuilder[ImpRAGMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ImpRAGMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        return ImpRAGMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=m.slot_mapping[: m.num_actual_tokens],
            block_table=m.block_table_tensor[:n],
            query_start_loc=m.query_start_loc_cpu[: n + 1].tolist(),
            seq_lens=m.seq_lens[:n].tolist(),
        )


def _plan(meta: ImpRAGMetadata, device: torch.device) -> list[_Group]:
    """Group the step's requests: all single-token (decode) requests in one padded call,
    every longer chunk (prefill) on its own."""
    groups: list[_Group] = []
    decodes: list[int] = []
    for r, seq_len in enumerate(meta.seq_lens):
        start, end = meta.query_start_loc[r], meta.query_start_loc[r + 1]
        if end - start == 0:
            continue
        if end - start == 1:
            decodes.append(r)
            continue
        k_index = torch.arange(seq_len, device=device)
        groups.append(
            _Group(
                reqs=torch.tensor([r], device=device),
                rows=torch.arange(start, end, device=device).unsqueeze(0),
                q_index=torch.arange(seq_len - (end - start), seq_len, device=device).unsqueeze(0),
                k_index=k_index.unsqueeze(0),
                k_valid=torch.ones(1, seq_len, dtype=torch.bool, device=device),
            )
        )
    if decodes:
        lens = torch.tensor([meta.seq_lens[r] for r in decodes], device=device)  # [R]
        k_index = torch.arange(int(lens.max()), device=device).unsqueeze(0)  # [1, K]
        k_valid = k_index < lens.unsqueeze(1)  # [R, K]
        groups.append(
            _Group(
                reqs=torch.tensor(decodes, device=device),
                rows=torch.tensor([meta.query_start_loc[r] for r in decodes], device=device).unsqueeze(1),
                q_index=(lens - 1).unsqueeze(1),
                k_index=torch.where(k_valid, k_index, 0),
                k_valid=k_valid,
            )
        )
    return groups


def _slots(meta: ImpRAGMetadata, group: _Group, block_size: int) -> Tensor:
    """KV-cache slots [R, K] of the group's keys through each request's block table."""
    blocks = meta.block_table[group.reqs.unsqueeze(1), group.k_index // block_size]  # [R, K]
    return blocks.long() * block_size + group.k_index % block_size


class ImpRAGAttentionImpl(AttentionImpl[ImpRAGMetadata]):
    """Writes K/V + flags into the paged cache, then attends under the ImpRAG mask."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        *,
        reader: bool,
        flags: TokenFlags,
    ) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("ImpRAG attention supports plain RoPE attention only")
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError("ImpRAG attention does not share KV between layers")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.reader = reader  # layer in b..t: prompt rows also see the passage region
        self.flags = flags

    def forward(
        self,
        layer,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        attn_metadata: ImpRAGMetadata | None,
        output: Tensor,
        output_scale: Tensor | None = None,
        output_block_scale: Tensor | None = None,
    ) -> Tensor:
        """query [T, h_q, d_h], key/value [T, h_kv, d_h], kv_cache [N, h_kv, bs, 2*d_h]."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run without a KV cache
            return output.zero_()
        meta = attn_metadata
        n = meta.num_actual_tokens
        d = self.head_size
        num_blocks, _, block_size, _ = kv_cache.shape
        k_cache, v_cache = kv_cache[..., :d], kv_cache[..., d:]  # [N, h_kv, bs, d_h] each
        slot = meta.slot_mapping.long()  # [n]
        blk, off = slot // block_size, slot % block_size
        k_cache[blk, :, off] = key[:n].to(k_cache.dtype)
        v_cache[blk, :, off] = value[:n].to(v_cache.dtype)
        store = self.flags.slot_store(num_blocks * block_size, kv_cache.device)
        if meta.groups is None:  # first layer of the step: flags + gather plan
            if self.flags.current is None:
                raise RuntimeError("ImpRAG attention ran without token flags from the model")
            store[slot] = self.flags.current[:n].to(store.device)
            meta.groups = _plan(meta, kv_cache.device)
            for g in meta.groups:
                g.k_slot = _slots(meta, g, block_size)
        for g in meta.groups:
            assert g.k_slot is not None
            mask = g.masks.get(self.reader)
            if mask is None:
                mask = visibility(
                    g.q_index.unsqueeze(2),
                    store[slot[g.rows]].unsqueeze(2),
                    g.k_index.unsqueeze(1),
                    store[g.k_slot].unsqueeze(1),
                    g.k_valid.unsqueeze(1),
                    reader=self.reader,
                ).unsqueeze(1)  # [R, 1, Q, K]
                g.masks[self.reader] = mask
            kb, ko = g.k_slot // block_size, g.k_slot % block_size
            k = k_cache[kb, :, ko].float().transpose(1, 2)  # [R, h_kv, K, d_h]
            v = v_cache[kb, :, ko].float().transpose(1, 2)  # [R, h_kv, K, d_h]
            q = query[g.rows].float().transpose(1, 2)  # [R, h_q, Q, d_h]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )  # [R, h_q, Q, d_h]
            output[g.rows] = out.transpose(1, 2).to(output.dtype)
        return output
