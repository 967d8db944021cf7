"""A Llama-3.x snapshot as Meta ships it: no pad token, several eos ids, a chat template."""

from __future__ import annotations

import json

import pytest

from imprag_ray.data.tokenized import encode_prompt_text
from imprag_ray.model.checkpoint import load_tokenizer, stop_token_ids
from tests.llama3_micro import build_snapshot, read_generation_eos

TEXTS = [
    f"The town of Vel{i} lies on the river Aro. Its mayor is Tana Obi{i % 7}, elected in {1900 + i}."
    for i in range(120)
]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, tiny_world):
    """The session's micro instruct snapshot (built once, shared with the engine tests)."""
    from tests.engine.llama3_imprag import snapshot as shared_snapshot

    return shared_snapshot(tmp_path_factory, tiny_world["world"] / "corpus.jsonl", instruct=True)


def test_snapshot_has_the_properties_of_a_real_one(snapshot):
    cfg = json.loads((snapshot / "config.json").read_text())
    assert not (snapshot / "imprag_config.json").exists()
    assert cfg["num_hidden_layers"] == 28 and cfg["tie_word_embeddings"]
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    assert cfg.get("pad_token_id") is None
    assert len(read_generation_eos(snapshot)) == 3
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(snapshot)
    assert raw.pad_token_id is None and raw.chat_template


def test_load_tokenizer_gives_a_pad_token_no_text_holds(snapshot):
    tok = load_tokenizer(snapshot)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id not in {i for t in TEXTS for i in tok(t)["input_ids"]}
    batch = tok(TEXTS[:3], padding=True)  # the call that needs a pad id
    assert len({len(ids) for ids in batch["input_ids"]}) == 1


def test_stop_ids_are_every_eos_of_the_generation_config(snapshot):
    tok = load_tokenizer(snapshot)
    ids = stop_token_ids(snapshot, tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ids == read_generation_eos(snapshot) and eot in ids


def test_chat_prompt_wraps_the_text_in_the_template_and_truncates_only_the_text(snapshot):
    tok = load_tokenizer(snapshot)
    long = " ".join(TEXTS[:20])
    ids = encode_prompt_text(tok, long, 64, chat=True)
    text = tok.decode(ids)
    assert len(ids) == 64
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert TEXTS[19][-40:] + "<|eot_id|>" in text  # the end of the text is kept
    plain = encode_prompt_text(tok, "Q: who A:", 64)
    assert plain[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|start_header_id|>") not in plain


def test_chat_prompt_without_a_template_names_the_setting(tmp_path):
    snap = build_snapshot(tmp_path / "base", TEXTS, instruct=False)
    with pytest.raises(ValueError, match=r"data\.chat_template"):
        encode_prompt_text(load_tokenizer(snap), "Q: who A:", 64, chat=True)


def test_greedy_decoding_of_the_instruct_snapshot_stops_at_eot(snapshot):
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(snapshot)
    lm = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for chat in (True, False):
        ids = encode_prompt_text(tok, "Q: who is the mayor of Vel3? A:", 64, chat=chat)
        out = lm.generate(
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stop_token_ids(snapshot, tok),
            pad_token_id=tok.pad_token_id,
        )
        new = out[0, len(ids) :].tolist()
        assert new[-1] == eot and len(new) < 12
