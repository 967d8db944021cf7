"""``imprag model pretrain-base``: pretrain a small base for the demo, in one command.

ImpRAG fine-tunes a *pretrained* LLM that already reads its context. The tiny demo model has no
such pretraining; this command is the pipeline for giving it one, on data that cannot leak the
demo's benchmark:

1. the demo world (``runs/demo/world``, seed 0, 5,000 passages) if it is not there;
2. a pretraining world of people who are NOT in the demo world (``imprag data synth
   --disjoint-from``: unused name combinations, facts from the same value pools);
3. the tiny preset, untied, with a wide input table and layer 0's o_proj loud
   (``embedding_init_std=0.4``, ``first_o_proj_init_std=0.2``: the init whose reader learns
   to read; see ``imprag_ray/model/presets.py``), with the demo world's tokenizer;
4. retrieval: ``jobs/tiny_synth_pretrain.yaml`` on Ray Train from that init, ImpRAG's own
   objective (J_ret + J_gen, NCE warmup) on the pretraining world;
5. reading: ``imprag model pretrain-reader`` runs on top (``READER_STAGES``): QA / profile /
   copy items over people outside the demo world, the gold passage in the slots (alone, then
   among k-1 others); ``freeze_retriever`` keeps every weight the embeddings are made of;
6. the last stage exported in bf16 to ``--out`` (default ``runs/pretrain/base``) with
   ``base.json`` (the command, both worlds' corpus fingerprints, the retrieval stage's dev
   metrics, the reading metrics). :func:`check_base_matches_world` tells whether a base's
   tokenizer belongs to a world.

Each stage is skipped when its output exists with the same settings; once one stage runs,
every later one runs too.

Not yet a base that both reads and retrieves (measured on the 2-core box, tiny shape b=1, t=4;
"reading" = held-out QA first-token accuracy with the gold passage alone, "retrieval" = the
pretraining world's dev QA recall@10):

* reading first (two pretrain-reader runs from the init, the second with ``--fresh-facts``:
  reading 20%, then 64%), then the ImpRAG job: retrieval 0/7/12/15% at steps 300..1,200
  (lr 5e-4), 0% at step 600 with retriever_lr 2e-3 and lambda_ret 2, 1/12/8% at steps
  300/600/900 of a 2,400-step schedule with retriever_lr 1e-3;
* the ImpRAG job from the init: retrieval 12/37/58% at steps 300/600/900 (recall@1 26%), no
  reading (EM 2-3%, also with the gold passage alone);
* then reading with the retriever frozen (these ``READER_STAGES``): reading stayed at 2-5%
  through 1,250 steps (from the init it started at step 750); not frozen (``--kinds
  copy,profile,qa --gold-only-steps 1250``): 3% at step 1,250.

Layer b's q/k and the layers below it serve both reading and retrieval in this 6-layer model;
each skill, trained first, kept the other from being learnt within these budgets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = "jobs/tiny_synth_pretrain.yaml"
BASE_DIR = Path("runs/pretrain/base")
BASE_MANIFEST = "base.json"
DEMO_WORLD = Path("runs/demo/world")  # the job's paths: relative to where the command runs
PRETRAIN_WORLD = Path("runs/pretrain/world")
PRETRAIN_INIT = Path("runs/pretrain/init")
DEMO_WORLD_KEY = (0, 5000)
PRETRAIN_WORLD_KEY = (1, 7000)  # seed, passages
L_MAX, K = 48, 4  # the demo jobs' l_max and k
READER_DIR = Path("runs/pretrain/reader")  # reading stages write reader-1, reader-2, ...
READER_STAGES = (  # on top of the retrieval stage, its embedding weights frozen
    {
        "people": 7000,
        "kinds": "copy,profile,qa",
        "steps": 2000,
        "gold_only_steps": 1000,
        "lr": 1e-3,
        "fresh_facts": False,
        "freeze_retriever": True,
        "seed": 0,
    },
    {
        "people": 7000,
        "kinds": "copy,profile,qa",
        "steps": 2000,
        "gold_only_steps": 500,
        "lr": 1e-3,
        "fresh_facts": True,
        "freeze_retriever": True,
        "seed": 1,
    },
)
INIT_SETTINGS: dict[str, Any] = {
    "tie_word_embeddings": False,
    "embedding_init_std": 0.4,
    "first_o_proj_init_std": 0.2,
}
COMMAND = "imprag model pretrain-base"


def prepare_worlds(
    demo_world: Path, pretrain_world: Path, init_dir: Path, echo: Callable[[str], None]
) -> None:
    """Demo world, pretraining world and the wide init (each skipped when already there)."""
    from imprag_ray.data.synth import synthesize, world_key
    from imprag_ray.model.checkpoint import init_checkpoint, tokenizer_texts
    from imprag_ray.model.presets import tiny

    if not (demo_world / "world.json").exists():
        echo(f"[pretrain-base] synthesising the demo world into {demo_world}")
        synthesize(demo_world, seed=DEMO_WORLD_KEY[0], n_passages=DEMO_WORLD_KEY[1])
    if world_key(demo_world) != DEMO_WORLD_KEY:
        raise ValueError(
            f"{demo_world}: is not the demo world (seed {DEMO_WORLD_KEY[0]}, {DEMO_WORLD_KEY[1]} passages); "
            "remove it and rerun"
        )
    if (pretrain_world / "world.json").exists():
        manifest = json.loads((pretrain_world / "world.json").read_text())
        key = (manifest.get("seed"), manifest.get("n_passages"))
        if manifest.get("disjoint_from") != {"seed": DEMO_WORLD_KEY[0], "n_passages": DEMO_WORLD_KEY[1]} or (
            key != PRETRAIN_WORLD_KEY
        ):
            raise ValueError(f"{pretrain_world}: is not the base's pretraining world; remove it and rerun")
    else:
        echo(f"[pretrain-base] synthesising the pretraining world into {pretrain_world}")
        synthesize(
            pretrain_world,
            seed=PRETRAIN_WORLD_KEY[0],
            n_passages=PRETRAIN_WORLD_KEY[1],
            disjoint_from=DEMO_WORLD_KEY,
        )
    if not (init_dir / "model.safetensors").exists():
        echo(f"[pretrain-base] initialising the tiny model into {init_dir} ({INIT_SETTINGS})")
        tasks = [demo_world / "train/qa.jsonl", demo_world / "train/instruction.jsonl"]
        init_checkpoint(
            dataclasses.replace(tiny(), **INIT_SETTINGS),
            tokenizer_texts(demo_world / "corpus.jsonl", tasks),
            init_dir,
            seed=0,
        )


def finished_retrieval_stage(cfg) -> tuple[str | None, str | None]:
    """(final checkpoint, metrics.jsonl) of a retrieval-stage run already trained with the same
    model, data, teacher, train and seed settings as ``cfg``, else (None, None)."""
    from imprag_ray.config.loader import to_dict

    final = Path(cfg.output_dir) / "ray_results" / cfg.name / f"epoch-{cfg.train.epochs:03d}"
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    saved_path = final / "job_config.json"
    if not saved_path.is_file() or not (final / "trainer_state.pt").is_file() or not metrics.is_file():
        return None, None
    keys = ("model", "teacher", "train", "seed")
    current = json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists, as in the saved file
    saved = json.loads(saved_path.read_text())
    # the checkpoint holds a worker's view: its share of the global batch
    saved["train"]["batch_size"] *= cfg.ray.num_workers
    same = (
        all(saved.get(k) == current[k] for k in keys) and saved["data"]["train"] == current["data"]["train"]
    )
    return (str(final), str(metrics)) if same else (None, None)


def finished_reading_stage(cfg) -> dict | None:
    """The report of a reading stage already written with exactly ``cfg`` (same settings,
    same init path), else None: a rerun after changing only the ImpRAG stage skips it."""
    report_path = Path(cfg.out) / "reader_pretrain.json"
    if not report_path.is_file() or not (Path(cfg.out) / "model.safetensors").is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return None
    return report if report.get("config") == dataclasses.asdict(cfg) else None


def last_dev_metrics(metrics_jsonl: str | Path) -> dict | None:
    """The last ``dev`` entry of a run's metrics.jsonl (None when the job has no dev set)."""
    from imprag_ray.pipelines.train import read_metrics

    devs = [{"step": row.get("step"), **row["dev"]} for row in read_metrics(metrics_jsonl) if row.get("dev")]
    return devs[-1] if devs else None


