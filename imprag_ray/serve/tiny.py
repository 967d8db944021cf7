"""A tiny servable world for tests, benchmarks and the local demo (Ray-free).

Synthetic corpus, a small random checkpoint and the FAISS index of its layer-b passage
embeddings, built with :meth:`PassageIndex.build` over :meth:`ImpRAGModel.embed_passages`
(the Ray Data ``imprag index build`` produces the same artefact at scale).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY_SHAPE = dict(
    hidden_size=96,
    intermediate_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=24,
    retrieval_layer=1,
    reader_last_layer=2,
    max_passage_tokens=48,
    num_passages=3,
)


def build_passage_index(
    checkpoint: str | Path,
    corpus: str | Path,
    out_dir: str | Path,
    index_type: str = "Flat",
    batch_size: int = 64,
) -> Path:
    """Embed every corpus passage with the checkpoint's bottom layers and save the index."""
    import numpy as np
    import torch

    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.tokenized import PassageStore
    from imprag_ray.index.store import PassageIndex, corpus_fingerprint
    from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
    from imprag_ray.serve.versions import load_bottom_model

    model = load_bottom_model(str(checkpoint))
    store = PassageStore(list(iter_corpus(corpus)), load_tokenizer(checkpoint), model.l_max)

    def shards():
        for start in range(0, len(store.order), batch_size):
            ids = store.order[start : start + batch_size]
            tok, mask = store.tensor(ids)
            width = max(int(mask.sum(1).max()), 1)
            with torch.no_grad():
                emb = model.embed_passages(tok[:, :width], mask[:, :width])  # [n, h_kv * d_h]
            yield ids, emb.float().numpy().astype(np.float32)

    manifest = {
        "checkpoint_hash": checkpoint_hash(checkpoint),
        "retrieval_layer": model.b,
        "post_rope": model.imprag_config.post_rope,
        "corpus_fingerprint": corpus_fingerprint(corpus),
    }
    index = PassageIndex.build(
        shards(), dim=model.embedding_dim, index_type=index_type, train_sample=None, manifest_fields=manifest
    )
    return index.save(out_dir)


def perturbed_checkpoint(src: str | Path, out_dir: str | Path, seed: int = 1, scale: float = 0.5) -> Path:
    """A copy of ``src`` with re-drawn LM head and top-layer weights: another version of
    the same architecture (different hash, different generations), for hot-swap tests."""
    import torch

    from imprag_ray.model.imprag import ImpRAGModel

    model = ImpRAGModel.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lm_head" in name or "layers.0." in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale * param.std().clamp_min(1e-3))
    model.save_pretrained(out_dir)
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) and f.is_file():
            shutil.copy(f, Path(out_dir) / f.name)
    return Path(out_dir)


def build_tiny_servable(root: str | Path, n_passages: int = 200, seed: int = 0) -> dict[str, Path]:
    """world/ (corpus + tasks), ckpt/ (random tiny model), index/ under ``root``."""
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.synth import synthesize
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import llama_like

    root = Path(root)
    world, ckpt, index = root / "world", root / "ckpt", root / "index"
    if not (world / "corpus.jsonl").exists():
        synthesize(world, seed=seed + 1, n_passages=n_passages, overwrite=world.exists())
    if not (ckpt / "model.safetensors").exists():
        texts = [format_passage(p) for p in iter_corpus(world / "corpus.jsonl")]
        init_checkpoint(llama_like(**TINY_SHAPE), texts, ckpt, seed=seed, vocab_size=1200)
    if not (index / "manifest.json").exists():
        build_passage_index(ckpt, world / "corpus.jsonl", index)
    return {
        "root": root,
        "world": world,
        "corpus": world / "corpus.jsonl",
        "checkpoint": ckpt,
        "index": index,
    }
