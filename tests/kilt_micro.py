"""A micro KILT + Atlas world in the real file formats, for rehearsing the paper jobs.

``write_kilt_world(root)`` writes, under ``root``, the tree that jobs/llama3_2_3b_imprag.yaml and
jobs/llama3_1_8b_imprag.yaml read under /mnt/data:

  atlas/enwiki-dec2021/passages.jsonl   Atlas passages {"id", "title", "section", "text"}:
                                        40 fictional pages (24 people, 16 towns) x 5 passages
                                        of 60-100 words; ids are integers as strings
  kilt/{nq,hotpotqa}-train-kilt.jsonl   KILT rows {"id", "input", "output": [{"answer",
  kilt/{nq,hotpotqa,trex,structured_zeroshot,fever,aidayago2}-dev-kilt.jsonl
                                        "provenance": [{"wikipedia_id", "title", "section",
                                        "start_paragraph_id", "end_paragraph_id", ...}]}], "meta"}
  instruct/instruction_mix.jsonl        `instruction` rows: the input is the whole prompt
  atlas/corpus_text_sample.jsonl        `corpus_text` rows: Atlas passages {"id", "title", "section", "text"}
  labels/contriever_msmarco_top50.jsonl `kind: labels` teacher file {"id", "ranking": [50 passage ids]}
                                        for every KILT train and dev example: the gold pages'
                                        passages first, then BM25 (bm25s) over the passages

As in real KILT over Atlas, a provenance ``wikipedia_id`` is a PAGE id and never a passage id of
its own page, and every page id here IS the passage id of a passage of ANOTHER page: comparing
retrieved passage ids with ``wikipedia_id`` counts spurious hits; only the titles join.
Answers are strings found in the gold page's passages (FEVER: SUPPORTS / REFUTES; AIDA: the page
title). Deterministic for a seed, and fast (well under a second without the labels' BM25).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIRST = [
    "Anselm",
    "Brigida",
    "Corvin",
    "Delphine",
    "Edric",
    "Fiora",
    "Gideon",
    "Hesper",
    "Ivo",
    "Jocasta",
    "Kasimir",
    "Liesel",
    "Marek",
    "Nerys",
    "Oswin",
    "Perpetua",
    "Quillon",
    "Rosalind",
    "Severin",
    "Thea",
    "Ulric",
    "Vesna",
    "Wendel",
    "Ysolde",
]
LAST = [
    "Aldercott",
    "Brennholt",
    "Castellan",
    "Dunmoor",
    "Everhart",
    "Falkenrath",
    "Greywell",
    "Halloran",
    "Ingleby",
    "Jessop",
    "Kestrelle",
    "Lindqvist",
    "Marrowby",
    "Northcote",
    "Oakhurst",
    "Pellerin",
    "Quarrington",
    "Ravensworth",
    "Stavrou",
    "Thornbury",
    "Underhill",
    "Valcourt",
    "Whitlock",
    "Yardley",
]
TOWNS = [
    "Kestmere",
    "Dunvallow",
    "Orlenbrook",
    "Saltcombe",
    "Varnholm",
    "Brackenfold",
    "Millhaven",
    "Tarrowby",
    "Quenmoor",
    "Elsworth",
    "Ravenmouth",
    "Caldergate",
    "Ashbury",
    "Fernhollow",
    "Wyvernton",
    "Glassford",
]
COUNTRIES = [
    ("Arvenland", "Arvenish"),
    ("Mesteria", "Mesterian"),
    ("Volkhar", "Volkharan"),
    ("Caledra", "Caledran"),
]
REGIONS = ["the northern highlands", "the eastern marches", "the lake district", "the southern coast"]
RIVERS = ["Eske", "Morrow", "Thale", "Varn", "Isel", "Corran", "Lune", "Aldwater"]
INDUSTRIES = ["shipbuilding", "wool weaving", "glassmaking", "salt mining", "clockmaking", "paper milling"]
LANDMARKS = [
    "a stone bridge of eleven arches",
    "the old customs house",
    "a ruined abbey",
    "a lighthouse on the harbour wall",
    "the covered market hall",
    "a clock tower",
]
OCCUPATIONS = {
    "botanist": ("study", ["The Flora of the Salt Marshes", "Mosses of the High Moor", "On Winter Seeds"]),
    "architect": ("building", ["the Lantern Library", "the Corn Exchange", "the Harbour Baths"]),
    "composer": ("symphony", ["Symphony of the Northern Shore", "The Glass Orchard", "Winter Lanterns"]),
    "cartographer": ("atlas", ["A Map of Quiet Rivers", "The Coastal Survey", "Atlas of the Marches"]),
    "physician": ("treatise", ["On Fevers of the Lowlands", "The Clean Water Report", "Notes on Quarantine"]),
    "novelist": ("novel", ["The Ferryman's Daughter", "Salt and Ash", "A House on the Isel"]),
    "astronomer": (
        "star catalogue",
        ["The Kestmere Catalogue", "Tables of the Moving Stars", "Night Survey"],
    ),
    "engineer": ("canal", ["the Varn Canal", "the Eske Viaduct", "the Morrow Locks"]),
}
AWARDS = ["the Halvard Prize", "the Order of the Silver Fern", "the Marlowe Medal", "the Caspian Award"]
PARENTS = ["schoolteacher", "ferryman", "weaver", "clerk", "miller", "glassblower", "printer", "carpenter"]
PERSON_FILLER = [
    "Letters from this period survive in the town archive.",
    "Contemporaries described {obj} as patient, exacting and generous with younger colleagues.",
    "Several of these papers were later reprinted in a collected edition.",
    "The work drew on years of careful notes kept in small bound diaries.",
    "Critics of the time were divided, but the public response was warm.",
    "A portrait of {name} by an unknown painter hangs in the academy hall.",
    "Much of this material was catalogued only after a fire in the old library.",
    "Friends recalled long walks along the river in every season.",
]
TOWN_FILLER = [
    "The surrounding farmland is mostly given over to sheep and barley.",
    "A weekly market has been held in the main square since the middle ages.",
    "The parish church contains fine carved pews and a painted rood screen.",
    "Rail services connect the town with the regional capital twice a day.",
    "Many of the older houses are built of a pale local sandstone.",
    "Local festivals mark the spring thaw and the autumn harvest.",
    "The town council meets in a guildhall rebuilt after a flood.",
    "Visitors come in summer for the walking trails along the valley.",
]
RELATIONS_TREX = {
    "place of birth": "birth_town",
    "occupation": "occupation",
    "award received": "award",
    "country": "country",
}
RELATIONS_ZSRE = {
    "employer": "institution",
    "spouse": "spouse",
    "located next to body of water": "river",
    "date of death": "death_year",
}


@dataclass
class Page:
    title: str
    kind: str  # person | town
    facts: dict[str, Any]
    passages: list[tuple[str, str]] = field(default_factory=list)  # (section, text)
    passage_ids: list[str] = field(default_factory=list)
    wikipedia_id: str = ""


def _a(word: str) -> str:
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def _words(text: str) -> int:
    return len(text.split())


def _fill(sentences: list[str], filler: list[str], rng: random.Random, fmt: dict[str, str]) -> str:
    """Base sentences plus filler until the passage has 60-100 words."""
    text = " ".join(sentences)
    pool = [f.format(**fmt) for f in filler]
    rng.shuffle(pool)
    for sentence in pool:
        if _words(text) >= 60:
            break
        if _words(text) + _words(sentence) <= 100:
            text = f"{text} {sentence}"
    assert 60 <= _words(text) <= 100, (_words(text), text)
    return text


def _towns(rng: random.Random) -> list[Page]:
    pages = []
    for i, name in enumerate(TOWNS):
        country, _ = COUNTRIES[i % len(COUNTRIES)]
        facts = {
            "town": name,
            "country": country,
            "region": REGIONS[i % len(REGIONS)],
            "river": RIVERS[i % len(RIVERS)],
            "founded": str(1100 + 37 * i),
            "population": f"{(3 + (7 * i) % 40) * 1000 + 500:,}",
            "industry": INDUSTRIES[i % len(INDUSTRIES)],
            "landmark": LANDMARKS[i % len(LANDMARKS)],
        }
        pages.append(Page(name, "town", facts))
    return pages


def _people(rng: random.Random, towns: list[Page]) -> list[Page]:
    pages = []
    occupations = list(OCCUPATIONS)
    for i in range(24):
        first, last = FIRST[i], LAST[(i * 5) % len(LAST)]
        occupation = occupations[i % len(occupations)]
        kind, works = OCCUPATIONS[occupation]
        birth, death = towns[(i * 3) % len(towns)], towns[(i * 3 + 5) % len(towns)]
        by = 1790 + 4 * i
        facts = {
            "name": f"{first} {last}",
            "first": first,
            "last": last,
            "occupation": occupation,
            "work_kind": kind,
            "work": works[i % len(works)],
            "work_year": str(by + 31),
            "birth_town": birth.title,
            "birth_year": str(by),
            "death_town": death.title,
            "death_year": str(by + 63 + i % 9),
            "country": birth.facts["country"],
            "nationality": dict(COUNTRIES)[birth.facts["country"]],
            "institution": f"the University of {towns[(i * 7 + 2) % len(towns)].title}",
            "award": AWARDS[i % len(AWARDS)],
            "award_year": str(by + 38),
            "spouse": f"{FIRST[(i + 11) % 24]} {LAST[(i * 5 + 3) % 24]}",
            "parent1": PARENTS[i % len(PARENTS)],
            "parent2": PARENTS[(i + 3) % len(PARENTS)],
            "p": "she" if i % 2 else "he",
            "poss": "her" if i % 2 else "his",
        }
        pages.append(Page(facts["name"], "person", facts))
    return pages


def _person_passages(page: Page, rng: random.Random) -> None:
    f = page.facts
    fmt = {"obj": "her" if f["p"] == "she" else "him", "name": f["name"]}
    P = f["p"].capitalize()
    bodies = [
        (
            "",
            [
                f"{f['name']} ({f['birth_year']}-{f['death_year']}) was {_a(f['nationality'])} {f['occupation']} "
                f"best known for {f['work']}.",
                f"Born in {f['birth_town']}, {f['p']} spent most of {f['poss']} working life at {f['institution']}.",
                f"{P} is remembered as one of the leading figures of {f['poss']} generation in {f['country']}.",
            ],
        ),
        (
            "Early life",
            [
                f"{f['name']} was born in {f['birth_town']}, {f['country']}, in {f['birth_year']}.",
                f"{P} was the child of {_a(f['parent1'])} and {_a(f['parent2'])}, and grew up in a narrow "
                f"house near the river.",
                f"As a youth {f['p']} attended the grammar school of {f['birth_town']} and read widely.",
            ],
        ),
        (
            "Career",
            [
                f"In {int(f['birth_year']) + 24}, {f['name']} joined {f['institution']} as an assistant.",
                f"{P} completed {f['poss']} best-known {f['work_kind']}, {f['work']}, in {f['work_year']}.",
                f"The {f['work_kind']} established {f['poss']} reputation as {_a(f['occupation'])} across "
                f"{f['country']}.",
            ],
        ),
        (
            "Recognition",
            [
                f"{f['name']} received {f['award']} in {f['award_year']} for {f['work']}.",
                f"The citation praised {f['poss']} precision and {f['poss']} service to {f['institution']}.",
                f"{P} used the prize money to fund a scholarship for students from {f['birth_town']}.",
            ],
        ),
        (
            "Later life",
            [
                f"{f['name']} married {f['spouse']}, a fellow member of {f['institution']}.",
                f"In old age {f['p']} moved to {f['death_town']}, where {f['p']} died in {f['death_year']}.",
                f"{P} is buried in the churchyard of {f['death_town']}.",
            ],
        ),
    ]
    page.passages = [(s, _fill(b, PERSON_FILLER, rng, fmt)) for s, b in bodies]


def _town_passages(page: Page, rng: random.Random, natives: list[Page]) -> None:
    f = page.facts
    names = ", ".join(p.title for p in natives[:3]) or "several merchants and clergy"
    bodies = [
        (
            "",
            [
                f"{f['town']} is a town in {f['region']} of {f['country']}, on the river {f['river']}.",
                f"It has a population of about {f['population']} and is the seat of its district.",
                f"The town grew up around a ford of the {f['river']} and a small harbour.",
            ],
        ),
        (
            "History",
            [
                f"{f['town']} was founded in {f['founded']} as a market settlement.",
                f"Its charter allowed a fair each autumn, and merchants from across {f['country']} came "
                f"to trade.",
                "Walls were raised two centuries later, though little of them survives.",
            ],
        ),
        (
            "Economy",
            [
                f"The economy of {f['town']} has long rested on {f['industry']}.",
                f"Workshops along the {f['river']} employed much of the town until the last century.",
                f"Today {f['industry']} remains a source of pride and a museum tells its story.",
            ],
        ),
        (
            "Landmarks",
            [
                f"The best-known landmark of {f['town']} is {f['landmark']}.",
                "It appears on postcards and on the town's coat of arms.",
                "Restoration work was completed with money raised by residents.",
            ],
        ),
        (
            "Notable people",
            [
                f"People born in {f['town']} include {names}.",
                f"The town library keeps a collection about its famous natives of {f['country']}.",
                "A blue plaque marks several of their houses.",
            ],
        ),
    ]
    page.passages = [(s, _fill(b, TOWN_FILLER, rng, {})) for s, b in bodies]


def _assign_ids(pages: list[Page], rng: random.Random, first_id: int) -> None:
    """Passage ids in corpus order; each page id = a passage id of ANOTHER page (a derangement)."""
    next_id = first_id
    for page in pages:
        page.passage_ids = [str(next_id + j) for j in range(len(page.passages))]
        next_id += len(page.passages)
    order = list(range(len(pages)))
    rng.shuffle(order)
    for j, i in enumerate(order):
        other = pages[order[(j + 1) % len(order)]]
        pages[i].wikipedia_id = other.passage_ids[rng.randrange(len(other.passage_ids))]


def _provenance(page: Page, fact_text: str | None = None) -> dict[str, Any]:
    """A KILT provenance entry for the page (paragraph ids 1-based: KILT's paragraph 0 is the title)."""
    index = 0
    if fact_text is not None:
        index = next((j for j, (_, t) in enumerate(page.passages) if fact_text in t), 0)
    section, text = page.passages[index]
    return {
        "wikipedia_id": page.wikipedia_id,
        "title": page.title,
        "section": f"Section::::{section}." if section else "Section::::Abstract",
        "start_paragraph_id": index + 1,
        "start_character": 0,
        "end_paragraph_id": index + 1,
        "end_character": len(text),
        "bleu_score": 1.0,
    }


def _row(
    qid: str, text: str, answer: str, gold: list[tuple[Page, str | None]], extra: list[str] = ()
) -> dict:
    out = [{"answer": answer, "provenance": [_provenance(p, fact) for p, fact in gold]}]
    out += [{"answer": a} for a in extra]
    return {"id": qid, "input": text, "output": out, "meta": {}}


def _check_answer(row: dict, pages: dict[str, Page]) -> None:
    """Every answer is a string in a gold page's passages (FEVER labels excepted)."""
    answer = row["output"][0]["answer"]
    if answer in ("SUPPORTS", "REFUTES"):
        return
    texts = [t for prov in row["output"][0]["provenance"] for _, t in pages[prov["title"]].passages]
    assert any(answer in t for t in texts), (row["id"], answer)


def _nq(people: list[Page], towns: list[Page], rng: random.Random, split: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = i % 6
        person, town = (
            people[(i * 7 + (split == "dev")) % len(people)],
            towns[(i * 5 + 3 * (split == "dev")) % len(towns)],
        )
        pf, tf = person.facts, town.facts
        q, a, gold = {
            0: (
                f"where was {pf['name'].lower()} born",
                pf["birth_town"],
                [(person, f"born in {pf['birth_town']}")],
            ),
            1: (f"when was {tf['town'].lower()} founded", tf["founded"], [(town, tf["founded"])]),
            2: (f"what river does {tf['town'].lower()} lie on", tf["river"], [(town, None)]),
            3: (f"who created {pf['work'].lower()}", pf["name"], [(person, None)]),
            4: (
                f"what award did {pf['name'].lower()} receive in {pf['award_year']}",
                pf["award"],
                [(person, pf["award_year"])],
            ),
            5: (f"what is the main industry of {tf['town'].lower()}", tf["industry"], [(town, "economy of")]),
        }[kind]
        rows.append(_row(f"nq-{split}-{i:04d}", q, a, gold))
    return rows


def _hotpot(
    people: list[Page], by_title: dict[str, Page], rng: random.Random, split: str, n: int
) -> list[dict]:
    rows = []
    for i in range(n):
        person = people[(i * 5 + 2 * (split == "dev")) % len(people)]
        other = people[(i * 5 + 7) % len(people)]
        pf = person.facts
        town = by_title[pf["birth_town"]]
        kind = i % 3
        if kind == 0:
            q, a = f"In which country is the town where {pf['name']} was born?", town.facts["country"]
            gold = [(person, "born in"), (town, None)]
        elif kind == 1:
            q, a = f"Which river flows through the birthplace of {pf['name']}?", town.facts["river"]
            gold = [(person, "born in"), (town, None)]
        else:
            older = person if int(pf["birth_year"]) < int(other.facts["birth_year"]) else other
            q, a = f"Who was born first, {pf['name']} or {other.facts['name']}?", older.title
            gold = [(person, "born in"), (other, "born in")]
        rows.append(_row(f"hotpot-{split}-{i:04d}", q, a, gold))
    return rows


def _slots(
    people: list[Page], towns: list[Page], relations: dict[str, str], prefix: str, n: int
) -> list[dict]:
    rows = []
    for i in range(n):
        relation, key = list(relations.items())[i % len(relations)]
        subject = towns[i % len(towns)] if key in ("river",) else people[(i * 3 + 1) % len(people)]
        if relation == "country" and prefix == "trex":
            subject = towns[(i * 3) % len(towns)]
        answer = subject.facts[key]
        rows.append(
            _row(f"{prefix}-dev-{i:04d}", f"{subject.title} [SEP] {relation}", answer, [(subject, answer)])
        )
    return rows


def _fever(people: list[Page], towns: list[Page], n: int) -> list[dict]:
    rows = []
    for i in range(n):
        person, town = people[(i * 5 + 1) % len(people)], towns[(i * 3 + 2) % len(towns)]
        true = i % 2 == 0
        if i % 4 < 2:
            place = person.facts["birth_town"] if true else person.facts["death_town"]
            claim, gold = f"{person.title} was born in {place}.", person
        else:
            river = (
                town.facts["river"] if true else RIVERS[(RIVERS.index(town.facts["river"]) + 1) % len(RIVERS)]
            )
            claim, gold = f"{town.title} lies on the river {river}.", town
        rows.append(_row(f"fever-dev-{i:04d}", claim, "SUPPORTS" if true else "REFUTES", [(gold, None)]))
    return rows


def _aida(people: list[Page], towns: list[Page], n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2 == 0:
            p = people[(i * 7 + 3) % len(people)]
            f = p.facts
            text = (
                f"The exhibition in {f['death_town']} opened with letters by the {f['occupation']} "
                f"[START] {f['last']} [END], whose {f['work_kind']} {f['work']} is on display."
            )
            rows.append(_row(f"aida-dev-{i:04d}", text, p.title, [(p, None)]))
        else:
            t = towns[(i * 3 + 1) % len(towns)]
            text = (
                f"Shipping on the {t.facts['river']} resumed after the floods, and traders in "
                f"[START] {t.title} [END] reported a busy week for {t.facts['industry']}."
            )
            rows.append(_row(f"aida-dev-{i:04d}", text, t.title, [(t, None)]))
    return rows


def _instructions(pages: list[Page], n: int) -> list[dict]:
    rows = []
    for i in range(n):
        page = pages[(i * 7) % len(pages)]
        section, text = page.passages[i % len(page.passages)]
        first = text.split(". ")[0].rstrip(".") + "."
        kind = i % 3
        if kind == 0:
            prompt, answer = f"Summarise the following passage in one sentence.\n\n{text}", first
        elif kind == 1:
            prompt = f"Give a title for this passage about {page.title}.\n\n{text}"
            answer = f"{page.title}: {section or 'Overview'}"
        else:
            prompt = f"User: Can you tell me one fact about {page.title}?\nAssistant:"
            answer = first
        rows.append({"id": f"instr-{i:04d}", "input": prompt, "output": [{"answer": answer}], "meta": {}})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _labels(pages: list[Page], tasks: dict[str, list[dict]], depth: int = 50) -> list[dict]:
    """BM25 (the project's bm25s teacher) over "title: text", gold pages' passages first."""
    from imprag_ray.data.records import Passage
    from imprag_ray.retrievers.teachers import BM25Teacher

    passages = [
        Passage(pid, p.title, t, s)
        for p in pages
        for pid, (s, t) in zip(p.passage_ids, p.passages, strict=True)
    ]
    by_title = {p.title: p for p in pages}
    rows = [row for name in sorted(tasks) for row in tasks[name]]
    ranked = BM25Teacher(passages).rank([r["input"] for r in rows], len(passages))
    out = []
    for row, ranking in zip(rows, ranked, strict=True):
        gold = {pid for prov in row["output"][0]["provenance"] for pid in by_title[prov["title"]].passage_ids}
        ids = [pid for pid, _ in ranking]
        ordered = [pid for pid in ids if pid in gold] + [pid for pid in ids if pid not in gold]
        out.append({"id": row["id"], "ranking": ordered[:depth]})
    return out


def write_kilt_world(root: Path, seed: int = 0) -> dict[str, Any]:
    """Write the micro world under ``root`` (see module docstring). Returns::

    {"root": root, "files": {relative path: absolute Path}, "pages": [{"title",
     "wikipedia_id", "passage_ids"}], "texts": [every passage, input, answer and title]}
    """
    root = Path(root)
    rng = random.Random(seed)
    towns = _towns(rng)
    people = _people(rng, towns)
    by_title = {p.title: p for p in towns + people}
    for p in people:
        _person_passages(p, rng)
    for t in towns:
        _town_passages(t, rng, [p for p in people if p.facts["birth_town"] == t.title])
    pages = [pages for pair in zip(people[:16], towns, strict=True) for pages in pair] + people[16:]
    _assign_ids(pages, rng, first_id=1000 + 100 * seed)

    kilt = {
        "nq-train-kilt.jsonl": _nq(people, towns, rng, "train", 48),
        "hotpotqa-train-kilt.jsonl": _hotpot(people, by_title, rng, "train", 36),
        "nq-dev-kilt.jsonl": _nq(people, towns, rng, "dev", 16),
        "hotpotqa-dev-kilt.jsonl": _hotpot(people, by_title, rng, "dev", 16),
        "trex-dev-kilt.jsonl": _slots(people, towns, RELATIONS_TREX, "trex", 16),
        "structured_zeroshot-dev-kilt.jsonl": _slots(people, towns, RELATIONS_ZSRE, "zsre", 16),
        "fever-dev-kilt.jsonl": _fever(people, towns, 16),
        "aidayago2-dev-kilt.jsonl": _aida(people, towns, 16),
    }
    for rows in kilt.values():
        for row in rows:
            _check_answer(row, by_title)
    corpus_rows = [
        {"id": pid, "title": p.title, "section": s, "text": t}
        for p in pages
        for pid, (s, t) in zip(p.passage_ids, p.passages, strict=True)
    ]
    instructions = _instructions(pages, 30)
    corpus_text = [corpus_rows[(i * 9) % len(corpus_rows)] for i in range(20)]
    files = {
        "atlas/enwiki-dec2021/passages.jsonl": _write_jsonl(
            root / "atlas/enwiki-dec2021/passages.jsonl", corpus_rows
        ),
        "atlas/corpus_text_sample.jsonl": _write_jsonl(root / "atlas/corpus_text_sample.jsonl", corpus_text),
        "instruct/instruction_mix.jsonl": _write_jsonl(root / "instruct/instruction_mix.jsonl", instructions),
    }
    for name, rows in kilt.items():
        files[f"kilt/{name}"] = _write_jsonl(root / "kilt" / name, rows)
    files["labels/contriever_msmarco_top50.jsonl"] = _write_jsonl(
        root / "labels/contriever_msmarco_top50.jsonl", _labels(pages, kilt)
    )
    texts = [r["text"] for r in corpus_rows] + [p.title for p in pages]
    for rows in [*kilt.values(), instructions]:
        for row in rows:
            texts.append(row["input"])
            texts += [o["answer"] for o in row["output"] if "answer" in o]
    return {
        "root": root,
        "files": files,
        "pages": [
            {"title": p.title, "wikipedia_id": p.wikipedia_id, "passage_ids": list(p.passage_ids)}
            for p in pages
        ],
        "texts": texts,
    }
