"""A small synthetic world + tiny random checkpoint + job YAML, built once per session."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_OVERRIDES = dict(hidden_size=96, intermediate_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=24, retrieval_layer=1, reader_last_layer=2,
                      max_passage_tokens=48, num_passages=3,
                      tie_word_embeddings=False)


def job_dict(root: Path, world: Path, ckpt: Path, **train) -> dict:
    """A training job over ``world`` (qa + instruction + corpus text), short schedule."""
    fmt = {"qa": "qa", "slot_filling": "slot_filling", "fact_check": "fact_check",
           "entity_linking": "entity_linking"}
    return {
        "name": "test",
        "output_dir": str(root / "run"),
        "threads": 1,
        "model": {"path": str(ckpt)},
        "data": {
            "corpus": str(world / "corpus.jsonl"),
            "train": [
                {"path": str(world / "train/qa.jsonl"), "format": "qa"},
                {"path": str(world / "train/instruction.jsonl"), "format": "instruction"},
                {"path": str(world / "train/corpus_text.jsonl"), "format": "corpus_text"},
            ],
            "dev": [{"path": str(world / "dev/qa.jsonl"), "format": "qa"}],
            "eval": [{"path": str(world / f"eval/{name}.jsonl"), "format": f} for name, f in fmt.items()],
            "max_prompt_tokens": 80,
            "max_target_tokens": 40,
        },
        "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 3, "batch_size": 8,
                  "log_every": 1, **train},
        "eval": {"top_k": 3, "recall_ks": [1, 3, 10], "max_new_tokens": 6, "limit": 12},
    }


def build_tiny_world(root: Path, n_passages: int = 300) -> dict:
    """Synthesize a world, init a small random checkpoint, write a job YAML."""
    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.synth import synthesize
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import init_checkpoint
    from imprag_ray.model.presets import llama_like

    world = root / "world"
    synthesize(world, seed=1, n_passages=n_passages)
    ckpt = root / "init"
    texts = [format_passage(p) for p in iter_corpus(world / "corpus.jsonl")]
    init_checkpoint(llama_like(**TINY_OVERRIDES), texts, ckpt, seed=0, vocab_size=1500)
    job = root / "job.yaml"
    job.write_text("# test job\n" + yaml.safe_dump(job_dict(root, world, ckpt)))
    return {"root": root, "world": world, "ckpt": ckpt, "job": job}
