"""Reader pretraining: the small model's stand-in for a pretrained LLM (Ray-free).

ImpRAG fine-tunes a *pretrained* LLM (Llama-3): it already reads text in its context, and
the method teaches it to retrieve. A tiny model initialised at random does not read after
the few hundred steps a demo can afford. This command gives a small model the missing
pretraining on data that cannot leak a benchmark:

* people who are NOT in the world (:func:`imprag_ray.data.synth.reading_people`: unused
  name combinations, facts drawn from the world's value pools), one item each, so facts
  can only be read, never learned by heart;
* items read their person's passage in the ImpRAG passage slots (packed region, reader
  mask, the layout of DESIGN §1) and answer one of: copy the passage, list its facts
  ("profile"), a QA-format question;
* the first ``gold_only_steps`` read the gold passage alone, then with ``k-1`` other
  reading people's passages in random order (finding the right passage by name);
* J_gen only: no retrieval loss, no world passage, no held-out people.

``imprag model pretrain-reader --world DIR --init DIR --out DIR`` writes an HF checkpoint
(same tokenizer as ``--init``) with ``reader_pretrain.json`` (arguments, the world's
fingerprint, held-out reading metrics per eval) next to it; any job can start from it
(``model.path``). ``--kinds`` picks the training items (held-out eval reads all kinds).

Measured on the tiny preset shape (b=1, t=4; 2-core box, 1 thread):

* with the preset's init (tied, HF std 0.02): 1,600 steps at lr 3e-3 (copy/profile/qa)
  left held-out first-answer-token accuracy at guessing level (3%);
* untied with a wide input table (``imprag model init --set tie_word_embeddings=false
  --set embedding_init_std=0.4``), "List the facts" items only, gold passage, lr 1e-3:
  held-out value-token accuracy 19% after 600 steps (an experiment script with this
  layout, not this command);
* that init plus ``--set first_o_proj_init_std=0.2``, then this command with ``--kinds
  profile --steps 1000 --gold-only-steps 1000 --lr 1e-3``: held-out "List the facts" value
  accuracy 40%, QA first-token accuracy 1.5% (no transfer to the QA format);
* that init, ``--kinds copy,profile,qa --steps 2000 --gold-only-steps 1000 --lr 1e-3``: QA
  first-token accuracy with the gold passage alone 20% from step 750 on, among k-1 random
  others 9-12%; continued with ``--fresh-facts --seed 1 --steps 2000 --gold-only-steps 500``:
  gold alone 64% at step 500, among others 8-17%. From the same init, ``--kinds
  qa,qa,profile,copy --fresh-facts --gold-only-steps 1500``: 1.5% after 1,500 steps (reading
  had not started).

A reader trained this way did not then learn to retrieve (see ``imprag_ray/pipelines/
pretrain_base.py``); the demo's base is one joint ImpRAG job instead.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imprag_ray.data import synth_vocab as V
from imprag_ray.data.io import atomic_dir
from imprag_ray.data.records import Passage, TaskExample
from imprag_ray.data.synth import build_world, reading_people, redraw_facts
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.index.store import corpus_fingerprint
from imprag_ray.model.checkpoint import load_tokenizer
from imprag_ray.model.imprag import ImpRAGModel
from imprag_ray.train.batching import Item, collate, make_reading_item

KINDS = ("copy", "profile", "qa")
EVAL_PEOPLE = 200


@dataclass(frozen=True)
class ReaderPretrainConfig:
    world: str  # a synthetic world dir (its world.json names the seed and size)
    init: str  # the random checkpoint (imprag model init) to start from
    out: str
    people: int = 7000
    max_passage_tokens: int = 48  # l_max and k of the jobs that will fine-tune the base
    num_passages: int = 4
    retrieval_layer: int | None = None  # b and t (null = the checkpoint's imprag_config.json)
    reader_last_layer: int | None = None
    steps: int = 5000
    gold_only_steps: int = 600
    lr: float = 1e-2
    warmup_steps: int = 30
    batch_size: int = 16
    max_prompt_tokens: int = 96
    max_target_tokens: int = 48
    seed: int = 0
    threads: int = 1
    eval_every: int = 250
    kinds: str = ",".join(KINDS)  # training item kinds, comma-separated (held-out eval: all)
    # new facts for the training people at every pass over them (their passages and items are
    # rebuilt): repeated items can then only be read, not recalled (held-out people unchanged)
    fresh_facts: bool = False
    # train the reader only: the weights the query/passage embeddings are made of (token
    # embeddings, layers 0..b-1, layer b's norm + q/k) stay as they are, so a checkpoint that
    # already retrieves keeps its embeddings exactly
    freeze_retriever: bool = False

    @property
    def kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.kinds.split(",") if k.strip())

    def validate(self) -> None:
        for key in ("people", "steps", "batch_size", "eval_every", "threads", "max_passage_tokens", "num_passages"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.people <= EVAL_PEOPLE:
            raise ValueError(f"people must be > {EVAL_PEOPLE} (that many are held out for evaluation)")
        if not 0 <= self.gold_only_steps <= self.steps:
            raise ValueError(f"gold_only_steps must be in 0..steps, got {self.gold_only_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        unknown = [k for k in self.kind_list if k not in KINDS]
        if unknown or not self.kind_list:
            raise ValueError(f"kinds must be a comma-separated subset of {','.join(KINDS)}, got {self.kinds!r}")
        manifest = Path(self.world) / "world.json"
        if not manifest.is_file():
            raise ValueError(f"world: {manifest} not found; write a world with `imprag data synth --out DIR`")


def reading_examples(people, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> list[TaskExample]:
    """One example per person, ``kinds`` in turn (of copy / profile / QA-format question)."""
    out = []
    for i, p in enumerate(people):
        kind = kinds[i % len(kinds)]
        if kind == "copy":
            text, answer = V.COPY_PROMPT.format(name=p.name), p.text
        elif kind == "profile":
            rels = rng.sample(V.RELATIONS, len(V.RELATIONS))
            text = V.PROFILE_PROMPT.format(name=p.name)
            answer = ", ".join(f"{V.SLOT_NAMES_PROFILE[r]}: {p.facts[r]}" for r in rels)
        else:
            rel = rng.choice(V.RELATIONS)
            text, answer = "Q: " + rng.choice(V.QUESTIONS[rel]).format(name=p.name) + " A:", p.facts[rel]
        out.append(TaskExample(f"reading-{kind}-{i:05d}", text, (answer,), (p.pid,), "instruction",
                               meta={"task": kind}))
    return out


class ReaderPretraining:
    def __init__(self, cfg: ReaderPretrainConfig, echo: Callable[[str], None] | None = print):
        cfg.validate()
        self.cfg, self.echo = cfg, echo or (lambda s: None)
        torch.manual_seed(cfg.seed)
        torch.set_flush_denormal(True)
        torch.set_num_threads(cfg.threads)
        meta = self.world_meta = json.loads((Path(cfg.world) / "world.json").read_text())
        world = build_world(meta["seed"], meta["n_passages"])
        rng = random.Random(cfg.seed)
        self.people = people = reading_people(world, cfg.people, rng)
        self.pools = world.pools
        examples = (reading_examples(people[:-EVAL_PEOPLE], rng, cfg.kind_list)
                    + reading_examples(people[-EVAL_PEOPLE:], rng))
        self.model = ImpRAGModel.from_pretrained(
            cfg.init, retrieval_layer=cfg.retrieval_layer, reader_last_layer=cfg.reader_last_layer,
            max_passage_tokens=cfg.max_passage_tokens, num_passages=cfg.num_passages)
        self.tokenizer = load_tokenizer(cfg.init)
        self.rng = rng
        self._build_store()
        self.gold: dict[int, str] = {}
        train, held = examples[:-EVAL_PEOPLE], examples[-EVAL_PEOPLE:]
        self.train = self._items(train)
        self.eval_qa = self._items([ex for ex in held if ex.meta["task"] == "qa"])
        self.eval_text = self._items([ex for ex in held if ex.meta["task"] != "qa"])
        self.passes = 0
        for name, p in self.model.named_parameters():
            if cfg.freeze_retriever and self.model.embedding_parameter(name):
                p.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))

    def _build_store(self) -> None:
        self.store = PassageStore([Passage(p.pid, p.name, p.text) for p in self.people], self.tokenizer,
                                  self.model.l_max)

    def new_pass(self) -> None:
        """With ``fresh_facts``, called before every pass over the training items after the
        first: the training people get new facts, passages and items."""
        self.passes += 1
        train_people = self.people[:-EVAL_PEOPLE]
        redraw_facts(train_people, self.pools, self.rng)
        self._build_store()
        for it in self.train:
            self.gold.pop(id(it), None)
        self.train = self._items(reading_examples(train_people, self.rng, self.cfg.kind_list))

    def _items(self, examples: list[TaskExample]) -> list[Item]:
        c, others = self.cfg, self.store.order
        out = []
        for ex in examples:
            it = make_reading_item(ex, self.tokenizer, others, k=self.model.k,
                                   max_prompt_tokens=c.max_prompt_tokens,
                                   max_target_tokens=c.max_target_tokens, rng=self.rng)
            self.gold[id(it)] = ex.provenance[0]
            out.append(it)
        return out

    def gold_only(self, items: list[Item]) -> list[Item]:
        out = []
        for it in items:
            alone = copy.copy(it)
            alone.context = [self.gold[id(it)]]
            out.append(alone)
        return out

    def _forward(self, items: list[Item]):
        b = collate(items, self.store, self.model.k, self.tokenizer.pad_token_id, with_passages=True)
        return self.model(b.input_ids, b.attention_mask, b.passage_ids, b.passage_mask, labels=b.labels), b

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out reading people: first answer token of QA items read with the gold passage
        alone / among k-1 others, and teacher-forced token accuracy of copy + profile items."""
        self.model.eval()
        out = {}
        for name, items in (("qa_first_token_gold_only", self.gold_only(self.eval_qa)),
                            ("qa_first_token_in_k", self.eval_qa)):
            res, _ = self._forward(items)
            idx = torch.tensor([len(it.prompt) - 1 for it in items])
            pred = res.logits[torch.arange(len(items)), idx].argmax(-1)
            gold = torch.tensor([it.target[0] for it in items])
            out[name] = round((pred == gold).float().mean().item(), 4)
        res, b = self._forward(self.eval_text)
        pred, tgt = res.logits[:, :-1].argmax(-1), b.labels[:, 1:]
        keep = tgt != -100
        out["text_token_acc_in_k"] = round((((pred == tgt) & keep).sum() / keep.sum()).item(), 4)
        self.model.train()
        return out

    def run(self) -> dict:
        c = self.cfg
        log, order, t0 = [], [], time.time()
        self.model.train()
        for step in range(1, c.steps + 1):
            if len(order) < c.batch_size:
                if step > 1 and c.fresh_facts:
                    self.new_pass()
                    order = []  # the items were rebuilt: a clean pass over the new ones
                order += self.rng.sample(range(len(self.train)), len(self.train))
            items = [self.train[i] for i in order[: c.batch_size]]
            order = order[c.batch_size :]
            if step <= c.gold_only_steps:
                items = self.gold_only(items)
            res, _ = self._forward(items)
            self.optimizer.zero_grad()
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            if step % c.eval_every == 0 or step == c.steps:
                row = {"step": step, "seconds": round(time.time() - t0, 1), "loss": round(res.loss.item(), 4),
                       **self.evaluate()}
                log.append(row)
                self.echo(json.dumps(row))
        world = Path(c.world)
        report = {
            "config": asdict(c),
            "world": {"seed": self.world_meta["seed"], "n_passages": self.world_meta["n_passages"],
                      "corpus_fingerprint": corpus_fingerprint(world / "corpus.jsonl")},
            "metrics": log,
        }
        with atomic_dir(c.out, overwrite=Path(c.out).exists()) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (Path(tmp) / "reader_pretrain.json").write_text(json.dumps(report, indent=1) + "\n")
        return report


