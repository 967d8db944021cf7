"""ImpRAG attention building blocks (arXiv 2506.02279, §3.1 "Reader").

Everything here is functional and works on the sub-modules of any Hugging Face
Llama-family decoder layer (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``): Llama, Qwen2 and Mistral share that shape.

The ImpRAG reader pattern is expressed as a *prefix* of passage keys/values that
only the middle layers ``b..t`` see:

    keys of a prompt/generated token in layer l =
        [ passage KV (layers b..t only, PAD masked) | earlier prompt/generated KV | itself ]

all in ONE softmax. Passages are packed (padding removed) into a single causal
sequence at positions ``0..|P|-1``; prompt token ``i`` sits at ``k * l_max + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LayerKV:
    """Post-RoPE keys/values of one layer. keys/values: [B, h_kv, S, d_h]."""

    keys: Tensor
    values: Tensor


@dataclass
class PassageKV:
    """Passage keys/values for the middle layers, computed once per request.

    ``layers[j]`` belongs to decoder layer ``b + j``; ``mask``: [B, Lp] bool, True for
    real passage tokens (PAD slots are never visible).
    """

    layers: list[LayerKV]
    mask: Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, h, L, d]; cos/sin: [B, L, d] (as returned by HF rotary embeddings)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def pack_passages(passage_ids: Tensor, passage_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the k passages of each example without padding.

    Args:
        passage_ids: [B, k, l_max] token ids, passage_mask: [B, k, l_max] (1 = real token).
    Returns:
        packed ids [B, Lp] and bool mask [B, Lp] with the real tokens first, in passage
        order; Lp = the largest total real length in the batch (0 if all are empty).
    """
    bsz = passage_ids.shape[0]
    ids = passage_ids.reshape(bsz, -1)  # [B, k*l_max]
    mask = passage_mask.reshape(bsz, -1).bool()  # [B, k*l_max]
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first
    lp = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    order = order[:, :lp]
    return ids.gather(1, order), mask.gather(1, order)


def build_mask(
    new_valid: Tensor, past_valid: Tensor | None, prefix_valid: Tensor | None
) -> Tensor:
    """Boolean attention mask [B, 1, Lnew, Lprefix + Lpast + Lnew] (True = may attend).

    new_valid: [B, Lnew] real-token flags of the new tokens; past_valid: [B, Lpast] of
    cached tokens; prefix_valid: [B, Lp] of passage tokens (reader layers only).
    New tokens attend causally among themselves; every row sees its own diagonal so
    no softmax row is empty (rows of PAD queries are ignored by callers).
    """
    bsz, lnew = new_valid.shape
    device = new_valid.device
    causal = torch.ones(lnew, lnew, dtype=torch.bool, device=device).tril()
    eye = torch.eye(lnew, dtype=torch.bool, device=device)
    own = (causal.unsqueeze(0) & new_valid.bool().unsqueeze(1)) | eye  # [B, Lnew, Lnew]
    parts = []
    for valid in (prefix_valid, past_valid):
        if valid is not None and valid.shape[1] > 0:
            parts.append(valid.bool().unsqueeze(1).expand(bsz, lnew, valid.shape[1]))
    parts.append(own)
    return torch.cat(parts, dim=2).unsqueeze(1)


def project_qkv(
    attn: nn.Module, h: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer-normed hidden states h: [B, L, D] -> post-RoPE q [B,h_q,L,d], k/v [B,h_kv,L,d]."""
    bsz, length, _ = h.shape
    d_h = attn.head_dim
    q = attn.q_proj(h).view(bsz, length, -1, d_h).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, length, -1, d_h).transpose(1, 2)
    v = attn.v_proj(h).view(bsz, length, -1, d_h).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def decoder_layer(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    past: LayerKV | None = None,
    prefix: LayerKV | None = None,
) -> tuple[Tensor, LayerKV]:
    """One pre-norm decoder layer with explicit prefix/past KV.

    h: [B, L, D]; mask from :func:`build_mask` (prefix keys first, then past, then new).
    Returns the new hidden states and this layer's KV for the *new tokens only* (the
    caller decides whether to keep it).
    """
    attn = layer.self_attn
    residual = h
    x = layer.input_layernorm(h)
    q, k, v = project_qkv(attn, x, cos, sin)
    keys, values = [k], [v]
    if past is not None:
        keys.insert(0, past.keys)
        values.insert(0, past.values)
    if prefix is not None:
        keys.insert(0, prefix.keys)
        values.insert(0, prefix.values)
    k_all = torch.cat(keys, dim=2) if len(keys) > 1 else k
    v_all = torch.cat(values, dim=2) if len(values) > 1 else v
    out = F.scaled_dot_product_attention(
        q,
        k_all,
        v_all,
        attn_mask=mask,
        dropout_p=0.0,
        scale=attn.scaling,
        enable_gqa=q.shape[1] != k_all.shape[1],
    )  # [B, h_q, L, d]
    bsz, _, length, _ = out.shape
    out = attn.o_proj(out.transpose(1, 2).reshape(bsz, length, -1))
    h = residual + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, LayerKV(k, v)
