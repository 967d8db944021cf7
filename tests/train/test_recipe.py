"""The Ray-free recipe: a few steps of each stage, checkpoints, resume, closed book."""

from __future__ import annotations

import json

import pytest
import torch

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.train.local import train_local
from imprag_ray.train.recipe import STATE_NAME, ImpRAGRecipe, latest_checkpoint, read_task_files


def _cfg(tiny_world, tmp_path, *overrides):
    return load_config(TrainJobConfig, tiny_world["job"], [f"output_dir={tmp_path / 'run'}", *overrides])


def test_both_stages_train_every_part_of_the_model(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path))
    recipe.setup()
    batch = next(recipe.epoch_batches(0))
    assert batch.stage == "warmup" and recipe.stage(1) == "distill"
    assert bool(batch.retrieval.any()) and not bool(batch.retrieval.all())  # mixed batch
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    warm = recipe.train_step(batch)
    assert {"j_gen", "j_ret", "loss"} <= warm.keys()
    assert warm["loss"] == pytest.approx(warm["j_gen"] + warm["j_ret"], rel=1e-5)
    distill_batch = next(recipe.epoch_batches(1))
    assert distill_batch.stage == "distill" and bool((distill_batch.candidates >= 0).any())
    distill = recipe.train_step(distill_batch)
    assert distill["j_ret"] >= 0.0 and distill["loss"] == distill["loss"]  # finite, not NaN
    changed = [n for n, p in recipe.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)


def test_teacher_logliks_match_single_passage_forward(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path))
    recipe.setup()
    batch = next(recipe.epoch_batches(1))  # a self-distillation batch
    logliks = recipe.teacher_logliks(batch)
    row = int(batch.retrieval.nonzero()[0])
    cand = int(batch.candidates[0, 1])
    from imprag_ray.model.losses import answer_loglik

    with torch.no_grad():
        out = recipe.model(batch.input_ids[row : row + 1], batch.attention_mask[row : row + 1],
                           batch.pool_tokens[cand].view(1, 1, -1), batch.pool_mask[cand].view(1, 1, -1))
    expected = answer_loglik(out.logits, batch.labels[row : row + 1])[0]
    assert logliks[0, 1].item() == pytest.approx(expected.item(), abs=1e-4)


def test_resume_continues_exactly_where_the_run_stopped(tiny_world, tmp_path):
    full = _cfg(tiny_world, tmp_path / "a")
    train_local(full, echo=None)
    # same job stopped after epoch 1, then resumed
    part = _cfg(tiny_world, tmp_path / "b", "train.epochs=2")
    recipe = ImpRAGRecipe(part)
    recipe.setup()
    recipe.train_epoch()
    recipe.save_checkpoint()
    ckpt = latest_checkpoint(tmp_path / "b" / "run")
    assert ckpt is not None and (ckpt / STATE_NAME).exists() and ckpt.name == "epoch-001"
    train_local(part, resume=True, echo=None)
    # the state files hold plain data only: they load without unpickling arbitrary objects
    a = torch.load(tmp_path / "a/run/checkpoints/epoch-002/" / STATE_NAME, weights_only=True)
    b = torch.load(tmp_path / "b/run/checkpoints/epoch-002/" / STATE_NAME, weights_only=True)
    assert a["step"] == b["step"] == 6
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a/run/checkpoints/epoch-002/model.safetensors")
    wb = load_file(tmp_path / "b/run/checkpoints/epoch-002/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows = [json.loads(line) for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_from", "") and r["resumed_from"].endswith("epoch-001") for r in rows)
    assert not list((tmp_path / "b/run/checkpoints").glob(".*tmp*"))


