"""``imprag`` command line.

    imprag data synth --out DIR [--seed N] [--passages N] [--disjoint-from WORLD_DIR]
    imprag model init --preset tiny --corpus FILE --out DIR [--vocab-size N] [--min-frequency N] [--seed N]
    imprag model pretrain-base [--out DIR] [key.sub=value ...]
    imprag train --config jobs/X.yaml [key.sub=value ...] [--resume] [--address URL | --no-ray]
    imprag eval --predictions FILE --tasks FILE[:FORMAT]... [--corpus FILE]
                [--provenance passage_id|page_title] [--json OUT]
    imprag demo [--json OUT] [--from-scratch] [key.sub=value ...]

User mistakes (bad config, bad data, bad arguments) print one clear line and exit 2;
no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imprag_ray.config.loader import ConfigError


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write the synthetic knowledge-intensive world")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--passages", type=int, default=5000)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument(
        "--disjoint-from",
        type=Path,
        metavar="WORLD_DIR",
        help="write a pretraining world instead: --passages people who are not in WORLD_DIR "
        "(a world written by this command), facts from its value pools",
    )
    s.set_defaults(func=cmd_data_synth)


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="checkpoints")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    s = msub.add_parser("init", help="train a BPE tokenizer and write a random checkpoint")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--corpus", required=True, type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--tasks", type=Path, nargs="*", default=[],
                   help="KILT task files whose inputs/answers also train the tokenizer")
    s.add_argument("--vocab-size", type=int, default=None)
    s.add_argument("--min-frequency", type=int, default=0,
                   help="uses a merge needs in the texts: rarer words are spelled in shared pieces (0 = fill the vocab)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one preset field, e.g. --set tie_word_embeddings=false "
                        "--set embedding_init_std=0.4 (repeatable)")
    s.set_defaults(func=cmd_model_init)
    from imprag_ray.train.reader_pretrain import add_parser, run_cli

    add_parser(msub)
    msub.choices["pretrain-reader"].set_defaults(func=run_cli)
    s = msub.add_parser(
        "pretrain-base",
        help="pretrain the tiny base the demo starts from, on people outside the demo world (Ray Train)",
    )
    s.add_argument("--out", type=Path, default=None,
                   help="where the bf16 base goes (default: runs/pretrain/base)")
    s.add_argument("overrides", nargs="*", help="key.sub=value applied to both pretraining stages' jobs")
    s.set_defaults(func=cmd_model_pretrain_base)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="joint retrieval-generation training")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--json", type=Path, default=None, help="write the final eval metrics here")
    p.add_argument("--address", default=None,
                   help="Ray cluster to train on (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process (Ray-free recipe loop; ignores the ray: section)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="EM and recall@k of a predictions file")
    p.add_argument("--predictions", required=True, type=Path)
    p.add_argument("--tasks", required=True, nargs="+",
                   help="task files, FILE or FILE:FORMAT (format defaults to the file stem)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="for answer-string recall, and needed by --provenance page_title")
    p.add_argument("--provenance", choices=("passage_id", "page_title"), default="passage_id",
                   help="how provenance names gold passages (the job's data.provenance): "
                        "passage_id = wikipedia_id is a corpus passage id (synthetic world); "
                        "page_title = through page titles (real KILT over Atlas passages)")
    p.add_argument("--ks", default="1,5,10")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_eval)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the tiny model (ImpRAG vs closed book)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-scratch", action="store_true",
                   help="start the three systems from a random tiny init instead of the checked-in "
                        "pretrained base (the random model does not learn to read in the demo's budget)")
    p.add_argument("overrides", nargs="*", help="key.sub=value applied to every system's training job")
    p.set_defaults(func=cmd_demo)


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run a job file on a Ray cluster (ray job submit)")
    p.add_argument("job", type=Path, help="job YAML under the project (jobs/...)")
    p.add_argument("--address", required=True, help="Ray dashboard / job server, e.g. http://127.0.0.1:8265")
    p.add_argument("--command", default="train", choices=["train", "index", "batch", "serve"],
                   help="what the job file runs (default train)")
    p.add_argument("--cluster", type=Path, default=None, help="cluster file to check resources against")
    p.add_argument("--working-dir", type=Path, default=Path("."), help="project dir shipped to the cluster")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("--dry-run", action="store_true", help="print the submission, submit nothing")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=cmd_submit)


def _add_bench(sub) -> None:
    import importlib
    import importlib.util

    from imprag_ray.bench import BENCHES

    p = sub.add_parser("bench", help="benchmarks (print JSON; --json OUT writes it)")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    for name in BENCHES:
        if importlib.util.find_spec(f"imprag_ray.bench.{name}") is not None:
            importlib.import_module(f"imprag_ray.bench.{name}").add_parser(bsub)


def _add_serve(sub) -> None:
    from imprag_ray.serve.cli import add_parser

    add_parser(sub)


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="passage indexes (Ray Data corpus encoding + FAISS)")
    isub = p.add_subparsers(dest="index_cmd", required=True)
    b = isub.add_parser("build", help="encode the corpus with the bottom layers on Ray Data; build the index")
    b.add_argument("--config", required=True, type=Path)
    b.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    b.add_argument("--json", type=Path, default=None, help="write the build report here")
    b.add_argument("overrides", nargs="*", help="key.sub=value (e.g. index.type=IVF256,PQ16)")
    b.set_defaults(func=cmd_index_build)


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="batch offline inference on Ray Data (JSONL/Parquet + metrics)")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    p.add_argument("overrides", nargs="*", help="key.sub=value (e.g. batch.retriever=bm25)")
    p.set_defaults(func=cmd_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imprag", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_data, _add_model, _add_train, _add_eval, _add_demo, _add_submit, _add_bench, _add_serve):
        add(sub)
    for add in (_add_index, _add_batch):
        add(sub)
    return parser


def cmd_data_synth(args) -> int:
    from imprag_ray.data.synth import synthesize

    disjoint = None
    if args.disjoint_from is not None:
        from imprag_ray.data.synth import world_key

        disjoint = world_key(args.disjoint_from)
    manifest = synthesize(
        args.out, seed=args.seed, n_passages=args.passages, overwrite=args.overwrite, disjoint_from=disjoint
    )
    print(json.dumps(manifest["counts"], indent=2))
    return 0


def cmd_model_init(args) -> int:
    from imprag_ray.model.checkpoint import init_checkpoint, tokenizer_texts
    from imprag_ray.model.presets import get_preset, with_settings

    preset = with_settings(get_preset(args.preset), args.set)
    texts = tokenizer_texts(args.corpus, args.tasks)
    out = init_checkpoint(preset, texts, args.out, seed=args.seed, vocab_size=args.vocab_size,
                          min_frequency=args.min_frequency)
    print(f"wrote {preset.name} checkpoint to {out}")
    return 0


def cmd_model_pretrain_base(args) -> int:
    from imprag_ray.pipelines.pretrain_base import BASE_DIR, pretrain_base

    pretrain_base(args.out or BASE_DIR, args.overrides, echo=lambda line: print(line, flush=True))
    return 0


def load_train_config(path: Path, overrides: list[str]):
    """Load + validate a training job YAML and check that its input paths exist."""
    from imprag_ray.config.loader import absolute_paths, check_paths, load_config
    from imprag_ray.config.schema import TrainJobConfig

    cfg = load_config(TrainJobConfig, path, overrides)
    check_paths(cfg, Path.cwd())
    # Ray workers and actors do not run in this directory: ship absolute paths.
    return absolute_paths(cfg, Path.cwd())


def cmd_train(args) -> int:
    cfg = load_train_config(args.config, args.overrides)
    if args.no_ray:
        from imprag_ray.train.local import train_local

        final = train_local(cfg, resume=args.resume)
    else:
        from imprag_ray.pipelines.train import train_ray

        run = train_ray(cfg, resume=args.resume, address=args.address)
        final = run.eval
        print(f"checkpoint: {run.checkpoint}\nmetrics: {run.metrics}\ncurves: {run.curves}")
    print(json.dumps(final, indent=2))
    if args.json:
        from imprag_ray.data.io import write_json_atomic

        write_json_atomic(args.json, final)
    return 0


def cmd_eval(args) -> int:
    from imprag_ray.eval.metrics import evaluate

    specs = []
    for item in args.tasks:
        path, _, fmt = item.partition(":")
        specs.append((path, fmt or Path(path).stem))
    ks = tuple(int(k) for k in args.ks.split(","))
    result = evaluate(args.predictions, specs, corpus_path=args.corpus, ks=ks, out_path=args.json,
                      provenance=args.provenance)
    print(json.dumps(result, indent=2))
    return 0


def cmd_demo(args) -> int:
    from imprag_ray.demo import run_demo

    run_demo(args.json, args.overrides, from_scratch=args.from_scratch)
    return 0


def cmd_submit(args) -> int:
    from imprag_ray import submit

    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    cfg = submit.load_job(args.job, args.command, args.overrides)
    if args.cluster is not None:
        submit.check_cluster(cfg, args.cluster, args.command)
    submission = submit.build_submission(args.job, args.command, args.overrides, args.working_dir, env)
    if args.dry_run:
        print(json.dumps(submission, indent=2))
        return 0
    job_id, status = submit.submit(args.address, submission, wait=not args.no_wait)
    print(f"imprag submit: job {job_id} {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def cmd_index_build(args) -> int:
    from imprag_ray.pipelines.encode import build_index

    cfg = load_train_config(args.config, args.overrides)
    report = build_index(cfg, echo=lambda line: print(line, file=sys.stderr), address=args.address)
    print(json.dumps(report, indent=2))
    if args.json:
        from imprag_ray.data.io import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


def cmd_batch(args) -> int:
    from imprag_ray.pipelines.batch import run_batch

    cfg = load_train_config(args.config, args.overrides)
    result = run_batch(cfg, echo=lambda line: print(line, file=sys.stderr), address=args.address)
    print(json.dumps(result["metrics"], indent=2))
    if args.json:
        from imprag_ray.data.io import write_json_atomic

        write_json_atomic(args.json, result["metrics"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"imprag {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