def export_base(checkpoint: str | Path, out: Path, manifest: dict) -> None:
    """Weights in bf16 + tokenizer + ImpRAG config + ``base.json``, atomically."""
    from imprag_ray.data.io import atomic_dir
    from imprag_ray.model.checkpoint import load_tokenizer
    from imprag_ray.model.imprag import ImpRAGModel

    model = ImpRAGModel.from_pretrained(checkpoint)
    model.lm.to(torch.bfloat16)
    tokenizer = load_tokenizer(checkpoint)
    with atomic_dir(out, overwrite=True) as tmp:
        model.write_files(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / BASE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(base: str | Path) -> dict:
    path = Path(base) / BASE_MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); rebuild the base with `{COMMAND}`") from e


def check_base_matches_world(base: str | Path, world_dir: str | Path) -> None:
    """The base's tokenizer was trained on one world's text: refuse another world."""
    from imprag_ray.index.store import corpus_fingerprint

    want = read_manifest(base)["demo_world"]["corpus_sha256"]
    have = corpus_fingerprint(Path(world_dir) / "corpus.jsonl")
    if want != have:
        raise ValueError(
            f"{world_dir}/corpus.jsonl (sha256 {have[:12]}) is not the world {base} was pretrained for "
            f"({want[:12]}); rewrite it with `imprag data synth --out {world_dir} --overwrite` "
            f"or rebuild the base with `{COMMAND}`"
        )


