"""The ImpRAG model: one decoder LLM that retrieves and reads (arXiv 2506.02279, §3).

Layer groups (DESIGN §1): bottom = layers 0..b (retriever), middle = b..t (reader,
layer b shared), top = t+1..N-1. Embeddings come from layer b's attention
projections at the last real token (pre-RoPE by default):

* query embedding  = layer-b ``q_proj`` of the prompt, averaged over each GQA group
* passage embedding = layer-b ``k_proj`` of the passage

Inference is two-stage: :meth:`ImpRAGModel.encode_prompt` runs only the bottom group
(stage 1, gives the query embedding and the state reused by stage 2),
:meth:`ImpRAGModel.encode_passage_kv` computes the passage KV of layers b..t once,
and :meth:`ImpRAGModel.continue_prompt` finishes the prompt from layer b.

Works on any Hugging Face Llama-family causal LM (Llama, Qwen2, Mistral) with RoPE
and GQA, loaded from a local directory. Batches are right-padded; masks are 1 for
real tokens.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from imprag_ray.model.attention import (
    LayerKV,
    PassageKV,
    apply_rope,
    build_mask,
    decoder_layer,
    pack_passages,
)
from imprag_ray.model.losses import response_nll

IMPRAG_CONFIG_NAME = "imprag_config.json"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class ImpRAGConfigError(ValueError):
    """An invalid ImpRAG setting; ``field`` names the offending :class:`ImpRAGConfig` field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ImpRAGConfig:
    """Method hyper-parameters saved next to the HF checkpoint.

    retrieval_layer (b), reader_last_layer (t), max_passage_tokens (l_max),
    num_passages (k, passages per request), post_rope (embeddings after RoPE).
    """

    retrieval_layer: int
    reader_last_layer: int
    max_passage_tokens: int
    num_passages: int = 10
    post_rope: bool = False

    def check(self, num_layers: int) -> None:
        """Raise :class:`ImpRAGConfigError` unless 0 <= b < t < N, k > 0 and l_max > 0."""
        b, t = self.retrieval_layer, self.reader_last_layer
        if not 0 <= b < t:
            raise ImpRAGConfigError(
                "retrieval_layer", f"b={b} must satisfy 0 <= b < reader_last_layer (t={t})"
            )
        if t >= num_layers:
            raise ImpRAGConfigError(
                "reader_last_layer", f"t={t} must be < the model's {num_layers} layers; lower it"
            )
        if self.max_passage_tokens <= 0:
            raise ImpRAGConfigError("max_passage_tokens", f"must be > 0, got {self.max_passage_tokens}")
        if self.num_passages <= 0:
            raise ImpRAGConfigError("num_passages", f"must be > 0, got {self.num_passages}")


@dataclass
class PromptState:
    """Stage-1 result, reused by stage 2 instead of recomputing the bottom layers.

    hidden: [B, L, D] input of layer b; kv: post-RoPE KV of layers 0..b-1;
    positions: [B, L]; valid: [B, L] bool; offset: k * l_max used for positions;
    query_embedding: [B, h_kv * d_h].
    """

    query_embedding: Tensor
    hidden: Tensor
    kv: list[LayerKV]
    positions: Tensor
    valid: Tensor
    offset: int


@dataclass
class ImpRAGOutput:
    logits: Tensor  # [B, L, V]
    loss: Tensor | None
    query_embedding: Tensor  # [B, h_kv * d_h]


