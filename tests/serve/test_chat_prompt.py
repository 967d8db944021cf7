"""Serving instruct checkpoints, without Ray: the ingress encodes prompts inside the chat
template when ``chat_template: true`` (refusing a tokenizer without one), and the vLLM
generation stage is sized by the job's limits."""

from __future__ import annotations

import pytest

from imprag_ray.config.loader import ConfigError
from imprag_ray.data.tokenized import encode_prompt_text
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.serve import api
from imprag_ray.serve.app import load_serve_config
from imprag_ray.serve.ingress import Ingress, prompt_ids
from imprag_ray.serve.stages import engine_options
from imprag_ray.serve.versions import Version
from tests.engine.llama3_imprag import corpus_texts
from tests.llama3_micro import CHAT_TEMPLATE, build_tokenizer
from tests.serve.conftest import ROOT


@pytest.fixture(scope="module")
def llama3_tokenizer_dir(serve_world, tmp_path_factory):
    tok = build_tokenizer(corpus_texts(serve_world["corpus"])[:100])
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("llama3_tokenizer")
    tok.save_pretrained(out)
    return out


def _request(prompt: str, kind: str = "chat") -> api.ParsedRequest:
    return api.ParsedRequest(kind, prompt, 16, 0.0, 1.0, None, False, None)


def _cfg(world, *overrides: str):
    paths = [f"checkpoint={world['checkpoint']}", f"index={world['index']}", f"corpus={world['corpus']}"]
    return load_serve_config(ROOT / "jobs/serve_tiny_synth.yaml", [*paths, *overrides])


def test_chat_template_prompts_are_one_user_turn_within_the_token_limit(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    text = "who founded the city of Arvel?"
    ids = prompt_ids(tok, _request(text), 64, chat=True)
    assert ids == encode_prompt_text(tok, text, 65, chat=True)
    rendered = tok.decode(ids)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + text)
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt_ids(tok, _request(text, "completion"), 64, chat=False) == encode_prompt_text(tok, text, 65)
    fits = len(ids)
    assert prompt_ids(tok, _request(text), fits, chat=True) == ids  # the template's tokens count too
    for limit in (fits - 1, 5):  # cut user text; or not even room for the template
        with pytest.raises(api.APIError) as err:
            prompt_ids(tok, _request(text), limit, chat=True)
        assert err.value.status == 400 and err.value.param == "messages"


def test_chat_template_needs_a_tokenizer_that_has_one(serve_world, llama3_tokenizer_dir):
    tiny = Version(str(serve_world["checkpoint"]), str(serve_world["index"]), serve_world["hash_a"])
    with pytest.raises(ValueError, match="chat_template: true, but the tokenizer"):
        Ingress._load_tokenizer(True, tiny)  # the tiny checkpoint's BPE tokenizer has no template
    assert Ingress._load_tokenizer(False, tiny).pad_token_id is not None
    assert _cfg(serve_world, "chat_template=true").chat_template is True


def test_vllm_generation_stage_gets_the_limits_as_its_budget(serve_world):
    cfg = _cfg(serve_world, "engine={kind: vllm, options: {max_num_seqs: 8}}", "limits.max_tokens=48")
    assert engine_options(cfg) == {
        "max_num_seqs": 8,
        "max_prompt_tokens": cfg.limits.max_prompt_tokens,
        "max_new_tokens": 48,
    }
    given = _cfg(serve_world, "engine={kind: vllm, options: {max_model_len: 2048}}")
    assert engine_options(given)["max_model_len"] == 2048
    assert engine_options(_cfg(serve_world)) == {"max_batch_size": 16, "dtype": "float32"}  # torch
    with pytest.raises(ConfigError) as err:
        _cfg(serve_world, "search.nprobe=0")
    assert err.value.key == "search.nprobe"
