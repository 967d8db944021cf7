"""Job configuration: one YAML per runnable job (``jobs/*.yaml``) -> frozen dataclasses.

Choices the paper leaves open (DESIGN §1 "Not given by the paper") are all here, with
the defaults we use and why:

* ``train.lambda_ret`` (1.0): J_ret and J_gen are both O(1) nats; equal weight. The tiny demo
  model uses 0.1: at 1.0 the retrieval loss took over its few bottom weights and it never
  started to read (``jobs/tiny_synth_pretrain.yaml``).
* ``train.gen_loss_average`` ("token", the usual causal-LM mean): "example" weighs every
  example the same, whatever its response length (a one-token answer vs a passage copy).
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
from typing import Any, Literal

from imprag_ray.config.loader import ConfigError

RETRIEVAL_FORMATS = ("qa", "fact_check", "slot_filling", "entity_linking", "prompt")
ALL_FORMATS = (*RETRIEVAL_FORMATS, "instruction", "corpus_text")


@dataclass(frozen=True)
class TaskFile:
    """One KILT-format task file and the template format of its inputs."""

    path: str = field(metadata={"path": "file"})
    format: Literal["qa", "fact_check", "slot_filling", "entity_linking", "prompt", "instruction", "corpus_text"]
    limit: int | None = None  # use only the first N examples
    # Reader context of training items: "teacher" = the teacher retriever's top-k (the
    # ImpRAG recipe); "gold" = the gold passage (provenance) among k-1 random passages, reader
    # loss only (a reading curriculum; needs provenance on every example).
    context: Literal["teacher", "gold"] = "teacher"

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
    # Training: bfloat16 = mixed precision (fp32 master weights and optimizer state, bf16
    # compute through autocast, or FSDP's MixedPrecisionPolicy under ray.strategy: fsdp) and
    # checkpoints written in bf16; float32 = fp32 throughout.
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
    """Corpus, task files and tokenisation.

    ``chat_template``: wrap every prompt (training items and evaluation prompts) as one user
    turn of the tokenizer's chat template, with the assistant header after it, and end
    training targets with the tokenizer's eos token (``<|eot_id|>`` in a Llama-3 instruct
    snapshot). For instruct checkpoints; base checkpoints keep the default (false: ``<s>`` +
    template text). ``corpus_text`` items stay plain LM text either way.

    ``provenance`` (``passage_id``): how KILT provenance names gold passages. ``passage_id``:
    a provenance ``wikipedia_id`` IS a passage id of ``corpus`` (what ``imprag data synth``
    writes; the default keeps the demo's numbers). ``page_title``: real KILT over Atlas
    passages, where ``wikipedia_id`` is a Wikipedia PAGE id, not a passage id: the gold passages
    are all corpus passages whose ``title`` is a provenance entry's ``title`` (every entry needs
    one). Recall@k and the recipe ask ``imprag_ray.data.provenance.ProvenanceResolver``.
    """

    corpus: str = field(metadata={"path": "file"})
    train: tuple[TaskFile, ...] = ()
    dev: tuple[TaskFile, ...] = ()
    eval: tuple[TaskFile, ...] = ()
    max_prompt_tokens: int = 128
    max_target_tokens: int = 48
    shuffle_context: bool = True  # random order of the teacher's top-k in the reader's context
    chat_template: bool = False  # prompts as a chat-template user turn (instruct checkpoints)
    provenance: Literal["passage_id", "page_title"] = "passage_id"  # see the docstring

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
    # The example's KILT provenance (gold passage ids), where it has one, ranks first, ahead
    # of the teacher's own list (which still gives the hard negatives and candidates). For
    # training sets with provenance whose inputs the teacher cannot match (a nickname shared
    # by several people, other names around the one that is meant).
    provenance_positives: bool = False

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
    # lr of the retriever side (layers 0..b-1, layer b's input norm + q/k projections);
    # null = lr. Lower than lr lets the reader learn fast without moving the embeddings
    # the retrieval loss is shaping (see ImpRAGModel.retriever_parameter).
    retriever_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lambda_ret: float = 1.0
    # How J_gen averages response tokens: "token" = over all response tokens of the batch (long
    # targets such as passage copies dominate); "example" = each example's mean, then the batch
    # mean, so a one-token QA answer weighs as much as a 40-token copy.
    gen_loss_average: Literal["token", "example"] = "token"
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
        if self.retriever_lr is not None and self.retriever_lr <= 0:
            raise ConfigError.at("retriever_lr", f"must be > 0 or null, got {self.retriever_lr}")
        for key in ("tau_nce", "tau_t", "tau_r"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"temperature must be > 0, got {getattr(self, key)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ConfigError.at("steps_per_epoch", "must be > 0 or null")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during and after training (``ImpRAGRecipe.evaluate``).

    ``corpus_sample``: null = retrieve from the whole corpus, re-encoded with the current
    bottom layers at every evaluation (exact, but a whole-corpus pass per evaluation). N =
    retrieve from a sub-corpus of about N passages: the gold passages of the evaluated
    examples, the teacher's rankings for them where the teacher is already built or is a
    labels file, then a seeded random sample of the corpus up to N (gold passages are always
    kept, even past N). Recall on a sub-corpus is higher than on the whole corpus; the
    metrics carry ``corpus_size`` and ``sub_corpus`` so it is never mistaken for it.
    """

    top_k: int | None = None  # passages retrieved per query (null = model.num_passages)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    max_new_tokens: int = 12
    batch_size: int = 32
    limit: int | None = None  # examples per eval file (null = all)
    corpus_sample: int | None = None  # passages searched at evaluation (null = whole corpus)

    def validate(self) -> None:
        if self.corpus_sample is not None and self.corpus_sample <= 0:
            raise ConfigError.at("corpus_sample", f"must be > 0 or null (whole corpus), got {self.corpus_sample}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError.at("top_k", f"must be > 0, got {self.top_k}")
        if self.max_new_tokens <= 0:
            raise ConfigError.at("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class RayTrainConfig:
    """``ray:`` how ``imprag train`` runs on Ray Train (``imprag_ray.pipelines.train``).

    ``train.batch_size`` is the GLOBAL batch: each of the ``num_workers`` workers takes
    ``batch_size / num_workers`` examples per step, so 1 and N workers see the same
    number of examples per optimiser step. In-batch negatives of the warmup NCE are
    gathered from all workers (differentiable all-gather).

    Index staleness policy (DESIGN §1 leaves it open): training never searches an index.
    Warmup candidates come from the teacher's pseudo labels (positives, hard negatives)
    plus every worker's in-batch passages, embedded with the current weights each step;
    self-distillation re-embeds the teacher's candidates with the current weights every
    step; dev/eval re-encode the whole corpus (or the ``eval.corpus_sample`` sub-corpus)
    with the current bottom layers at evaluation time. So nothing the loss sees is stale.
    A separate periodic re-encoding of the corpus (Ray Data, ``imprag_ray/pipelines/encode.py``) is only needed to mine
    candidates with the model's own retrieval; it is not done during training.
    """

    num_workers: int = 1
    use_gpu: bool = False  # one GPU per worker; NCCL then, gloo on CPU
    cpus_per_worker: float = 1.0
    # extra custom resources per worker, e.g. {node_0: 0.5} to pin workers to a node
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train storage (checkpoints, run state): local dir or URI (s3://, gs://, ...);
    # null = <output_dir>/ray_results
    storage_path: str | None = field(default=None, metadata={"path": "out"})
    run_name: str | None = None  # null = the job's name
    max_failures: int = 0  # automatic restarts from the latest checkpoint; -1 = unlimited
    # fsdp: FSDP2 sharding of params/grads/optimizer (3B/8B), see README; with model.dtype:
    # bfloat16 it computes in bf16 (MixedPrecisionPolicy) and reduces gradients in fp32
    strategy: Literal["ddp", "fsdp"] = "ddp"
    num_to_keep: int | None = None  # checkpoints kept in storage (null = all)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError.at("num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError.at("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        for name, amount in self.resources_per_worker.items():
            if name in ("CPU", "GPU", "memory"):
                fix = "cpus_per_worker" if name == "CPU" else "use_gpu" if name == "GPU" else "a custom resource"
                raise ConfigError.at(f"resources_per_worker.{name}", f"set {name} through {fix}, not here")
            if amount <= 0:
                raise ConfigError.at(f"resources_per_worker.{name}", f"must be > 0, got {amount}")
        if self.storage_path is not None and not self.storage_path.strip():
            raise ConfigError.at("storage_path", "must not be empty; use a directory, a URI or null")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise ConfigError.at("run_name", f"must be a plain name without '/', got {self.run_name!r}")
        if self.max_failures < -1:
            raise ConfigError.at("max_failures", f"must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ConfigError.at("num_to_keep", f"must be >= 1 or null (keep all), got {self.num_to_keep}")


@dataclass(frozen=True)
class IndexConfig:
    """``index:`` corpus encoding into a FAISS index (``imprag index build``,
    ``imprag_ray.pipelines.encode``).

    Encoder actors load only layers 0..b-1 + layer b's projections of ``checkpoint``
    (null = ``model.path``). Embedding shards of ``shard_size`` passages (corpus order)
    go to ``shard_dir`` (null = ``<out_dir>-embeddings``); a rerun skips shards already
    finished there. ``num_shards > 1`` splits the FAISS index into that many parts
    (faiss IndexShards) for corpora that do not fit one device.
    """

    out_dir: str | None = field(default=None, metadata={"path": "out"})  # null = <output_dir>/index
    # null = data.corpus; a path, directory or pyarrow URI (s3://...)
    corpus: str | None = field(default=None, metadata={"path": "out"})
    checkpoint: str | None = field(default=None, metadata={"path": "out"})  # null = model.path
    type: str = "Flat"  # FAISS factory string: Flat, IVF1024,PQ64, HNSW32, ...
    train_sample: int = 65536  # vectors used to train IVF/PQ
    num_shards: int = 1
    shard_size: int = 4096  # passages per embedding shard
    shard_dir: str | None = field(default=None, metadata={"path": "out"})
    encoders: int = 1  # encoder actor pool size
    num_cpus: float = 1.0  # per encoder actor
    num_gpus: float = 0.0  # per encoder actor (> 0 runs it on the GPU)
    tokenize_num_cpus: float = 0.5  # per read/tokenize task
    batch_size: int = 64  # passages per encoder call
    threads: int = 1  # torch threads per encoder actor
    gpu_faiss: bool = True  # build on GPU FAISS when faiss sees GPUs
    seed: int = 0  # training-sample draw
    # Search settings recorded in the index manifest and applied whenever the index is loaded
    # (batch and serving may override them): IVF lists visited per query (clamped to the
    # list count; FAISS's own default of 1 makes IVF65536 search 1/65536 of the corpus), and
    # HNSW efSearch (candidate list size; at least the search depth is used).
    nprobe: int = 32
    ef_search: int = 64

    def validate(self) -> None:
        for key in ("train_sample", "num_shards", "shard_size", "encoders", "batch_size", "threads",
                    "nprobe", "ef_search"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.tokenize_num_cpus < 0:
            raise ConfigError.at("num_cpus", "num_cpus, num_gpus and tokenize_num_cpus must be >= 0")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ConfigError.at("num_cpus", "an encoder needs CPUs or GPUs: set num_cpus > 0 or num_gpus > 0")
        if not self.type.strip():
            raise ConfigError.at("type", "must be a FAISS factory string such as Flat, IVF1024,PQ64 or HNSW32")


@dataclass(frozen=True)
class BatchConfig:
    """``batch:`` offline inference over task files (``imprag batch``,
    ``imprag_ray.pipelines.batch``): read -> stage 1 (query embedding) -> search ->
    stage 2 generation -> JSONL/Parquet -> metrics.

    ``retriever``: ``imprag`` (the model's own implicit query, searched in ``index_dir``),
    ``bm25`` (explicit-query baseline: the whole prompt as a BM25 query over the corpus),
    or ``none`` (closed book: no passages). ``top_k`` passages are read (null = the
    checkpoint's k; at most k); ``search_depth`` ids are retrieved and written for recall@k.
    """

    inputs: tuple[TaskFile, ...] = ()  # empty = data.eval
    # .jsonl or .parquet; null = <output_dir>/batch/predictions.jsonl
    output: str | None = field(default=None, metadata={"path": "out"})
    metrics: str | None = field(default=None, metadata={"path": "out"})  # null = <output>.metrics.json
    index_dir: str | None = field(default=None, metadata={"path": "out"})  # null = index.out_dir
    checkpoint: str | None = field(default=None, metadata={"path": "out"})  # null = model.path
    retriever: Literal["imprag", "bm25", "none"] = "imprag"
    engine: Literal["torch", "vllm"] = "torch"
    engine_options: dict[str, Any] = field(default_factory=dict)  # passed to build_engine
    top_k: int | None = None
    search_depth: int | None = None  # null = max(top_k, eval.recall_ks)
    max_new_tokens: int | None = None  # null = eval.max_new_tokens
    batch_size: int = 32  # examples per actor call
    encoders: int = 1  # stage-1 actors
    searchers: int = 1  # actors holding the index (or BM25)
    generators: int = 1  # stage-2 actors
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per stage-1 / stage-2 actor
    threads: int = 1  # torch threads per actor
    limit: int | None = None  # examples per input file (null = all)
    nprobe: int | None = None  # IVF lists searched (null = the index manifest's, index.nprobe)
    ef_search: int | None = None  # HNSW efSearch (null = the index manifest's)

    def validate(self) -> None:
        for key in ("top_k", "search_depth", "max_new_tokens", "limit", "nprobe", "ef_search"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError.at(key, f"must be > 0 or null, got {value}")
        for key in ("batch_size", "encoders", "searchers", "generators", "threads"):
            if getattr(self, key) <= 0:
                raise ConfigError.at(key, f"must be > 0, got {getattr(self, key)}")
        if self.top_k and self.search_depth and self.search_depth < self.top_k:
            raise ConfigError.at("search_depth", f"must be >= top_k ({self.top_k}), got {self.search_depth}")
        if self.output is not None and not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError.at("output", f"must end in .jsonl or .parquet, got {self.output!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError.at("num_cpus", "num_cpus and num_gpus must be >= 0")


@dataclass(frozen=True)
class TrainJobConfig:
    """``imprag train``: model + data + teacher + schedule + evaluation."""

    name: str
    output_dir: str = field(metadata={"path": "out"})
    model: ModelConfig
    data: DataConfig
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (null = torch default)
    ray: RayTrainConfig = RayTrainConfig()  # imprag train on Ray Train (ignored with --no-ray)
    index: IndexConfig = IndexConfig()  # imprag index build (Ray Data corpus encoding)
    batch: BatchConfig = BatchConfig()  # imprag batch (Ray Data offline inference)
