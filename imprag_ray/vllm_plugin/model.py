"""The out-of-tree ImpRAG Llama for vLLM (arXiv 2506.02279 §3.1 "Reader", DESIGN §1).

vLLM's ``LlamaForCausalLM`` with two changes: every decoder layer's attention runs on
:class:`~imprag_ray.vllm_plugin.attention.ImpRAGAttentionBackend`, told whether its
layer is a reader layer (b..t); and the forward decodes the region encoding of
:mod:`imprag_ray.vllm_plugin.layout` (passage / PAD flags carried in the token ids) into
real token ids plus per-token flags, then runs only the tokens whose states someone
reads: PAD slots in no layer, passage tokens in layers 0..t (no prompt token reads a
passage above layer t). Their rows of the returned hidden states are zeros (vLLM only
samples from a request's last token, never a passage or PAD token of a finished prefill).
Weights are our HF-format checkpoints unchanged (same names as Llama).

The ImpRAG settings come from ``hf_overrides`` (``imprag_retrieval_layer`` ...), which
:class:`~imprag_ray.vllm_plugin.engine.VLLMEngine` fills from ``imprag_config.json``;
without them the model reads ``imprag_config.json`` from the checkpoint directory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionType

from imprag_ray.vllm_plugin.attention import ImpRAGAttentionBackend, TokenFlags
from imprag_ray.vllm_plugin.layout import PAD, REGION, decode_ids, region_length
from imprag_ray.vllm_plugin.patches import apply_cpu_seed_patch

ARCHITECTURE = "ImpRAGLlamaForCausalLM"
OVERRIDE_KEYS = {  # hf_config attribute -> imprag_config.json field
    "imprag_retrieval_layer": "retrieval_layer",
    "imprag_reader_last_layer": "reader_last_layer",
    "imprag_max_passage_tokens": "max_passage_tokens",
    "imprag_num_passages": "num_passages",
}


@dataclass(frozen=True)
class ReaderSettings:
    b: int  # retrieval_layer: first reader layer
    t: int  # reader_last_layer: last reader layer
    l_max: int
    k: int

    def is_reader(self, layer_idx: int) -> bool:
        return self.b <= layer_idx <= self.t


def reader_settings(vllm_config: VllmConfig) -> ReaderSettings:
    """b, t, l_max, k from the hf_config overrides, else from imprag_config.json."""
    hf = vllm_config.model_config.hf_config
    values: dict[str, Any] = {field: getattr(hf, key, None) for key, field in OVERRIDE_KEYS.items()}
    if any(v is None for v in values.values()):
        path = Path(vllm_config.model_config.model) / "imprag_config.json"
        if not path.exists():
            raise ValueError(
                f"{path} not found and hf_overrides lack {sorted(OVERRIDE_KEYS)}: "
                "load ImpRAG checkpoints through imprag_ray's VLLMEngine or pass these keys"
            )
        saved = {"num_passages": 10, **json.loads(path.read_text())}  # ImpRAGConfig's default k
        values = {f: saved.get(f) if v is None else v for f, v in values.items()}
        missing = [f for f, v in values.items() if v is None]
        if missing:
            raise ValueError(f"{path}: missing {missing}")
    settings = ReaderSettings(
        int(values["retrieval_layer"]),
        int(values["reader_last_layer"]),
        int(values["max_passage_tokens"]),
        int(values["num_passages"]),
    )
    if not 0 <= settings.b < settings.t < hf.num_hidden_layers:
        raise ValueError(f"need 0 <= b < t < {hf.num_hidden_layers}, got b={settings.b}, t={settings.t}")
    return settings


class ImpRAGLlamaAttention(nn.Module):
    """vLLM's LlamaAttention (qkv/o projections, RoPE) on the ImpRAG backend."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
        *,
        settings: ReaderSettings,
        flags: TokenFlags,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            self.head_dim,
            num_heads,
            num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            num_heads * self.head_dim,
            hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=max_position_embeddings,
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_type=attn_type,
            attn_backend=ImpRAGAttentionBackend,
            reader=settings.is_reader(extract_layer_index(prefix)),
            flags=flags,
            region=region_length(settings.k, settings.l_max),
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class ImpRAGLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose layers b..t let prompt tokens read the passage region (DESIGN §1)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        apply_cpu_seed_patch()  # we are in a worker process: its model runner is loaded
        self.settings = reader_settings(vllm_config)
        flags = TokenFlags()
        attn_type = functools.partial(ImpRAGLlamaAttention, settings=self.settings, flags=flags)
        layer_type = functools.partial(LlamaDecoderLayer, attn_layer_type=attn_type)  # type: ignore[arg-type]
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)  # type: ignore[arg-type]
        self.flags = flags
        self.region_vocab = vllm_config.model_config.hf_config.vocab_size  # V of the id encoding

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor | IntermediateTensors:
        if input_ids is None:
            raise NotImplementedError("ImpRAG needs token ids (region flags travel in them)")
        if intermediate_tensors is not None:
            raise NotImplementedError("ImpRAG's vLLM model runs without pipeline parallelism")
        ids, flags = decode_ids(input_ids, self.region_vocab)  # [T], [T]
        self.flags.current, self.flags.positions = flags, positions
        model = self.model
        in_region, pad = (flags & REGION) != 0, (flags & PAD) != 0
        # rows of layers 0..t: all but PAD; of the top layers: neither PAD nor passage
        low = None if not bool(pad.any()) else (~pad).nonzero().squeeze(1)
        if low is not None and low.numel() == 0:
            # a step of PAD slots only: one of them still runs (its state is never read) so
            # that the attention layers record the slots' flags, which later steps read
            low = low.new_zeros(1)
        top = None if not bool(in_region.any()) else (~in_region).nonzero().squeeze(1)
        h = model.embed_input_ids(ids if low is None else ids[low])
        pos = positions if low is None else positions[low]
        residual = None
        self.flags.rows, self.flags.phase = low, 0
        for i, layer in enumerate(model.layers):
            if i == self.settings.t + 1 and top is not None:
                keep = ~in_region if low is None else ~in_region[low]  # among the rows run so far
                keep_rows = keep.nonzero().squeeze(1)
                h, pos = h[keep_rows], pos[keep_rows]
                residual = None if residual is None else residual[keep_rows]
                self.flags.rows, self.flags.phase = top, 1
            if h.shape[0]:
                h, residual = layer(pos, h, residual)
        self.flags.rows = None
        rows = top if top is not None and self.settings.t + 1 < len(model.layers) else low
        if h.shape[0]:
            h, _ = model.norm(h, residual)
        if rows is None:
            return h
        out = h.new_zeros(ids.shape[0], h.shape[-1])
        out[rows] = h
        return out

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        ids, _ = decode_ids(input_ids, self.region_vocab)
        return self.model.embed_input_ids(ids)
