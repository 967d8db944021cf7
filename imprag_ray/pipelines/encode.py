"""Corpus encoding on Ray Data -> embedding shards -> FAISS index (``imprag index build``).

DESIGN §2 "corpus encoding" / "index"; issue 3 §1. The pipeline streams::

    read_json / read_parquet (local path or pyarrow URI)
      -> tokenize ("title: text", truncated to l_max; tasks)
      -> map_batches(PassageEncoder)  actor pool; each actor loads only layers 0..b-1 +
                                      layer b's projections (imprag_ray.model.bottom)
      -> the driver iterates the (ordered) output and writes one embedding shard per
         ``index.shard_size`` passages (npy + ids, atomic), logging a line per shard

Shard s holds corpus rows ``[s * shard_size, (s+1) * shard_size)`` (corpus order; Ray
Data keeps block order), so the assignment is deterministic: a rerun reads
``build.json`` + the ``shard-*.done.json`` markers, checks every finished shard against
the corpus (its ids are its rows' ids, its embeddings float32 ``[rows, dim]``:
:func:`verify_finished`, one pass over the corpus ids) and recomputes those that are not,
drops the rows of the good ones before the encoder and re-encodes only the rest. Each
shard file is fsynced before its rename and the done marker is written last, so a crash
never leaves a marker naming missing data. The driver holds at most one shard.

The FAISS index is then trained on a sample drawn from the shards and filled shard by
shard (GPU FAISS when available), and saved with its manifest (checkpoint hash, b,
post-RoPE, dim, count, type, corpus fingerprint, search settings ``index.nprobe`` /
``index.ef_search``). ``index.num_shards > 1`` writes that many index parts
(``part-XXX/``) that :func:`imprag_ray.index.parts.load_index` joins in a
``faiss.IndexShards`` (re-exported here).

The checkpoint may be a plain HF snapshot (no ``imprag_config.json``, e.g. a base
Llama-3.2-3B): b, post-RoPE and l_max then come from the job's ``model:`` section
(:func:`retrieval_settings`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imprag_ray.config.loader import ConfigError
from imprag_ray.data.io import replace_durably, write_json_atomic
from imprag_ray.index.parts import PARTS_FILE, load_index, save_parts
from imprag_ray.index.store import IndexManifest, PassageIndex, corpus_fingerprint

log = logging.getLogger(__name__)
BUILD_STATE = "build.json"
__all__ = ["PARTS_FILE", "build_faiss", "build_index", "encode_shards", "load_index", "retrieval_settings"]


# ------------------------------------------------------------------ settings
def connect_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; no-op when
    this process is already connected (the demo calls the pipelines on its own Ray)."""
    import ray

    from imprag_ray.pipelines.local_ray import init_local_ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        init_local_ray()


def resolve_paths(cfg) -> dict[str, str]:
    """Index dir, shard dir, corpus and checkpoint of a job (``index:`` defaults filled)."""
    ic = cfg.index
    out_dir = ic.out_dir or str(Path(cfg.output_dir) / "index")
    return {
        "out_dir": out_dir,
        "shard_dir": ic.shard_dir or f"{out_dir.rstrip('/')}-embeddings",
        "corpus": ic.corpus or cfg.data.corpus,
        "checkpoint": ic.checkpoint or cfg.model.path,
    }


