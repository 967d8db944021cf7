"""The Ray-free ImpRAG training recipe (arXiv 2506.02279 §3.2; DESIGN §1).

One class, ``setup / train_step / train_epoch / evaluate / save_checkpoint / resume``,
that runs in a single process here (``imprag train``) and unchanged inside a Ray Train
worker later: distribution enters only through ``rank``/``world_size`` (data sharding)
and ``gather`` (in-batch negatives from all workers).

Each step optimises ``J = J_gen + lambda * J_ret`` on a mixed batch: retrieval-format
examples read the teacher's top-k passages and train the retriever (warmup NCE for the
first ``warmup_epochs``, then self-distillation from the model's own answer
likelihoods); retrieval-free examples (instructions, corpus text) add to J_gen only.

Device and precision: the model moves to the recipe's ``device`` before the optimizer is
built or its state loaded, and batches are built there. ``model.dtype: bfloat16`` is mixed
precision: the weights (the optimizer's master copy) and the optimizer state stay fp32,
forward and loss run under ``torch.autocast(bfloat16)``, and checkpoints are written in
bf16 (a resumed bf16 job starts from those bf16 weights, so its fp32 masters are rounded
once to bf16; the optimizer state is resumed in full). AdamW straight on bf16 weights, as
before, lost every update smaller than half a bf16 step of its weight: 20 steps at lr 2e-5
on the tests' tiny model (weights of std 0.02) moved 25% of the weights, against 99.99% in
fp32 and with fp32 masters (``tests/train/test_mixed_precision.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from imprag_ray.config.loader import ConfigError, to_dict
from imprag_ray.config.schema import TaskFile, TrainJobConfig
from imprag_ray.data.io import atomic_dir
from imprag_ray.data.provenance import ProvenanceResolver
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.data.records import RETRIEVAL_FORMATS, TaskExample
from imprag_ray.data.templates import format_passage
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.eval.metrics import score_task
from imprag_ray.eval.predict import encode_corpus, predict
from imprag_ray.model.checkpoint import load_tokenizer, stop_token_ids
from imprag_ray.model.imprag import ImpRAGConfigError, ImpRAGModel
from imprag_ray.model.losses import answer_loglik, distillation_kl, multi_positive_nce, response_nll
from imprag_ray.retrievers.teachers import build_teacher
from imprag_ray.train.batching import Batch, Item, collate, make_items, make_reading_item
from imprag_ray.train.eval_corpus import eval_passage_ids, teacher_rankings

# gather(local [M, d]) -> (all workers' passages [M_all, d], offset of the local rows in it);
# the local rows must keep their gradient (Ray Train's all-gather does so for its own rank).
GatherFn = Callable[[Tensor], tuple[Tensor, int]]
STATE_NAME = "trainer_state.pt"


def read_task_files(
    specs: tuple[TaskFile, ...], provenance: str = "passage_id"
) -> list[tuple[TaskFile, list[TaskExample]]]:
    """Read each configured task file (first ``limit`` examples); ``provenance`` is
    ``data.provenance`` (``page_title`` needs a title on every provenance entry)."""
    out = []
    for spec in specs:
        examples = read_tasks(spec.path, spec.format, provenance=provenance)
        out.append((spec, examples[: spec.limit] if spec.limit else examples))
    return out


class ImpRAGRecipe:
    """Joint retrieval + generation training of one ImpRAG checkpoint."""

    def __init__(
        self,
        cfg: TrainJobConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: GatherFn | None = None,
        log: Callable[[dict], None] | None = None,
        device: torch.device | str | None = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bf16 = cfg.model.dtype == "bfloat16"  # mixed precision (fp32 masters, bf16 compute)
        self.rank, self.world_size = rank, world_size
        self.gather = gather or (lambda x: (x, 0))
        self.log = log or (lambda row: None)
        self.output_dir = Path(cfg.output_dir)
        self.epoch = 0
        self.step = 0
        # Optional: epoch -> this rank's item indices (e.g. a Ray Data shard, see
        # imprag_ray.pipelines.train); None = the seeded shuffle + rank sharding below.
        self.example_source: Callable[[int], list[int]] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: str | os.PathLike | None = None) -> None:
        """Load model (onto ``device``), tokenizer, corpus, tasks, teacher labels, then the
        optimizer over the placed weights (and its state, which lands on their device)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # Denormal floats (common in freshly initialised small models) make CPU kernels
        # 10-20x slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = self._load_model(Path(resume_from) if resume_from else Path(cfg.model.path))
        self._place_model()
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.stop_ids = stop_token_ids(cfg.model.path, self.tokenizer)  # eval answers end at any
        self.passages = read_corpus(cfg.data.corpus)
        self.store = PassageStore(self.passages, self.tokenizer, self.model.l_max)
        self.passage_texts = {p.id: format_passage(p) for p in self.passages}  # answer-string recall
        # Which passages an example's provenance names (KILT: every passage of the gold pages).
        self.resolver = ProvenanceResolver(self.passages, cfg.data.provenance)
        train = read_task_files(cfg.data.train, cfg.data.provenance)
        if not any(exs for _, exs in train):
            raise ValueError("data.train lists no examples; add at least one task file")
        # Items in file order (the Ray Train example source indexes them that way).
        self.items = [it for spec, exs in train for it in self._items_of(spec, exs)]
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        if resume_from:
            self._load_state(Path(resume_from))

    def _load_model(self, path: Path) -> ImpRAGModel:
        """The checkpoint at ``path`` in fp32 (a bf16 job's master weights are fp32 too)."""
        m = self.cfg.model
        try:
            return ImpRAGModel.from_pretrained(
                path,
                retrieval_layer=m.retrieval_layer,
                reader_last_layer=m.reader_last_layer,
                max_passage_tokens=m.max_passage_tokens,
                num_passages=m.num_passages,
                post_rope=m.post_rope,
                dtype=torch.float32,
            )
        except ImpRAGConfigError as err:
            raise ConfigError(f"model.{err.field}", str(err).split(": ", 1)[1]) from None

    def _place_model(self) -> None:
        """Move the model to ``device``; setup calls it before the optimizer is built."""
        self.model.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the recipe's device for a bf16 job (a no-op for fp32 jobs)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations and embeddings are computed in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def closed_book(self) -> bool:
        return self.cfg.train.mode == "closed_book"

    def _items_of(self, spec: TaskFile, examples: list[TaskExample]) -> list[Item]:
        if spec.context == "teacher":
            return self._make_items(examples)
        d = self.cfg.data
        rng = random.Random(f"{self.cfg.seed}-{spec.path}")
        gold = {ex.id: self.resolver.reading_passage(ex, self.passage_texts) for ex in examples}
        missing = next((ex_id for ex_id, pid in gold.items() if pid is None), None)
        if missing is not None:
            raise ConfigError("data.train", f"{spec.path}: example {missing!r} has no provenance passage in "
                              "the corpus, which context: gold needs; use context: teacher for this file")
        return [make_reading_item(ex, self.tokenizer, self.store.order, k=self.model.k,
                                  max_prompt_tokens=d.max_prompt_tokens,
                                  max_target_tokens=d.max_target_tokens, rng=rng,
                                  chat=d.chat_template, gold=gold[ex.id]) for ex in examples]

    def _make_items(self, examples: list[TaskExample]) -> list[Item]:
        t = self.cfg.teacher
        retrieval = [ex for ex in examples if ex.format in RETRIEVAL_FORMATS]
        rankings: dict[str, list[str]] = {}
        if retrieval and not self.closed_book:
            if getattr(self, "_teacher", None) is None:
                self._teacher = build_teacher(t.kind, self.passages, t.path)
            teacher = self._teacher
            depth = max(t.hard_negative_ranks[1], t.num_candidates, t.num_positives, self.model.k)
            for start in range(0, len(retrieval), 512):
                chunk = retrieval[start : start + 512]
                ranked = teacher.rank([ex.input for ex in chunk], depth, [ex.id for ex in chunk])
                rankings.update({ex.id: [pid for pid, _ in r] for ex, r in zip(chunk, ranked, strict=False)})
            if t.provenance_positives:
                for ex in retrieval:
                    ranking = rankings.get(ex.id, [])
                    gold = self.resolver.order_gold(ex, ranking)[: t.num_positives]
                    # other passages of a gold page are neither positives nor hard negatives
                    rankings[ex.id] = gold + [pid for pid in ranking if not self.resolver.is_gold(ex, pid)]
        d = self.cfg.data
        return make_items(
            examples, self.tokenizer, rankings, rng=random.Random(self.cfg.seed), chat=d.chat_template,
            k=self.model.k, num_positives=t.num_positives,
            hard_negative_ranks=t.hard_negative_ranks, num_hard_negatives=t.num_hard_negatives,
            num_candidates=t.num_candidates, max_prompt_tokens=d.max_prompt_tokens,
            max_target_tokens=d.max_target_tokens, shuffle_context=d.shuffle_context,
        )

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; no weight decay on norms/biases; the retriever side (see
        :meth:`ImpRAGModel.retriever_parameter`; the token embedding table is shared with the
        reader and the LM head, so it stays at ``lr``) at ``train.retriever_lr`` when that is set."""
        tc = self.cfg.train
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.model.named_parameters():
            decay = 0.0 if p.dim() < 2 or "norm" in name else tc.weight_decay
            lr = tc.retriever_lr if tc.retriever_lr is not None and self.model.retriever_parameter(name) else tc.lr
            groups.setdefault((lr, decay), []).append(p)
        # On CUDA the fused kernel: no foreach temporaries the size of the weights (a 3B
        # model's fp32 masters are 12.8 GB). DTensor (FSDP) parameters keep the default.
        params = [p for ps in groups.values() for p in ps]
        fused = all(p.device.type == "cuda" and type(p.data) is torch.Tensor for p in params)
        return torch.optim.AdamW(
            [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
            lr=tc.lr, betas=(0.9, 0.98), **({"fused": True} if fused else {}),
        )

    @property
    def steps_per_epoch(self) -> int:
        tc = self.cfg.train
        per_rank = math.ceil(len(self.items) / self.world_size)
        return tc.steps_per_epoch or max(1, per_rank // tc.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def _lr_lambda(self, step: int) -> float:
        tc = self.cfg.train
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = min(1.0, (step - tc.warmup_steps) / max(1, self.total_steps - tc.warmup_steps))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # --------------------------------------------------------------- training
    def stage(self, epoch: int) -> str:
        """'warmup' (NCE on teacher labels) for the first warmup_epochs, then 'distill'."""
        return "warmup" if epoch < self.cfg.train.warmup_epochs else "distill"

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of one epoch (seeded shuffle, disjoint shards per rank)."""
        tc = self.cfg.train
        if self.example_source is not None:
            order = list(self.example_source(epoch))
            if not order:
                raise ValueError(f"rank {self.rank} got no training examples for epoch {epoch}; "
                                 "use fewer workers or more training data")
        else:
            order = list(range(len(self.items)))
            random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
            order = order[self.rank :: self.world_size]
        needed = self.steps_per_epoch * tc.batch_size
        while len(order) < needed:  # steps_per_epoch may ask for more than one pass
            order = order + order
        for s in range(self.steps_per_epoch):
            chunk = [self.items[i] for i in order[s * tc.batch_size : (s + 1) * tc.batch_size]]
            batch = collate(chunk, self.store, self.model.k, self.tokenizer.pad_token_id,
                            with_passages=not self.closed_book, stage=self.stage(epoch))
            yield batch.to(self.device)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step of J = J_gen + lambda * J_ret (J_ret of ``batch.stage``);
        returns scalar metrics."""
        tc = self.cfg.train
        self.model.train()
        with self.autocast():  # forward and losses; backward runs outside, as autocast wants
            out = self.model(
                batch.input_ids, batch.attention_mask, batch.passage_ids, batch.passage_mask,
                query_index=batch.query_index,
            )
            j_gen = response_nll(out.logits, batch.labels, tc.gen_loss_average)
            metrics = {"j_gen": j_gen.item()}
            loss = j_gen
            if bool(batch.retrieval.any()) and not self.closed_book:
                j_ret, ret_metrics = self.retrieval_loss(out.query_embedding[batch.retrieval], batch)
                loss = loss + tc.lambda_ret * j_ret
                metrics.update(ret_metrics)
        return self.apply_gradients(loss, metrics)

    def apply_gradients(self, loss: Tensor, metrics: dict[str, float]) -> dict[str, float]:
        """Backward, clip, optimiser + scheduler step; adds grad_norm, loss and lr to ``metrics``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.train.grad_clip
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics.update(loss=loss.item(), lr=self.scheduler.get_last_lr()[0])
        return metrics

    def retrieval_loss(self, queries: Tensor, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Warmup NCE against every pooled passage, or self-distillation KL on candidates.

        queries: [R, d] query embeddings of the retrieval rows.
        """
        tc = self.cfg.train
        pool = self.model.embed_passages(batch.pool_tokens, batch.pool_mask)  # [M, d]
        if batch.stage == "warmup":
            everyone, offset = self.gather(pool)  # [M_all, d]: in-batch negatives of all workers
            scores = queries @ everyone.T  # [R, M_all]
            positive = torch.zeros_like(scores, dtype=torch.bool)
            negative = torch.ones_like(scores, dtype=torch.bool)  # other workers' passages
            positive[:, offset : offset + pool.shape[0]] = batch.positive
            negative[:, offset : offset + pool.shape[0]] = batch.negative
            j_ret = multi_positive_nce(scores, positive, negative, tc.tau_nce)
            top1 = scores.argmax(dim=1)
            acc = positive.gather(1, top1.unsqueeze(1)).float().mean()
            return j_ret, {"j_ret": j_ret.item(), "nce_top1_in_positives": acc.item()}
        cand = batch.candidates  # [R, C]
        valid = cand >= 0
        student = (queries.unsqueeze(1) * pool[cand.clamp_min(0)]).sum(-1)  # [R, C]
        teacher = self.teacher_logliks(batch)  # [R, C]
        j_ret = distillation_kl(student, teacher, valid, tc.tau_r, tc.tau_t)
        return j_ret, {"j_ret": j_ret.item()}

    @torch.no_grad()
    def teacher_logliks(self, batch: Batch) -> Tensor:
        """log P_LM(answer | p, q) for every candidate p, one passage at a time: [R, C]."""
        rows = batch.retrieval.nonzero().squeeze(1)  # [R] batch rows of the retrieval rows
        cand = batch.candidates  # [R, C] pool indices, -1 = none
        r_idx, c_idx = (cand >= 0).nonzero(as_tuple=True)
        out = torch.full(cand.shape, -1e4, device=cand.device)  # [R, C], fp32
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            for start in range(0, len(r_idx), 64):
                r, c = r_idx[start : start + 64], c_idx[start : start + 64]
                src = rows[r]
                p_tok = batch.pool_tokens[cand[r, c]].unsqueeze(1)  # [n, 1, l_max]
                p_mask = batch.pool_mask[cand[r, c]].unsqueeze(1)
                res = self.model(batch.input_ids[src], batch.attention_mask[src], p_tok, p_mask)
                out[r, c] = answer_loglik(res.logits, batch.labels[src])
        self.model.train(was_training)
        return out

    def train_epoch(self, eval_fn: Callable[[], dict] | None = None) -> dict[str, float]:
        """Run one epoch; logs every ``log_every`` steps; returns the mean metrics."""
        tc = self.cfg.train
        stage = self.stage(self.epoch)
        sums: dict[str, float] = {}
        start = time.time()
        tokens = 0
        steps = 0
        for batch in self.epoch_batches(self.epoch):
            metrics = self.train_step(batch)
            steps += 1
            tokens += int(batch.attention_mask.sum())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            if self.step % tc.log_every == 0:
                self.log({"epoch": self.epoch, "step": self.step, "stage": stage, **metrics,
                          "tokens_per_s": tokens / max(time.time() - start, 1e-9)})
            if eval_fn is not None and tc.eval_every and self.step % tc.eval_every == 0:
                eval_fn()
        self.epoch += 1
        return {key: value / max(steps, 1) for key, value in sums.items()}

    # -------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "dev", *, limit: int | None = None, write: bool = True) -> dict:
        """EM and recall@k per task file of ``data.<split>`` with the current weights.

        ImpRAG mode re-encodes the passages it searches with the current bottom layers (the
        whole corpus, or the ``eval.corpus_sample`` sub-corpus, see :meth:`eval_passages`)
        and retrieves with the model's own query embeddings; each result then says how many
        passages were searched (``corpus_size``) and whether that was a sub-corpus.
        Closed-book mode reads no passages.
        """
        ec = self.cfg.eval
        limit = limit or ec.limit
        specs = getattr(self.cfg.data, split)
        tasks = [(spec, exs[:limit] if limit else exs)
                 for spec, exs in read_task_files(specs, self.cfg.data.provenance)]
        self.model.eval()
        top_k = ec.top_k or self.model.k
        depth = max(top_k, *ec.recall_ks)  # retrieve deep enough for every recall@k
        searched: dict = {}
        with self.autocast():
            index = None
            if not self.closed_book:
                ids = self.eval_passages([ex for _, exs in tasks for ex in exs], split, depth)
                index = encode_corpus(self.model, self.store, ids=ids)
                searched = {"corpus_size": len(index), "sub_corpus": len(index) < len(self.store)}
            results: dict[str, dict] = {}
            predictions: list[dict] = []
            for spec, examples in tasks:
                preds = predict(
                    self.model, self.tokenizer, self.store, examples, index=index, top_k=top_k,
                    search_depth=depth, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                    max_prompt_tokens=self.cfg.data.max_prompt_tokens, stop_ids=self.stop_ids,
                    chat=self.cfg.data.chat_template,
                )
                predictions.extend(preds)
                by_id = {p["id"]: p for p in preds}
                scores = score_task(examples, by_id, self.passage_texts, ec.recall_ks, self.resolver)
                results[Path(spec.path).stem] = {"format": spec.format, **scores, **searched}
        if write and self.rank == 0:
            from imprag_ray.data.io import write_json_atomic, write_jsonl_atomic

            out = self.output_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(out / f"{split}-predictions.jsonl", predictions)
            write_json_atomic(out / f"{split}-metrics.json", results)
        return results

    def eval_passages(self, examples: list[TaskExample], split: str, depth: int) -> list[str] | None:
        """Passage ids evaluation searches: None = the whole corpus (``eval.corpus_sample``
        null), else the bounded sub-corpus of :func:`eval_passage_ids`, the same for every
        evaluation of ``split`` in a run (seeded by the job's seed), with the teacher's top
        ``depth`` for each example where the teacher is already built or is a labels file."""
        size = self.cfg.eval.corpus_sample
        if size is None or size >= len(self.store):
            return None
        teacher = getattr(self, "_teacher", None)
        t = self.cfg.teacher
        if teacher is None and t.kind == "labels":
            teacher = self._teacher = build_teacher(t.kind, self.passages, t.path)
        rankings = teacher_rankings(teacher, examples, depth) if teacher is not None else []
        seed = f"{self.cfg.seed}-eval-{split}"
        return eval_passage_ids(self.store.order, examples, size, seed, rankings, self.resolver.gold_ids)

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, out_dir: str | os.PathLike | None = None) -> Path:
        """HF weights (in the job's dtype) + tokenizer + ImpRAG config + optimizer/scheduler
        state, atomically."""
        out_dir = Path(out_dir or self.output_dir / "checkpoints" / f"epoch-{self.epoch:03d}")
        with atomic_dir(out_dir, overwrite=True) as tmp:
            self.model.write_files(tmp, dtype=torch.bfloat16 if self.bf16 else None)
            self.tokenizer.save_pretrained(tmp)
            # Plain data only (tensors, numbers, strings, lists, tuples, dicts; the RNG state
            # is a uint8 tensor): loadable with torch.load(weights_only=True) in _load_state.
            state = {
                "epoch": int(self.epoch), "step": int(self.step),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            _check_plain(state, STATE_NAME)
            torch.save(state, tmp / STATE_NAME)
            (tmp / "job_config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        return out_dir

    def _load_state(self, ckpt: Path) -> None:
        """Optimizer/scheduler/RNG state of ``ckpt``. Read onto the CPU; the optimizer then
        puts each state tensor on its parameter's device (the model is already there)."""
        path = ckpt / STATE_NAME
        # weights_only=True: the file may come from object storage or another user, and a
        # full unpickle runs whatever callable the file names. Only tensors and plain data
        # load; anything else is refused.
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            # torch's own message suggests weights_only=False: quote only what it refused
            what = [line for line in str(err).splitlines() if "GLOBAL" in line or "nsupported" in line]
            raise ValueError(
                f"{path}: refusing to load the trainer state: it holds objects other than tensors, "
                "numbers, strings, lists and dicts (a tampered file, or one written by another "
                "program). Resume from a checkpoint written by `imprag train`, or start without "
                f"resuming. ({(what[0] if what else 'not a weights-only file')[:300].strip()})"
            ) from None
        keys = ("epoch", "step", "optimizer", "scheduler", "torch_rng")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise ValueError(f"{path}: not a trainer state (no {', '.join(missing)}); resume from a "
                             "checkpoint written by `imprag train`")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step = state["epoch"], state["step"]


_PLAIN = (Tensor, int, float, bool, str, bytes, type(None))


def _check_plain(obj, where: str) -> None:
    """Raise TypeError naming the first value in ``obj`` that ``torch.load(weights_only=True)``
    would refuse, so an unloadable state file is never written (the writer's bug shows at
    save time, not at the resume a day later)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; the trainer state must hold "
            "only tensors, numbers, strings, lists, tuples and dicts (convert it before saving)"
        )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete ``checkpoints/epoch-*`` (temp dirs are ignored)."""
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("epoch-*") if (p / STATE_NAME).exists()) if root.exists() else []
    return done[-1] if done else None
