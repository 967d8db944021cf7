"""Checkpoint versions served by both stages, and what each stage loads for one version.

A *version* is (checkpoint dir, index dir, checkpoint hash). Every request is pinned to
one version when it arrives at the ingress: the retrieval stage searches that version's
index with that version's bottom layers, and the generation stage decodes with that
version's full model (DESIGN §2 "one checkpoint, both stages"). Replicas may hold two
versions at once during a hot swap (:mod:`imprag_ray.serve.control`).

This module has no Ray import: loading is plain torch / FAISS, usable in a notebook.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imprag_ray.config.serve_schema import ModelExpectation


@dataclass(frozen=True)
class Version:
    checkpoint: str
    index: str
    hash: str  # checkpoint_hash(checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Version:
        return cls(**data)


class VersionMismatchError(ValueError):
    """A checkpoint on disk is not the version a request or a config names."""


def make_version(checkpoint: str, index: str, expect: ModelExpectation | None = None) -> Version:
    """Hash the checkpoint, check it against ``expect`` and check that the index manifest
    names it (without loading the index), so a bad reload fails before any replica loads."""
    from imprag_ray.index.store import IndexMismatchError
    from imprag_ray.model.checkpoint import checkpoint_hash

    ckpt, idx = Path(checkpoint).resolve(), Path(index).resolve()
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint: directory not found: {ckpt}")
    manifest_path = idx / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"index: {idx} has no manifest.json; build the index for this checkpoint")
    digest = checkpoint_hash(ckpt)
    check_expectation(ckpt, expect)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("checkpoint_hash") != digest:
        raise IndexMismatchError(
            f"index: {idx} was built with checkpoint {str(manifest.get('checkpoint_hash'))[:12]}, "
            f"but {ckpt} is {digest[:12]}; build the index with this checkpoint"
        )
    return Version(str(ckpt), str(idx), digest)


def check_expectation(checkpoint: str | Path, expect: ModelExpectation | None) -> dict:
    """Compare ``imprag_config.json`` with the config's ``model`` section; returns it."""
    from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME

    saved = json.loads((Path(checkpoint) / IMPRAG_CONFIG_NAME).read_text())
    if expect is None:
        return saved
    for key in ("retrieval_layer", "reader_last_layer", "num_passages"):
        want = getattr(expect, key)
        if want is not None and saved.get(key) != want:
            raise VersionMismatchError(
                f"model.{key}: the config expects {want} but checkpoint {checkpoint} has "
                f"{saved.get(key)}; fix the config or serve the right checkpoint"
            )
    return saved


def load_bottom_model(checkpoint: str, dtype: str = "float32"):
    """An :class:`ImpRAGModel` holding only what stage 1 needs: embeddings, layers 0..b
    (layer b for its q/k projections), rotary embedding. The other layers and the LM head
    are never materialised, so a retrieval replica of Llama-3.2-3B (b=7) holds 8 of 28
    layers. Only ``encode_prompt`` / ``embed_queries`` / ``embed_passages`` may be used.
    """
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME, ImpRAGConfig, ImpRAGModel

    saved = json.loads((Path(checkpoint) / IMPRAG_CONFIG_NAME).read_text())
    config = ImpRAGConfig(**saved)
    hf_config = AutoConfig.from_pretrained(checkpoint)
    config.check(hf_config.num_hidden_layers)
    hf_config.num_hidden_layers = config.retrieval_layer + 1
    if getattr(hf_config, "layer_types", None):
        hf_config.layer_types = hf_config.layer_types[: hf_config.num_hidden_layers]
    hf_config.tie_word_embeddings = False  # keep embed_tokens even if the head was tied
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped layers are "unexpected keys": by design
    try:
        lm = AutoModelForCausalLM.from_pretrained(checkpoint, config=hf_config, dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    lm.lm_head = nn.Identity()  # stage 1 never produces logits
    model = ImpRAGModel.__new__(ImpRAGModel)  # skip the t < N check: layers > b are absent
    nn.Module.__init__(model)
    model.lm = lm.eval()
    model.imprag_config = config
    return model


class VersionCache:
    """Thread-safe ``hash -> loaded state`` map with at-most-once loading per version."""

    def __init__(self, loader: Callable[[Version], Any], on_drop: Callable[[Any], None] | None = None):
        self._loader = loader
        self._on_drop = on_drop
        self._items: dict[str, Any] = {}
        self._versions: dict[str, Version] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def held(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def peek(self, digest: str) -> Any:
        """The loaded state of a held version, or None (never loads)."""
        with self._lock:
            return self._items.get(digest)

    def get(self, version: Version) -> Any:
        """The loaded state of ``version``, loading it first when absent (blocking)."""
        with self._lock:
            if version.hash in self._items:
                return self._items[version.hash]
            load_lock = self._load_locks.setdefault(version.hash, threading.Lock())
        with load_lock:
            with self._lock:
                if version.hash in self._items:
                    return self._items[version.hash]
            item = self._loader(version)
            with self._lock:
                self._items[version.hash] = item
                self._versions[version.hash] = version
            return item

    def keep_only(self, hashes: set[str]) -> list[str]:
        """Drop versions not in ``hashes``; nothing is dropped unless a wanted version is
        held (a replica never ends up empty). Returns the dropped hashes."""
        with self._lock:
            if not any(h in hashes for h in self._items):
                return []
            drop = [h for h in self._items if h not in hashes]
            dropped = [self._items.pop(h) for h in drop]
            for h in drop:
                self._versions.pop(h, None)
        if self._on_drop is not None:
            for item in dropped:
                self._on_drop(item)
        return drop
