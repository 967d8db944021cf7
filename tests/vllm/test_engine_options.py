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