def retrieval_settings(cfg, checkpoint: str) -> dict[str, Any]:
    """b, post-RoPE and l_max of the encoder: the job's ``model:`` section where it sets
    them, else the checkpoint's ``imprag_config.json``; a plain HF snapshot (no such file)
    needs ``model.retrieval_layer`` and ``model.max_passage_tokens`` in the job."""
    from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME

    conf = Path(checkpoint) / IMPRAG_CONFIG_NAME
    saved = json.loads(conf.read_text()) if conf.exists() else {}
    m = cfg.model

    def setting(key: str, example: str) -> int:
        value = getattr(m, key) if getattr(m, key) is not None else saved.get(key)
        if value is None:
            raise ConfigError(
                f"model.{key}",
                f"{checkpoint} has no {IMPRAG_CONFIG_NAME} (a base HF snapshot?) and the job does not "
                f"set it; set model.{key} (e.g. {example}) or point index.checkpoint at an ImpRAG "
                "checkpoint",
            )
        return int(value)

    b = setting("retrieval_layer", "7 for Llama-3.2-3B")
    l_max = setting("max_passage_tokens", "256")
    post_rope = m.post_rope if m.post_rope is not None else bool(saved.get("post_rope", False))
    n = int(json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"])
    if not 0 <= b < n:
        raise ConfigError(
            "model.retrieval_layer", f"b={b} must be in 0..{n - 1} for this {n}-layer checkpoint"
        )
    return {"retrieval_layer": b, "post_rope": post_rope, "max_passage_tokens": l_max}


def fingerprint(corpus: str) -> str:
    """The corpus fingerprint recorded in build.json and the index manifest: see
    :func:`imprag_ray.index.store.corpus_fingerprint` (file, directory or pyarrow URI)."""
    return corpus_fingerprint(corpus)


def read_corpus_dataset(corpus: str, num_cpus: float):
    """A Ray Dataset of corpus rows from JSONL or Parquet (file, directory or URI)."""
    import ray

    parquet = corpus.endswith(".parquet") or (
        "://" not in corpus and Path(corpus).is_dir() and any(Path(corpus).glob("*.parquet"))
    )
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if parquet:
        return ray.data.read_parquet(corpus, **args)
    return ray.data.read_json(corpus, lines=True, file_extensions=["jsonl", "json"], **args)


def _ids_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "id" not in batch:
        raise ValueError(f"corpus rows need 'id' and 'text' columns, got {sorted(batch)}")
    return {"id": np.array([str(i) for i in batch["id"]], dtype=object)}


def corpus_ids(corpus: str, num_cpus: float) -> Iterator[str]:
    """Every corpus id in corpus order, read by the same Ray Data reader as the encoding
    (so in the same order: call it with ``preserve_order`` set), as ``tokenize_batch``
    spells them (``str``). Only ids reach the driver."""
    ds = read_corpus_dataset(corpus, num_cpus).map_batches(_ids_only, batch_format="numpy", num_cpus=num_cpus)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        yield from batch["id"]


# ------------------------------------------------------------ Ray Data stages
_TOKENIZERS: dict[str, Any] = {}


def tokenize_batch(batch: dict[str, np.ndarray], *, checkpoint: str, l_max: int, skip: frozenset) -> dict:
    """Corpus rows -> {"id": str, "input_ids": int32 tokens[:l_max]}; drops ids in ``skip``
    (rows of finished shards). Reader text is ``format_passage`` ("title: text")."""
    from imprag_ray.data.records import Passage
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import load_tokenizer

    if checkpoint not in _TOKENIZERS:
        _TOKENIZERS[checkpoint] = load_tokenizer(checkpoint)
    tok = _TOKENIZERS[checkpoint]
    if "id" not in batch or "text" not in batch:
        raise ValueError(f"corpus rows need 'id' and 'text' columns, got {sorted(batch)}")
    ids = [str(i) for i in batch["id"]]
    titles = batch.get("title", [None] * len(ids))
    keep = [j for j, pid in enumerate(ids) if pid not in skip]
    texts = [format_passage(Passage(ids[j], titles[j] or "", str(batch["text"][j]))) for j in keep]
    tokens = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = np.empty(len(keep), dtype=object)
    for j, t in enumerate(tokens):
        out[j] = np.asarray(t[:l_max], dtype=np.int32)
    return {"id": np.array([ids[j] for j in keep], dtype=object), "input_ids": out}


class PassageEncoder:
    """Ray Data actor: layer-b passage embeddings of token batches (bottom layers only)."""

    def __init__(
        self,
        checkpoint: str,
        retrieval_layer: int,
        post_rope: bool,
        threads: int,
        dtype: str,
        max_passage_tokens: int | None = None,
    ):
        import torch

        from imprag_ray.model.bottom import BottomModel

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = BottomModel.from_pretrained(
            checkpoint,
            retrieval_layer=retrieval_layer,
            post_rope=post_rope,
            max_passage_tokens=max_passage_tokens,
            dtype=getattr(torch, dtype),
            device=device,
        )
        self.device = device
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        import torch

        start = time.time()  # wall clock: comparable across actors and nodes
        rows = list(batch["input_ids"])
        width = max([len(r) for r in rows] + [1])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            if len(r) == 0:
                raise ValueError(f"passage {batch['id'][i]!r} has no tokens; give it a title or text")
            ids[i, : len(r)] = torch.from_numpy(np.array(r, dtype=np.int64))  # a writable copy
            mask[i, : len(r)] = 1
        with torch.no_grad():
            emb = self.model.embed_passages(ids.to(self.device), mask.to(self.device))  # [B, dim]
        return {
            "id": batch["id"],
            "embedding": emb.float().cpu().numpy(),
            "node": np.array([self.node] * len(rows), dtype=object),
            "t_start": np.full(len(rows), start),  # the encoding window (bench encode)
            "t_end": np.full(len(rows), time.time()),
        }


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (plain use of the class)
        return "local"


# ---------------------------------------------------------------- the shards
def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def finished_shards(shard_dir: Path) -> dict[int, dict]:
    """{shard number: done marker} of the shards whose marker exists (written last).

    A marker only says the shard was finished once; :func:`verify_finished` checks the
    shard's files against the corpus before a rerun trusts them."""
    out = {}
    for marker in sorted(shard_dir.glob("shard-*.done.json")):
        s = int(marker.name.split("-")[1].split(".")[0])
        if (shard_dir / f"{_shard_name(s)}.npy").exists():
            try:
                out[s] = json.loads(marker.read_text())
            except (OSError, ValueError) as err:  # unreadable marker: the shard is redone
                log.warning("%s: unreadable (%s); shard %d will be recomputed", marker, err, s)
    return out


def _shard_problem(shard_dir: Path, s: int, marker: dict, want_ids: list[str], dim: int) -> str | None:
    """Why finished shard ``s`` cannot be reused (None: it can). ``want_ids`` are the corpus
    ids of its rows ``[s * shard_size, ...)``; ``dim`` the encoder's embedding dim."""
    name = _shard_name(s)
    n = len(want_ids)
    if marker.get("count") != n:
        return f"its done marker counts {marker.get('count')} passages, the corpus has {n} rows for it"
    try:
        ids = json.loads((shard_dir / f"{name}.ids.json").read_text())
    except (OSError, ValueError) as err:
        return f"{name}.ids.json is unreadable ({err})"
    if not isinstance(ids, list) or len(ids) != n:
        got = len(ids) if isinstance(ids, list) else type(ids).__name__
        return f"{name}.ids.json holds {got} ids, the corpus has {n} rows for it"
    if ids != want_ids:
        j = next(j for j, (a, b) in enumerate(zip(ids, want_ids, strict=True)) if a != b)
        return (
            f"{name}.ids.json row {j} is {ids[j]!r}, the corpus row is {want_ids[j]!r} (the corpus or "
            "its order changed)"
        )
    try:
        # mmap: only the header is read; a truncated file fails here or has too few rows
        emb = np.load(shard_dir / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        return f"{name}.npy is unreadable or truncated ({err})"
    if emb.shape != (n, dim) or emb.dtype != np.float32:
        return f"{name}.npy holds {emb.dtype} {list(emb.shape)}, expected float32 [{n}, {dim}]"
    return None


def verify_finished(
    shard_dir: Path,
    done: dict[int, dict],
    corpus_ids: Iterable[str],
    shard_size: int,
    dim: int,
    echo: Callable[[str], None] = print,
) -> dict[int, dict]:
    """The finished shards in ``done`` whose files match the corpus; every other one is
    dropped (its marker first, then its files) so the rerun recomputes it, with a line
    saying why.

    A shard is reused only if its ids are the corpus ids of its rows (``corpus_ids`` in
    corpus order: shard s holds rows ``[s * shard_size, (s+1) * shard_size)``), its
    marker's count is that row count (``shard_size``, less for the corpus's last shard)
    and its embeddings are float32 ``[rows, dim]``. A done marker alone proves none of
    this: a file truncated by a full disk, an ids file of another corpus order or a shard
    past a shortened corpus would otherwise be joined into the index as it is (and shift
    every later shard's rows)."""
    good: dict[int, dict] = {}
    seen: set[int] = set()

    def check(s: int, want: list[str]) -> None:
        seen.add(s)
        if s not in done:
            return
        problem = _shard_problem(shard_dir, s, done[s], want, dim)
        if problem is None:
            good[s] = done[s]
        else:
            _drop_shard(shard_dir, s, problem, echo)

    current, want, rows = None, [], 0
    for pid in corpus_ids:
        s = rows // shard_size
        rows += 1
        if s != current:
            if current is not None:
                check(current, want)
            current, want = s, []
        if s in done:
            want.append(pid)
    if current is not None:
        check(current, want)
    for s in sorted(set(done) - seen):
        reason = f"it starts at row {s * shard_size}, but the corpus now has {rows} rows"
        _drop_shard(shard_dir, s, reason, echo)
    return good


def _drop_shard(shard_dir: Path, s: int, reason: str, echo: Callable[[str], None]) -> None:
    name = _shard_name(s)
    msg = f"index: shard {s} is recomputed: {reason}"
    log.warning(msg)
    echo(msg)
    (shard_dir / f"{name}.done.json").unlink(missing_ok=True)  # first: never a marker without data
    for suffix in (".npy", ".ids.json"):
        (shard_dir / f"{name}{suffix}").unlink(missing_ok=True)


def _write_shard(shard_dir: Path, s: int, ids: list[str], emb: np.ndarray, nodes: list[str]) -> dict:
    """Write shard ``s`` (embeddings, ids, then the done marker), each file fsynced and
    renamed durably (:func:`replace_durably`) before the next: the marker, written last,
    only ever names a shard whose data is on disk, even across a power loss."""
    name = _shard_name(s)
    tmp = shard_dir / f".{name}.npy.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, emb.astype(np.float32))
    replace_durably(tmp, shard_dir / f"{name}.npy")
    write_json_atomic(shard_dir / f"{name}.ids.json", ids)
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n] = counts.get(n, 0) + 1
    done = {"shard": s, "count": len(ids), "nodes": counts}
    write_json_atomic(shard_dir / f"{name}.done.json", done)
    return done


def _check_state(shard_dir: Path, state: dict) -> None:
    """Refuse to resume shards encoded with other weights / corpus / shard size."""
    path = shard_dir / BUILD_STATE
    if path.exists():
        old = json.loads(path.read_text())
        for key, value in state.items():
            if old.get(key) != value:
                raise ValueError(
                    f"{shard_dir} holds embedding shards built with another {key} "
                    f"({str(old.get(key))[:16]} vs {str(value)[:16]}); delete that directory or set "
                    "index.shard_dir to a fresh one"
                )
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)


