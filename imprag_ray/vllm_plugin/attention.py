"""ImpRAG attention for vLLM: a custom attention backend over vLLM's paged KV cache.

The reader mask on the fixed-region layout of :mod:`imprag_ray.vllm_plugin.layout`
decomposes into attentions over *contiguous* key ranges, by the kind of query:

* a passage token (any layer it runs in): causal over the passage keys ``[0, p]`` (the real
  passage tokens are packed at the start of the region, PAD only at its tail);
* a closed-book request's token: causal over ``[0, p]``;
* a prompt/generated token of a request with passages, outside layers b..t: causal over
  the prompt keys ``[C, p]`` (C = k * l_max, a whole number of KV blocks);
* the same token in layers b..t: the real passage keys ``[0, |P|)`` plus ``[C, p]``, in one
  softmax.

The first three are plain causal attentions over a block-table row (offset by C/block_size
blocks for the third), which vLLM's own CPU paged-attention kernel runs for all of them in
one call per layer. The fourth has a gap (the PAD tail of the region) that the kernel
cannot skip and, as it returns no log-sum-exp, cannot be merged from two calls: these
queries (the prompt and generated tokens in the reader layers) gather their keys through
the block table and attend with ``scaled_dot_product_attention`` in the cache's dtype,
all decoding requests of a step in one call. Without the kernel (another platform, a head
size or block size it does not take, C not a whole number of blocks) every query takes
that path.

The model (:mod:`imprag_ray.vllm_plugin.model`) never runs PAD slots and runs passage
tokens through layers 0..t only, so the attention layers see a subset of the step's
tokens: ``TokenFlags.rows`` names them. PAD slots and the passages' KV above layer t are
never written and never read.

Per-slot token flags (REGION / PAD) are kept in a small int8 tensor next to the KV cache
and written at ``slot_mapping`` for every token of a step, so chunked prefill, preemption
and prefix-cache hits see the same flags as the forward that wrote the slot; a request's
flags at positions 0..C-1 tell whether it has a region and how many real passage tokens
it holds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

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

from imprag_ray.vllm_plugin.layout import PAD, REGION

BACKEND_PATH = "imprag_ray.vllm_plugin.attention.ImpRAGAttentionBackend"


class TokenFlags:
    """Shared by the model and all its attention layers (one model per worker process).

    ``current``: flags [T] of the tokens of the running forward (set by the model);
    ``positions``: their positions [T]; ``rows``: which of the T tokens the layers run
    now (None = all), ``phase`` which set of rows that is (0: layers 0..t, 1: above);
    ``slots``: flags of every KV-cache slot, written with the step.
    """

    def __init__(self) -> None:
        self.current: Tensor | None = None
        self.positions: Tensor | None = None
        self.rows: Tensor | None = None
        self.phase = 0
        # query rows attended by vLLM's kernel / the gather path, and the calls of each
        self.stats = {"kernel_rows": 0, "kernel_calls": 0, "gather_rows": 0, "gather_calls": 0}
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
        # per layer [num_blocks, h_kv, block_size, 2 * d_h]; each block-head holds its keys
        # transposed ([d_h, block_size]), then its values ([block_size, d_h]): the layout
        # vLLM's CPU kernel writes and reads with its "vec" / "vec16" code
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class _Runs:
    """Runs of consecutive query rows of one request and one key range ``[0, a) + [s, p]``."""

    start: Tensor  # [G] first row (index into the layer's rows)
    count: Tensor  # [G] rows in the run
    req: Tensor  # [G] request (row of the block table)
    last: Tensor  # [G] position of the run's last query
    a: Tensor  # [G] keys [0, a) ...
    s: Tensor  # [G] ... plus [s, position of the query]


@dataclass
class _Plan:
    """How one layer kind (reader or not) attends for one set of rows of the step."""

    kernel_rows: Tensor | None = None  # rows run by the kernel (None: all of them)
    kernel: dict[str, Any] | None = None  # the kernel's varlen inputs
    gather: list[_Runs] = field(default_factory=list)  # batches for the gather path


@dataclass
class ImpRAGMetadata(AttentionMetadata):
    num_actual_tokens: int
    slot_mapping: Tensor  # [T] slot of each new token
    block_table: Tensor  # [num_reqs, max_blocks]
    query_start_loc: Tensor  # [num_reqs + 1] (CPU)
    step: dict[str, Any] | None = None  # per-step facts, built by the first layer of the step
    plans: dict[tuple[int, bool], _Plan] = field(default_factory=dict)  # (phase, reader) ->


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
            query_start_loc=m.query_start_loc_cpu[: n + 1].long(),
        )


@functools.lru_cache(maxsize=16)
def kernel_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The ISA name vLLM's CPU attention kernel runs for this shape, or None where the
    kernel is not available (not a CPU build of vLLM, an unsupported head or block size)."""
    try:
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except ImportError:
        return None
    if not current_platform.is_cpu() or head_size not in CPUAttentionBackend.get_supported_head_sizes():
        return None
    if block_size % 16:
        return None
    try:
        isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    except NotImplementedError:
        return None
    # the gather path reads what the kernel wrote: only layouts it knows (AMX, NEON, ...
    # pack blocks otherwise)
    return isa if isa in ("vec", "vec16") else None


