"""`imprag model pretrain-base` end to end (small worlds, shortened stages)."""

from __future__ import annotations

import json

import pytest
import torch

from imprag_ray.pipelines.pretrain_base import (
    READER_STAGES,
    check_base_matches_world,
    pretrain_base,
    read_manifest,
)


def test_pretrain_base_writes_a_bf16_base_for_the_demo_world(tmp_path, monkeypatch, ray_local):
    import imprag_ray.pipelines.pretrain_base as pb
    from imprag_ray.data.synth import synthesize
    from imprag_ray.model.imprag import ImpRAGModel

    monkeypatch.chdir(tmp_path)  # the job's runs/... paths are relative to where it runs
    monkeypatch.setattr(pb, "DEMO_WORLD_KEY", (0, 400))  # small worlds: same code path, seconds not minutes
    monkeypatch.setattr(pb, "PRETRAIN_WORLD_KEY", (1, 300))
    stages = [{**s, "steps": 2, "gold_only_steps": 1, "people": 210} for s in READER_STAGES]
    out = tmp_path / "base"
    overrides = ["train.epochs=1", "train.warmup_epochs=1", "train.steps_per_epoch=2", "train.warmup_steps=1",
                 "data.dev=[]"]
    manifest = pretrain_base(out, overrides, echo=lambda s: None, reader_stages=stages)
    assert read_manifest(out) == manifest
    assert manifest["demo_world"]["n_passages"] == 400 and manifest["pretraining_world"]["n_passages"] == 300
    assert [r["settings"]["steps"] for r in manifest["reading_stages"]] == [2] * len(READER_STAGES)
    assert (tmp_path / "runs/pretrain/world/world.json").exists()
    assert json.loads((tmp_path / "runs/pretrain/world/world.json").read_text())["disjoint_from"]["seed"] == 0
    model = ImpRAGModel.from_pretrained(out, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (model.imprag_config.retrieval_layer, model.l_max, model.k) == (1, 48, 4)
    assert not model.lm.config.tie_word_embeddings
    check_base_matches_world(out, tmp_path / "runs/demo/world")
    synthesize(tmp_path / "other", seed=3, n_passages=300)
    with pytest.raises(ValueError, match="is not the world"):
        check_base_matches_world(out, tmp_path / "other")
    assert not list(tmp_path.glob("*.tmp*"))
    # a rerun with the same settings skips every stage; a changed reading stage reruns only itself
    lines: list[str] = []
    again = pretrain_base(tmp_path / "again", overrides, echo=lines.append, reader_stages=stages)
    assert sum("is done with these settings" in line for line in lines) == 1 + len(stages), lines
    assert again["reading_stages"] == manifest["reading_stages"]
    lines.clear()
    changed = [*stages[:-1], {**stages[-1], "lr": 5e-4}]
    pretrain_base(tmp_path / "third", overrides, echo=lines.append, reader_stages=changed)
    assert sum("is done with these settings" in line for line in lines) == len(stages), lines