class ImpRAGModel(nn.Module):
    """Wraps a HF causal LM and runs it with ImpRAG's layer-group attention."""

    def __init__(self, lm: nn.Module, config: ImpRAGConfig):
        super().__init__()
        model_type = getattr(lm.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
            )
        self.lm = lm
        self.imprag_config = config
        config.check(self.num_layers)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        retrieval_layer: int | None = None,
        reader_last_layer: int | None = None,
        max_passage_tokens: int | None = None,
        num_passages: int | None = None,
        post_rope: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImpRAGModel:
        """Load a HF-format checkpoint; ImpRAG settings come from the arguments, else
        from ``imprag_config.json`` in ``path`` (arguments win)."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        saved: dict = {}
        if (path / IMPRAG_CONFIG_NAME).exists():
            saved = json.loads((path / IMPRAG_CONFIG_NAME).read_text())
        given = {
            "retrieval_layer": retrieval_layer,
            "reader_last_layer": reader_last_layer,
            "max_passage_tokens": max_passage_tokens,
            "num_passages": num_passages,
            "post_rope": post_rope,
        }
        merged = {**saved, **{k: v for k, v in given.items() if v is not None}}
        missing = [m for m in ("retrieval_layer", "reader_last_layer", "max_passage_tokens") if m not in merged]
        if missing:
            raise ValueError(
                f"{path}: no {IMPRAG_CONFIG_NAME} and {missing} not given; pass them to from_pretrained"
            )
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        return cls(lm, ImpRAGConfig(**merged))

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write HF weights + config and ``imprag_config.json`` atomically (temp dir, rename)."""
        from imprag_ray.data.io import atomic_dir

        with atomic_dir(out_dir, overwrite=True) as tmp:
            self.write_files(tmp)

    def write_files(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write HF weights + config and ``imprag_config.json`` into an existing directory
        (not atomic: callers that assemble a larger checkpoint wrap it in ``atomic_dir``).

        ``dtype``: write the floating-point weights in this dtype (e.g. bf16 weights of a
        mixed-precision job whose fp32 master weights stay untouched in memory); None = as held.
        """
        if dtype is None or all(p.dtype == dtype for p in self.lm.parameters()):
            self.lm.save_pretrained(directory)
        else:
            self.lm.save_pretrained(directory, state_dict=_cast_state(self.lm, dtype))
            config = Path(directory) / "config.json"  # save_pretrained records the held dtype
            hf = json.loads(config.read_text())
            hf["dtype"] = str(dtype).removeprefix("torch.")
            config.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        (Path(directory) / IMPRAG_CONFIG_NAME).write_text(json.dumps(asdict(self.imprag_config), indent=2))

    def retriever_parameter(self, name: str) -> bool:
        """True for the weights that only the bottom group (the retriever) owns: layers
        0..b-1 and layer b's input norm and q/k projections (``name`` as in
        ``named_parameters()``). The token embedding table is shared with the reader."""
        b = self.b
        m = re.search(r"\.layers\.(\d+)\.(.*)$", name)
        if m is None:
            return False
        layer, modules = int(m.group(1)), set(m.group(2).split("."))
        return layer < b or (layer == b and bool(modules & {"input_layernorm", "q_proj", "k_proj"}))

    def embedding_parameter(self, name: str) -> bool:
        """True for every weight the query and passage embeddings depend on: the retriever's
        own (:meth:`retriever_parameter`) plus the input token embedding table."""
        return self.retriever_parameter(name) or name.endswith("embed_tokens.weight")

    # -------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs built outside the model go here)."""
        return next(self.parameters()).device

    @property
    def decoder(self) -> nn.Module:
        return self.lm.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.lm.model.layers)

    @property
    def b(self) -> int:
        return self.imprag_config.retrieval_layer

    @property
    def t(self) -> int:
        return self.imprag_config.reader_last_layer

    @property
    def l_max(self) -> int:
        return self.imprag_config.max_passage_tokens

    @property
    def k(self) -> int:
        return self.imprag_config.num_passages

    @property
    def embedding_dim(self) -> int:
        attn = self.layers[0].self_attn
        return self.lm.config.num_key_value_heads * attn.head_dim

    # ------------------------------------------------------------- primitives
    def run_layers(
        self,
        h: Tensor,
        positions: Tensor,
        valid: Tensor,
        start: int,
        end: int,
        *,
        past: list[LayerKV] | None = None,
        past_valid: Tensor | None = None,
        passage_kv: PassageKV | None = None,
    ) -> tuple[Tensor, list[LayerKV]]:
        """Run decoder layers start..end-1 on new tokens h: [B, L, D].

        past[l - start] holds cached KV of earlier tokens of this sequence (layer l);
        passage_kv is visible to layers b..t only. Returns the hidden states and the
        KV of the new tokens for each layer run.
        """
        cos, sin = self.decoder.rotary_emb(h, positions)  # [B, L, d_h] each
        plain = build_mask(valid, past_valid, None)
        reader = None
        if passage_kv is not None and passage_kv.mask.shape[1] > 0:
            reader = build_mask(valid, past_valid, passage_kv.mask)
        new_kv: list[LayerKV] = []
        for layer_idx in range(start, end):
            prefix, mask = None, plain
            if reader is not None and self.b <= layer_idx <= self.t:
                prefix, mask = passage_kv.layers[layer_idx - self.b], reader
            layer_past = past[layer_idx - start] if past is not None else None
            h, kv = decoder_layer(
                self.layers[layer_idx], h, cos, sin, mask, past=layer_past, prefix=prefix
            )
            new_kv.append(kv)
        return h, new_kv

    def lm_logits(self, h: Tensor) -> Tensor:
        """Final norm + LM head: [B, L, D] -> [B, L, V]."""
        return self.lm.lm_head(self.decoder.norm(h))

    def _layer_b_states(
        self, hidden: Tensor, valid: Tensor, last: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Layer-b input-normed hidden state at each row's last real token (or at index
        ``last`` [B] when given): [B, D], idx [B]."""
        if last is None:
            last = valid.long().sum(dim=1) - 1  # [B]
        if bool((last < 0).any()):
            raise ValueError("every sequence needs at least one real token (attention_mask all 0)")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        x = self.layers[self.b].input_layernorm(hidden[rows, last])  # [B, D]
        return x, last

    def _rope_single(self, x: Tensor, positions: Tensor) -> Tensor:
        """Apply RoPE to per-row vectors x: [B, h, d_h] at positions [B]."""
        cos, sin = self.decoder.rotary_emb(x, positions.unsqueeze(1))  # [B, 1, d_h]
        return apply_rope(x.unsqueeze(2), cos, sin).squeeze(2)

    def _query_embedding(
        self, hidden: Tensor, valid: Tensor, positions: Tensor, last: Tensor | None = None
    ) -> Tensor:
        attn = self.layers[self.b].self_attn
        x, last = self._layer_b_states(hidden, valid, last)
        q = attn.q_proj(x).view(x.shape[0], -1, attn.head_dim)  # [B, h_q, d_h]
        if self.imprag_config.post_rope:
            q = self._rope_single(q, positions.gather(1, last.unsqueeze(1)).squeeze(1))
        h_kv = self.lm.config.num_key_value_heads
        q = q.view(x.shape[0], h_kv, -1, attn.head_dim).mean(dim=2)  # [B, h_kv, d_h]
        return q.reshape(x.shape[0], -1)

    def _embed(self, input_ids: Tensor, positions: Tensor, valid: Tensor, end: int):
        h = self.decoder.embed_tokens(input_ids)
        return self.run_layers(h, positions, valid, 0, end)

    # ------------------------------------------------------------------ stage 1
    def encode_prompt(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_passages: int | None = None,
        query_index: Tensor | None = None,
    ) -> PromptState:
        """Stage 1: bottom layers 0..b-1 on the prompt -> query embedding + reusable state.

        Prompt token i is placed at position ``num_passages * l_max + i``
        (num_passages defaults to k; 0 gives the base LLM's positions). The query
        embedding is taken at the last real token, or at ``query_index`` [B] (training
        appends the answer to the prompt; causality makes the prompt's states identical).
        """
        n = self.k if num_passages is None else num_passages
        offset = n * self.l_max
        valid = attention_mask.bool()
        positions = offset + torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)  # [B, L]
        hidden, kv = self._embed(input_ids, positions, valid, self.b)
        query = self._query_embedding(hidden, valid, positions, query_index)
        return PromptState(query, hidden, kv, positions, valid, offset)

    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Query embeddings [B, h_kv * d_h] (layer-b q_proj, GQA-group mean)."""
        return self.encode_prompt(input_ids, attention_mask).query_embedding

    def embed_passages(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Passage embeddings [B, h_kv * d_h]: layer-b k_proj at the last real token.

        Each row is one passage at positions 0..L-1; only layers 0..b-1 run.
        """
        valid = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        hidden, _ = self._embed(input_ids, positions, valid, self.b)
        attn = self.layers[self.b].self_attn
        x, last = self._layer_b_states(hidden, valid)
        k = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim)  # [B, h_kv, d_h]
        if self.imprag_config.post_rope:
            k = self._rope_single(k, last)
        return k.reshape(x.shape[0], -1)

    # ------------------------------------------------------------------ stage 2
    def encode_passage_kv(self, passage_ids: Tensor, passage_mask: Tensor) -> PassageKV:
        """Pack the k passages into one causal sequence (positions 0..|P|-1), run layers
        0..t on it and keep the KV of layers b..t. passage_ids: [B, k, l_max]."""
        if passage_ids.dim() != 3 or passage_mask.shape != passage_ids.shape:
            raise ValueError("passage_ids and passage_mask must both be [B, k, l_max]")
        if passage_ids.shape[2] > self.l_max:
            raise ValueError(
                f"passages have {passage_ids.shape[2]} tokens > max_passage_tokens={self.l_max}"
            )
        ids, mask = pack_passages(passage_ids, passage_mask)  # [B, Lp]
        if ids.shape[1] == 0:
            return PassageKV([], mask)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        _, kv = self._embed(ids, positions, mask, self.t + 1)
        return PassageKV(kv[self.b :], mask)

    def continue_prompt(
        self, state: PromptState, passage_kv: PassageKV | None = None
    ) -> tuple[Tensor, list[LayerKV]]:
        """Stage 2: layers b..N-1 on the prompt. Returns final hidden [B, L, D] and the
        prompt KV of all layers (0..b-1 reused from stage 1)."""
        h, kv = self.run_layers(
            state.hidden, state.positions, state.valid, self.b, self.num_layers,
            passage_kv=passage_kv,
        )
        return h, state.kv + kv

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        passage_ids: Tensor | None = None,
        passage_mask: Tensor | None = None,
        labels: Tensor | None = None,
        query_index: Tensor | None = None,
    ) -> ImpRAGOutput:
        """Logits [B, L, V] of the prompt read with its passages; HF-style shifted loss
        on ``labels`` (-100 = ignored). No passages = exactly the base LLM.
        ``query_index`` [B]: where to take the query embedding (default: last real token)."""
        n = 0 if passage_ids is None else passage_ids.shape[1]
        state = self.encode_prompt(input_ids, attention_mask, num_passages=n, query_index=query_index)
        passage_kv = None
        if passage_ids is not None:
            if passage_mask is None:
                raise ValueError("passage_mask is required with passage_ids")
            passage_kv = self.encode_passage_kv(passage_ids, passage_mask)
        h, _ = self.continue_prompt(state, passage_kv)
        logits = self.lm_logits(h)
        loss = None if labels is None else response_nll(logits, labels)
        return ImpRAGOutput(logits, loss, state.query_embedding)

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        passage_ids: Tensor | None = None,
        passage_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """KV-cached batched decoding -> new token ids [B, T]; keyword arguments
        (max_new_tokens, do_sample, ..., prompt_state) as in
        :func:`imprag_ray.model.generation.generate`."""
        from imprag_ray.model.generation import generate

        return generate(self, input_ids, attention_mask, passage_ids, passage_mask, **kwargs)


def _cast_state(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """``module.state_dict()`` on the CPU with floating-point tensors in ``dtype``; tied
    weights stay one tensor (save_pretrained drops the alias by storage)."""
    out: dict[str, Tensor] = {}
    done: dict[tuple, Tensor] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in done:
            to = dtype if tensor.is_floating_point() else tensor.dtype
            done[key] = tensor.detach().to("cpu", to)
        out[name] = done[key]
    return out
