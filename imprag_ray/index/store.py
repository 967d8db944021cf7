"""On-disk passage indexes with a manifest naming the checkpoint they were built with.

An index of layer-b passage embeddings is only meaningful for the bottom-layer weights
that produced it (DESIGN §2): a query embedding from other weights lives in another
space and search silently returns garbage. So every index directory carries
``manifest.json`` (checkpoint content hash, b, pre/post-RoPE, dim, count, FAISS factory
string, corpus fingerprint) and :meth:`PassageIndex.load` refuses a checkpoint whose
hash differs. It also refuses a manifest that does not describe the files next to it
(an unknown ``version``, a ``dim`` other than the FAISS index's, a ``count`` other than
the index's and the ids file's: :class:`IndexManifestError`), and :func:`check_corpus`
refuses a corpus other than the one the index was built from.

Layout of an index directory (written atomically: temp dir, then rename)::

    index.faiss     the FAISS index (inner product)
    ids.json        passage ids in index order
    manifest.json   IndexManifest

The manifest also records the search settings of approximate indexes (``nprobe``: IVF
lists visited per query; ``ef_search``: HNSW candidate list size), applied whenever the
index is loaded (a loader may override them): FAISS itself defaults to one IVF list,
which on an IVF65536 index visits 1/65536 of the corpus. An index in parts is loaded by
:func:`imprag_ray.index.parts.load_index`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from imprag_ray.data.io import atomic_dir
from imprag_ray.index.flat import IdIndex

MANIFEST_VERSION = 1
# Manifest versions this code reads. A manifest of a newer layout may mean something
# else by the same fields; refusing it beats searching with a misread index.
SUPPORTED_MANIFEST_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"

log = logging.getLogger(__name__)


class IndexMismatchError(ValueError):
    """The index was built by other bottom-layer weights (or settings) than the model."""


class IndexManifestError(ValueError):
    """manifest.json is unreadable, of an unknown version, or does not describe the
    index files next to it (dim, count)."""


class CorpusMismatchError(IndexMismatchError):
    """The corpus given is not the one the index was built from: its ids would point at
    other passages (or at none)."""


@dataclass(frozen=True)
class IndexManifest:
    checkpoint_hash: str
    retrieval_layer: int  # b
    post_rope: bool
    dim: int
    count: int
    index_type: str  # FAISS factory string, e.g. "Flat", "IVF1024,PQ64", "HNSW32"
    # corpus_fingerprint() of the corpus the index was built from ("": not recorded)
    corpus_fingerprint: str = ""
    version: int = MANIFEST_VERSION
    nprobe: int | None = None  # IVF lists searched per query (null: FAISS's default, 1)
    ef_search: int | None = None  # HNSW efSearch (null: FAISS's default, 16)


def read_manifest(index_dir: str | os.PathLike) -> IndexManifest:
    """The manifest of ``index_dir`` (a single index or an index in parts), checked for
    what can be checked without the index files: a known ``version``, no unknown or
    missing field, integer ``dim`` > 0 and ``count`` >= 0.

    Raises FileNotFoundError (no manifest.json) or IndexManifestError naming the field.
    """
    path = Path(index_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{index_dir}: no {MANIFEST_NAME}; rebuild the index with `imprag index build`"
        )
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise IndexManifestError(f"{path} is not valid JSON ({err}); rebuild the index") from None
    if not isinstance(raw, dict):
        raise IndexManifestError(
            f"{path} holds a JSON {type(raw).__name__}, not an object; rebuild the index"
        )
    version = raw.get("version")
    if isinstance(version, bool) or version not in SUPPORTED_MANIFEST_VERSIONS:
        raise IndexManifestError(
            f"{path}: manifest version {version!r} is not one this imprag-ray reads "
            f"({', '.join(map(str, SUPPORTED_MANIFEST_VERSIONS))}); load it with the imprag-ray that "
            "built it, or rebuild the index with `imprag index build`"
        )
    known = {f.name: f for f in fields(IndexManifest)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise IndexManifestError(
            f"{path}: unknown manifest field(s) {unknown} for version {version}; the manifest was "
            "edited or written by another imprag-ray: rebuild the index"
        )
    missing = sorted(n for n, f in known.items() if n not in raw and f.default is MISSING)
    if missing:
        raise IndexManifestError(f"{path}: manifest field(s) {missing} missing; rebuild the index")
    for key, low in (("dim", 1), ("count", 0)):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise IndexManifestError(
                f"{path}: manifest {key}={value!r} is not an integer >= {low}; rebuild the index"
            )
    return IndexManifest(**raw)


def corpus_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a corpus: of a local file's bytes; of a local directory or pyarrow URI
    (``s3://...``), over every file's relative name and bytes, in name order. Streamed.

    Why a hash of every byte and not a sample (size + first/last MiB): the failures it
    must catch are a corpus re-chunked, filtered, re-ordered or edited in the middle, with
    the same size and often the same first and last lines; a sample misses those. The
    cost is one sequential read (sha256 runs at ~1 GB/s per core: ~15 s for a 15 GB
    passage file), paid where the corpus is read in full anyway (the index build; the
    Serve retrieval stage parses the whole corpus into memory). It is also the digest the
    pretraining records (``corpus_sha256``), so the same bytes give the same value there.
    """
    if "://" not in str(path) and Path(path).is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    import pyarrow.fs as pafs

    corpus = str(path)
    fs, root = pafs.FileSystem.from_uri(corpus if "://" in corpus else str(Path(corpus).resolve()))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"corpus {corpus!r} does not exist")
    files = (
        [root]
        if info.type == pafs.FileType.File
        else sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.is_file)
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file[len(root) :].encode())
        with fs.open_input_stream(file) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_corpus(index_dir: str | os.PathLike, corpus_path: str | os.PathLike) -> str | None:
    """Refuse ``corpus_path`` unless it is the corpus ``index_dir`` was built from.

    Compares :func:`corpus_fingerprint` of ``corpus_path`` (a file, directory or pyarrow
    URI) with the fingerprint in the index manifest (single index or index in parts).
    Returns the fingerprint, or None for an index whose manifest records none (built by an
    older imprag-ray: accepted, with a warning logged).

    Raises FileNotFoundError (no manifest, no corpus), IndexManifestError (bad manifest)
    or CorpusMismatchError naming ``corpus``.
    """
    manifest = read_manifest(index_dir)
    if not manifest.corpus_fingerprint:
        log.warning(
            "%s: the index manifest records no corpus fingerprint (an index built by an older "
            "imprag-ray); corpus %s is used unchecked. Rebuild the index to have it checked.",
            index_dir,
            corpus_path,
        )
        return None
    have = corpus_fingerprint(corpus_path)
    if have != manifest.corpus_fingerprint:
        raise CorpusMismatchError(
            f"corpus {str(corpus_path)!r} (sha256 {have[:12]}) is not the corpus the index {index_dir} "
            f"was built from (sha256 {manifest.corpus_fingerprint[:12]}): its passage ids would name "
            "other passages or none; serve the corpus the index was built from, or rebuild the index "
            "from this corpus with `imprag index build`"
        )
    return have


