"""The recipe on a Llama-3.x instruct snapshot (tests/llama3_micro.py): no pad token,
several eos ids, and ``data.chat_template: true`` for training items and evaluation."""

from __future__ import annotations

import pytest
import torch
import yaml

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.templates import format_prompt
from imprag_ray.data.tokenized import encode_prompt_text
from imprag_ray.train.recipe import ImpRAGRecipe
from tests.llama3_micro import B, T, read_generation_eos
from tests.world import job_dict


@pytest.fixture(scope="module")
def llama3_job(tiny_world, tmp_path_factory):
    """A job over the tiny world on a micro Llama-3.2 instruct snapshot (b=7, t=19)."""
    from tests.engine.llama3_imprag import snapshot

    tmp = tmp_path_factory.mktemp("llama3")
    # the session's micro instruct snapshot of the tiny world (built once, shared)
    snap = snapshot(tmp_path_factory, tiny_world["world"] / "corpus.jsonl", instruct=True)
    d = job_dict(tmp, tiny_world["world"], snap, steps_per_epoch=1, batch_size=4)
    d["model"].update(retrieval_layer=B, reader_last_layer=T, max_passage_tokens=48, num_passages=3)
    d["data"]["chat_template"] = True
    for spec in d["data"]["train"]:
        spec["limit"] = 24
    (tmp / "job.yaml").write_text(yaml.safe_dump(d))
    return {"job": tmp / "job.yaml", "snapshot": snap, "tmp": tmp}


@pytest.fixture(scope="module")
def recipe(llama3_job):
    r = ImpRAGRecipe(load_config(TrainJobConfig, llama3_job["job"]))
    r.setup()
    return r


def test_llama3_items_use_the_chat_template_and_end_at_eot(recipe):
    tok = recipe.tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    header = tok.convert_tokens_to_ids("<|start_header_id|>")
    from imprag_ray.data.readers import read_tasks

    qa = read_tasks(recipe.cfg.data.train[0].path, "qa")[0]
    item = recipe.items[0]
    assert item.prompt == encode_prompt_text(
        tok, format_prompt(qa), recipe.cfg.data.max_prompt_tokens, chat=True
    )
    assert item.prompt[:2] == [tok.bos_token_id, header]
    assert tok.decode(item.prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert all(it.target[-1] == eot for it in recipe.items)
    plain = [it for it in recipe.items if it.prompt == [tok.bos_token_id]]
    assert plain  # corpus_text items stay plain LM text


def test_llama3_snapshot_trains_through_the_recipe(recipe):
    """No pad token in the snapshot: batches pad with the fallback load_tokenizer gives."""
    from imprag_ray.train.batching import collate

    tok = recipe.tokenizer
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    items = [it for it in recipe.items if it.retrieval][:2] + [it for it in recipe.items if not it.context][
        :2
    ]
    batch = collate(items, recipe.store, recipe.model.k, tok.pad_token_id, with_passages=True)
    assert bool((batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all())
    assert bool((batch.attention_mask == 0).any())  # right-padded rows exist
    metrics = recipe.train_step(batch)
    assert {"j_gen", "j_ret"} <= metrics.keys() and metrics["loss"] == metrics["loss"]


def test_llama3_evaluation_reads_chat_prompts_and_stops_at_every_eos(recipe, llama3_job):
    tok = recipe.tokenizer
    from imprag_ray.eval.predict import model_stop_ids

    assert recipe.stop_ids == read_generation_eos(llama3_job["snapshot"])  # end_of_text, eom, eot
    assert model_stop_ids(recipe.model, tok) == recipe.stop_ids  # predict's default, from the config
    seen: list[torch.Tensor] = []
    encode = recipe.model.encode_prompt
    recipe.model.encode_prompt = lambda ids, *a, **k: seen.append(ids) or encode(ids, *a, **k)
    try:
        result = recipe.evaluate("dev", limit=4, write=False)
    finally:
        del recipe.model.encode_prompt
    assert result["qa"]["n"] == 4 and result["qa"]["corpus_size"] == len(recipe.store)
    header = tok.convert_tokens_to_ids("<|start_header_id|>")
    assert seen and all(bool((ids[:, 1] == header).all()) for ids in seen)
