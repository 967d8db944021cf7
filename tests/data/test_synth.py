"""The synthetic world: deterministic, sized, leak-free, answerable, and a poor explicit query."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from imprag_ray.data import synth_vocab as V
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.data.synth import split_sizes, synthesize
from imprag_ray.data.templates import ENTITY_LINKING_INSTRUCTION, SLOT_FILLING_INSTRUCTION, format_prompt
from imprag_ray.eval.metrics import answer_in_text

N = 400


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    synthesize(out, seed=0, n_passages=N)
    return out


def _manifest(world: Path) -> dict:
    return json.loads((world / "world.json").read_text())


def _tasks(world: Path, split: str) -> dict[str, list]:
    return {e["path"]: read_tasks(world / e["path"], e["format"]) for e in _manifest(world)[split]}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(tmp_path, world):
    synthesize(tmp_path / "a", seed=0, n_passages=N)
    synthesize(tmp_path / "b", seed=1, n_passages=N)
    same, other = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert same == _files(world)
    assert same.keys() == other.keys() and same["corpus.jsonl"] != other["corpus.jsonl"]


def test_layout_sizes_and_manifest(world):
    m = _manifest(world)
    assert m["seed"] == 0 and m["n_passages"] == N
    assert [e["path"] for e in m["train"]] == [
        "train/qa.jsonl",
        "train/instruction.jsonl",
        "train/corpus_text.jsonl",
        "train/reading.jsonl",
        "train/qa_once.jsonl",
        "train/qa_varied.jsonl",
        "train/tasks_varied.jsonl",
    ]
    assert {e["path"]: e["format"] for e in m["eval"]} == {
        "eval/qa.jsonl": "qa",
        "eval/slot_filling.jsonl": "slot_filling",
        "eval/fact_check.jsonl": "fact_check",
        "eval/entity_linking.jsonl": "entity_linking",
    }
    assert m["entities"] == split_sizes(N) and sum(m["entities"].values()) == N
    for path, count in m["counts"].items():
        assert sum(1 for line in (world / path).open() if line.strip()) == count
    assert m["counts"]["corpus.jsonl"] == N
    for entry in m["eval"] + m["dev"]:
        assert entry["count"] >= 20
    assert not (world / "train" / "slot_filling.jsonl").exists()
    corpus_text = m["counts"]["train/corpus_text.jsonl"]
    # drawn apart from the ImpRAG mix
    curricula = ("train/reading.jsonl", "train/qa_once.jsonl", "train/qa_varied.jsonl", "train/tasks_varied.jsonl")
    mix = sum(e["count"] for e in m["train"] if e["path"] not in curricula)
    assert 0.07 < corpus_text / mix < 0.13


def test_default_sizes_scale():
    assert split_sizes(5000) == {"train": 1500, "dev": 200, "test": 200, "distractor": 3100}
    with pytest.raises(ValueError, match="too small"):
        split_sizes(50)


def test_corpus_passages(world):
    corpus = read_corpus(world / "corpus.jsonl")
    assert len(corpus) == N and corpus[0].id == "p00000"
    assert len({p.title for p in corpus}) == N  # unique names
    for p in corpus:
        assert 20 <= len(p.text.split()) <= 50, p.text
        assert p.title in p.text
        assert 2 <= p.text.count(".") <= 3
    # Small regular vocabulary: besides years and alias compounds ("Redhand" = red + hand),
    # only a few hundred words (syllable-built names, a few value pools, template words).
    aliases = {(h + t) for h in V.ALIAS_HEADS for t in V.ALIAS_TAILS}
    vocab = {w for p in corpus for w in re.findall(r"[a-z]+", p.text.lower())} - aliases
    assert len(vocab) < 300


def test_held_out_people_never_in_train_files(world):
    held = [
        ex for tasks in (_tasks(world, "dev"), _tasks(world, "eval")) for exs in tasks.values() for ex in exs
    ]
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    held_ids = {pid for ex in held for pid in ex.provenance}
    held_names = {corpus[pid].title for pid in held_ids}
    assert len(held_ids) == 2 * split_sizes(N)["test"]
    for entry in _manifest(world)["train"]:
        raw = (world / entry["path"]).read_text()
        assert not any(name in raw for name in held_names), entry["path"]
        assert not any(f'"{pid}"' in raw for pid in held_ids), entry["path"]
    dev_ids = {pid for exs in _tasks(world, "dev").values() for ex in exs for pid in ex.provenance}
    test_ids = {pid for exs in _tasks(world, "eval").values() for ex in exs for pid in ex.provenance}
    assert not dev_ids & test_ids


def test_unseen_formats_stay_unseen_in_training(world):
    for entry in _manifest(world)["train"]:
        raw = (world / entry["path"]).read_text()
        for marker in ("[SEP]", "[START]", "[END]", "Is this statement true?", "Wikipedia page title"):
            assert marker not in raw, (entry["path"], marker)


def test_every_eval_answer_is_in_its_gold_passage(world):
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    for path, exs in {**_tasks(world, "dev"), **_tasks(world, "eval")}.items():
        for ex in exs:
            [pid] = ex.provenance
            gold = corpus[pid]
            if ex.format == "fact_check":
                assert gold.title in ex.input and ex.answers[0] in ("true", "false")
            elif ex.format == "entity_linking":
                alias = re.search(r"\[START\] (\w+) \[END\]", ex.input).group(1)
                assert ex.answers == (gold.title,) and alias in gold.text
            else:
                assert gold.title in ex.input and answer_in_text(gold.text, ex.answers), (path, ex)


def test_fact_check_balanced(world):
    answers = [ex.answers[0] for ex in _tasks(world, "eval")["eval/fact_check.jsonl"]]
    assert abs(answers.count("true") - answers.count("false")) <= 1


def test_aliases_of_test_people_are_unique(world):
    corpus = read_corpus(world / "corpus.jsonl")
    for ex in _tasks(world, "eval")["eval/entity_linking.jsonl"]:
        alias = re.search(r"\[START\] (\w+) \[END\]", ex.input).group(1)
        assert sum(re.search(rf"\b{alias}\b", p.text) is not None for p in corpus) == 1


def test_questions_are_poor_explicit_queries(world):
    titles = [p.title for p in read_corpus(world / "corpus.jsonl")]
    for path, exs in {**_tasks(world, "train"), **_tasks(world, "eval")}.items():
        if not path.endswith("qa.jsonl"):
            continue
        mentions = [sum(t in ex.input for t in titles) for ex in exs]
        multi = sum(m >= 2 for m in mentions) / len(mentions)
        assert multi > 0.5, (path, multi)
        assert any(m >= 3 for m in mentions)
        assert max(len(ex.input.split()) for ex in exs) > 25  # long instructions exist


def test_instruction_and_corpus_text_shapes(world):
    train = _tasks(world, "train")
    instr = train["train/instruction.jsonl"]
    assert all(format_prompt(ex) == ex.input and ex.input.endswith("A:") for ex in instr)
    kinds = {ex.input.split(" Passage:")[0].split(".")[0] for ex in instr}
    assert len(kinds) >= 3
    assert any("[MASK]" in ex.input for ex in instr)
    texts = train["train/corpus_text.jsonl"]
    assert all(ex.input == "" and format_prompt(ex) == "" for ex in texts)


def test_reading_curriculum_copies_and_asks_with_the_gold_passage(world):
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    rows = _tasks(world, "train")["train/reading.jsonl"]
    kinds = {ex.meta["task"] for ex in rows}
    assert kinds == {"copy", "profile", "read_qa"}
    assert len(rows) == split_sizes(N)["train"] + split_sizes(N)["distractor"]  # one per non-held-out person
    for ex in rows:
        gold = corpus[ex.provenance[0]]
        assert format_prompt(ex) == ex.input and ex.input.endswith("A:") and gold.title in ex.input
        if ex.meta["task"] == "copy":
            assert ex.answers[0] == gold.text
        elif ex.meta["task"] == "profile":
            values = [pair.split(": ")[1] for pair in ex.answers[0].split(", ")]
            assert len(values) == 5 and all(v in gold.text for v in values)
        else:
            assert ex.input.startswith("Q: ") and ex.answers[0] in gold.text


def test_qa_once_asks_each_non_held_out_person_one_answerable_question(world):
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    rows = _tasks(world, "train")["train/qa_once.jsonl"]
    people = [ex.provenance[0] for ex in rows]
    assert len(people) == len(set(people)) == split_sizes(N)["train"] + split_sizes(N)["distractor"]
    relations = {ex.meta["relation"] for ex in rows}
    assert relations == set(V.RELATIONS)
    for ex in rows:
        gold = corpus[ex.provenance[0]]
        assert ex.format == "qa" and gold.title in ex.input and ex.answers[0] in gold.text


def test_qa_varied_asks_each_person_about_another_fact_in_varied_prompts(world):
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    tasks = _tasks(world, "train")
    once = {ex.provenance[0]: ex.meta["relation"] for ex in tasks["train/qa_once.jsonl"]}
    rows = tasks["train/qa_varied.jsonl"]
    assert [ex.provenance[0] for ex in rows] == list(once)  # the same people, in the same order
    eval_wording = (SLOT_FILLING_INSTRUCTION, ENTITY_LINKING_INSTRUCTION, "[SEP]", "[START]", "Is this statement")
    for ex in rows:
        gold = corpus[ex.provenance[0]]
        assert ex.format == "prompt" and format_prompt(ex) == ex.input and ex.input.endswith(" A:")
        assert ex.meta["relation"] != once[gold.id]  # each fact is asked once over both files
        assert not any(w in ex.input for w in eval_wording)
        assert gold.title in ex.input and ex.answers[0] in gold.text
    share = lambda pred: sum(map(pred, rows)) / len(rows)  # noqa: E731
    assert 0.05 < share(lambda ex: ex.input.startswith(corpus[ex.provenance[0]].title)) < 0.3  # the name opens it
    assert 0.25 < share(lambda ex: ex.input.startswith(V.QUESTION_PREFIXES)) < 0.75
    assert 0.25 < share(lambda ex: ex.input[: -len(" A:")].endswith(V.QUESTION_SUFFIXES)) < 0.75
    assert 0.1 < share(lambda ex: "Q: " in ex.input) < 0.6


@pytest.fixture(scope="module")
def demo_size_world(tmp_path_factory) -> Path:
    """The demo's size: training aliases are shared by 3-4 people only at this size."""
    out = tmp_path_factory.mktemp("synth5k") / "world"
    synthesize(out, seed=0, n_passages=5000)
    return out


