"""`imprag model pretrain-base` end to end (small worlds, a shortened job)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from imprag_ray.pipelines.pretrain_base import check_base_matches_world, pretrain_base, read_manifest


class TrainingStarted(Exception):
    """Raised by the stand-in for Ray Train once a rerun decides to train again."""


# Two Ray Train runs (one per stage) and a demo-world synthesis. Reruns with other settings
# only check that training starts again (the stand-in below), not train a third time.
@pytest.mark.timeout(600)
def test_pretrain_base_writes_a_bf16_base_for_the_demo_world(tmp_path, monkeypatch, ray_local):
    import imprag_ray.model.presets as presets
    import imprag_ray.pipelines.pretrain_base as pb
    import imprag_ray.pipelines.train as train_module
    from imprag_ray.data.synth import build_world, synthesize
    from imprag_ray.model.imprag import ImpRAGModel

    monkeypatch.chdir(tmp_path)  # the job's runs/... paths are relative to where it runs
    monkeypatch.setattr(pb, "DEMO_WORLD_KEY", (0, 400))  # small worlds: same code path, seconds not minutes
    monkeypatch.setattr(pb, "PRETRAIN_WORLD_KEY", (1, 300))
    out = tmp_path / "base"
    overrides = [
        "train.epochs=1",
        "train.warmup_epochs=1",
        "train.steps_per_epoch=2",
        "train.warmup_steps=1",
        "data.dev=[]",
    ]
    manifest = pretrain_base(out, overrides, echo=lambda s: None)
    assert read_manifest(out) == manifest
    assert manifest["demo_world"]["n_passages"] == 400 and manifest["pretraining_world"]["n_passages"] == 300
    assert manifest["steps"] == 4 and manifest["dev"] is None  # 2 steps per stage; no dev set
    assert manifest["init"]["tokenizer_min_frequency"] == pb.TOKENIZER_MIN_FREQUENCY == 0
    assert json.loads((tmp_path / "runs/pretrain/init" / pb.INIT_MARK).read_text()) == manifest["init"]
    assert [st["job"] for st in manifest["stages"]] == ["tiny-synth-pretrain", "tiny-synth-pretrain-tasks"]
    # stage 2 went on from stage 1's bf16 export, with the tasks the unseen formats need
    stage1 = tmp_path / "runs/pretrain/stage1"
    assert read_manifest(stage1)["stage"]["job"] == "tiny-synth-pretrain"
    saved = json.loads(next((tmp_path / "runs/pretrain/train_tasks").rglob("job_config.json")).read_text())
    assert saved["model"]["path"] == str(stage1)
    assert any(e["path"].endswith("train/tasks_varied.jsonl") for e in saved["data"]["train"])
    assert (tmp_path / "runs/pretrain/world/world.json").exists()
    assert json.loads((tmp_path / "runs/pretrain/world/world.json").read_text())["disjoint_from"]["seed"] == 0
    model = ImpRAGModel.from_pretrained(out, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (model.imprag_config.retrieval_layer, model.l_max, model.k) == (1, 48, 1)
    assert not model.lm.config.tie_word_embeddings
    # tokens no text of either world uses (template words) carry the mean of the used rows
    from imprag_ray.model.checkpoint import load_tokenizer, used_token_ids

    tok = load_tokenizer(out)
    used = used_token_ids(
        tok, pb.world_texts([tmp_path / "runs/demo/world", tmp_path / "runs/pretrain/world"])
    )
    table = model.lm.get_input_embeddings().weight.float()
    unused = [i for i in range(table.shape[0]) if i not in used]
    assert manifest["unused_token_rows"] == len(unused) > 0
    provide = tok.convert_tokens_to_ids("\u0120Provide")  # of the slot-filling instruction only
    assert provide != tok.unk_token_id and provide in unused
    torch.testing.assert_close(table[provide], table[sorted(used)].mean(0), atol=2e-2, rtol=0)
    check_base_matches_world(out, tmp_path / "runs/demo/world")
    synthesize(tmp_path / "other", seed=3, n_passages=300)
    with pytest.raises(ValueError, match="is not the world"):
        check_base_matches_world(out, tmp_path / "other")
    assert not list(tmp_path.glob("*.tmp*"))
    # a rerun with the same settings skips training; another setting trains again
    # (a pretraining world of an older version, lacking a file the job reads, is rewritten)
    varied = tmp_path / "runs/pretrain/world/train/qa_varied.jsonl"
    want_varied = varied.read_bytes()
    varied.unlink()
    lines: list[str] = []
    again = pretrain_base(tmp_path / "again", overrides, echo=lines.append)
    assert sum("is done with these settings" in line for line in lines) == 2, lines  # both stages
    assert any("synthesising the pretraining world" in line for line in lines)
    assert varied.read_bytes() == want_varied
    assert again["pretraining_world"] == manifest["pretraining_world"]

    # from here on, a rerun that trains again stops where Ray Train would start
    def train_started(cfg, echo=print):
        raise TrainingStarted(cfg.name)

    monkeypatch.setattr(train_module, "train_ray", train_started)
    runs, kept = tmp_path / "runs", tmp_path / "runs-after-two-trainings"
    shutil.copytree(runs, kept)  # copy2 keeps the mtimes the "done" check compares

    def restore() -> None:  # a rerun that starts training clears the stage's run first
        shutil.rmtree(runs)
        shutil.copytree(kept, runs)

    lines.clear()
    with pytest.raises(TrainingStarted, match="tiny-synth-pretrain"):
        pretrain_base(tmp_path / "third", [*overrides, "train.lr=5e-4"], echo=lines.append)
    assert not any("is done with these settings" in line for line in lines), lines
    # an init of other settings (a minimum frequency for the tokenizer) is written anew, and
    # training starts again from it
    init = tmp_path / "runs/pretrain/init"
    monkeypatch.setattr(pb, "TOKENIZER_MIN_FREQUENCY", 10)
    restore()
    lines.clear()
    with pytest.raises(TrainingStarted):
        pretrain_base(tmp_path / "fourth", overrides, echo=lines.append)
    assert any("initialising the tiny model" in line for line in lines)
    assert not any("is done with these settings" in line for line in lines), lines
    assert json.loads((init / pb.INIT_MARK).read_text())["tokenizer_min_frequency"] == 10
    alias = build_world(0, 400).people[0].alias  # a nickname of the demo world's first person
    assert len(load_tokenizer(init).tokenize(alias)) > 1
    assert len(load_tokenizer(out).tokenize(alias)) == 1
    # so is an init of another shape (an edit of the tiny preset): the mark records the shape
    assert manifest["init"]["shape"]["num_kv_heads"] == presets.tiny().num_kv_heads == 2
    original = presets.tiny
    monkeypatch.setattr(presets, "tiny", lambda: dataclasses.replace(original(), num_kv_heads=1))
    restore()
    lines.clear()
    with pytest.raises(TrainingStarted):
        pretrain_base(tmp_path / "fifth", overrides, echo=lines.append)
    assert any("initialising the tiny model" in line for line in lines)
    assert not any("is done with these settings" in line for line in lines), lines
    assert json.loads((init / pb.INIT_MARK).read_text())["shape"]["num_kv_heads"] == 1
    assert ImpRAGModel.from_pretrained(init).lm.config.num_key_value_heads == 1
