"""``imprag demo``: the end-to-end run on an embedded local Ray, no arguments needed.

1. synthesise the world (``runs/demo/world``) and start the tiny model (``runs/demo/init``) from
   the checked-in base (:data:`BASE`: pretrained by ``imprag model pretrain-base`` on people who
   are not in this world, so it reads and retrieves but knows none of the held-out facts), or
   from a random init with ``--from-scratch``;
2. train three systems with Ray Train (2 workers each), same model size and step budget:
   closed book (``jobs/tiny_synth_closed_book.yaml``), an explicit-query RAG baseline that
   reads the same training passages as ImpRAG (the gold one, else BM25's) without a retrieval
   loss (``jobs/tiny_synth_bm25_rag.yaml``) and ImpRAG (``jobs/tiny_synth_imprag.yaml``);
3. encode the corpus with ImpRAG's trained bottom layers through Ray Data into a FAISS index;
4. run Ray Data batch inference on the held-out eval sets: closed book without passages,
   the baseline with BM25 over the whole prompt, ImpRAG with its own layer-b retrieval;
5. print a Markdown table of EM and recall@k per format (the seen QA format and the unseen
   ones) and write it, the JSON summary and the plots to ``runs/demo``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("runs/demo")
WORLD = OUT / "world"
INIT = OUT / "init"
INIT_MARK = "demo_init.json"  # which start INIT holds: {"from": "base" | "random", "base_sha256"}
BASE = ROOT / "imprag_ray" / "assets" / "tiny_synth_base"  # `imprag model pretrain-base`, bf16
# (row name, job file, retriever used at inference)
SYSTEMS = (
    ("closed-book", "jobs/tiny_synth_closed_book.yaml", "none"),
    ("BM25 RAG", "jobs/tiny_synth_bm25_rag.yaml", "bm25"),
    ("ImpRAG", "jobs/tiny_synth_imprag.yaml", "imprag"),
)


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


def plot_results(results: dict[str, dict], recall_ks: tuple[int, ...], png: Path) -> Path:
    """Grouped bars: EM and recall@max(k) per task for each system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(results.values())))
    k = max(recall_ks)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(results)
    for ax, key, title in ((axes[0], "em", "exact match (%)"), (axes[1], f"recall@{k}", f"recall@{k} (%)")):
        for i, (name, metrics) in enumerate(results.items()):
            values = [100 * (metrics[t].get(key) or 0.0) for t in tasks]
            ax.bar([j + i * width for j in range(len(tasks))], values, width, label=name)
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(tasks))], tasks, rotation=15)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png


def _world_files(systems) -> list[Path]:
    """Every data file the demo jobs read (a world from an older version may lack some)."""
    from imprag_ray.config.loader import job_data_files

    return [f for _, job, _ in systems for f in job_data_files(ROOT / job)]


def prepare(echo=print, systems=SYSTEMS, base: Path | None = BASE) -> None:
    """World + the start checkpoint: a copy of ``base``, or a random tiny init when ``base`` is
    None (each skipped when already there)."""
    from imprag_ray.data.io import atomic_dir, write_json_atomic
    from imprag_ray.data.synth import synthesize
    from imprag_ray.model.checkpoint import init_checkpoint, tokenizer_texts
    from imprag_ray.model.presets import tiny
    from imprag_ray.pipelines.pretrain_base import TOKENIZER_MIN_FREQUENCY, check_base_matches_world

    if not (WORLD / "world.json").exists() or not all(f.exists() for f in _world_files(systems)):
        shutil.rmtree(INIT, ignore_errors=True)  # its tokenizer belongs to the old world
        echo(f"[demo] synthesising the world into {WORLD}")
        synthesize(WORLD, seed=0, n_passages=5000, overwrite=WORLD.exists())
    start = {"from": "random"} if base is None else {"from": "base", "base_sha256": _dir_sha256(Path(base))}
    try:
        mark = json.loads((INIT / INIT_MARK).read_text())
        held = {k: mark.get(k) for k in start}
    except (OSError, ValueError, AttributeError):
        held = None
    if held == start and (INIT / "model.safetensors").exists():
        return  # (a base that changed since, e.g. a rebuilt checked-in one, is copied again)
    if base is not None:
        check_base_matches_world(base, WORLD)
    shutil.rmtree(INIT, ignore_errors=True)
    if base is None:
        echo(f"[demo] initialising a random tiny model into {INIT}")
        tasks = [WORLD / "train/qa.jsonl", WORLD / "train/instruction.jsonl"]
        init_checkpoint(tiny(), tokenizer_texts(WORLD / "corpus.jsonl", tasks), INIT, seed=0,
                        min_frequency=TOKENIZER_MIN_FREQUENCY)
    else:
        echo(f"[demo] starting from the pretrained base {base}")
        with atomic_dir(INIT) as tmp:
            for f in Path(base).iterdir():
                shutil.copy2(f, Path(tmp) / f.name)
    write_json_atomic(INIT / INIT_MARK, {**start, "base": None if base is None else str(base)})


