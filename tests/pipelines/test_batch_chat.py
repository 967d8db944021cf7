"""Batch inference settings for instruct snapshots, without Ray: prompts inside the chat
template (``data.chat_template``), the vLLM engine sized by the job's request budget, and
the index's search settings (``batch.nprobe``) handed to the searchers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imprag_ray.config.loader import ConfigError, load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.tokenized import encode_prompt_text
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.pipelines.batch import _settings, engine_options, parse_tasks
from tests.engine.llama3_imprag import corpus_texts
from tests.llama3_micro import CHAT_TEMPLATE, build_tokenizer

ROWS = [{"id": "q1", "input": "who founded the city of Arvel?"}, {"id": "q2", "input": "when was Mora born?"}]


@pytest.fixture(scope="module")
def llama3_tokenizer_dir(tiny_world, tmp_path_factory):
    """A Llama-3 tokenizer with the chat template (what parse_tasks loads of a checkpoint)."""
    tok = build_tokenizer(corpus_texts(tiny_world["world"] / "corpus.jsonl")[:100])
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("llama3_tokenizer")
    tok.save_pretrained(out)
    return out


def _parse(checkpoint, chat: bool) -> dict:
    batch = {"text": np.array([json.dumps(r) for r in ROWS], dtype=object)}
    return parse_tasks(
        batch, path="q.jsonl", format="qa", checkpoint=str(checkpoint), max_prompt_tokens=48, chat=chat
    )


def test_chat_template_wraps_each_prompt_as_a_user_turn(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    chat, raw = _parse(llama3_tokenizer_dir, True), _parse(llama3_tokenizer_dir, False)
    for i, text in enumerate(chat["prompt_text"]):
        ids = list(chat["prompt_ids"][i])
        assert ids == encode_prompt_text(tok, text, 48, chat=True)
        rendered = tok.decode(ids)
        assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
        assert rendered.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert text.strip() in rendered
        assert list(raw["prompt_ids"][i]) == encode_prompt_text(tok, text, 48)  # <s> + text, as trained
        assert len(ids) > len(raw["prompt_ids"][i])


def _job(tiny_world, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, tiny_world["job"], list(overrides))


def test_vllm_gets_the_request_budget_and_searchers_the_nprobe(tiny_world):
    cfg = _job(
        tiny_world,
        "batch.engine=vllm",
        "batch.max_new_tokens=20",
        "batch.nprobe=64",
        "batch.engine_options={max_num_seqs: 4}",
    )
    s = _settings(cfg)
    assert s["nprobe"] == 64 and s["ef_search"] is None and s["chat"] is False
    options = engine_options(cfg, s)
    assert options == {
        "max_num_seqs": 4,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_new_tokens": 20,
    }
    given = _job(tiny_world, "batch.engine=vllm", "batch.engine_options={max_model_len: 4096}")
    assert engine_options(given, _settings(given))["max_model_len"] == 4096  # the job may say more
    torch_job = _job(tiny_world)
    assert engine_options(torch_job, _settings(torch_job)) == {}  # the torch engine takes no budget
    with pytest.raises(ConfigError) as err:
        _job(tiny_world, "batch.nprobe=0")
    assert err.value.key == "batch.nprobe"


def test_chat_template_on_a_tokenizer_without_one_names_the_key(tiny_world):
    with pytest.raises(ConfigError) as err:
        _settings(_job(tiny_world, "data.chat_template=true"))  # the tiny checkpoint has no template
    assert err.value.key == "data.chat_template"