class _Callable:
    """Pickles as a call of os.system: what a tampered state file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_trainer_state_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    state = {"epoch": 1, "step": 3, "optimizer": {}, "scheduler": {}, "torch_rng": _Callable(marker)}
    torch.save(state, tmp_path / STATE_NAME)
    recipe = ImpRAGRecipe.__new__(ImpRAGRecipe)  # _load_state reads the file before any state
    with pytest.raises(ValueError, match=r"refusing to load the trainer state.*posix\.system") as err:
        recipe._load_state(tmp_path)
    assert "weights_only=False" not in str(err.value)  # no advice to disable the check
    assert not marker.exists()
    torch.save({"epoch": 1}, tmp_path / STATE_NAME)
    with pytest.raises(ValueError, match=r"not a trainer state \(no step, optimizer, scheduler, torch_rng\)"):
        recipe._load_state(tmp_path)


def test_save_refuses_state_that_would_not_load_weights_only():
    from imprag_ray.train.recipe import _check_plain

    _check_plain({"a": [torch.zeros(2), (0.9, 0.98), None, "x", {"b": True}]}, "state")
    with pytest.raises(TypeError, match=r"state\['rng'\] is a random.Random"):
        import random

        _check_plain({"rng": random.Random(0)}, "state")


def test_closed_book_mode_reads_no_passages(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path, "train.mode=closed_book"))
    recipe.setup()
    batch = next(recipe.epoch_batches(0))
    assert batch.passage_ids is None and not bool(batch.retrieval.any())
    metrics = recipe.train_step(batch)
    assert "j_ret" not in metrics
    result = recipe.evaluate("eval", limit=4, write=False)
    assert all(r["recall@1"] == 0.0 for r in result.values())


def test_evaluate_writes_predictions_with_retrieved_ids(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path))
    recipe.setup()
    result = recipe.evaluate("eval", limit=5)
    assert set(result) == {"qa", "slot_filling", "fact_check", "entity_linking"}
    preds = [json.loads(line) for line in (tmp_path / "run/eval/eval-predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 20 and all(len(p["retrieved"]) == 10 for p in preds)
    scores = preds[0]["scores"]
    assert scores == sorted(scores, reverse=True)


def test_gather_hook_adds_other_workers_passages_as_negatives(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path))
    recipe.setup()
    batch = next(recipe.epoch_batches(0))
    with torch.no_grad():
        out = recipe.model(batch.input_ids, batch.attention_mask, batch.passage_ids, batch.passage_mask,
                           query_index=batch.query_index)
        queries = out.query_embedding[batch.retrieval]
        alone, _ = recipe.retrieval_loss(queries, batch)
        foreign = torch.randn(5, queries.shape[1])
        recipe.gather = lambda local: (torch.cat([foreign, local]), 5)  # this worker is second
        gathered, _ = recipe.retrieval_loss(queries, batch)
    assert gathered.item() > alone.item()


def test_gold_context_files_train_the_reader_only(tiny_world, tmp_path):
    from imprag_ray.config.loader import ConfigError
    from imprag_ray.data.readers import read_tasks
    from imprag_ray.train.batching import collate

    w = tiny_world["world"]
    train = (f"data.train=[{{path: {w}/train/qa.jsonl, format: qa}}, "
             f"{{path: {w}/train/reading.jsonl, format: instruction, context: gold}}]")
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path, train))
    recipe.setup()
    qa, reading = read_tasks(w / "train/qa.jsonl", "qa"), read_tasks(w / "train/reading.jsonl", "instruction")
    assert len(recipe.items) == len(qa) + len(reading)  # file order kept (Ray Train shards by index)
    assert all(it.retrieval for it in recipe.items[: len(qa)])
    for it, ex in zip(recipe.items[len(qa):], reading, strict=True):
        assert not it.retrieval and ex.provenance[0] in it.context and len(it.context) == recipe.model.k
    batch = collate(recipe.items[len(qa) : len(qa) + 4], recipe.store, recipe.model.k,
                    recipe.tokenizer.pad_token_id, with_passages=True)
    assert batch.passage_ids is not None and not bool(batch.retrieval.any())
    before = recipe.model.layers[recipe.model.b].self_attn.k_proj.weight.detach().clone()
    metrics = recipe.train_step(batch)
    assert "j_ret" not in metrics and metrics["loss"] == pytest.approx(metrics["j_gen"])
    assert not torch.equal(before, recipe.model.layers[recipe.model.b].self_attn.k_proj.weight)  # reader trains
    bad = f"data.train=[{{path: {w}/train/instruction.jsonl, format: instruction, context: gold}}]"
    with pytest.raises(ConfigError, match=r"data\.train.*no provenance"):
        ImpRAGRecipe(_cfg(tiny_world, tmp_path, bad)).setup()


def test_retriever_lr_applies_to_the_bottom_group_only(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path, "train.lr=2e-3", "train.retriever_lr=5e-4"))
    recipe.setup()
    b = recipe.model.b
    lr_of = {id(p): g["initial_lr"] for g in recipe.optimizer.param_groups for p in g["params"]}
    by_name = {n: lr_of[id(p)] for n, p in recipe.model.named_parameters()}
    assert len(lr_of) == len(by_name)  # every parameter in exactly one group
    bottom = f"lm.model.layers.{b}.self_attn"
    for name, lr in by_name.items():
        retriever = (any(f"layers.{i}." in name for i in range(b))
                     or name in {f"{bottom}.q_proj.weight", f"{bottom}.k_proj.weight",
                                 f"lm.model.layers.{b}.input_layernorm.weight"})
        assert lr == (5e-4 if retriever else 2e-3), name
    assert by_name[f"{bottom}.v_proj.weight"] == 2e-3  # layer b's value/output feed the reader
    assert by_name["lm.model.embed_tokens.weight"] == 2e-3
    # the scheduler scales both groups by the same factor
    recipe.train_step(next(recipe.epoch_batches(0)))
    ratios = {g["lr"] / g["initial_lr"] for g in recipe.optimizer.param_groups}
    assert len({round(r, 9) for r in ratios}) == 1


def test_provenance_positives_make_the_gold_passage_the_positive(tiny_world, tmp_path):
    bm25 = ImpRAGRecipe(_cfg(tiny_world, tmp_path / "a"))
    bm25.setup()
    gold = ImpRAGRecipe(_cfg(tiny_world, tmp_path / "b", "teacher.provenance_positives=true"))
    gold.setup()
    examples = [ex for _, exs in read_task_files(gold.cfg.data.train) for ex in exs]
    assert len(examples) == len(gold.items) == len(bm25.items)
    retrieval = [(ex, a, b) for ex, a, b in zip(examples, bm25.items, gold.items, strict=True) if a.retrieval]
    assert retrieval and all(b.retrieval for _, _, b in retrieval)
    for ex, _, b in retrieval:
        assert b.positives[0] == ex.provenance[0] and len(b.positives) == len(set(b.positives))
        assert ex.provenance[0] not in b.hard_negatives and ex.provenance[0] in b.context
    # where BM25 ranks another passage first, that one leads the positives without the option
    missed = [(ex, a, b) for ex, a, b in retrieval if a.positives[0] != ex.provenance[0]]
    assert missed and all(b.positives[1:] == [p for p in a.positives if p != b.positives[0]][: len(b.positives) - 1]
                          for _, a, b in missed)
