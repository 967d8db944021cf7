"""``imprag bench engines``: generation tokens/s of the vLLM engine vs the torch engine.

Both engines serve the same checkpoint (``--checkpoint``, else a random model of
``--preset`` built in a temp dir) and get the same batch of requests with k passages
(random token ids; greedy decoding). Each engine is warmed up on two short requests,
then timed on the whole batch in one ``generate`` call. The JSON reports tokens/s of
each, their ratio and the share of requests whose greedy tokens agree exactly.

``--compare-plain`` adds stock vLLM on the same checkpoint and requests, the passages
sent as a plain token prefix (``passages + prompt``, the same tokens ImpRAG reads, without
its region layout or reader attention): the speed ImpRAG's vLLM path is measured against.
Its greedy tokens differ from ImpRAG's (another attention pattern), so only speed is
compared. Every engine runs on the same cores: the torch engine with ``--threads`` threads,
vLLM's CPU worker bound to that many cores (``VLLM_CPU_OMP_THREADS_BIND``, unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from imprag_ray.engine import GenerationEngine, GenerationRequest, Sampling, build_engine


def make_checkpoint(out_dir: Path, preset: str, seed: int = 0) -> Path:
    """A random model of ``preset`` with a BPE tokenizer trained on synthetic words."""
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import get_preset

    rng = random.Random(seed)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    texts = [" ".join(rng.choices(words, k=20)) for _ in range(2000)]
    return init_checkpoint(get_preset(preset), texts, out_dir, seed=seed)


def make_requests(
    n: int, *, vocab_size: int, k: int, l_max: int, prompt_tokens: int, max_new_tokens: int, seed: int = 0
) -> list[GenerationRequest]:
    """``n`` requests of k passages (l_max/2..l_max tokens each) + a prompt; ids avoid
    the special tokens (< 8)."""
    rng = random.Random(seed)

    def ids(length: int) -> tuple[int, ...]:
        return tuple(rng.randrange(8, vocab_size) for _ in range(length))

    return [
        GenerationRequest(
            (1, *ids(prompt_tokens - 1)),
            tuple(ids(rng.randint(max(1, l_max // 2), l_max)) for _ in range(k)),
            Sampling(max_new_tokens),
            f"bench-{i}",
        )
        for i in range(n)
    ]


def time_engine(engine: GenerationEngine, requests: list[GenerationRequest]) -> tuple[dict[str, Any], list]:
    """Warm up, then time one ``generate`` over all requests."""
    engine.generate([GenerationRequest(r.prompt_ids, r.passages, Sampling(2)) for r in requests[:2]])
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "seconds": round(seconds, 4),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2),
    }, results


def run_engines_bench(
    checkpoint: str | Path,
    *,
    requests: int = 32,
    max_new_tokens: int = 32,
    prompt_tokens: int = 24,
    threads: int = 1,
    torch_batch_size: int = 32,
    vllm_options: dict[str, Any] | None = None,
    vllm_engine: GenerationEngine | None = None,
    compare_plain: bool = False,
    plain_engine: GenerationEngine | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure both engines on the same requests; ``vllm_engine`` reuses a running one;
    ``compare_plain`` also times stock vLLM with the passages as a plain prefix
    (``plain_engine``: a running ``plain=True`` engine to reuse)."""
    import torch

    torch.set_num_threads(threads)
    hf = json.loads((Path(checkpoint) / "config.json").read_text())
    torch_engine = build_engine("torch", str(checkpoint), device="cpu", max_batch_size=torch_batch_size)
    reqs = make_requests(
        requests,
        vocab_size=hf["vocab_size"],
        k=torch_engine.num_passages,
        l_max=torch_engine.max_passage_tokens,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    torch_stats, torch_results = time_engine(torch_engine, reqs)
    torch_engine.close()

    own = vllm_engine is None
    start = time.perf_counter()
    engine = vllm_engine or build_engine("vllm", str(checkpoint), **(vllm_options or {}))
    startup = time.perf_counter() - start
    try:
        vllm_stats, vllm_results = time_engine(engine, reqs)
        if hasattr(engine, "attention_stats"):  # rows through vLLM's kernel / the gather path
            vllm_stats["attention"] = engine.attention_stats()
    finally:
        if own:
            engine.close()
    if own:
        vllm_stats["startup_s"] = round(startup, 1)
    same = sum(a.token_ids == b.token_ids for a, b in zip(vllm_results, torch_results, strict=True))
    plain_stats = None
    if compare_plain:
        start = time.perf_counter()
        plain = plain_engine or build_engine("vllm", str(checkpoint), plain=True, **(vllm_options or {}))
        startup = time.perf_counter() - start
        try:
            plain_stats, _ = time_engine(plain, reqs)
        finally:
            if plain_engine is None:
                plain.close()
        if plain_engine is None:
            plain_stats["startup_s"] = round(startup, 1)
    report = {
        "checkpoint": str(checkpoint),
        "model": {
            k: hf.get(k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        "requests": requests,
        "passages_per_request": torch_engine.num_passages,
        "max_passage_tokens": torch_engine.max_passage_tokens,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "torch_threads": threads,
        "torch_batch_size": torch_batch_size,
        "vllm_options": vllm_options or {},
        "torch": torch_stats,
        "vllm": vllm_stats,
        "ratio_vllm_over_torch": round(vllm_stats["tokens_per_s"] / torch_stats["tokens_per_s"], 3),
        "greedy_exact_match": round(same / len(reqs), 4),
    }
    if plain_stats is not None:
        report["plain_vllm"] = plain_stats
        report["ratio_vllm_over_plain_vllm"] = round(
            vllm_stats["tokens_per_s"] / plain_stats["tokens_per_s"], 3
        )
    return report


def cmd_bench_engines(args: argparse.Namespace) -> int:
    from imprag_ray.data.io import write_json_atomic

    for name in (
        "requests",
        "max_new_tokens",
        "prompt_tokens",
        "threads",
        "max_num_seqs",
        "max_num_batched_tokens",
    ):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    # the same cores for every engine: vLLM's CPU worker binds its OpenMP threads to the
    # cores named here (vLLM's own default keeps one core free), the torch engine runs
    # --threads threads
    cores = sorted(os.sched_getaffinity(0))
    if args.threads > len(cores):
        raise ValueError(f"--threads {args.threads} > the {len(cores)} cores this process may use")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores[: args.threads])))
    vllm_options = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_gib": args.kv_cache_gib,
    }
    with tempfile.TemporaryDirectory(prefix="imprag-bench-engines-") as tmp:
        ckpt = args.checkpoint or make_checkpoint(Path(tmp) / "model", args.preset, args.seed)
        if not (Path(ckpt) / "config.json").exists():
            raise FileNotFoundError(f"--checkpoint {ckpt}: no config.json (not a checkpoint directory)")
        report = run_engines_bench(
            ckpt,
            requests=args.requests,
            max_new_tokens=args.max_new_tokens,
            prompt_tokens=args.prompt_tokens,
            threads=args.threads,
            torch_batch_size=args.torch_batch_size,
            vllm_options=vllm_options,
            compare_plain=args.compare_plain,
            seed=args.seed,
        )
    report["preset"] = None if args.checkpoint else args.preset
    report["vllm_cpu_omp_threads_bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    print(json.dumps(report, indent=2))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def add_parser(bsub) -> None:
    p = bsub.add_parser(
        "engines", help="generation tokens/s: vLLM engine vs torch engine, same model and batch"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="default: a random --preset model")
    p.add_argument(
        "--preset", default="tiny", help="model shape when no --checkpoint (see imprag model init)"
    )
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the torch engine")
    p.add_argument("--torch-batch-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time stock vLLM with the passages as a plain token prefix (same tokens)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.set_defaults(func=cmd_bench_engines)
