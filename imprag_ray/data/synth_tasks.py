"""Task rows (KILT JSONL dicts) of the synthetic world built by synth.py.

Row: {"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id", "title"}]}], "meta"}
meta holds the relation / task kind and `mentions` (people named in the input) for analysis;
it never holds the answer or the asked person's name.
Other people mentioned in any input come from train and distractor people only, so held-out
people never appear outside the corpus and their own split's files.
"""

from __future__ import annotations

import random
import re
from typing import Any

from imprag_ray.data import synth_vocab as V
from imprag_ray.data.synth import Person, World

QA_PER_TRAIN_PERSON = 4
INSTRUCTION_KINDS = ("rc", "rc_alias", "verify", "next", "prev", "denoise")
CORPUS_TEXT_SHARE = 0.10  # of the whole training mix


def _row(rid: str, text: str, answer: str, person: Person | None, meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"answer": answer}
    if person is not None:
        out["provenance"] = [{"wikipedia_id": person.pid, "title": person.name}]
    return {"id": rid, "input": text, "output": [out], "meta": meta}


class TaskBuilder:
    """Draws questions, claims and instruction prompts about people of one world."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        # Mentionable "other" people: never held-out ones.
        self.mentionable = [p for p in world.people if p.split in ("train", "distractor")]

    # ---- shared pieces -----------------------------------------------------------
    def _others(self, target: Person, k: int) -> list[str]:
        names: list[str] = []
        while len(names) < k:
            cand = self.rng.choice(self.mentionable).name
            if cand != target.name and cand not in names:
                names.append(cand)
        return names

    def _other_city(self, target: Person) -> str:
        cities = [c for c in self.world.pools["birthplace"] if c != target.facts["birthplace"]]
        return self.rng.choice(cities)

    def _frame(self, target: Person, q: str) -> tuple[str, int]:
        """Wrap question q in a frame mentioning 0-2 other people; returns (text, mentions)."""
        r = self.rng.random()
        if r < 0.2:
            return q, 1
        frames, k = (V.TWO_FRAMES, 1) if r < 0.6 or r >= 0.85 else (V.THREE_FRAMES, 2)
        o = self._others(target, 2)
        frame = self.rng.choice(frames)
        body = frame.format(o1=o[0], o2=o[1], c2=self._other_city(target), name=target.name, q=q)
        mentions = 1 + k
        if r >= 0.85:  # long instruction around a short need
            body = self.rng.choice(V.LONG_WRAPS).format(body=body)
        return body, mentions

    def question(self, target: Person, rel: str) -> tuple[str, int]:
        q = self.rng.choice(V.QUESTIONS[rel]).format(name=target.name)
        return self._frame(target, q)

    def claim(self, target: Person, rel: str, true: bool) -> str:
        value = target.facts[rel]
        if not true:
            value = self.rng.choice([v for v in self.world.pools[rel] if v != value])
        return self.rng.choice(V.CLAIMS[rel]).format(name=target.name, v=value)

    # ---- task files ----------------------------------------------------------------
    def qa(self, people: list[Person], prefix: str, per_person: int) -> list[dict[str, Any]]:
        rows = []
        for p in people:
            for rel in self.rng.sample(V.RELATIONS, per_person):
                text, mentions = self.question(p, rel)
                meta = {"relation": rel, "mentions": mentions}
                rows.append(_row(f"{prefix}-{len(rows):05d}", text, p.facts[rel], p, meta))
        return rows

    def slot_filling(self, people: list[Person], prefix: str) -> list[dict[str, Any]]:
        rows = []
        for i, p in enumerate(people):
            rel = self.rng.choice(V.RELATIONS)
            text = f"{p.name} [SEP] {V.SLOT_NAMES[rel]}"
            rows.append(_row(f"{prefix}-{i:05d}", text, p.facts[rel], p, {"relation": rel, "mentions": 1}))
        return rows

    def fact_check(self, people: list[Person], prefix: str) -> list[dict[str, Any]]:
        labels = [i % 2 == 0 for i in range(len(people))]  # exactly half true (rounded up)
        self.rng.shuffle(labels)
        rows = []
        for i, (p, true) in enumerate(zip(people, labels, strict=True)):
            rel = self.rng.choice(V.RELATIONS)
            o = self._others(p, 2)
            frame = self.rng.choice(V.CLAIM_FRAMES)
            text = frame.format(claim=self.claim(p, rel, true), o1=o[0], o2=o[1])
            meta = {"relation": rel, "mentions": 1 + frame.count("{o")}
            rows.append(_row(f"{prefix}-{i:05d}", text, "true" if true else "false", p, meta))
        return rows

    def entity_linking(self, people: list[Person], prefix: str) -> list[dict[str, Any]]:
        rows = []
        for i, p in enumerate(people):
            o1 = self._others(p, 1)[0]
            text = self.rng.choice(V.LINKING_TEXTS).format(alias=p.alias, o1=o1, c2=self._other_city(p))
            rows.append(_row(f"{prefix}-{i:05d}", text, p.name, p, {"relation": "alias", "mentions": 2}))
        return rows

    def qa_varied(self, people: list[Person], asked: list[str], prefix: str) -> list[dict[str, Any]]:
        """One question per person as a whole prompt (format ``prompt``): a question (framed by
        other people as in QA) or a request without a question mark, sometimes with other people
        mentioned after it, inside instruction text before and/or after it, with or without the
        QA template's "Q:", always ending in " A:". The target is thus not always the name
        before the last "?", nor never the first name of the prompt: QA alone taught the tiny
        model those shortcuts (measured on the demo model: fact-check claims recall@1 2.5% in
        their template "Is this statement true? {claim} A:", 35.5% as "Q: {claim} A:").

        ``asked[i]`` is the relation already asked about ``people[i]`` elsewhere (qa_once):
        this question asks another one, so each fact is still asked once. Without such items
        the implicit query is learned for the "Q: ... ? A:" surface only: one instruction
        sentence after the question dropped the demo model's QA recall@10 from 75.5% to 7%
        (measured). There are no "who is known as {alias}?" items: training people share
        aliases (only held-out aliases are unique), so the BM25 teacher's top-1 was the
        asked person for 3.6% of them (measured on the demo world), and the rest would train
        retrieval and reading on the wrong passage.
        """
        rows = []
        for i, (p, done) in enumerate(zip(people, asked, strict=True)):
            rel = self.rng.choice([r for r in V.RELATIONS if r != done])
            answer, meta = p.facts[rel], {"relation": rel}
            if self.rng.random() < 0.5:
                text, mentions = self.question(p, rel)
            else:
                text, mentions = self.rng.choice(V.REQUESTS[rel]).format(name=p.name), 1
            if self.rng.random() < 0.25:
                o = self._others(p, 2)
                frame = self.rng.choice(V.AFTER_FRAMES)
                text = frame.format(q=text, o1=o[0], o2=o[1], c2=self._other_city(p))
                mentions += frame.count("{o")
            if text.startswith(p.name) and self.rng.random() < 0.5:
                # A prompt may open with the person's name, as slot-filling inputs do: keep
                # some so, with nothing before the name.
                rows.append(_row(f"{prefix}-{i:05d}", text + " A:", answer, p, {**meta, "mentions": mentions}))
                continue
            text = self.rng.choice(("", "", "Q: ")) + text
            r = self.rng.random()
            if 0.2 <= r < 0.5 or r >= 0.8:
                text = self.rng.choice(V.QUESTION_PREFIXES) + text
            if r >= 0.5:
                text = text + self.rng.choice(V.QUESTION_SUFFIXES)
            rows.append(_row(f"{prefix}-{i:05d}", text + " A:", answer, p, {**meta, "mentions": mentions}))
        return rows

    def tasks_varied(self, people: list[Person], asked: list[set[str]], prefix: str) -> list[dict[str, Any]]:
        """Three more prompts per person (format ``prompt``, answered from retrieved passages):
        a claim to verify (answer "true"/"false", half of each), a look-up request
        ("{name} | trade", "Look up guild for {name}.", ...), each about a relation not in
        ``asked[i]`` (the ones qa_once and qa_varied asked), so each fact is still asked once,
        and who is meant by an alias plus one fact that no other bearer of the alias shares
        (answer: the full name).

        These are the task kinds of fact checking, slot filling and entity linking in other
        words than their eval templates, which stay unseen (synth_vocab.VERIFY_*, SLOT_*,
        LOOKUP_SUFFIXES, LINK_*); a look-up's label may be the slot-filling relation name.
        Measured on the demo world's held-out people: without look-ups, slot-filling EM was
        8% even with the gold passage read (9.5% for BM25, which retrieves it perfectly);
        with them (imprag model pretrain-base, stage 2, then the demo fine-tune) 59.5%.
        Without claims, every system answered fact-check prompts with a fact value
        ("brewer"); with them the answers are true/false, but the tiny reader does not yet
        compare the claim with the passage (EM near 50% with the gold passage). The alias
        items have not yet made entity linking retrieve (recall@10 near 0%).
        """
        bearers: dict[str, list[Person]] = {}
        for q in self.world.people:
            bearers.setdefault(q.alias, []).append(q)
        labels = [i % 2 == 0 for i in range(len(people))]
        self.rng.shuffle(labels)
        rows = []
        for p, done, true in zip(people, asked, labels, strict=True):
            verify_rel, slot_rel = self.rng.sample([r for r in V.RELATIONS if r not in done], 2)
            claim, mentions = self.claim(p, verify_rel, true), 1
            if self.rng.random() < 0.25:  # other people around the claim, as in fact checking
                o, frame = self._others(p, 2), self.rng.choice(V.CLAIM_FRAMES[2:])
                claim, mentions = frame.format(claim=claim, o1=o[0], o2=o[1]), 1 + frame.count("{o")
            cue = self.rng.choice(V.VERIFY_BEFORE + V.VERIFY_AFTER)
            meta = {"task": "verify", "relation": verify_rel, "mentions": mentions}
            text = cue.format(claim=claim) + " A:"
            rows.append(_row(f"{prefix}-{len(rows):05d}", text, "true" if true else "false", p, meta))
            label = self.rng.choice(V.SLOT_LABELS[slot_rel])
            text = self.rng.choice(V.SLOT_FORMS).format(name=p.name, label=label)
            if self.rng.random() < 0.5:
                text += self.rng.choice(V.LOOKUP_SUFFIXES + V.QUESTION_SUFFIXES)
            text += " A:"
            meta = {"task": "lookup", "relation": slot_rel, "mentions": 1}
            rows.append(_row(f"{prefix}-{len(rows):05d}", text, p.facts[slot_rel], p, meta))
            others = [q for q in bearers[p.alias] if q is not p]
            telling = [r for r in V.RELATIONS if all(q.facts[r] != p.facts[r] for q in others)]
            # the fact no other prompt asks about, if it tells the bearers apart
            unasked = [r for r in telling if r not in {*done, verify_rel, slot_rel}]
            rel = self.rng.choice(unasked or telling or list(V.RELATIONS))
            form = self.rng.choice(V.LINK_FORMS)
            fact = V.LINK_FACTS[rel].format(v=p.facts[rel])
            o1 = self._others(p, 1)[0]
            text = form.format(alias=p.alias, fact=fact, o1=o1, c2=self._other_city(p)) + " A:"
            meta = {"task": "link", "relation": rel, "mentions": 1 + form.count("{o")}
            rows.append(_row(f"{prefix}-{len(rows):05d}", text, p.name, p, meta))
        return rows

    # ---- retrieval-free instruction data -----------------------------------------------
    def instruction(self, pool: list[Person], n: int, prefix: str) -> list[dict[str, Any]]:
        rows = []
        for i in range(n):
            p = self.rng.choice(pool)
            kind = INSTRUCTION_KINDS[i % len(INSTRUCTION_KINDS)]
            text, answer = getattr(self, f"_instr_{kind}")(p)
            rows.append(_row(f"{prefix}-{i:05d}", text, answer, None, {"task": kind}))
        return rows

    # ---- reading curriculum: the gold passage is in the reader's passage slots --------------
    def reading(self, pool: list[Person], prefix: str) -> list[dict[str, Any]]:
        """One row per person of ``pool``: copy its passage, list its facts as "relation: value"
        pairs (a profile), or answer a QA-format question.

        Trained with ``context: gold`` (the person's passage among random others in the
        ImpRAG passage slots, reader loss only). Copying whole passages is a dense signal that
        makes the middle layers read the passages early; without it the tiny model learned
        the answer type but not to copy the value (measured).
        """
        rows = []
        for i, p in enumerate(pool):
            if i % 3 == 0:
                text, answer, meta = V.COPY_PROMPT.format(name=p.name), p.text, {"task": "copy"}
            elif i % 3 == 1:
                text, answer, meta = V.PROFILE_PROMPT.format(name=p.name), self._profile(p), {"task": "profile"}
            else:
                rel = self.rng.choice(V.RELATIONS)
                q = self.rng.choice(V.QUESTIONS[rel]).format(name=p.name)
                text, answer, meta = f"Q: {q} A:", p.facts[rel], {"task": "read_qa", "relation": rel}
            rows.append(_row(f"{prefix}-{i:05d}", text, answer, p, meta))
        return rows

    def _profile(self, p: Person) -> str:
        """All facts as "relation: value" pairs in random order: each value must be looked up
        in the passage by its relation (other wording than the passage, so no span copying)."""
        rels = self.rng.sample(V.RELATIONS, len(V.RELATIONS))
        return ", ".join(f"{V.SLOT_NAMES_PROFILE[r]}: {p.facts[r]}" for r in rels)

    def _instr_rc(self, p: Person) -> tuple[str, str]:
        rel = self.rng.choice(V.RELATIONS)
        q = self.rng.choice(V.QUESTIONS[rel]).format(name=p.name)
        return V.RC_PREFIX.format(passage=_passage(p), q=q), p.facts[rel]

    def _instr_rc_alias(self, p: Person) -> tuple[str, str]:
        q = V.RC_ALIAS_QUESTION.format(alias=p.alias)
        return V.RC_PREFIX.format(passage=_passage(p), q=q), p.name

    def _instr_verify(self, p: Person) -> tuple[str, str]:
        true = self.rng.random() < 0.5
        claim = self.claim(p, self.rng.choice(V.RELATIONS), true)
        return V.VERIFY_PROMPT.format(passage=_passage(p), claim=claim), "true" if true else "false"

    def _instr_next(self, p: Person) -> tuple[str, str]:
        i = self.rng.randrange(len(p.sentences) - 1)
        return V.NEXT_PROMPT.format(sentence=p.sentences[i]), p.sentences[i + 1]

    def _instr_prev(self, p: Person) -> tuple[str, str]:
        i = self.rng.randrange(len(p.sentences) - 1)
        return V.PREV_PROMPT.format(sentence=p.sentences[i + 1]), p.sentences[i]

    def _instr_denoise(self, p: Person) -> tuple[str, str]:
        phrase = self.rng.choice([*p.facts.values(), p.alias])
        masked = re.sub(rf"\b{re.escape(phrase)}\b", "[MASK]", _passage(p), count=1)
        return V.DENOISE_PROMPT.format(masked=masked), phrase


def _passage(p: Person) -> str:
    """Same "title: text" string the reader sees (templates.format_passage)."""
    return f"{p.name}: {p.text}"


def build_task_files(world: World, rng: random.Random) -> dict[str, list[tuple[str, str, list]]]:
    """{"train"|"dev"|"eval": [(relative path, format, rows), ...]}."""
    b = TaskBuilder(world, rng)
    train, dev, test = world.split("train"), world.split("dev"), world.split("test")
    pool = [p for p in world.people if p.split in ("train", "distractor")]
    qa = b.qa(train, "train-qa", QA_PER_TRAIN_PERSON)
    instr = b.instruction(pool, len(qa), "train-instruction")
    n_text = min(len(pool), round((len(qa) + len(instr)) * CORPUS_TEXT_SHARE / (1 - CORPUS_TEXT_SHARE)))
    text_rows = [
        _row(f"train-corpus_text-{i:05d}", "", p.text, p, {"task": "corpus_text"})
        for i, p in enumerate(rng.sample(pool, n_text))
    ]
    dev_qa = b.qa(dev, "dev-qa", 1)
    evals = [
        ("eval/qa.jsonl", "qa", b.qa(test, "eval-qa", 1)),
        ("eval/slot_filling.jsonl", "slot_filling", b.slot_filling(test, "eval-slot_filling")),
        ("eval/fact_check.jsonl", "fact_check", b.fact_check(test, "eval-fact_check")),
        ("eval/entity_linking.jsonl", "entity_linking", b.entity_linking(test, "eval-entity_linking")),
    ]
    # Drawn last so that adding it left every other file of a seed unchanged.
    reading = b.reading(rng.sample(pool, len(pool)), "train-reading")
    # One question per training or distractor person, from its own generator (every other
    # file stays as it was): a fact asked once cannot be recalled, only read, which is what
    # lets a small model start reading while it learns to retrieve (imprag model pretrain-base).
    qa_once = TaskBuilder(world, random.Random(f"qa-once-{rng.random()}")).qa(pool, "train-qa_once", 1)
    # The same people asked about another relation, inside instruction text.
    asked = [row["meta"]["relation"] for row in qa_once]
    qa_varied = TaskBuilder(world, random.Random(f"qa-varied-{rng.random()}")).qa_varied(
        pool, asked, "train-qa_varied"
    )
    # Claims to verify and look-up requests about two further relations of the same people,
    # and who is meant by each one's alias.
    asked_twice = [{a, row["meta"]["relation"]} for a, row in zip(asked, qa_varied, strict=True)]
    tasks_varied = TaskBuilder(world, random.Random(f"tasks-varied-{rng.random()}")).tasks_varied(
        pool, asked_twice, "train-tasks_varied"
    )
    return {
        "train": [
            ("train/qa.jsonl", "qa", qa),
            ("train/instruction.jsonl", "instruction", instr),
            ("train/corpus_text.jsonl", "corpus_text", text_rows),
            ("train/reading.jsonl", "instruction", reading),
            ("train/qa_once.jsonl", "qa", qa_once),
            ("train/qa_varied.jsonl", "prompt", qa_varied),
            ("train/tasks_varied.jsonl", "prompt", tasks_varied),
        ],
        "dev": [("dev/qa.jsonl", "qa", dev_qa)],
        "eval": evals,
    }