def embedding_dim(checkpoint: str) -> int:
    """Dim of the passage embeddings of ``checkpoint``: layer b's key projection width,
    ``num_key_value_heads * head_dim`` (from its config.json)."""
    hf = json.loads((Path(checkpoint) / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return int(hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim)


def _check_index_type(ic, checkpoint: str) -> None:
    """Fail on a bad ``index.type`` before encoding, not after."""
    import faiss

    dim = embedding_dim(checkpoint)
    try:
        faiss.index_factory(dim, ic.type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"index.type {ic.type!r} is not a valid FAISS factory string for dim {dim} "
            "(e.g. 'Flat', 'IVF1024,PQ64' with 64 dividing the dim, 'HNSW32')"
        ) from err


def _global_rows(done: dict[int, dict], shard_size: int) -> Iterator[int]:
    """Global row numbers of the rows still to encode: all rows but finished shards'."""
    g = 0
    while True:
        s = g // shard_size
        if s in done:
            g = (s + 1) * shard_size
            continue
        yield g
        g += 1


def encode_shards(cfg, *, echo: Callable[[str], None] = print, address: str | None = None) -> dict:
    """Run the Ray Data pipeline; write missing embedding shards. Returns a report
    (shards written / skipped, passages encoded, nodes per shard).

    Settings are checked before Ray is touched; then this process joins ``address`` (or
    ``RAY_ADDRESS``, else a local Ray) unless it is already connected."""
    import ray

    from imprag_ray.model.checkpoint import checkpoint_hash

    ic, paths = cfg.index, resolve_paths(cfg)
    ckpt = paths["checkpoint"]
    settings = retrieval_settings(cfg, ckpt)
    b, post_rope, l_max = settings["retrieval_layer"], settings["post_rope"], settings["max_passage_tokens"]
    state = {
        "checkpoint_hash": checkpoint_hash(ckpt),
        "retrieval_layer": b,
        "post_rope": post_rope,
        "max_passage_tokens": l_max,
        "shard_size": ic.shard_size,
        "corpus_fingerprint": fingerprint(paths["corpus"]),
    }
    _check_index_type(ic, ckpt)
    shard_dir = Path(paths["shard_dir"])
    _check_state(shard_dir, state)
    done = finished_shards(shard_dir)
    connect_ray(address)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shard s = corpus rows [s*S, (s+1)*S)
    old_deaths = ctx.max_consecutive_actor_init_deaths
    # A loaded machine sometimes loses a pending actor; replace it instead of failing.
    ctx.max_consecutive_actor_init_deaths = max(old_deaths, 3)
    try:
        from imprag_ray.pipelines.batch import warn_if_starved

        if done:
            # One pass over the corpus ids (no text leaves the readers): a resumed shard must
            # be the rows it claims, whole; see verify_finished. Cheaper by far than encoding.
            ids_in_order = corpus_ids(paths["corpus"], ic.tokenize_num_cpus)
            dim = embedding_dim(ckpt)
            done = verify_finished(shard_dir, done, ids_in_order, ic.shard_size, dim, echo)
        skip: set[str] = set()
        for s in done:
            skip.update(json.loads((shard_dir / f"{_shard_name(s)}.ids.json").read_text()))
        if done:
            echo(f"index: resuming, {len(done)} finished shard(s) in {shard_dir} are skipped")
        warn_if_starved("index.num_cpus", ic.encoders * ic.num_cpus, ic.tokenize_num_cpus, echo)
        ds = read_corpus_dataset(paths["corpus"], ic.tokenize_num_cpus)
        ds = ds.map_batches(
            tokenize_batch,
            batch_format="numpy",
            num_cpus=ic.tokenize_num_cpus,
            fn_kwargs={"checkpoint": ckpt, "l_max": l_max, "skip": frozenset(skip)},
        )
        ds = ds.map_batches(
            PassageEncoder,
            batch_format="numpy",
            batch_size=ic.batch_size,
            compute=ray.data.ActorPoolStrategy(size=ic.encoders),
            num_cpus=ic.num_cpus,
            num_gpus=ic.num_gpus,
            fn_constructor_kwargs={
                "checkpoint": ckpt,
                "retrieval_layer": b,
                "post_rope": post_rope,
                "threads": ic.threads,
                "dtype": cfg.model.dtype,
                "max_passage_tokens": l_max,
            },
        )
        written, window = _drain(ds, shard_dir, done, ic.shard_size, echo)
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.max_consecutive_actor_init_deaths = old_deaths
    all_done = finished_shards(shard_dir)
    return {
        "shard_dir": str(shard_dir),
        "shards_written": sorted(written),
        "shards_skipped": sorted(done),
        "passages_encoded": sum(written.values()),
        "encode_window_s": round(window, 3),
        "count": sum(d["count"] for d in all_done.values()),
        "nodes": {s: d["nodes"] for s, d in sorted(all_done.items())},
        **state,
    }


def _drain(ds, shard_dir: Path, done: dict[int, dict], shard_size: int, echo) -> tuple[dict[int, int], float]:
    """Stream the encoder output in corpus order into shard files. Returns {shard: count}
    written and the encoding window (first batch start to last batch end, seconds)."""
    rows = _global_rows(done, shard_size)
    written: dict[int, int] = {}
    window = [float("inf"), float("-inf")]
    current, ids, embs, nodes = None, [], [], []

    def flush():
        if current is None or not ids:
            return
        info = _write_shard(shard_dir, current, ids, np.concatenate(embs), nodes)
        written[current] = info["count"]
        echo(f"index: shard {current} written ({info['count']} passages, nodes {sorted(info['nodes'])})")

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if len(batch["id"]):
            window[0] = min(window[0], float(batch["t_start"].min()))
            window[1] = max(window[1], float(batch["t_end"].max()))
        for j in range(len(batch["id"])):
            s = next(rows) // shard_size
            if s != current:
                flush()
                current, ids, embs, nodes = s, [], [], []
            ids.append(str(batch["id"][j]))
            embs.append(batch["embedding"][j : j + 1])
            nodes.append(str(batch["node"][j]))
    flush()
    return written, max(window[1] - window[0], 0.0)


# ------------------------------------------------------------------ the index
def iter_shards(shard_dir: Path, shards: list[int]) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, embeddings [n, dim] memory-mapped) of each shard; refuses a shard whose row
    count differs from its id count (it would misalign every later id in the index)."""
    for s in shards:
        name = _shard_name(s)
        ids = json.loads((shard_dir / f"{name}.ids.json").read_text())
        emb = np.load(shard_dir / f"{name}.npy", mmap_mode="r")
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(
                f"{shard_dir}/{name}.npy holds {list(emb.shape)} embeddings for {len(ids)} ids; rerun "
                "`imprag index build` (it recomputes such a shard)"
            )
        yield ids, emb


def train_sample(shard_dir: Path, done: dict[int, dict], n: int, seed: int) -> np.ndarray:
    """``n`` embeddings drawn uniformly (seeded) over all shards, in corpus order."""
    counts = [done[s]["count"] for s in sorted(done)]
    total = sum(counts)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    out, start = [], 0
    for (_, emb), count in zip(iter_shards(shard_dir, sorted(done)), counts, strict=True):
        local = pick[(pick >= start) & (pick < start + count)] - start
        out.append(np.asarray(emb[local], dtype=np.float32))
        start += count
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _build_part(shard_dir, shards, dim, index_type, sample, manifest_fields, use_gpu) -> PassageIndex:
    """One FAISS index over ``shards``; on GPU FAISS when ``use_gpu`` (copied back to CPU)."""
    if not use_gpu:
        return PassageIndex.build(
            iter_shards(shard_dir, shards),
            dim=dim,
            index_type=index_type,
            train_sample=sample,
            manifest_fields=manifest_fields,
        )
    import faiss

    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    try:
        index = faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # e.g. HNSW has no GPU version: stay on CPU
        log.info("index type %s has no GPU FAISS version; building on CPU", index_type)
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    ids: list[str] = []
    for shard_ids, emb in iter_shards(shard_dir, shards):
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        ids.extend(shard_ids)
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    manifest = IndexManifest(dim=dim, count=len(ids), index_type=index_type, **manifest_fields)
    return PassageIndex(index, ids, manifest)


def build_faiss(cfg, report: dict, *, echo: Callable[[str], None] = print) -> Path:
    """FAISS index (or ``index.num_shards`` parts) from the finished shards -> out_dir."""
    import faiss

    ic, paths = cfg.index, resolve_paths(cfg)
    shard_dir, out_dir = Path(paths["shard_dir"]), Path(paths["out_dir"])
    done = finished_shards(shard_dir)
    order = sorted(done)
    if not order or order != list(range(len(order))):
        raise ValueError(f"{shard_dir}: shards {order} are not all finished; rerun `imprag index build`")
    dim = int(np.load(shard_dir / f"{_shard_name(0)}.npy", mmap_mode="r").shape[1])
    try:
        probe = faiss.index_factory(dim, ic.type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"index.type {ic.type!r} is not a valid FAISS factory string for dim {dim} "
            "(e.g. 'Flat', 'IVF1024,PQ64' with 64 dividing the dim, 'HNSW32')"
        ) from err
    sample = train_sample(shard_dir, done, ic.train_sample, ic.seed) if not probe.is_trained else None
    fields = {k: report[k] for k in ("checkpoint_hash", "retrieval_layer", "post_rope", "corpus_fingerprint")}
    fields.update(nprobe=ic.nprobe, ef_search=ic.ef_search)  # recorded; applied at every load
    use_gpu = ic.gpu_faiss and faiss.get_num_gpus() > 0
    if ic.num_shards > len(order):
        raise ValueError(
            f"index.num_shards={ic.num_shards} > {len(order)} embedding shards; lower index.num_shards "
            "or index.shard_size"
        )
    groups = [list(g) for g in np.array_split(np.array(order), ic.num_shards)]
    parts = [
        _build_part(shard_dir, [int(s) for s in g], dim, ic.type, sample, fields, use_gpu) for g in groups
    ]
    if ic.num_shards == 1:
        parts[0].save(out_dir)
    else:
        save_parts(parts, out_dir)
    echo(f"index: {ic.type} over {sum(len(p) for p in parts)} passages in {len(parts)} part(s) -> {out_dir}")
    return out_dir


def build_index(cfg, *, echo: Callable[[str], None] = print, address: str | None = None) -> dict:
    """Encode the corpus with Ray Data (resuming finished shards) and build the FAISS index.

    Uses the Ray this process is connected to (the demo's), else joins ``address`` /
    ``RAY_ADDRESS`` / a new local Ray. Returns the report of :func:`encode_shards` plus
    ``out_dir``.
    """
    report = encode_shards(cfg, echo=echo, address=address)
    out_dir = build_faiss(cfg, report, echo=echo)
    return {**report, "out_dir": str(out_dir)}
