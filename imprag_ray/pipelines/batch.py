"""Batch offline inference on Ray Data (``imprag batch``; DESIGN §1 "Inference", issue 3 §3).

    read KILT task files (read_text / read_parquet) -> prompt tokens (tasks; inside the
                   chat template with ``data.chat_template: true``)
      -> stage 1   QueryEncoder actors: bottom layers 0..b-1 + layer b's q_proj
                   (imprag_ray.model.bottom) -> query embedding
      -> search    Searcher actors holding the index (``imprag_ray.index.load_index``:
                   single or in parts; refuses an index of another checkpoint; the
                   manifest's nprobe / ef_search unless ``batch.nprobe`` / ``batch.ef_search``)
                   and the passages' tokens -> top ids, scores, the top_k passages' tokens;
                   or BM25 over the whole prompt (``batch.retriever: bm25``, the
                   explicit-query baseline)
      -> stage 2   Generator actors: ``imprag_ray.engine.build_engine(kind)`` (torch / vLLM;
                   vLLM is sized for data.max_prompt_tokens + max_new_tokens after the
                   passage region); answers end at any of the checkpoint's stop ids
      -> the driver streams rows in input order into JSONL / Parquet (atomic)
      -> ``imprag_ray.eval.metrics.evaluate``: EM and recall@k per input file

With greedy fp32 decoding and ``top_k`` = the checkpoint's k, predictions equal the
Ray-free :func:`imprag_ray.eval.predict.predict` (the engine always lays the prompt
after k passage slots, as predict does with top_k = k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imprag_ray.config.loader import ConfigError
from imprag_ray.data.records import RETRIEVAL_FORMATS, DataError

_TOKENIZERS: dict[str, Any] = {}
TASK_FIX = 'each line must be {"id", "input", ...} (KILT format)'


def _tokenizer(checkpoint: str):
    from imprag_ray.model.checkpoint import load_tokenizer

    if checkpoint not in _TOKENIZERS:
        _TOKENIZERS[checkpoint] = load_tokenizer(checkpoint)
    return _TOKENIZERS[checkpoint]


def _settings(cfg) -> dict[str, Any]:
    """Resolved paths and numbers of a batch job (``batch:`` defaults filled in)."""
    from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME
    from imprag_ray.pipelines.encode import resolve_paths

    bc = cfg.batch
    ckpt = bc.checkpoint or cfg.model.path
    conf = Path(ckpt) / IMPRAG_CONFIG_NAME
    if not conf.exists():
        raise FileNotFoundError(
            f"batch.checkpoint {ckpt!r}: no {IMPRAG_CONFIG_NAME}; point it at an ImpRAG checkpoint"
        )
    saved = json.loads(conf.read_text())
    k = saved.get("num_passages", 10)
    top_k = bc.top_k or cfg.eval.top_k or k
    if top_k > k:
        raise ConfigError("batch.top_k", f"{top_k} > the checkpoint's num_passages k={k}; lower it to <= {k}")
    inputs = bc.inputs or cfg.data.eval
    if not inputs:
        raise ConfigError("batch.inputs", "no input task files (and data.eval is empty); list some")
    for i, spec in enumerate(inputs):
        if "://" not in spec.path and not Path(spec.path).is_file():
            raise ConfigError(f"batch.inputs[{i}].path", f"{spec.path!r} does not exist")
    output = bc.output or str(Path(cfg.output_dir) / "batch" / "predictions.jsonl")
    chat = cfg.data.chat_template  # prompts as one user turn of the chat template
    if chat and not getattr(_tokenizer(ckpt), "chat_template", None):
        raise ConfigError(
            "data.chat_template",
            f"true, but the tokenizer of {ckpt} has no chat template; set it false (a base snapshot)",
        )
    return {
        "checkpoint": ckpt,
        "inputs": inputs,
        "output": output,
        "metrics": bc.metrics or str(Path(output).with_suffix(".metrics.json")),
        "index_dir": bc.index_dir or resolve_paths(cfg)["out_dir"],
        "top_k": top_k,
        "depth": bc.search_depth or max(top_k, *cfg.eval.recall_ks),
        "max_new_tokens": bc.max_new_tokens or cfg.eval.max_new_tokens,
        "retrieval_layer": cfg.model.retrieval_layer
        if cfg.model.retrieval_layer is not None
        else saved["retrieval_layer"],
        "post_rope": cfg.model.post_rope
        if cfg.model.post_rope is not None
        else saved.get("post_rope", False),
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "chat": chat,
        "nprobe": bc.nprobe,
        "ef_search": bc.ef_search,
    }


def engine_options(cfg, s: dict) -> dict[str, Any]:
    """``batch.engine_options`` plus, for vLLM, the request budget that sizes its
    ``max_model_len`` (the options win)."""
    options = dict(cfg.batch.engine_options)
    if cfg.batch.engine == "vllm":
        options.setdefault("max_prompt_tokens", s["max_prompt_tokens"])
        options.setdefault("max_new_tokens", s["max_new_tokens"])
    return options


# ------------------------------------------------------------ Ray Data stages
def parse_tasks(
    batch: dict[str, np.ndarray],
    *,
    path: str,
    format: str,
    checkpoint: str,
    max_prompt_tokens: int,
    chat: bool = False,
) -> dict:
    """KILT rows (JSONL lines in ``text`` or Parquet columns) -> id, prompt text/tokens
    (``chat``: the prompt as one user turn of the tokenizer's chat template)."""
    from imprag_ray.data.records import TaskExample
    from imprag_ray.data.templates import format_prompt
    from imprag_ray.data.tokenized import encode_prompt_text

    if "text" in batch and "input" not in batch:  # read_text: one JSON line per row
        rows = []
        for line in batch["text"]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    path, None, f"invalid JSON line ({err.msg}): {line[:60]!r}", TASK_FIX
                ) from None
            rows.append(row)
    else:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    tok = _tokenizer(checkpoint)
    ids, texts, prompts = [], [], []
    for row in rows:
        if not isinstance(row, dict) or row.get("id") in (None, "") or not isinstance(row.get("input"), str):
            raise DataError(
                path,
                "id" if not isinstance(row, dict) or row.get("id") in (None, "") else "input",
                f"missing or invalid in row {str(row)[:80]}",
                TASK_FIX,
            )
        ex = TaskExample(id=str(row["id"]), input=row["input"], answers=(), provenance=(), format=format)
        ids.append(ex.id)
        texts.append(format_prompt(ex))
        prompts.append(
            np.asarray(encode_prompt_text(tok, texts[-1], max_prompt_tokens, chat=chat), dtype=np.int64)
        )
    n = len(ids)
    out_prompts = np.empty(n, dtype=object)
    out_prompts[:] = prompts if n else []
    return {
        "id": np.array(ids, dtype=object),
        "prompt_text": np.array(texts, dtype=object),
        "prompt_ids": out_prompts,
        "use_passages": np.array([format in RETRIEVAL_FORMATS] * n, dtype=bool),
    }


