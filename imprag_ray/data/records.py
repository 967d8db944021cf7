"""Plain records shared by readers, templates, training and evaluation.

Kept free of any heavy dependency: these are what every other component passes around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Formats whose inputs are answered with retrieved passages: the paper's templates (Table 1),
# and `prompt`, whose input already is the whole prompt (a task with its own instruction).
RETRIEVAL_FORMATS: tuple[str, ...] = ("qa", "fact_check", "slot_filling", "entity_linking", "prompt")
# Retrieval-free training formats: `instruction` inputs are already the full prompt;
# `corpus_text` examples are plain LM text (empty input, the text is the answer).
RETRIEVAL_FREE_FORMATS: tuple[str, ...] = ("instruction", "corpus_text")
FORMATS: tuple[str, ...] = RETRIEVAL_FORMATS + RETRIEVAL_FREE_FORMATS


def check_format(format: str) -> str:
    """Return `format` if known, else raise ValueError listing the known formats."""
    if format not in FORMATS:
        raise ValueError(f"unknown task format {format!r}; known formats: {', '.join(FORMATS)}")
    return format


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of the corpus (Atlas style: {id, title, section, text}).

    title: the Wikipedia page the passage comes from (several passages share a page);
    section: the page section ("" when the corpus has none).
    """

    id: str
    title: str
    text: str
    section: str = ""


@dataclass(frozen=True)
class TaskExample:
    """One task input with its gold answers.

    answers: non-empty for labelled data, deduplicated, original order kept.
    provenance: the KILT provenance `wikipedia_id`s, deduplicated, may be empty. What they
        name depends on the data: passage ids of data.corpus (the synthetic world), or
        Wikipedia PAGE ids (real KILT), which are not passage ids; see
        :mod:`imprag_ray.data.provenance` for turning provenance into gold passages.
    provenance_titles: the page title of each provenance entry, parallel to `provenance`
        ("" where the entry has no title); empty when the source gave no titles at all.
    format: one of FORMATS; decides the prompt template.
    meta: free-form extras; not part of equality or hashing.
    """

    id: str
    input: str
    answers: tuple[str, ...]
    provenance: tuple[str, ...]
    format: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    provenance_titles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples so the record stays immutable.
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "provenance", tuple(self.provenance))
        object.__setattr__(self, "provenance_titles", tuple(self.provenance_titles))
        if self.provenance_titles and len(self.provenance_titles) != len(self.provenance):
            raise ValueError(
                f"example {self.id!r}: provenance_titles has {len(self.provenance_titles)} entries "
                f'for {len(self.provenance)} provenance ids; give one title per id ("" if unknown)'
            )
        check_format(self.format)


class DataError(ValueError):
    """A malformed input record. The message names `file:line`, the field and the fix.

    Example: ``corpus.jsonl:17: field 'text' missing; each line must be {"id", "title", "text"}``
    """

    def __init__(self, where: str, field: str | None, problem: str, fix: str) -> None:
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        subject = f"field '{field}' {problem}" if field else problem
        super().__init__(f"{where}: {subject}; {fix}")