def pretrain_base(
    out: Path = BASE_DIR,
    overrides: Sequence[str] = (),
    echo: Callable[[str], None] = print,
    reader_stages: Sequence[dict] = READER_STAGES,
) -> dict:
    """Steps 1-6 of the module docstring on the Ray this process is connected to (or an
    embedded local one); returns the manifest written to ``out/base.json``."""
    from imprag_ray.cli import load_train_config
    from imprag_ray.index.store import corpus_fingerprint
    from imprag_ray.pipelines.train import train_ray
    from imprag_ray.train.reader_pretrain import ReaderPretrainConfig, pretrain_reader

    prepare_worlds(DEMO_WORLD, PRETRAIN_WORLD, PRETRAIN_INIT, echo)
    start = time.time()
    cfg = load_train_config(ROOT / JOB, list(overrides))
    if (cfg.model.max_passage_tokens, cfg.model.num_passages) != (L_MAX, K):
        raise ValueError(f"{JOB}: model.max_passage_tokens/num_passages must stay {L_MAX}/{K}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=()))
    checkpoint, metrics = finished_retrieval_stage(cfg)
    fresh = checkpoint is None  # once a stage runs, every later stage runs too
    if checkpoint is not None:
        echo(f"[pretrain-base] retrieval stage: {checkpoint} is done with these settings")
    else:
        if PRETRAIN_WORLD.parent.resolve() in Path(cfg.output_dir).resolve().parents:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a rerun pretrains from the init again
        echo(f"[pretrain-base] retrieval stage: {JOB} on Ray Train")
        run = train_ray(cfg, echo=echo)  # joins the connected Ray, else starts an embedded one
        if run.checkpoint is None:
            raise RuntimeError(f"{JOB}: training ended without a checkpoint")
        checkpoint, metrics = run.checkpoint, run.metrics
    reading, init = [], Path(checkpoint)
    for i, stage in enumerate(reader_stages):
        out_dir = READER_DIR.with_name(f"{READER_DIR.name}-{i + 1}")
        rcfg = ReaderPretrainConfig(
            world=str(DEMO_WORLD),
            init=str(init),
            out=str(out_dir),
            max_passage_tokens=L_MAX,
            num_passages=K,
            threads=max(1, min(2, os.cpu_count() or 1)),
            **stage,
        )
        label = f"[pretrain-base] reading stage {i + 1}/{len(reader_stages)}"
        report = None if fresh else finished_reading_stage(rcfg)
        fresh = report is None
        if report is not None:
            echo(f"{label}: {out_dir} is done with these settings")
        else:
            echo(f"{label} -> {out_dir} ({stage})")
            report = pretrain_reader(rcfg, echo=echo)
        reading.append({"settings": stage, "last": report["metrics"][-1] if report["metrics"] else None})
        init = out_dir
    manifest = {
        "command": COMMAND,
        "job": JOB,
        "overrides": list(overrides),
        "init": INIT_SETTINGS,
        "reading_stages": reading,
        "demo_world": {
            "seed": DEMO_WORLD_KEY[0],
            "n_passages": DEMO_WORLD_KEY[1],
            "corpus_sha256": corpus_fingerprint(DEMO_WORLD / "corpus.jsonl"),
        },
        "pretraining_world": {
            "seed": PRETRAIN_WORLD_KEY[0],
            "n_passages": PRETRAIN_WORLD_KEY[1],
            "corpus_sha256": corpus_fingerprint(cfg.data.corpus),
        },
        "steps": cfg.train.epochs * (cfg.train.steps_per_epoch or 0),
        "train_seconds": round(time.time() - start, 1),
        "retrieval_stage_dev": last_dev_metrics(metrics),
        "dtype": "bfloat16",
    }
    export_base(init, Path(out), manifest)
    echo(f"[pretrain-base] wrote {out} ({json.dumps(reading[-1]['last'] if reading else None)})")
    return manifest
