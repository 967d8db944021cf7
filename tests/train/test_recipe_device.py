"""Placement: the recipe puts the model on its device before the optimizer exists, so a
resumed optimizer state lands on the parameters' device; batches and teacher scores are
built on the recipe's device. (CPU only here: the order and the placement rules are what
is checked; the CUDA run of the same code is ``make gpu-check``.)"""

from __future__ import annotations

import pytest
import torch

from imprag_ray.config.loader import load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.model.imprag import ImpRAGModel
from imprag_ray.train.recipe import ImpRAGRecipe


def _cfg(tiny_world, tmp_path, *overrides):
    return load_config(TrainJobConfig, tiny_world["job"], [f"output_dir={tmp_path / 'run'}", *overrides])


def test_resume_places_the_model_before_building_and_loading_the_optimizer(tiny_world, tmp_path, monkeypatch):
    first = ImpRAGRecipe(_cfg(tiny_world, tmp_path), device="cpu")
    first.setup()
    first.train_step(next(first.epoch_batches(0)))
    ckpt = first.save_checkpoint()

    calls: list[str] = []
    real_to, real_opt, real_load = ImpRAGModel.to, ImpRAGRecipe._optimizer, ImpRAGRecipe._load_state

    def to(self, *args, **kwargs):  # the real .to, recorded
        calls.append(f"to {torch.device(args[0]) if args else kwargs}")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(ImpRAGModel, "to", to)
    monkeypatch.setattr(ImpRAGRecipe, "_optimizer", lambda self: calls.append("optimizer") or real_opt(self))
    monkeypatch.setattr(
        ImpRAGRecipe, "_load_state", lambda self, c: calls.append("load_state") or real_load(self, c)
    )
    resumed = ImpRAGRecipe(_cfg(tiny_world, tmp_path), device=torch.device("cpu"))
    resumed.setup(resume_from=ckpt)
    assert calls == ["to cpu", "optimizer", "load_state"]
    assert resumed.step == 1
    resumed.train_step(next(resumed.epoch_batches(0)))
    for group in resumed.optimizer.param_groups:
        for p in group["params"]:
            state = resumed.optimizer.state[p]
            assert state["exp_avg"].device == p.device == resumed.device
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_batches_and_teacher_scores_are_on_the_recipe_device(tiny_world, tmp_path):
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path), device="cpu")
    recipe.setup()
    assert recipe.model.device == recipe.device
    batch = next(recipe.epoch_batches(1))  # a distillation batch
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device == recipe.device for t in tensors)
    scores = recipe.teacher_logliks(batch)
    assert scores.device == batch.candidates.device and scores.dtype == torch.float32
    assert bool((scores[batch.candidates >= 0] > -1e4).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluation_runs_in_the_jobs_precision(tiny_world, tmp_path, dtype):
    """bf16 jobs evaluate under autocast (the model core's attention and decoding paths)."""
    recipe = ImpRAGRecipe(_cfg(tiny_world, tmp_path, f"model.dtype={dtype}"))
    recipe.setup()
    result = recipe.evaluate("dev", limit=3, write=False)
    assert result["qa"]["n"] == 3 and result["qa"]["recall@10"] is not None
