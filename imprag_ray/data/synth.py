"""A knowledge-intensive synthetic world for end-to-end tests and small experiments.

`synthesize(out_dir, seed=0, n_passages=5000)` writes (deterministically per seed):

  corpus.jsonl                  {"id": "p00042", "title": "Ilsa Dren", "text": "..."}  one per person
  train/qa.jsonl                KILT QA about train people (several per person)
  train/instruction.jsonl       retrieval-free prompts (reading comprehension, true/false
                                verification, next/previous sentence, [MASK] denoising)
  train/corpus_text.jsonl       plain passage text (~10% of the training mix)
  train/reading.jsonl           reading curriculum over train + distractor people: "copy the
                                passage about X" and QA-format questions, each to be read with
                                its gold passage in the reader's slots (job `context: gold`)
  dev/qa.jsonl                  QA about dev held-out people
  eval/qa.jsonl                 QA about test held-out people (seen format)
  eval/slot_filling.jsonl       "Ilsa Dren [SEP] place of birth"           (unseen format)
  eval/fact_check.jsonl         half true / half false claims, "true"/"false" (unseen format)
  eval/entity_linking.jsonl     "[START] Redhand [END] ..." -> "Ilsa Dren"   (unseen format)
  world.json                    manifest: seed, counts, formats, split sizes

`synthesize(out_dir, seed=1, n_passages=7000, disjoint_from=(0, 5000))` writes a *pretraining
world* in the same layout: its people are name combinations the world (seed 0, 5,000
passages) does not use, with facts drawn from that world's value pools, so a small base
pretrained on it learns to read and retrieve by name without ever seeing the other world's
people (``imprag data synth --disjoint-from runs/demo/world``).

Held-out (dev/test) people exist only in the corpus and in their own split's files;
distractor people share templates and values but are never asked about. Questions are poor
explicit queries: other people and places are mentioned around a paraphrased relation.
The mechanics of the world (people, passages) live here; task rows are built in synth_tasks.py.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprag_ray.data import synth_vocab as V
from imprag_ray.data.io import atomic_dir, write_json_atomic, write_jsonl_atomic

MIN_PASSAGES = 100
MAX_HELDOUT = 600  # per held-out split; bounded by the number of unique aliases
HELDOUT_SHARE = 0.04  # dev and test each: ~200 people for 5,000 passages
MIN_HELDOUT = 24  # keeps >= ~20 items per eval file for tiny worlds
TRAIN_SHARE = 0.30  # the rest (~60%) are distractors
N_CITIES, N_RIVERS, N_GUILDS = 48, 24, 32
VERSION = 1


@dataclass
class Person:
    """One entity of the world and its passage. split: train | dev | test | distractor."""

    pid: str
    name: str
    first: str
    gender: str
    alias: str
    facts: dict[str, str]  # relation -> value (see synth_vocab.RELATIONS)
    split: str
    sentences: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def slots(self) -> dict[str, str]:
        """Template slots for this person ({name}, {he}, {city}, ...)."""
        f = self.facts
        return {
            "name": self.name,
            "first": self.first,
            "alias": self.alias,
            "city": f["birthplace"],
            "year": f["birth_year"],
            "occ": f["occupation"],
            "org": f["employer"],
            "river": f["river"],
            **V.PRONOUNS[self.gender],
        }


@dataclass
class World:
    """People (in passage-id order) plus the value pools other tasks draw from."""

    people: list[Person]
    pools: dict[str, list[str]]  # relation -> possible values

    def split(self, name: str) -> list[Person]:
        return [p for p in self.people if p.split == name]


def split_sizes(n_passages: int) -> dict[str, int]:
    """People per split for a corpus of n_passages (one passage per person)."""
    if n_passages < MIN_PASSAGES:
        raise ValueError(f"n_passages={n_passages} is too small; use at least {MIN_PASSAGES}")
    held = min(MAX_HELDOUT, max(MIN_HELDOUT, round(HELDOUT_SHARE * n_passages)))
    train = round(TRAIN_SHARE * n_passages)
    return {"train": train, "dev": held, "test": held, "distractor": n_passages - train - 2 * held}


def _strings(value: Any) -> list[str]:
    """All strings inside a (nested) constant of synth_vocab."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _strings(v)]
    return []


def _reserved_words() -> set[str]:
    """Lowercase words of all templates and lists: generated names must not collide with them."""
    texts = [s for name, v in vars(V).items() if name.isupper() for s in _strings(v)]
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


def _draw_words(rng: random.Random, k: int, n_syll: int, used: set[str]) -> list[str]:
    """k new capitalised words of n_syll syllables each, unique across `used` (updated)."""
    out: list[str] = []
    for _ in range(200 * k + 1000):
        if len(out) == k:
            return out
        word = "".join(rng.choice(V.SYLLABLES) for _ in range(n_syll)).capitalize()
        if word.lower() not in used:
            used.add(word.lower())
            out.append(word)
    raise ValueError(f"cannot draw {k} unique {n_syll}-syllable words; lower n_passages")