def test_tasks_varied_verifies_looks_up_and_links_in_other_words_than_the_eval(demo_size_world):
    world = demo_size_world
    corpus = {p.id: p for p in read_corpus(world / "corpus.jsonl")}
    tasks = _tasks(world, "train")
    asked: dict[str, set[str]] = {}
    for name in ("train/qa_once.jsonl", "train/qa_varied.jsonl"):
        for ex in tasks[name]:
            asked.setdefault(ex.provenance[0], set()).add(ex.meta["relation"])
    rows = tasks["train/tasks_varied.jsonl"]
    verify, lookup, link = rows[0::3], rows[1::3], rows[2::3]
    assert [ex.provenance[0] for ex in verify] == [ex.provenance[0] for ex in lookup] == list(asked)
    assert [ex.provenance[0] for ex in link] == list(asked)
    for kind, exs in (("verify", verify), ("lookup", lookup), ("link", link)):
        assert {ex.meta["task"] for ex in exs} == {kind}
    eval_wording = (SLOT_FILLING_INSTRUCTION, ENTITY_LINKING_INSTRUCTION, "[SEP]", "[START]", "Is this statement")
    labels_seen: set[str] = set()
    alias_of = {p.id: re.search(r"(?:known as|called) (\w+)", p.text).group(1) for p in corpus.values()}
    bearers: dict[str, list[str]] = {}
    for pid, alias in alias_of.items():
        bearers.setdefault(alias, []).append(pid)
    shared = 0
    for v, lk, li in zip(verify, lookup, link, strict=True):
        gold = corpus[v.provenance[0]]
        # each fact is asked once over qa_once, qa_varied and this file
        assert len({*asked[gold.id], v.meta["relation"], lk.meta["relation"]}) == 4
        for ex in (v, lk, li):
            assert ex.format == "prompt" and format_prompt(ex) == ex.input and ex.input.endswith(" A:")
            assert not any(w in ex.input for w in eval_wording)
        assert gold.title in v.input and gold.title in lk.input
        labels_seen.add(max((x for x in V.SLOT_LABELS[lk.meta["relation"]] if x in lk.input), key=len))
        assert lk.answers[0] in gold.text
        # a true claim holds its person's value, a false one another value of that relation
        claims = [c.format(name=gold.title, v="(\\w+)") for c in V.CLAIMS[v.meta["relation"]]]
        value = next(m for c in claims if (m := re.search(c.replace(".", "\\."), v.input))).group(1)
        in_passage = re.search(rf"\b{value}\b", gold.text) is not None
        assert in_passage == (v.answers[0] == "true"), (v.input, gold.text)
        # linking: the alias and a fact, not the name; the fact tells the alias's bearers apart
        assert li.answers == (gold.title,) and gold.title not in li.input and alias_of[gold.id] in li.input
        fact = re.search(r"(?:born in(?: the year)?|worked as a|served the|lived by the river) (\w+)", li.input)
        assert fact and fact.group(1) in gold.text, li.input
        others = [corpus[pid] for pid in bearers[alias_of[gold.id]] if pid != gold.id]
        assert not any(re.search(rf"\b{fact.group(1)}\b", o.text) for o in others), li.input
        shared += bool(others)
    assert shared > len(link) / 2  # most training aliases have other bearers
    assert set(V.SLOT_NAMES.values()) <= labels_seen  # the relation names, not the format
    suffixed = sum(ex.input[: -len(" A:")].endswith(V.LOOKUP_SUFFIXES + V.QUESTION_SUFFIXES) for ex in lookup)
    assert 0.35 < suffixed / len(lookup) < 0.65
    labels = [ex.answers[0] for ex in verify]
    assert abs(labels.count("true") - labels.count("false")) <= 1
    cue_first = sum(ex.input.startswith(tuple(c.split("{")[0] for c in V.VERIFY_BEFORE)) for ex in verify)
    assert 0.3 < cue_first / len(verify) < 0.7  # the cue before the claim (as in fact checking) or after it


