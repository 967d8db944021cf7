"""``imprag bench encode``: corpus-encoding throughput (passages/s).

Measures, over the same corpus and checkpoint on the same machine:

* ``torch_loop``: a raw batched-torch loop in this process (tokenize + ``embed_passages``
  of the full model, batches of ``--batch-size``), with 1 thread and with all cores;
* ``ray_data``: the Ray Data pipeline of :mod:`imprag_ray.pipelines.encode` (read ->
  tokenize -> bottom-layer encoder actors -> shards) with 1 and with 2 encoder actors
  (1 torch thread each), end to end (Ray Data start and actor start-up included) and in
  steady state (passages / the window from the first encoder batch's start to the last
  one's end, timestamps taken inside the actors).

Without ``--checkpoint`` it synthesises a world and a random checkpoint of the ``tiny``
preset in a temp dir. Prints JSON (``--json OUT`` also writes it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def add_parser(bsub) -> None:
    p = bsub.add_parser("encode", help="passages/s: Ray Data encoder (1 vs 2 actors) vs a raw torch loop")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--checkpoint", type=Path, default=None, help="ImpRAG checkpoint (default: synthesise)")
    p.add_argument("--corpus", type=Path, default=None, help="corpus JSONL (default: synthesise)")
    p.add_argument("--passages", type=int, default=3000, help="passages of the synthesised world")
    p.add_argument("--preset", default="tiny", help="model preset of the synthesised checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--actors", default="1,2", help="encoder actor counts to measure")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.set_defaults(func=cmd_bench_encode)


def _world(tmp: Path, passages: int, preset: str) -> tuple[Path, Path]:
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.synth import synthesize
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import get_preset

    synthesize(tmp / "world", seed=0, n_passages=passages)
    corpus = tmp / "world" / "corpus.jsonl"
    texts = [format_passage(p) for p in iter_corpus(corpus)]
    init_checkpoint(get_preset(preset), texts, tmp / "ckpt", seed=0)
    return corpus, tmp / "ckpt"


def torch_loop(checkpoint: Path, corpus: Path, batch_size: int, threads: int) -> dict[str, Any]:
    """Raw loop: read + tokenize + embed_passages (full model) in this process."""
    import torch

    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import load_tokenizer
    from imprag_ray.model.imprag import ImpRAGModel

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = ImpRAGModel.from_pretrained(checkpoint).eval()
        tok = load_tokenizer(checkpoint)
        start, n, batch = time.perf_counter(), 0, []

        def run(texts):
            ids = [t[: model.l_max] for t in tok(texts, add_special_tokens=False)["input_ids"]]
            width = max(len(t) for t in ids)
            x = torch.zeros(len(ids), width, dtype=torch.long)
            m = torch.zeros_like(x)
            for i, t in enumerate(ids):
                x[i, : len(t)], m[i, : len(t)] = torch.tensor(t), 1
            with torch.no_grad():
                model.embed_passages(x, m)

        for p in iter_corpus(corpus):
            batch.append(format_passage(p))
            if len(batch) == batch_size:
                run(batch)
                n, batch = n + len(batch), []
        if batch:
            run(batch)
            n += len(batch)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old)
    return {
        "threads": threads,
        "passages": n,
        "seconds": round(seconds, 3),
        "passages_per_s": round(n / seconds, 1),
    }


def ray_data(checkpoint: Path, corpus: Path, tmp: Path, actors: int, args) -> dict[str, Any]:
    """One Ray Data encoding run with ``actors`` encoder actors into a fresh shard dir."""
    from imprag_ray.config.schema import DataConfig, IndexConfig, ModelConfig, TrainJobConfig
    from imprag_ray.pipelines.encode import encode_shards

    out = tmp / f"ray-{actors}"
    cfg = TrainJobConfig(
        name="bench",
        output_dir=str(out),
        model=ModelConfig(path=str(checkpoint)),
        data=DataConfig(corpus=str(corpus)),
        index=IndexConfig(
            out_dir=str(out / "index"),
            encoders=actors,
            num_cpus=0.5,
            tokenize_num_cpus=0.25,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            threads=1,
        ),
    )
    start = time.perf_counter()
    report = encode_shards(cfg, echo=lambda _: None)
    seconds = time.perf_counter() - start
    n, window = report["passages_encoded"], report["encode_window_s"]
    return {
        "actors": actors,
        "passages": n,
        "seconds": round(seconds, 3),
        "passages_per_s": round(n / seconds, 1),
        "encode_window_s": window,
        "steady_passages_per_s": round(n / window, 1) if window else None,
        "nodes": len({x for s in report["nodes"].values() for x in s}),
    }


def cmd_bench_encode(args) -> int:
    import ray
    import torch

    from imprag_ray.pipelines.local_ray import init_local_ray

    tmp = Path(tempfile.mkdtemp(prefix="imprag-bench-encode-"))
    corpus, checkpoint = args.corpus, args.checkpoint
    if checkpoint is None or corpus is None:
        corpus, checkpoint = _world(tmp, args.passages, args.preset)
    cpus = args.cpus or os.cpu_count() or 1
    result: dict[str, Any] = {
        "bench": "encode",
        "checkpoint": str(checkpoint),
        "corpus": str(corpus),
        "cpus": cpus,
        "batch_size": args.batch_size,
        "torch_loop": [],
        "ray_data": [],
    }
    for threads in sorted({1, cpus}):
        result["torch_loop"].append(torch_loop(checkpoint, corpus, args.batch_size, threads))
    torch.set_num_threads(1)
    started_here = not ray.is_initialized()
    if started_here:
        init_local_ray(num_cpus=cpus)
    try:
        for actors in (int(a) for a in args.actors.split(",")):
            result["ray_data"].append(ray_data(checkpoint, corpus, tmp, actors, args))
    finally:
        if started_here:
            ray.shutdown()
    print(json.dumps(result, indent=2))
    if args.json:
        from imprag_ray.data.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0