def pretrain_reader(cfg: ReaderPretrainConfig, echo: Callable[[str], None] | None = print) -> dict:
    return ReaderPretraining(cfg, echo).run()


# Settings the command line may change: name -> type (defaults from ReaderPretrainConfig).
CLI_FIELDS = {"people": int, "max_passage_tokens": int, "num_passages": int, "retrieval_layer": int,
              "reader_last_layer": int, "steps": int, "gold_only_steps": int, "lr": float,
              "batch_size": int, "seed": int, "threads": int, "eval_every": int, "kinds": str,
              "fresh_facts": bool, "freeze_retriever": bool}


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain-reader", help="pretrain a small base model to read passages in the ImpRAG slots")
    p.add_argument("--world", required=True, help="synthetic world dir (imprag data synth)")
    p.add_argument("--init", required=True, help="random checkpoint to start from (imprag model init)")
    p.add_argument("--out", required=True)
    for field, kind in CLI_FIELDS.items():
        flag = f"--{field.replace('_', '-')}"
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f"(default: {getattr(ReaderPretrainConfig, field)})")
        else:
            p.add_argument(flag, type=kind, default=getattr(ReaderPretrainConfig, field))


def run_cli(args) -> int:
    cfg = ReaderPretrainConfig(world=args.world, init=args.init, out=args.out,
                               **{f: getattr(args, f) for f in CLI_FIELDS})
    pretrain_reader(cfg)
    return 0


__all__ = ["ReaderPretrainConfig", "ReaderPretraining", "pretrain_reader", "reading_examples"]
