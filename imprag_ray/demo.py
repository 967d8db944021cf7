"""``imprag demo``: the end-to-end run on a laptop, no arguments needed.

Synthesise the world, initialise the tiny model, train ImpRAG and the same model
closed-book (jobs/tiny_synth_imprag.yaml, jobs/tiny_synth_closed_book.yaml), evaluate
both on the held-out-entity eval files and print a Markdown table of EM and recall@k
per format (seen QA format and the unseen ones). Artefacts go to ``runs/demo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"closed-book": "jobs/tiny_synth_closed_book.yaml", "ImpRAG": "jobs/tiny_synth_imprag.yaml"}
WORLD = Path("runs/demo/world")
INIT = Path("runs/demo/init")


def markdown_table(results: dict[str, dict], recall_ks: tuple[int, ...]) -> str:
    """Rows = systems, columns = EM and recall@k per task file (formats in eval order)."""
    tasks = list(next(iter(results.values())))
    header = ["system"] + [f"{t} {m}" for t in tasks for m in ["EM"] + [f"R@{k}" for k in recall_ks]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in results.items():
        cells = [name]
        for task in tasks:
            row = metrics[task]
            for key in ["em"] + [f"recall@{k}" for k in recall_ks]:
                value = row.get(key)
                cells.append("-" if value is None else f"{100 * value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepare(echo=print) -> None:
    """World + random tiny checkpoint (skipped when already there)."""
    from imprag_ray.data.synth import synthesize
    from imprag_ray.model.checkpoint import init_checkpoint, tokenizer_texts
    from imprag_ray.model.presets import tiny

    if not (WORLD / "world.json").exists():
        echo(f"[demo] synthesising the world into {WORLD}")
        synthesize(WORLD, seed=0, n_passages=5000, overwrite=WORLD.exists())
    if not (INIT / "model.safetensors").exists():
        echo(f"[demo] initialising the tiny model into {INIT}")
        tasks = [WORLD / "train/qa.jsonl", WORLD / "train/instruction.jsonl"]
        init_checkpoint(tiny(), tokenizer_texts(WORLD / "corpus.jsonl", tasks), INIT, seed=0)


def run_demo(json_out: Path | None = None, overrides: list[str] | None = None, echo=print) -> dict:
    """Run every step; returns {"table", "results", "seconds"}."""
    from imprag_ray.cli import load_train_config
    from imprag_ray.data.io import write_json_atomic
    from imprag_ray.train.local import train_local

    start = time.time()
    prepare(echo)
    results, seconds = {}, {}
    for name, job in JOBS.items():
        t0 = time.time()
        echo(f"[demo] training {name} ({job})")
        cfg = load_train_config(ROOT / job, list(overrides or []))
        results[name] = train_local(cfg, echo=echo)
        seconds[name] = round(time.time() - t0, 1)
    recall_ks = cfg.eval.recall_ks
    table = markdown_table(results, recall_ks)
    summary = {"table": table, "results": results, "seconds": seconds,
               "total_seconds": round(time.time() - start, 1)}
    out = Path("runs/demo")
    (out / "table.md").write_text(table + "\n")
    write_json_atomic(out / "demo.json", summary)
    if json_out:
        write_json_atomic(json_out, summary)
    echo("\n" + table + "\n")
    echo(f"[demo] wall time {summary['total_seconds']} s ({json.dumps(seconds)}); outputs in {out}")
    return summary
