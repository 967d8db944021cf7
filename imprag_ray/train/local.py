"""Single-process driver of :class:`ImpRAGRecipe` (``imprag train`` without Ray).

Epoch loop: train, save a checkpoint, evaluate on the dev files; at the end evaluate
on the eval files. Metrics go to ``<output_dir>/metrics.jsonl`` (one JSON per line).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.train.recipe import ImpRAGRecipe, latest_checkpoint


class JsonlLogger:
    """Append metric rows to a JSONL file and echo a short line to ``echo``."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.echo = path, echo

    def __call__(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.echo:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "time"}
            self.echo(" ".join(f"{k}={v}" for k, v in shown.items()))


def train_local(cfg: TrainJobConfig, *, resume: bool = False, echo=print) -> dict:
    """Train per ``cfg`` in this process; returns the final eval metrics (or dev if none)."""
    out = Path(cfg.output_dir)
    log = JsonlLogger(out / "metrics.jsonl", echo)
    recipe = ImpRAGRecipe(cfg, log=log)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None and echo:
        echo(f"no checkpoint under {out}/checkpoints; starting from {cfg.model.path}")
    recipe.setup(resume_from=ckpt)
    log({"event": "setup", "items": len(recipe.items), "steps_per_epoch": recipe.steps_per_epoch,
         "resumed_from": str(ckpt) if ckpt else None})
    while recipe.epoch < cfg.train.epochs:
        means = recipe.train_epoch()
        log({"event": "epoch", "epoch": recipe.epoch, **{f"mean_{k}": v for k, v in means.items()}})
        if recipe.epoch % cfg.train.save_every_epochs == 0 or recipe.epoch == cfg.train.epochs:
            recipe.save_checkpoint()
        if cfg.data.dev:
            log({"event": "dev", "epoch": recipe.epoch, "metrics": recipe.evaluate("dev")})
    final = recipe.evaluate("eval") if cfg.data.eval else {}
    log({"event": "eval", "epoch": recipe.epoch, "metrics": final})
    return final
