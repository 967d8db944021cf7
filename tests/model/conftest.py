"""Tiny random Llama-family checkpoints built in code (no hub downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_lm(family: str = "llama", *, layers: int = 6, seed: int = 0, vocab: int = 97):
    """A random fp32 causal LM with h_q != h_kv (GQA), eager attention for references."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    cfg = cfg_cls(**common)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms/biases so every parameter matters
        for name, p in lm.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return lm


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")