def _dir_sha256(directory: Path) -> str:
    """sha256 over a checkpoint directory's file names and bytes (a few MB for the tiny base).

    Not :func:`~imprag_ray.model.checkpoint.checkpoint_hash`, which covers weights and configs
    only: the demo copies the whole base, and a base can change in its tokenizer.json or
    base.json alone (this version's decoder fix changed only tokenizer.json)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _fresh(path: str) -> None:
    """The demo owns runs/demo: a rerun retrains from scratch (nothing outside is removed)."""
    p = Path(path).resolve()
    if p.exists() and OUT.resolve() in p.parents:
        shutil.rmtree(p)


def run_system(name: str, job: str, retriever: str, overrides: list[str], echo=print) -> dict:
    """Train one system on Ray Train, (ImpRAG) build its index with Ray Data, run batch
    inference on the eval files -> {"metrics", "train_seconds", "checkpoint", ...}."""
    from imprag_ray.cli import load_train_config
    from imprag_ray.pipelines.batch import run_batch
    from imprag_ray.pipelines.encode import build_index
    from imprag_ray.pipelines.train import train_ray

    cfg = load_train_config(ROOT / job, overrides)
    _fresh(cfg.output_dir)
    t0 = time.time()
    echo(f"[demo] {name}: training on Ray Train with {cfg.ray.num_workers} workers ({job})")
    # held-out eval runs once, in the batch step below (not again at the end of training)
    run = train_ray(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=())), echo=echo)
    out: dict = {
        "job": job,
        "checkpoint": run.checkpoint,
        "train_seconds": round(time.time() - t0, 1),
        "curves": run.curves,
    }
    index_dir = str(Path(cfg.output_dir) / "index")
    if retriever == "imprag":
        t1 = time.time()
        echo(f"[demo] {name}: encoding the corpus with Ray Data -> FAISS index")
        icfg = dataclasses.replace(
            cfg, index=dataclasses.replace(cfg.index, checkpoint=run.checkpoint, out_dir=index_dir)
        )
        build_index(icfg, echo=echo)
        out["index_seconds"] = round(time.time() - t1, 1)
    t2 = time.time()
    echo(f"[demo] {name}: batch inference on the held-out eval sets (retriever: {retriever})")
    bcfg = dataclasses.replace(
        cfg,
        batch=dataclasses.replace(
            cfg.batch,
            checkpoint=run.checkpoint,
            retriever=retriever,
            index_dir=index_dir,
            inputs=cfg.batch.inputs or cfg.data.eval,
            output=str(Path(cfg.output_dir) / "batch" / "predictions.jsonl"),
        ),
    )
    res = run_batch(bcfg, echo=echo)
    out.update(metrics=res["metrics"], predictions=res["output"], batch_seconds=round(time.time() - t2, 1))
    return out


def run_demo(
    json_out: Path | None = None,
    overrides: list[str] | None = None,
    echo=print,
    systems=SYSTEMS,
    from_scratch: bool = False,
) -> dict:
    """Run every step on an embedded local Ray (or the Ray this process is connected to);
    returns {"table", "results", "seconds", ...}."""
    import ray

    from imprag_ray.data.io import write_json_atomic
    from imprag_ray.pipelines.local_ray import init_local_ray

    start = time.time()
    started = not ray.is_initialized()
    if started:
        init_local_ray()
    try:
        prepare(echo, systems, None if from_scratch else BASE)
        runs = {
            name: run_system(name, job, retriever, list(overrides or []), echo)
            for name, job, retriever in systems
        }
    finally:
        if started:
            ray.shutdown()
    results = {
        name: {
            task: {k: v for k, v in m.items() if k not in ("path", "format")}
            for task, m in r["metrics"].items()
        }
        for name, r in runs.items()
    }
    recall_ks = tuple(
        sorted(
            {
                int(k.split("@")[1])
                for m in results.values()
                for t in m.values()
                for k in t
                if k.startswith("recall@")
            }
        )
    )
    table = markdown_table(results, recall_ks)
    plots = OUT / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_results(results, recall_ks, plots / "results.png")
    for name, r in runs.items():
        if r.get("curves") and Path(r["curves"]).exists():
            shutil.copy(r["curves"], plots / f"training_{name.lower().replace(' ', '_')}.png")
    summary = {
        "table": table,
        "results": results,
        "runs": runs,
        "total_seconds": round(time.time() - start, 1),
    }
    (OUT / "table.md").write_text(table + "\n")
    write_json_atomic(OUT / "demo.json", summary)
    if json_out:
        write_json_atomic(json_out, summary)
    echo("\n" + table + "\n")
    seconds = {n: {k: v for k, v in r.items() if k.endswith("_seconds")} for n, r in runs.items()}
    echo(f"[demo] wall time {summary['total_seconds']} s ({json.dumps(seconds)}); outputs in {OUT}")
    return summary