class QueryEncoder:
    """Stage 1 actor: query embeddings from the bottom layers only."""

    def __init__(
        self, checkpoint: str, retrieval_layer: int, post_rope: bool, num_passages: int, threads: int
    ):
        import torch

        from imprag_ray.model.bottom import BottomModel

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = BottomModel.from_pretrained(
            checkpoint, retrieval_layer=retrieval_layer, post_rope=post_rope, device=self.device
        )
        self.num_passages = num_passages
        self.pad = _tokenizer(checkpoint).pad_token_id or 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids, mask = _pad(list(batch["prompt_ids"]), self.pad)
        with torch.no_grad():
            state = self.model.encode_prompt(
                ids.to(self.device), mask.to(self.device), num_passages=self.num_passages
            )
        return {**batch, "query_embedding": state.query_embedding.float().cpu().numpy()}


def _pad(rows: list, pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(np.array(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class Searcher:
    """Search actor: holds the index (or BM25) and the corpus passages' tokens."""

    def __init__(
        self,
        *,
        retriever: str,
        checkpoint: str,
        corpus: str,
        index_dir: str | None,
        retrieval_layer: int,
        post_rope: bool,
        top_k: int,
        depth: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        from imprag_ray.data.readers import read_corpus
        from imprag_ray.data.tokenized import PassageStore
        from imprag_ray.model.checkpoint import checkpoint_hash
        from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME

        passages = read_corpus(corpus)
        l_max = json.loads((Path(checkpoint) / IMPRAG_CONFIG_NAME).read_text())["max_passage_tokens"]
        self.store = PassageStore(passages, _tokenizer(checkpoint), l_max)
        self.retriever, self.top_k, self.depth = retriever, top_k, depth
        if retriever == "bm25":
            from imprag_ray.retrievers.teachers import build_teacher

            self.bm25 = build_teacher("bm25", passages)
        else:
            from imprag_ray.index.parts import load_index

            self.index = load_index(
                index_dir,
                checkpoint_hash=checkpoint_hash(checkpoint),
                retrieval_layer=retrieval_layer,
                post_rope=post_rope,
                nprobe=nprobe,
                ef_search=ef_search,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        use = np.asarray(batch["use_passages"], dtype=bool)
        retrieved: list[list[str]] = [[] for _ in range(n)]
        scores: list[list[float]] = [[] for _ in range(n)]
        rows = [i for i in range(n) if use[i]]
        if rows and self.retriever == "bm25":
            ranked = self.bm25.rank([str(batch["prompt_text"][i]) for i in rows], self.depth)
            for i, r in zip(rows, ranked, strict=True):
                retrieved[i], scores[i] = [p for p, _ in r], [float(s) for _, s in r]
        elif rows:
            q = np.stack([np.asarray(batch["query_embedding"][i], dtype=np.float32) for i in rows])
            ids, sc = self.index.search(q, self.depth)
            for j, i in enumerate(rows):
                retrieved[i], scores[i] = list(ids[j]), [float(s) for s in sc[j][: len(ids[j])]]
        passages = np.empty(n, dtype=object)
        for i in range(n):
            passages[i] = [list(self.store.tokens[p]) for p in retrieved[i][: self.top_k]] if use[i] else []
        out = {k: v for k, v in batch.items() if k != "query_embedding"}
        return {**out, "retrieved": _objects(retrieved), "scores": _objects(scores), "passages": passages}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values if values else []
    for i, v in enumerate(values):  # numpy would broadcast equal-length lists into 2-D
        out[i] = v
    return out


class Generator:
    """Stage 2 actor: one generation engine (torch reference or vLLM) over the checkpoint."""

    def __init__(self, *, kind: str, checkpoint: str, options: dict, max_new_tokens: int, threads: int):
        import torch

        from imprag_ray.engine import Sampling, build_engine

        torch.set_num_threads(threads)
        self.engine = build_engine(kind, checkpoint, **options)
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
        self.tokenizer = _tokenizer(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from imprag_ray.engine import GenerationRequest
        from imprag_ray.engine.base import cut_at_stop
        from imprag_ray.eval.predict import decode_answer

        requests = []
        for i in range(len(batch["id"])):
            # closed book (no retriever, or a retrieval-free format): the base LLM path
            read = bool(batch["use_passages"][i])
            passages = tuple(tuple(int(t) for t in x) for x in batch["passages"][i]) if read else None
            requests.append(
                GenerationRequest(
                    tuple(int(t) for t in batch["prompt_ids"][i]),
                    passages,
                    self.sampling,
                    str(batch["id"][i]),
                )
            )
        results = self.engine.generate(requests)
        stops = self.engine.stop_token_ids  # every eos id (engines already end there)
        preds = [decode_answer(self.tokenizer, cut_at_stop(r.token_ids, stops)[0]) for r in results]
        # Cells that came through Arrow are numpy arrays; handed back as they are, Ray Data
        # cannot write them as Arrow lists and pickles the column. Plain lists stay list<...>.
        return {
            "id": batch["id"],
            "prediction": np.array(preds, dtype=object),
            "retrieved": _objects([[str(p) for p in r] for r in batch["retrieved"]]),
            "scores": _objects([[float(x) for x in r] for r in batch["scores"]]),
        }


# --------------------------------------------------------------- the pipeline
def _read_inputs(inputs, s: dict, parse_cpus: float):
    import ray

    datasets = []
    for spec in inputs:
        args = {"num_cpus": parse_cpus}
        if spec.path.endswith(".parquet"):
            ds = ray.data.read_parquet(spec.path, **args)
        else:
            ds = ray.data.read_text(spec.path, **args)
        if spec.limit:
            ds = ds.limit(spec.limit)
        ds = ds.map_batches(
            parse_tasks,
            batch_format="numpy",
            num_cpus=parse_cpus,
            fn_kwargs={
                "path": spec.path,
                "format": spec.format,
                "checkpoint": s["checkpoint"],
                "max_prompt_tokens": s["max_prompt_tokens"],
                "chat": s["chat"],
            },
        )
        datasets.append(ds)
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def build_dataset(cfg, s: dict):
    """The lazy Ray Dataset of prediction rows (id, prediction, retrieved, scores)."""
    bc = cfg.batch
    inputs = [spec if not bc.limit else _limited(spec, bc.limit) for spec in s["inputs"]]
    parse_cpus = min(bc.num_cpus, 0.25) or 0.25
    pools = bc.generators + (bc.encoders if bc.retriever == "imprag" else 0)
    pools += bc.searchers if bc.retriever != "none" else 0
    warn_if_starved("batch.num_cpus", pools * bc.num_cpus, parse_cpus)
    ds = _read_inputs(inputs, s, parse_cpus=parse_cpus)
    actor = {"batch_format": "numpy", "batch_size": bc.batch_size, "num_cpus": bc.num_cpus}
    if bc.retriever == "imprag":
        ds = ds.map_batches(
            QueryEncoder,
            compute=_pool(bc.encoders),
            num_gpus=bc.num_gpus,
            **actor,
            fn_constructor_kwargs={
                "checkpoint": s["checkpoint"],
                "retrieval_layer": s["retrieval_layer"],
                "post_rope": s["post_rope"],
                "num_passages": s["top_k"],
                "threads": bc.threads,
            },
        )
    if bc.retriever != "none":
        ds = ds.map_batches(
            Searcher,
            compute=_pool(bc.searchers),
            **actor,
            fn_constructor_kwargs={
                "retriever": bc.retriever,
                "checkpoint": s["checkpoint"],
                "corpus": cfg.data.corpus,
                "index_dir": s["index_dir"],
                "retrieval_layer": s["retrieval_layer"],
                "post_rope": s["post_rope"],
                "top_k": s["top_k"],
                "depth": s["depth"],
                "nprobe": s["nprobe"],
                "ef_search": s["ef_search"],
            },
        )
    else:
        ds = ds.map_batches(_closed_book, batch_format="numpy", num_cpus=min(bc.num_cpus, 0.25) or 0.25)
    return ds.map_batches(
        Generator,
        compute=_pool(bc.generators),
        num_gpus=bc.num_gpus,
        **actor,
        fn_constructor_kwargs={
            "kind": bc.engine,
            "checkpoint": s["checkpoint"],
            "options": engine_options(cfg, s),
            "max_new_tokens": s["max_new_tokens"],
            "threads": bc.threads,
        },
    )


def warn_if_starved(key: str, actor_cpus: float, task_cpus: float, echo=None) -> bool:
    """Warn when the actor pools take so many of the cluster's CPUs that the read /
    tokenize tasks feeding them cannot be scheduled (the pipeline would wait forever on a
    fixed-size cluster; an autoscaling one adds nodes instead). Returns True if starved."""
    import logging

    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if actor_cpus + task_cpus <= total + 1e-9:
        return False
    msg = (
        f"{key}: the actor pools reserve {actor_cpus:g} CPUs and the read tasks need {task_cpus:g}, "
        f"but the cluster has {total:g} now; unless it autoscales, lower {key} or the pool sizes"
    )
    (echo or logging.getLogger(__name__).warning)(msg)
    return True


def _pool(size: int):
    import ray

    return ray.data.ActorPoolStrategy(size=size)


def _limited(spec, limit: int):
    from dataclasses import replace

    return replace(spec, limit=min(spec.limit or limit, limit))


def _closed_book(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["id"])
    empty = _objects([[] for _ in range(n)])
    return {
        **batch,
        "use_passages": np.zeros(n, dtype=bool),
        "retrieved": empty,
        "scores": _objects([[] for _ in range(n)]),
        "passages": _objects([[] for _ in range(n)]),
    }


def _rows(ds) -> Iterator[dict]:
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["id"])):
            yield {
                "id": str(batch["id"][i]),
                "prediction": str(batch["prediction"][i]),
                "retrieved": [str(x) for x in batch["retrieved"][i]],
                "scores": [float(x) for x in batch["scores"][i]],
            }


def write_predictions(rows: Iterator[dict], output: str) -> int:
    """Stream rows into ``output`` (.jsonl or .parquet) atomically; returns the row count."""
    from imprag_ray.data.io import write_jsonl_atomic

    if output.endswith(".jsonl"):
        return write_jsonl_atomic(output, rows)
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prediction", pa.string()),
            ("retrieved", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
        ]
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(output).name}.", suffix=".tmp", dir=Path(output).parent)
    os.close(fd)
    n = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            chunk: list[dict] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) >= 1024:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    n, chunk = n + len(chunk), []
            if chunk:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                n += len(chunk)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def run_batch(
    cfg, *, echo: Callable[[str], None] = print, metrics: bool = True, address: str | None = None
) -> dict:
    """Run batch inference of ``cfg.batch``. Writes the predictions and (``metrics=True``,
    labelled inputs) the metrics JSON; returns ``{"output", "count", "metrics"}``.

    Settings and the index manifest are checked before Ray is touched; then the Ray this
    process is connected to is used, else ``address`` / ``RAY_ADDRESS`` / a new local Ray."""
    import ray

    from imprag_ray.pipelines.encode import connect_ray

    s = _settings(cfg)
    if cfg.batch.retriever == "imprag":
        _check_index(s)
    connect_ray(address)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # output rows in input order
    old_deaths = ctx.max_consecutive_actor_init_deaths
    # A loaded machine sometimes loses a pending actor; replace it instead of failing.
    ctx.max_consecutive_actor_init_deaths = max(old_deaths, 3)
    try:
        count = write_predictions(_rows(build_dataset(cfg, s)), s["output"])
    except ray.exceptions.RayTaskError as err:  # a user-data error inside a worker
        cause = err.cause if isinstance(getattr(err, "cause", None), Exception) else None
        if isinstance(cause, ValueError):
            raise type(cause)(*cause.args) if not isinstance(cause, DataError) else cause from None
        raise
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.max_consecutive_actor_init_deaths = old_deaths
    echo(f"batch: {count} predictions -> {s['output']}")
    result: dict[str, Any] = {"output": s["output"], "count": count, "metrics": None}
    if metrics:
        result["metrics"] = score(cfg, s)
        result["metrics_path"] = s["metrics"]
    return result


def score(cfg, s: dict) -> dict[str, dict]:
    """EM and recall@k per input file over the examples that were run (``limit``s
    honoured), as :func:`imprag_ray.eval.metrics.score_task`; written to ``s["metrics"]``."""
    from imprag_ray.data.io import write_json_atomic
    from imprag_ray.data.provenance import ProvenanceResolver
    from imprag_ray.data.readers import iter_corpus, read_tasks
    from imprag_ray.data.templates import format_passage
    from imprag_ray.eval.metrics import read_predictions, score_task

    mode = cfg.data.provenance
    inputs = []
    for spec in s["inputs"]:
        limit = min(x for x in (spec.limit, cfg.batch.limit, 10**18) if x)
        inputs.append((spec, read_tasks(spec.path, spec.format, provenance=mode)[:limit]))
    # page_title: recall joins retrieved passages to the gold pages through their titles
    resolver = ProvenanceResolver.from_corpus(cfg.data.corpus, mode, [ex for _, exs in inputs for ex in exs])
    preds = read_predictions(s["output"])
    needed = {r for p in preds.values() for r in p["retrieved"][: max(cfg.eval.recall_ks)]}
    texts = {
        p.id: format_passage(p)
        for p in iter_corpus(cfg.data.corpus, check_duplicates=False)
        if p.id in needed
    }
    results: dict[str, dict] = {}
    for spec, examples in inputs:
        key = Path(spec.path).stem if Path(spec.path).stem not in results else spec.path
        results[key] = {
            "path": spec.path,
            "format": spec.format,
            **score_task(examples, preds, texts, cfg.eval.recall_ks, resolver),
        }
    write_json_atomic(s["metrics"], results)
    return results


def _check_index(s: dict) -> None:
    """Refuse a missing index or one of another checkpoint before starting any actor."""
    from imprag_ray.index.store import IndexManifest, IndexMismatchError
    from imprag_ray.model.checkpoint import checkpoint_hash

    manifest = Path(s["index_dir"]) / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(
            f"batch.index_dir {s['index_dir']!r} holds no index; build it with `imprag index build` "
            "or set batch.retriever to bm25 / none"
        )
    m = IndexManifest(**json.loads(manifest.read_text()))
    if m.checkpoint_hash != checkpoint_hash(s["checkpoint"]):
        raise IndexMismatchError(
            f"{s['index_dir']} was built with checkpoint {m.checkpoint_hash[:12]}, not with "
            f"{s['checkpoint']}; rebuild it with `imprag index build` for this checkpoint"
        )
