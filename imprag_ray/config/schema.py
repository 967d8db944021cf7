"""Job configuration: one YAML per runnable job (``jobs/*.yaml``) -> frozen dataclasses.

Choices the paper leaves open (DESIGN §1 "Not given by the paper") are all here, with
the defaults we use and why:

* ``train.lambda_ret`` (1.0): J_ret and J_gen are both O(1) nats; equal weight.
* ``train.tau_nce`` (1.0), ``tau_t`` (1.0), ``tau_r`` (1.0): dot products of un-normalised
  layer-b projections are already well scaled for small models; raise tau_t to soften
  the LM teacher when answers are long.
* ``teacher.num_positives`` (5, as the paper), ``teacher.hard_negative_ranks`` (10..50,
  as the paper), ``teacher.num_hard_negatives`` (2).
* Index staleness: the training loop never searches an index; warmup uses teacher
  labels and in-batch passages, self-distillation re-embeds the teacher's candidates
  with the current weights every step, so nothing is stale. Evaluation re-encodes the
  corpus with the current bottom layers (``imprag_ray.index``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from imprag_ray.config.loader import ConfigError

RETRIEVAL_FORMATS = ("qa", "fact_check", "slot_filling", "entity_linking")
ALL_FORMATS = (*RETRIEVAL_FORMATS, "instruction", "corpus_text")


@dataclass(frozen=True)
class TaskFile:
    """One KILT-format task file and the template format of its inputs."""

    path: str = field(metadata={"path": "file"})
    format: Literal["qa", "fact_check", "slot_filling", "entity_linking", "instruction", "corpus_text"]
    limit: int | None = None  # use only the first N examples

    def validate(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ConfigError.at("limit", f"must be > 0 or null, got {self.limit}")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint and the ImpRAG split (null = the value saved in the checkpoint)."""

    path: str = field(metadata={"path": "dir"})
    retrieval_layer: int | None = None  # b
    reader_last_layer: int | None = None  # t
    max_passage_tokens: int | None = None  # l_max
    num_passages: int | None = None  # k
    post_rope: bool | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        b, t = self.retrieval_layer, self.reader_last_layer
        if b is not None and b < 0:
            raise ConfigError.at("retrieval_layer", f"must be >= 0, got {b}")
        if b is not None and t is not None and b >= t:
            raise ConfigError.at(
                "retrieval_layer", f"b must be < reader_last_layer (t={t}), got b={b}; lower b or raise t"
            )
        for key in ("max_passage_tokens", "num_passages"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError.at(key, f"must be > 0, got {value}")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = field(metadata={"path": "file"})
    train: tuple[TaskFile, ...] = ()
    dev: tuple[TaskFile, ...] = ()
    eval: tuple[TaskFile, ...] = ()
    max_prompt_tokens: int = 128
    max_target_tokens: int = 48
    shuffle_context: bool = True  # random order of the teacher's top-k in the reader's context

    def validate(self) -> None:
        for key in ("max_prompt_tokens", "max_target_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher retriever for pseudo labels / candidates (registry name + optional path)."""

    kind: Literal["bm25", "dense", "labels"] = "bm25"
    path: str | None = field(default=None, metadata={"path": "any"})
    num_positives: int = 5
    hard_negative_ranks: tuple[int, int] = (10, 50)
    num_hard_negatives: int = 2
    num_candidates: int = 8  # self-distillation candidates per query

    def validate(self) -> None:
        if self.kind != "bm25" and self.path is None:
            raise ConfigError.at("path", f"teacher kind {self.kind!r} needs a path (model dir or labels file)")
        lo, hi = self.hard_negative_ranks
        if not 0 <= lo < hi:
            raise ConfigError.at("hard_negative_ranks", f"need 0 <= lo < hi, got [{lo}, {hi}]")
        for key in ("num_positives", "num_candidates"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")
        if self.num_hard_negatives < 0:
            raise ConfigError.at("num_hard_negatives", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the two-stage schedule (warmup NCE, then self-distillation)."""

    mode: Literal["imprag", "closed_book"] = "imprag"
    epochs: int = 10
    warmup_epochs: int = 3
    steps_per_epoch: int | None = None  # null = one pass over the training mix
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lambda_ret: float = 1.0
    tau_nce: float = 1.0
    tau_t: float = 1.0
    tau_r: float = 1.0
    eval_every: int = 0  # steps; 0 = at the end of each epoch only
    log_every: int = 10
    save_every_epochs: int = 1

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "log_every", "save_every_epochs"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError.at("warmup_epochs", f"must be in 0..epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.lr <= 0:
            raise ConfigError.at("lr", f"must be > 0, got {self.lr}")
        for key in ("tau_nce", "tau_t", "tau_r"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"temperature must be > 0, got {getattr(self, key)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ConfigError.at("steps_per_epoch", "must be > 0 or null")


@dataclass(frozen=True)
class EvalConfig:
    top_k: int | None = None  # passages retrieved per query (null = model.num_passages)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    max_new_tokens: int = 12
    batch_size: int = 32
    limit: int | None = None  # examples per eval file (null = all)

    def validate(self) -> None:
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError.at("top_k", f"must be > 0, got {self.top_k}")
        if self.max_new_tokens <= 0:
            raise ConfigError.at("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TrainJobConfig:
    """``imprag train``: model + data + teacher + schedule + evaluation."""

    name: str
    output_dir: str
    model: ModelConfig
    data: DataConfig
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (null = torch default)
