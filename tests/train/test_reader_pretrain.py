"""Reader pretraining (imprag model pretrain-reader): data that cannot leak the world, a
written base checkpoint, and config errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from imprag_ray.cli import main
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.data.synth import build_world, reading_people
from imprag_ray.model.imprag import ImpRAGModel
from imprag_ray.train.reader_pretrain import ReaderPretrainConfig, ReaderPretraining, reading_examples


def test_reading_people_are_new_people_with_the_worlds_values():
    world = build_world(1, 300)
    people = reading_people(world, 250, random.Random(0))
    names = {p.name for p in world.people}
    assert len({p.name for p in people}) == 250 and not names & {p.name for p in people}
    held_aliases = {p.alias for p in world.people if p.split in ("dev", "test")}
    for p in people:
        assert p.pid.startswith("r") and p.alias not in held_aliases
        assert all(v in world.pools[rel] for rel, v in p.facts.items())
        assert p.name in p.text and all(v in p.text for v in p.facts.values() if v)
    exs = reading_examples(people[:6], random.Random(0))
    assert [ex.meta["task"] for ex in exs] == ["copy", "profile", "qa"] * 2
    assert exs[0].answers == (people[0].text,) and exs[0].provenance == (people[0].pid,)
    assert exs[2].answers[0] in people[2].facts.values()
    with pytest.raises(ValueError, match="unused names"):
        reading_people(world, 10**6, random.Random(0))


def test_pretrain_reader_writes_a_base_that_never_saw_the_world(tiny_world, tmp_path):
    world, init = tiny_world["world"], tiny_world["ckpt"]
    out = tmp_path / "base"
    rc = main(["model", "pretrain-reader", "--world", str(world), "--init", str(init), "--out", str(out),
               "--people", "230", "--steps", "6", "--gold-only-steps", "3", "--eval-every", "3",
               "--max-passage-tokens", "48", "--num-passages", "3"])
    assert rc == 0
    report = json.loads((out / "reader_pretrain.json").read_text())
    assert [row["step"] for row in report["metrics"]] == [3, 6]
    for row in report["metrics"]:
        assert row["loss"] == row["loss"] and 0 <= row["qa_first_token_in_k"] <= 1
        assert 0 <= row["text_token_acc_in_k"] <= 1
    base = ImpRAGModel.from_pretrained(out)
    start = ImpRAGModel.from_pretrained(init)
    assert (base.l_max, base.k) == (48, 3)
    changed = [n for (n, p), (_, q) in zip(base.named_parameters(), start.named_parameters(), strict=True)
               if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_pretraining_items_hold_no_world_passage(tiny_world, tmp_path):
    cfg = ReaderPretrainConfig(world=str(tiny_world["world"]), init=str(tiny_world["ckpt"]),
                               out=str(tmp_path / "b"), people=230, steps=1, gold_only_steps=0,
                               eval_every=1)
    run = ReaderPretraining(cfg, echo=None)
    world_ids = {p.id for p in read_corpus(tiny_world["world"] / "corpus.jsonl")}
    items = run.train + run.eval_qa + run.eval_text
    assert len(items) == 230 and all(len(it.context) == run.model.k for it in items)
    assert not {pid for it in items for pid in it.context} & world_ids
    held = {ex.provenance[0] for ex in read_tasks(tiny_world["world"] / "eval/qa.jsonl", "qa")}
    assert held <= world_ids  # (the held-out people's passages are world passages: none is read)
    # gold-only phase: exactly the item's own passage
    for it, alone in zip(run.train[:5], run.gold_only(run.train[:5]), strict=True):
        assert alone.context == [run.gold[id(it)]] and run.gold[id(it)] in it.context


@pytest.mark.parametrize(("field", "value", "match"), [
    ("people", 150, "people must be > 200"),
    ("gold_only_steps", 2000, "gold_only_steps must be in 0..steps"),
    ("lr", 0.0, "lr must be > 0"),
    ("kinds", "profile,summary", "kinds must be a comma-separated subset of copy,profile,qa"),
    ("kinds", " , ", "kinds must be"),
])
def test_bad_pretrain_settings_are_named(tiny_world, tmp_path, field, value, match):
    kw = {"world": str(tiny_world["world"]), "init": str(tiny_world["ckpt"]), "out": str(tmp_path / "b"),
          "steps": 1000, field: value}
    with pytest.raises(ValueError, match=match):
        ReaderPretrainConfig(**kw).validate()


def test_kinds_choose_the_training_items_but_not_the_held_out_eval(tiny_world, tmp_path):
    cfg = ReaderPretrainConfig(world=str(tiny_world["world"]), init=str(tiny_world["ckpt"]),
                               out=str(tmp_path / "b"), people=230, steps=1, gold_only_steps=0,
                               eval_every=1, kinds="profile")
    run = ReaderPretraining(cfg, echo=None)
    prompts = {run.tokenizer.decode(it.prompt, skip_special_tokens=True).split(" about ")[0]
               for it in run.train}
    assert prompts == {"List the facts"} and len(run.train) == 30
    assert run.eval_qa and run.eval_text  # the held-out people are read in every kind
    assert 0 <= run.evaluate()["qa_first_token_gold_only"] <= 1


def test_missing_world_manifest_says_how_to_make_one(tmp_path):
    cfg = ReaderPretrainConfig(world=str(tmp_path), init=str(tmp_path), out=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="imprag data synth"):
        cfg.validate()


def test_fresh_facts_redraw_the_training_people_at_every_pass(tiny_world, tmp_path):
    from imprag_ray.eval.metrics import answer_in_text

    cfg = ReaderPretrainConfig(world=str(tiny_world["world"]), init=str(tiny_world["ckpt"]),
                               out=str(tmp_path / "b"), people=230, steps=1, gold_only_steps=0,
                               eval_every=1, kinds="qa", fresh_facts=True)
    run = ReaderPretraining(cfg, echo=None)
    before = {p.pid: dict(p.facts) for p in run.people}
    eval_before = [(list(it.prompt), list(it.target), list(it.context)) for it in run.eval_qa]
    run.new_pass()
    train_pids, eval_pids = {p.pid for p in run.people[:-200]}, {p.pid for p in run.people[-200:]}
    changed = [p.pid for p in run.people if p.facts != before[p.pid]]
    assert changed and set(changed) <= train_pids and len(changed) > 0.8 * len(train_pids)
    assert [(list(it.prompt), list(it.target), list(it.context)) for it in run.eval_qa] == eval_before
    assert not eval_pids & {run.gold[id(it)] for it in run.train}
    # every rebuilt item's answer is in its (rebuilt) gold passage
    texts = {p.pid: p.text for p in run.people}
    for it in run.train:
        answer = run.tokenizer.decode(it.target, skip_special_tokens=True).strip()
        assert answer_in_text(texts[run.gold[id(it)]], [answer]), answer
    assert run.passes == 1


def test_freeze_retriever_keeps_every_embedding_weight_and_trains_the_reader(tiny_world, tmp_path):
    cfg = ReaderPretrainConfig(world=str(tiny_world["world"]), init=str(tiny_world["ckpt"]),
                               out=str(tmp_path / "b"), people=230, steps=3, gold_only_steps=1,
                               eval_every=3, freeze_retriever=True)
    ReaderPretraining(cfg, echo=None).run()
    base, start = ImpRAGModel.from_pretrained(tmp_path / "b"), ImpRAGModel.from_pretrained(tiny_world["ckpt"])
    frozen = {n for n, _ in base.named_parameters() if base.embedding_parameter(n)}
    b = base.b
    assert "lm.model.embed_tokens.weight" in frozen and f"lm.model.layers.{b}.self_attn.q_proj.weight" in frozen
    assert f"lm.model.layers.{b}.self_attn.v_proj.weight" not in frozen
    for (name, p), (_, q) in zip(base.named_parameters(), start.named_parameters(), strict=True):
        assert torch.equal(p, q) == (name in frozen), name
