"""Indexes in parts, and the one loader every consumer uses (Ray-free).

``imprag index build`` with ``index.num_shards > 1`` writes a corpus's index as that many
parts, for corpora whose index does not fit one device::

    parts.json      ["part-000", "part-001", ...]
    manifest.json   the parts' manifest with the total count
    part-000/       a single index directory (index.faiss, ids.json, manifest.json)
    ...

:func:`load_index` opens either layout: a single index directory as
:meth:`PassageIndex.load` does, or the parts joined in one ``faiss.IndexShards`` (ids
successive, part by part). Batch inference (``imprag batch``), the Serve retrieval stage
and the index build all load through it, so an index that one of them can open the
others can too. Every part is checked against the checkpoint, and the search settings
(IVF ``nprobe``, HNSW ``ef_search``; the manifest's unless overridden) are set on every part.

The top-level manifest is what readers that do not open the index look at (the Serve
version check, :func:`imprag_ray.index.store.check_corpus`), so it is checked as well: a
known version, the parts' dim, their total count, and the parts' checkpoint, settings and
corpus fingerprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from imprag_ray.data.io import atomic_dir
from imprag_ray.index.store import IndexManifestError, PassageIndex, read_manifest

PARTS_FILE = "parts.json"


def part_name(i: int) -> str:
    return f"part-{i:03d}"


def save_parts(parts: Sequence[PassageIndex], out_dir: str | os.PathLike) -> Path:
    """Write ``parts`` (same checkpoint, dim and type) as one index in parts, atomically."""
    if not parts:
        raise ValueError("save_parts needs at least one part")
    for key in _SHARED_FIELDS:  # the top-level manifest speaks for every part
        values = {getattr(p.manifest, key) for p in parts}
        if len(values) != 1:
            raise ValueError(
                f"save_parts: the parts differ in {key} ({sorted(map(str, values))}); "
                "build every part with the same checkpoint, settings and corpus"
            )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for i, part in enumerate(parts):
            part.save(tmp / part_name(i))
        manifest = replace(parts[0].manifest, count=sum(len(p) for p in parts))
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        (tmp / PARTS_FILE).write_text(json.dumps([part_name(i) for i in range(len(parts))]))
    return out_dir


def is_index_in_parts(index_dir: str | os.PathLike) -> bool:
    return (Path(index_dir) / PARTS_FILE).exists()


def load_index(
    index_dir: str | os.PathLike,
    *,
    checkpoint_hash: str,
    retrieval_layer: int | None = None,
    post_rope: bool | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> PassageIndex:
    """Load a single index or an index in parts (``IndexShards``), refusing one built with
    another checkpoint or embedding setting (``IndexMismatchError``).

    ``nprobe`` / ``ef_search`` override the values recorded in the manifest at build time
    (null: the manifest's); they are set on every part.
    """
    index_dir = Path(index_dir)

    def load_one(directory: Path) -> PassageIndex:
        return PassageIndex.load(
            directory,
            checkpoint_hash=checkpoint_hash,
            retrieval_layer=retrieval_layer,
            post_rope=post_rope,
            nprobe=nprobe,
            ef_search=ef_search,
        )

    if not is_index_in_parts(index_dir):
        return load_one(index_dir)
    import faiss

    top = read_manifest(index_dir)  # version and field checks before any part is read
    names = json.loads((index_dir / PARTS_FILE).read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
        raise IndexManifestError(f"{index_dir}/{PARTS_FILE} is not a list of part names; rebuild the index")
    if not names:
        raise FileNotFoundError(f"{index_dir}/{PARTS_FILE} lists no parts; rebuild the index")
    parts = [load_one(index_dir / name) for name in names]
    dims = {p.manifest.dim for p in parts}
    if len(dims) != 1:
        raise ValueError(f"{index_dir}: its parts have different dims {sorted(dims)}; rebuild the index")
    _check_top_manifest(index_dir, top, parts, names)
    shards = faiss.IndexShards(parts[0].manifest.dim, False, True)  # threaded=False, successive_ids=True
    for p in parts:
        shards.add_shard(p.index)
    merged = PassageIndex(
        shards,
        [i for p in parts for i in p.ids],
        replace(parts[0].manifest, count=sum(len(p) for p in parts)),
    )
    merged.parts = parts  # keeps the sub-indexes alive (IndexShards does not own them)
    return merged


# Fields every part shares with the top-level manifest (count is the parts' sum instead;
# nprobe / ef_search are applied per part from the parts' own manifests).
_SHARED_FIELDS = (
    "checkpoint_hash",
    "retrieval_layer",
    "post_rope",
    "dim",
    "index_type",
    "corpus_fingerprint",
)


def _show(value) -> str:
    """A manifest value for an error message (hashes cut to 16 characters)."""
    return repr(value[:16] if isinstance(value, str) else value)


def _check_top_manifest(index_dir: Path, top, parts: Sequence[PassageIndex], names: list[str]) -> None:
    """Refuse a top-level manifest that does not describe its parts (see module doc)."""
    where = index_dir / "manifest.json"
    for name, part in zip(names, parts, strict=True):
        for key in _SHARED_FIELDS:
            if getattr(top, key) != getattr(part.manifest, key):
                raise IndexManifestError(
                    f"{where}: manifest {key}={_show(getattr(top, key))} but part {name} has "
                    f"{key}={_show(getattr(part.manifest, key))}; the manifest does not describe "
                    "its parts: rebuild the index with `imprag index build`"
                )
    total = sum(len(p) for p in parts)
    if top.count != total:
        raise IndexManifestError(
            f"{where}: manifest count={top.count} but its {len(parts)} parts hold {total} passages; "
            "the manifest does not describe its parts: rebuild the index with `imprag index build`"
        )
