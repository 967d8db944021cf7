"""CI-sized learning tests: a couple of hundred steps of joint training on a small synthetic
world raise held-out-entity recall@k and EM far above the untrained model (step counts and
the metrics they reach: docs/notes.md).

Held-out entities never appear in training tasks; their facts exist only in the corpus,
so everything measured here is retrieval by the model's own layer-b embeddings plus
reading of the retrieved passages.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import yaml

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.train.recipe import ImpRAGRecipe
from tests.world import job_dict

# training steps of the random-init test and of the from-the-base test (env: longer runs)
STEPS = int(os.environ.get("IMPRAG_LEARNING_STEPS", "200"))
BASE_STEPS = int(os.environ.get("IMPRAG_BASE_STEPS", "150"))


def _world(tmp_path):
    from imprag_ray.data.synth import synthesize
    from imprag_ray.model.checkpoint import init_checkpoint, tokenizer_texts
    from imprag_ray.model.presets import llama_like

    world = tmp_path / "world"
    synthesize(world, seed=5, n_passages=800)
    ckpt = tmp_path / "init"
    shape = llama_like(
        hidden_size=128,
        intermediate_size=384,
        num_layers=5,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        retrieval_layer=2,
        reader_last_layer=3,
        max_passage_tokens=48,
        num_passages=3,
        initializer_range=0.05,
    )
    texts = tokenizer_texts(
        world / "corpus.jsonl", [world / "train/qa.jsonl", world / "train/instruction.jsonl"]
    )
    init_checkpoint(shape, texts, ckpt, seed=0, vocab_size=2500)
    job = job_dict(
        tmp_path,
        world,
        ckpt,
        epochs=1,
        warmup_epochs=1,
        steps_per_epoch=STEPS,
        batch_size=16,
        lr=5e-4,
        warmup_steps=20,
        log_every=50,
    )
    job["teacher"] = {"num_positives": 1}
    job["data"]["eval"] = [e for e in job["data"]["eval"] if e["format"] == "qa"]  # what is asserted
    job["eval"] = {"top_k": 3, "recall_ks": [1, 3, 10], "max_new_tokens": 6, "batch_size": 64}
    path = tmp_path / "job.yaml"
    path.write_text("# learning test\n" + yaml.safe_dump(job))
    return load_config(TrainJobConfig, path)


@torch.no_grad()
def answer_nll(recipe, split_file, with_gold_passage):
    """Mean per-token NLL of the gold answer of held-out QA items, reading the gold passage
    (k=1) or nothing. Held-out facts exist only in the corpus: a gap means reading."""
    from imprag_ray.data.readers import read_tasks
    from imprag_ray.train.batching import collate, make_item

    examples = read_tasks(split_file, "qa")
    items = [
        make_item(
            ex,
            recipe.tokenizer,
            list(ex.provenance),
            k=1,
            num_positives=1,
            hard_negative_ranks=(10, 50),
            num_hard_negatives=0,
            num_candidates=1,
            max_prompt_tokens=80,
            max_target_tokens=12,
            rng=random.Random(0),
        )
        for ex in examples
    ]
    batch = collate(items, recipe.store, 1, recipe.tokenizer.pad_token_id, with_passages=with_gold_passage)
    recipe.model.eval()
    out = recipe.model(
        batch.input_ids, batch.attention_mask, batch.passage_ids, batch.passage_mask, labels=batch.labels
    )
    return out.loss.item()


@pytest.mark.timeout(1200)  # ~2 min on an idle 2-core box; more on a busy one
def test_joint_training_learns_to_retrieve_and_read(tmp_path):
    recipe = ImpRAGRecipe(_world(tmp_path))
    recipe.setup()
    qa_file = recipe.cfg.data.eval[0].path
    before = recipe.evaluate("eval", write=False)
    nll_before = answer_nll(recipe, qa_file, True)
    for batch in recipe.epoch_batches(0):
        recipe.train_step(batch)
    after = recipe.evaluate("eval", write=False)
    nll_gold, nll_closed = answer_nll(recipe, qa_file, True), answer_nll(recipe, qa_file, False)
    print({"before": before["qa"], "after": after["qa"]})
    print({"nll_before": nll_before, "nll_gold_passage": nll_gold, "nll_no_passage": nll_closed})
    qa0, qa1 = before["qa"], after["qa"]
    # retrieval with the model's own layer-b embeddings, over all 800 passages
    assert qa0["recall@10"] <= 0.1  # untrained: chance level (10/800)
    assert qa1["recall@10"] >= 0.2 and qa1["recall@10"] >= qa0["recall@10"] + 0.15
    assert qa1["recall@3"] >= qa0["recall@3"] + 0.05
    # generation: answers of held-out entities are far likelier than before training, and
    # likelier when the gold passage is read than without it (only the corpus has them)
    assert nll_gold < nll_before - 3.0
    assert nll_gold < nll_closed - 1.0
    assert qa1["em"] >= qa0["em"]


@pytest.mark.timeout(1200)  # ~2 min on an idle 2-core box
def test_150_steps_from_the_base_answer_held_out_questions(tmp_path, monkeypatch):
    """The demo's ImpRAG job, 150 steps from the checked-in base (pretrained on people who are
    not in this world, ``imprag model pretrain-base``): held-out people's answers come out of the
    passages the model retrieves itself, far above chance."""
    import dataclasses

    from imprag_ray import demo
    from imprag_ray.cli import load_train_config

    monkeypatch.chdir(tmp_path)  # the job's runs/demo/... paths
    demo.prepare(echo=lambda s: None)  # the demo world + a copy of the base in runs/demo/init
    overrides = [
        "threads=2",
        "ray.num_workers=1",
        "train.epochs=1",
        "train.warmup_epochs=1",
        f"train.steps_per_epoch={BASE_STEPS}",
        "train.batch_size=16",
        "eval.limit=100",
        "eval.batch_size=100",
    ]
    cfg = load_train_config(demo.ROOT / "jobs/tiny_synth_imprag.yaml", overrides)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=cfg.data.eval[:1]))  # QA

    recipe = ImpRAGRecipe(cfg)
    recipe.setup()
    for batch in recipe.epoch_batches(0):
        recipe.train_step(batch)
    qa = recipe.evaluate("eval", write=False)["qa"]
    print({"trained": qa})
    # chance: recall@10 = 10 / 5000 passages; the untrained tiny model scores 0 on all three
    # (docs/notes.md), as the random-init test above checks for its own model
    assert qa["recall@10"] >= 0.4 and qa["recall@1"] >= 0.2
    assert qa["em"] >= 0.12
