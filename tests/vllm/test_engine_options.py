"""VLLMEngine refuses bad construction input before any vLLM process starts."""

from __future__ import annotations

import json
import shutil

import pytest

from imprag_ray.engine import EngineError
from imprag_ray.vllm_plugin.engine import VLLMEngine


def test_unknown_engine_option_names_it(tiny_world):
    with pytest.raises(EngineError, match="no_such_option"):
        VLLMEngine(str(tiny_world["ckpt"]), no_such_option=1)


def test_missing_imprag_config_is_refused(tiny_world, tmp_path):
    ckpt = tmp_path / "plain"
    shutil.copytree(tiny_world["ckpt"], ckpt)
    (ckpt / "imprag_config.json").unlink()
    with pytest.raises(EngineError, match=r"imprag_config\.json"):
        VLLMEngine(str(ckpt))


def test_non_llama_checkpoint_is_refused(tiny_world, tmp_path):
    ckpt = tmp_path / "qwen"
    shutil.copytree(tiny_world["ckpt"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(EngineError, match="model_type"):
        VLLMEngine(str(ckpt))


def test_max_model_len_comes_from_the_request_budget_not_the_model():
    from imprag_ray.vllm_plugin.engine import derive_max_model_len

    hf = {"max_position_embeddings": 131072}
    assert derive_max_model_len(hf, region=2560, max_prompt_tokens=512, max_new_tokens=64) == 3136
    assert derive_max_model_len({"max_position_embeddings": 1024}, 960, 512, 64) == 1024  # capped
    assert derive_max_model_len(hf, 32, None, None) == 32 + 512 + 256  # the default budget


def test_batched_tokens_follow_vllm_rule():
    from imprag_ray.vllm_plugin.engine import derive_batched_tokens

    assert derive_batched_tokens(None, 3136, 32) == 3136  # a whole request per step
    assert derive_batched_tokens(None, 131072, 32) == 8192
    assert derive_batched_tokens(None, 20, 32) == 32  # vLLM: >= max_num_seqs
    assert derive_batched_tokens(64, 512, 8) == 64  # chunked prefill allows < max_model_len
    with pytest.raises(EngineError, match=r"max_num_batched_tokens=16 < max_num_seqs=32"):
        derive_batched_tokens(16, 512, 32)


def test_auto_cpu_kv_cache_fits_one_sequence_or_names_the_fix():
    from imprag_ray.vllm_plugin.engine import GiB, auto_cpu_kv_cache_bytes, kv_bytes_per_token

    llama3_2_3b = {
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_size": 3072,
    }
    per_token = kv_bytes_per_token(llama3_2_3b, "bfloat16")
    assert per_token == 28 * 2 * 8 * 128 * 2
    kv = auto_cpu_kv_cache_bytes(per_token, 3136, 32, available=64 * GiB)
    assert 3136 * per_token <= kv <= 16 * GiB  # >= one full sequence, <= a quarter of memory
    with pytest.raises(EngineError, match=r"max_model_len=131072 needs 14\.0. GiB.*kv_cache_gib"):
        auto_cpu_kv_cache_bytes(per_token, 131072, 32, available=16 * GiB)


def test_engine_pins_vllm_v1_model_runner_unless_told(tiny_world, monkeypatch):
    """vLLM 0.32 picks its V2 model runner on CUDA by default; the plugin runs on V1."""
    import os

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with pytest.raises(EngineError, match="max_num_batched_tokens"):  # fails before any engine starts
        VLLMEngine(str(tiny_world["ckpt"]), max_num_batched_tokens=1, max_num_seqs=8)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(EngineError):
        VLLMEngine(str(tiny_world["ckpt"]), max_num_batched_tokens=1, max_num_seqs=8)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # a user's explicit choice stands