def kv_views(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of one layer's cache [N, h_kv, bs, 2*d_h]: the kernel's key and value
    arguments ([N, h_kv, bs, d_h] each), the keys as stored ([N, h_kv, d_h, bs]) and the
    values ([N, h_kv, bs, d_h])."""
    num_blocks, h_kv, block_size, _ = kv_cache.shape
    k_arg, v_arg = kv_cache.view(num_blocks, h_kv, 2 * block_size, head_size).chunk(2, dim=2)
    stride = kv_cache.stride()
    keys_t = torch.as_strided(
        kv_cache, (num_blocks, h_kv, head_size, block_size), (stride[0], stride[1], block_size, 1)
    )
    return k_arg, v_arg, keys_t, v_arg


def _step_facts(meta: ImpRAGMetadata, flags: TokenFlags, store: Tensor, block_size: int, region: int) -> dict:
    """Token -> request, position and kind; per request: has a region, real passage tokens."""
    device = meta.slot_mapping.device
    n = meta.num_actual_tokens
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]  # [R]
    req = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens).to(device)  # [T]
    assert flags.current is not None and flags.positions is not None
    tok_flags = flags.current[:n].to(device)
    first = meta.block_table[:, 0].long() * block_size  # slot of position 0
    has_region = store[first] != 0  # [R]: position 0 is a passage token or PAD
    if region > 0:
        r_blocks = region // block_size if region % block_size == 0 else -(-region // block_size)
        bt = meta.block_table[:, :r_blocks].long()  # [R, r_blocks]
        slots = (bt.unsqueeze(2) * block_size + torch.arange(block_size, device=device)).flatten(1)[
            :, :region
        ]
        plen = ((store[slots] & (REGION | PAD)) == REGION).sum(1)  # [R]: passage tokens, not PAD
    else:
        plen = torch.zeros_like(has_region, dtype=torch.long)
    return {
        "req": req,
        "pos": flags.positions[:n].long().to(device),
        "in_region": (tok_flags & REGION) != 0,
        "has_region": has_region,
        "plen": torch.where(has_region, plen, 0),
    }


def _runs(req: Tensor, pos: Tensor, cls: Tensor, a: Tensor, s: Tensor, select: Tensor) -> _Runs:
    """Runs of consecutive selected rows with the same request and class."""
    idx = select.nonzero().squeeze(1)
    if idx.numel() == 0:
        empty = idx.new_zeros(0)
        return _Runs(empty, empty, empty, empty, empty, empty)
    key_r, key_c = req[idx], cls[idx]
    new = torch.ones_like(idx, dtype=torch.bool)
    new[1:] = (key_r[1:] != key_r[:-1]) | (key_c[1:] != key_c[:-1]) | (idx[1:] != idx[:-1] + 1)
    starts = new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([idx.numel()])]) - 1
    return _Runs(
        start=idx[starts],
        count=ends - starts + 1,
        req=key_r[starts],
        last=pos[idx[ends]],
        a=a[idx[starts]],
        s=s[idx[starts]],
    )


def _make_plan(
    step: dict, rows: Tensor | None, reader: bool, region: int, block_size: int, kernel: bool
) -> _Plan:
    req, pos = step["req"], step["pos"]
    in_region = step["in_region"]
    if rows is not None:
        req, pos, in_region = req[rows], pos[rows], in_region[rows]
    has_region = step["has_region"][req]
    plen = step["plen"][req]
    prompt = has_region & ~in_region  # a prompt/generated token of a request with passages
    a = torch.where(prompt & reader, plen, 0)  # keys [0, a) ...
    s = torch.where(prompt, region, 0)  # ... and [s, p]
    cls = prompt.long()
    gap = a > 0
    plan = _Plan()
    if kernel and not bool(gap.all()):
        runs = _runs(req, pos, cls, a, s, ~gap)
        all_rows = not bool(gap.any())
        k_rows = None if all_rows else (~gap).nonzero().squeeze(1)
        # the kernel's query tensor holds the kernel rows in order: run starts within it
        local = runs.start if all_rows else torch.searchsorted(k_rows, runs.start)
        qsl = torch.cat([local, local.new_tensor([int(local[-1] + runs.count[-1])])]).to(torch.int32)
        plan.kernel_rows = k_rows
        plan.kernel = {
            "query_start_loc": qsl,
            "seq_lens": (runs.last + 1 - runs.s).to(torch.int32),
            "req": runs.req,
            "block_offset": runs.s // block_size,
        }
        gap_select = gap
    else:
        gap_select = torch.ones_like(gap)
    if bool(gap_select.any()):
        runs = _runs(req, pos, cls, a, s, gap_select)
        single = runs.count == 1
        if bool(single.any()):  # one query each (decoding): one call for all of them
            plan.gather.append(_Runs(*(getattr(runs, f)[single] for f in _Runs.__dataclass_fields__)))
        for i in (~single).nonzero().squeeze(1).tolist():  # a prefill chunk: a call each
            plan.gather.append(_Runs(*(getattr(runs, f)[i : i + 1] for f in _Runs.__dataclass_fields__)))
    return plan


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
        region: int,
        use_kernel: bool = True,
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
        self.region = region  # C = k * l_max
        self.use_kernel = use_kernel

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
        """query [n, h_q, d_h], key/value [n, h_kv, d_h] of the rows ``flags.rows`` of the
        step; kv_cache [N, h_kv, bs, 2*d_h]."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run without a KV cache
            return output.zero_()
        meta = attn_metadata
        rows = self.flags.rows
        n = query.shape[0]
        if n == 0:
            return output
        num_blocks, _, block_size, _ = kv_cache.shape
        k_cache, v_cache, keys_t, values = kv_views(kv_cache, self.head_size)
        isa = kernel_isa(kv_cache.dtype, block_size, self.head_size) if self.use_kernel else None
        kernel = isa is not None and self.region % block_size == 0
        store = self.flags.slot_store(num_blocks * block_size, kv_cache.device)
        if meta.step is None:  # first layer of the step: slot flags, then per-step facts
            if self.flags.current is None:
                raise RuntimeError("ImpRAG attention ran without token flags from the model")
            t = meta.num_actual_tokens
            store[meta.slot_mapping.long()] = self.flags.current[:t].to(store.device)
            meta.step = _step_facts(meta, self.flags, store, block_size, self.region)
        slot = meta.slot_mapping if rows is None else meta.slot_mapping[rows]
        if kernel:
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(key[:n], value[:n], k_cache, v_cache, slot, isa)
        else:
            slot = slot.long()
            keys_t[slot // block_size, :, :, slot % block_size] = key[:n].to(kv_cache.dtype)
            values[slot // block_size, :, slot % block_size] = value[:n].to(kv_cache.dtype)
        plan_key = (self.flags.phase, self.reader)
        plan = meta.plans.get(plan_key)
        if plan is None:
            plan = _make_plan(meta.step, rows, self.reader, self.region, block_size, kernel)
            meta.plans[plan_key] = plan
        stats = self.flags.stats
        if plan.kernel is not None:
            self._kernel(plan, meta, query[:n], output[:n], k_cache, v_cache, isa)
            stats["kernel_calls"] += 1
            stats["kernel_rows"] += n if plan.kernel_rows is None else int(plan.kernel_rows.numel())
        for runs in plan.gather:
            self._gather(runs, meta, query, output, keys_t, values, block_size)
            stats["gather_calls"] += 1
            stats["gather_rows"] += int(runs.count.sum())
        return output

    def _kernel(
        self, plan: _Plan, meta: ImpRAGMetadata, query: Tensor, output: Tensor, k_cache, v_cache, isa
    ) -> None:
        """vLLM's CPU paged attention over each run's contiguous key range."""
        from vllm import _custom_ops as ops
        from vllm import envs

        k = plan.kernel
        assert k is not None
        if "block_table" not in k:  # once per step and plan: the shared varlen inputs
            bt = meta.block_table
            width = bt.shape[1]
            cols = k["block_offset"].unsqueeze(1) + torch.arange(width, device=bt.device)
            k["block_table"] = bt[k["req"].unsqueeze(1), cols.clamp(max=width - 1)].contiguous()
            k["sched"] = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(k["seq_lens"]),
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size,
                seq_lens=k["seq_lens"],
                dtype=query.dtype,
                query_start_loc=k["query_start_loc"],
                causal=True,
                sliding_window_size=-1,
                isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
        rows = plan.kernel_rows
        q = query if rows is None else query[rows]
        out = output if rows is None else torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=k_cache,
            value_cache=v_cache,
            output=out,
            query_start_loc=k["query_start_loc"],
            seq_lens=k["seq_lens"],
            scale=self.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=k["block_table"],
            softcap=0.0,
            scheduler_metadata=k["sched"],
            s_aux=None,
        )
        if rows is not None:
            output[rows] = out

    def _gather(
        self, runs: _Runs, meta: ImpRAGMetadata, query, output, keys_t, values, block_size: int
    ) -> None:
        """Each run's queries over its keys ``[0, a) + [s, p]``, gathered through the
        block table, in one padded ``scaled_dot_product_attention`` call."""
        device = query.device
        n_keys = runs.a + runs.last + 1 - runs.s  # [G]
        width = int(n_keys.max())
        j = torch.arange(width, device=device).unsqueeze(0)  # [1, K]
        k_valid = j < n_keys.unsqueeze(1)  # [G, K]
        k_pos = torch.where(j < runs.a.unsqueeze(1), j, j - runs.a.unsqueeze(1) + runs.s.unsqueeze(1))
        k_pos = torch.where(k_valid, k_pos, 0)
        blocks = meta.block_table[runs.req.unsqueeze(1), k_pos // block_size].long()  # [G, K]
        kb, ko = blocks, k_pos % block_size
        keys = keys_t[kb, :, :, ko].transpose(1, 2)  # [G, h_kv, K, d]
        vals = values[kb, :, ko].transpose(1, 2)
        q_len = int(runs.count.max())
        i = torch.arange(q_len, device=device).unsqueeze(0)  # [1, Q]
        q_valid = i < runs.count.unsqueeze(1)  # [G, Q]
        q_rows = torch.where(q_valid, runs.start.unsqueeze(1) + i, runs.start.unsqueeze(1))  # [G, Q]
        q_pos = runs.last.unsqueeze(1) - (runs.count.unsqueeze(1) - 1) + i  # [G, Q]
        mask = k_valid.unsqueeze(1) & (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2))  # [G, Q, K]
        q = query[q_rows].transpose(1, 2).to(keys.dtype)  # [G, h_q, Q, d]
        out = F.scaled_dot_product_attention(
            q,
            keys,
            vals,
            attn_mask=mask.unsqueeze(1),
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # [G, Q, h_q, d]
        output[q_rows[q_valid]] = out[q_valid].to(output.dtype)