def _value_pools(rng: random.Random, used: set[str]) -> dict[str, list[str]]:
    lo, hi = V.YEAR_RANGE
    return {
        "birthplace": _draw_words(rng, N_CITIES, 3, used),
        "river": _draw_words(rng, N_RIVERS, 2, used),
        "employer": _draw_words(rng, N_GUILDS, 2, used),
        "occupation": list(V.OCCUPATIONS),
        "birth_year": [str(y) for y in range(lo, hi + 1)],
    }


def _names(rng: random.Random, n: int, used: set[str]) -> list[tuple[str, str]]:
    """n unique (first, last) names from two small syllable-built pools (reused across people)."""
    k = max(20, math.ceil(math.sqrt(2.5 * n)))
    firsts = _draw_words(rng, k, 2, used)
    lasts = _draw_words(rng, k, 2 if k <= 400 else 3, used)  # 2-syllable words run out past ~64k people
    picks = rng.sample(range(k * k), n)
    return [(firsts[i // k], lasts[i % k]) for i in picks]


def _aliases(rng: random.Random, splits: list[str]) -> list[str]:
    """One alias per person; dev/test aliases are unique in the whole world (entity linking)."""
    combos = [(h + t).capitalize() for h in V.ALIAS_HEADS for t in V.ALIAS_TAILS]
    rng.shuffle(combos)
    held = [i for i, s in enumerate(splits) if s in ("dev", "test")]
    aliases = [""] * len(splits)
    for i, a in zip(held, combos, strict=False):
        aliases[i] = a
    rest = combos[len(held) :]
    others = [i for i, s in enumerate(splits) if s not in ("dev", "test")]
    for j, i in enumerate(others):
        aliases[i] = rest[j % len(rest)]
    return aliases


def _sentences(rng: random.Random, slots: dict[str, str]) -> list[str]:
    """2-3 short sentences (~25-35 words) stating all facts, with varied surface templates."""
    intro = rng.choice(V.INTRO_SENTENCES).format(**slots)
    if rng.random() < 0.3:
        return [intro, rng.choice(V.WORK_RIVER_SENTENCES).format(**slots)]
    rest = [rng.choice(V.WORK_SENTENCES).format(**slots), rng.choice(V.RIVER_SENTENCES).format(**slots)]
    if rng.random() < 0.5:
        rest.reverse()
    return [intro, *rest]


def _shuffled_splits(n_passages: int, rng: random.Random) -> list[str]:
    """One split name per person (sizes of :func:`split_sizes`), in random order."""
    splits = [s for s, k in split_sizes(n_passages).items() for _ in range(k)]
    rng.shuffle(splits)
    return splits


def _pid_width(n_passages: int) -> int:
    return max(5, len(str(n_passages - 1)))


def build_world(seed: int = 0, n_passages: int = 5000) -> World:
    """All people of the world, deterministic per seed; passage ids p00000.. in order."""
    rng = random.Random(seed)
    used = _reserved_words()
    pools = _value_pools(rng, used)
    names = _names(rng, n_passages, used)
    splits = _shuffled_splits(n_passages, rng)
    aliases = _aliases(rng, splits)
    width = _pid_width(n_passages)
    people = []
    for i, ((first, last), split, alias) in enumerate(zip(names, splits, aliases, strict=True)):
        facts = {rel: rng.choice(pools[rel]) for rel in V.RELATIONS}
        p = Person(
            pid=f"p{i:0{width}d}",
            name=f"{first} {last}",
            first=first,
            gender=rng.choice("mf"),
            alias=alias,
            facts=facts,
            split=split,
            sentences=[],
        )
        p.sentences = _sentences(rng, p.slots())
        people.append(p)
    return World(people=people, pools=pools)


def reading_people(world: World, n: int, rng: random.Random) -> list[Person]:
    """n people who are NOT in the world: unused (first, last) combinations of the world's
    name pools, facts drawn from its value pools, aliases of its non-held-out people.

    They exist only in the reader-pretraining data (``imprag model pretrain-reader``):
    one item each, so the model cannot learn their facts by heart, only by reading, and
    held-out people's facts are never trained on. Pids are ``r00000``..."""
    firsts = sorted({p.first for p in world.people})
    lasts = sorted({p.name.split(" ", 1)[1] for p in world.people})
    taken = {p.name for p in world.people}
    combos = [(f, la) for f in firsts for la in lasts if f"{f} {la}" not in taken]
    if n > len(combos):
        raise ValueError(f"the world's name pools leave {len(combos)} unused names; ask for <= {len(combos)}")
    aliases = sorted({p.alias for p in world.people if p.split not in ("dev", "test")})
    out = []
    for i, (first, last) in enumerate(rng.sample(combos, n)):
        facts = {rel: rng.choice(world.pools[rel]) for rel in V.RELATIONS}
        p = Person(pid=f"r{i:05d}", name=f"{first} {last}", first=first, gender=rng.choice("mf"),
                   alias=rng.choice(aliases), facts=facts, split="reading", sentences=[])
        p.sentences = _sentences(rng, p.slots())
        out.append(p)
    return out


def redraw_facts(people: list[Person], pools: dict[str, list[str]], rng: random.Random) -> None:
    """New facts (from ``pools``) and new passage sentences for the same names, in place:
    a reader trained on several passes over fresh facts can only read them, never recall."""
    for p in people:
        p.facts = {rel: rng.choice(pools[rel]) for rel in V.RELATIONS}
        p.sentences = _sentences(rng, p.slots())


def pretraining_world(world: World, n_passages: int, seed: int) -> World:
    """A second world of n_passages people, none of whom is in ``world``: unused name
    combinations of its name pools, facts from its value pools (the same words, so one
    tokenizer serves both), split train/dev/test/distractor like :func:`build_world`.

    Pretraining on it cannot leak a held-out fact of ``world``: a person's facts live only in
    the world that has the person. Aliases are reused from ``world``'s non-held-out people
    (its entity-linking files are not unique per alias; the pretraining jobs do not use them)."""
    rng = random.Random(f"pretraining-{seed}")
    splits = _shuffled_splits(n_passages, rng)
    people = reading_people(world, n_passages, rng)
    width = _pid_width(n_passages)
    for i, (p, split) in enumerate(zip(people, splits, strict=True)):
        p.pid, p.split = f"p{i:0{width}d}", split
    return World(people=people, pools=world.pools)


def world_key(world_dir: str | os.PathLike) -> tuple[int, int]:
    """(seed, n_passages) of a world written by :func:`synthesize`, checked against its corpus
    (ValueError naming the file and the fix otherwise)."""
    import json

    manifest_path = Path(world_dir) / "world.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        key = (int(manifest["seed"]), int(manifest["n_passages"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: not a world written by `imprag data synth` ({e})") from e
    if "disjoint_from" in manifest:
        raise ValueError(f"{manifest_path}: is itself a pretraining world; pass the world it was drawn for")
    corpus = Path(world_dir) / "corpus.jsonl"
    try:
        with open(corpus) as fh:
            titles = [json.loads(line)["title"] for line in fh if line.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{corpus}: unreadable ({e}); rewrite the world with `imprag data synth`") from e
    if titles != [p.name for p in build_world(*key).people]:
        raise ValueError(
            f"{corpus}: does not match seed={key[0]} passages={key[1]} of {manifest_path}; "
            "rewrite the world with `imprag data synth`"
        )
    return key


def corpus_rows(world: World) -> list[dict[str, Any]]:
    return [{"id": p.pid, "title": p.name, "text": p.text} for p in world.people]


def synthesize(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_passages: int = 5000,
    overwrite: bool = False,
    disjoint_from: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write the synthetic world to out_dir atomically and return its manifest (world.json).

    ``disjoint_from=(seed, n_passages)`` of another world writes a pretraining world of
    n_passages people outside it (:func:`pretraining_world`) instead. Refuses a non-empty
    out_dir unless overwrite=True (FileExistsError).
    """
    from imprag_ray.data.synth_tasks import build_task_files

    if disjoint_from is None:
        world = build_world(seed, n_passages)
    else:
        world = pretraining_world(build_world(*disjoint_from), n_passages, seed)
    files = build_task_files(world, random.Random(f"tasks-{seed}"))
    manifest: dict[str, Any] = {
        "name": "imprag-synth",
        "version": VERSION,
        "seed": seed,
        "n_passages": n_passages,
        "corpus": {"path": "corpus.jsonl", "count": n_passages},
        "entities": split_sizes(n_passages),
        "relations": list(V.RELATIONS),
        "unseen_formats": ["slot_filling", "fact_check", "entity_linking"],
    }
    if disjoint_from is not None:
        manifest["disjoint_from"] = {"seed": disjoint_from[0], "n_passages": disjoint_from[1]}
    counts = {"corpus.jsonl": n_passages}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_jsonl_atomic(tmp / "corpus.jsonl", corpus_rows(world))
        for split in ("train", "dev", "eval"):
            manifest[split] = []
            for rel_path, fmt, rows in files[split]:
                (tmp / rel_path).parent.mkdir(parents=True, exist_ok=True)
                counts[rel_path] = write_jsonl_atomic(tmp / rel_path, rows)
                manifest[split].append({"path": rel_path, "format": fmt, "count": counts[rel_path]})
        manifest["counts"] = counts
        write_json_atomic(Path(tmp) / "world.json", manifest)
    return manifest