def test_adding_the_reading_curriculum_left_the_other_files_unchanged(world):
    # sha256 of the seed-0 JSONL files before train/reading.jsonl, train/qa_once.jsonl and
    # train/qa_varied.jsonl and train/tasks_varied.jsonl existed (each is drawn last, from its
    # own generator),
    # so runs and numbers measured on earlier worlds stay comparable.
    digest = hashlib.sha256()
    for path in sorted(world.rglob("*.jsonl")):
        if path.name not in ("reading.jsonl", "qa_once.jsonl", "qa_varied.jsonl", "tasks_varied.jsonl"):
            digest.update(str(path.relative_to(world)).encode())
            digest.update(path.read_bytes())
    assert digest.hexdigest() == "188ac1df6a54ff4671041110e8cd404f7891799fc6ac3af67ef1678654eeab66"


def test_refuses_non_empty_out_dir_and_overwrites(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize(out, n_passages=120)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    m = synthesize(out, n_passages=120, overwrite=True)
    assert (out / "world.json").exists() and not (out / "keep.txt").exists()
    assert m == _manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_pretraining_world_has_none_of_the_worlds_people_and_the_same_values(tmp_path, world):
    from imprag_ray.data.synth import world_key

    assert world_key(world) == (0, N)
    m = synthesize(tmp_path / "pre", seed=5, n_passages=200, disjoint_from=world_key(world))
    assert m["disjoint_from"] == {"seed": 0, "n_passages": N} and m["entities"] == split_sizes(200)
    pre = {p.title: p for p in read_corpus(tmp_path / "pre/corpus.jsonl")}
    base = {p.title for p in read_corpus(world / "corpus.jsonl")}
    assert len(pre) == 200 and not pre.keys() & base
    # same name pools (one tokenizer serves both worlds), other combinations
    firsts = {t.split(" ")[0] for t in base}
    assert {t.split(" ")[0] for t in pre} <= firsts
    # answers come from the world's value pools and are read from the person's passage
    from imprag_ray.data.synth import build_world

    values = {v for pool in build_world(0, N).pools.values() for v in pool}
    qa = read_tasks(tmp_path / "pre/train/qa.jsonl", "qa") + read_tasks(tmp_path / "pre/dev/qa.jsonl", "qa")
    by_id = {p.id: p for p in pre.values()}
    assert all(answer_in_text(by_id[e.provenance[0]].text, e.answers) for e in qa)
    assert qa and {e.answers[0] for e in qa} <= values
    # deterministic, and a pretraining world cannot be the world another one avoids
    synthesize(tmp_path / "again", seed=5, n_passages=200, disjoint_from=(0, N))
    assert _files(tmp_path / "again") == _files(tmp_path / "pre")
    with pytest.raises(ValueError, match="is itself a pretraining world"):
        world_key(tmp_path / "pre")


def test_world_key_refuses_a_corpus_that_is_not_its_seeds(tmp_path, world):
    from imprag_ray.data.synth import world_key

    (tmp_path / "w").mkdir()
    (tmp_path / "w/world.json").write_text((world / "world.json").read_text())
    lines = (world / "corpus.jsonl").read_text().splitlines()
    (tmp_path / "w/corpus.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="does not match seed=0 passages=400"):
        world_key(tmp_path / "w")
    with pytest.raises(ValueError, match="not a world written by"):
        world_key(tmp_path / "missing")