def _faiss():
    import faiss

    return faiss


def set_search_params(index, *, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
    """Set ``nprobe`` on the IVF level and ``efSearch`` on the HNSW level of one FAISS index
    (through IndexPreTransform / IndexRefine / IndexIDMap wrappers); settings that do not
    apply to the index type are skipped. ``nprobe`` is clamped to the IVF's list count.
    Returns what was set, e.g. ``{"nprobe": 32}``."""
    faiss = _faiss()
    applied: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = min(int(nprobe), int(ivf.nlist))
        applied["nprobe"] = int(ivf.nprobe)
    hnsw = _hnsw_level(index)
    if ef_search is not None and hnsw is not None:
        hnsw.hnsw.efSearch = int(ef_search)
        applied["ef_search"] = int(ef_search)
    return applied


def _hnsw_level(index):
    """The IndexHNSW inside ``index`` (unwrapping single-index wrappers), or None."""
    faiss = _faiss()
    current = faiss.downcast_index(index)
    for _ in range(8):  # wrappers nest a few levels at most
        if hasattr(current, "hnsw"):
            return current
        inner = getattr(current, "index", None)  # IndexPreTransform, IndexRefine, IndexIDMap
        if inner is None:
            return None
        current = faiss.downcast_index(inner)
    return None


class PassageIndex(IdIndex):
    """A FAISS inner-product index over passage embeddings + ids + manifest."""

    def __init__(self, index, ids: Sequence[str], manifest: IndexManifest):
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index, self.ids, self.manifest = index, list(ids), manifest
        # Sub-indexes of an index in parts (faiss.IndexShards does not own them; they must
        # stay alive as long as it does); empty for a single index.
        self.parts: list[PassageIndex] = []

    def set_search(self, *, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
        """Apply IVF ``nprobe`` / HNSW ``ef_search`` to this index, or to every part of an
        index in parts (see :func:`set_search_params`). Returns what was set."""
        applied: dict[str, int] = {}
        for part in self.parts or [self]:
            applied.update(set_search_params(part.index, nprobe=nprobe, ef_search=ef_search))
        return applied

    @classmethod
    def build(
        cls,
        shards: Iterable[tuple[Sequence[str], np.ndarray]],
        *,
        dim: int,
        index_type: str,
        train_sample: np.ndarray | None,
        manifest_fields: dict,
    ) -> PassageIndex:
        """Build from embedding shards ``(ids, [n, dim] float32)`` added one at a time.

        Index types that need training (IVF, PQ) are trained on ``train_sample`` first.
        """
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(
                f"index.type {index_type!r} is not a valid FAISS factory string "
                "(e.g. 'Flat', 'IVF1024,PQ64', 'HNSW32')"
            ) from err
        if not index.is_trained:
            if train_sample is None or len(train_sample) == 0:
                raise ValueError(f"index.type {index_type!r} needs training vectors (a corpus sample)")
            index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
        ids: list[str] = []
        for shard_ids, emb in shards:
            if emb.shape != (len(shard_ids), dim):
                raise ValueError(
                    f"shard of {len(shard_ids)} ids has embeddings {emb.shape}, expected [n, {dim}]"
                )
            index.add(np.ascontiguousarray(emb, dtype=np.float32))
            ids.extend(shard_ids)
        manifest = IndexManifest(dim=dim, count=len(ids), index_type=index_type, **manifest_fields)
        built = cls(index, ids, manifest)
        built.set_search(nprobe=manifest.nprobe, ef_search=manifest.ef_search)
        return built

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write index, ids and manifest atomically (temp dir next to ``out_dir``, rename)."""
        faiss = _faiss()
        out_dir = Path(out_dir)
        with atomic_dir(out_dir, overwrite=True) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "ids.json").write_text(json.dumps(self.ids))
            (tmp / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=2))
        return out_dir

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        *,
        checkpoint_hash: str,
        retrieval_layer: int | None = None,
        post_rope: bool | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> PassageIndex:
        """Load an index, refusing one built with another checkpoint or embedding setting.

        The manifest's ``nprobe`` / ``ef_search`` are applied; the arguments override them.
        """
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if manifest.checkpoint_hash != checkpoint_hash:
            raise IndexMismatchError(
                f"{index_dir} was built with checkpoint {manifest.checkpoint_hash[:12]}, but the model "
                f"is checkpoint {checkpoint_hash[:12]}: its passage embeddings come from other "
                "bottom-layer weights and search would be silently wrong; rebuild the index for "
                "this checkpoint or load the checkpoint the index was built with"
            )
        for key, want in (("retrieval_layer", retrieval_layer), ("post_rope", post_rope)):
            if want is not None and getattr(manifest, key) != want:
                raise IndexMismatchError(
                    f"{index_dir} was built with {key}={getattr(manifest, key)} but the model uses "
                    f"{key}={want}; rebuild the index with the model's settings"
                )
        index = _faiss().read_index(str(index_dir / "index.faiss"))
        ids = json.loads((index_dir / "ids.json").read_text())
        _check_files(index_dir, manifest, index, ids)
        loaded = cls(index, ids, manifest)
        loaded.set_search(
            nprobe=manifest.nprobe if nprobe is None else nprobe,
            ef_search=manifest.ef_search if ef_search is None else ef_search,
        )
        return loaded


def _check_files(index_dir: Path, manifest: IndexManifest, index, ids) -> None:
    """Refuse a manifest whose dim / count are not the FAISS index's and the ids file's:
    such a manifest was edited or belongs to other files, so nothing else it says (the
    checkpoint, the corpus) can be trusted either."""
    where = index_dir / MANIFEST_NAME
    if int(index.d) != manifest.dim:
        raise IndexManifestError(
            f"{where}: manifest dim={manifest.dim} but index.faiss holds vectors of d={index.d}; the "
            "manifest does not describe this index: rebuild the index with `imprag index build`"
        )
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexManifestError(
            f"{index_dir}/ids.json is not a list of passage id strings; rebuild the index"
        )
    if not manifest.count == int(index.ntotal) == len(ids):
        raise IndexManifestError(
            f"{where}: manifest count={manifest.count} but index.faiss holds {index.ntotal} vectors "
            f"and ids.json {len(ids)} ids; the manifest does not describe these files: rebuild the "
            "index with `imprag index build`"
        )
