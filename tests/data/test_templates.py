"""The paper's prompt templates (Table 1), character for character."""

from __future__ import annotations

import pytest

from imprag_ray.data.records import Passage, TaskExample
from imprag_ray.data.templates import format_example, format_passage, format_prompt, format_target


def _ex(fmt: str, text: str, answers=("Velmora",)) -> TaskExample:
    return TaskExample("1", text, answers, (), fmt)


@pytest.mark.parametrize(
    "fmt, text, prompt",
    [
        ("qa", "Where was Ilsa Dren born?", "Q: Where was Ilsa Dren born? A:"),
        (
            "fact_check",
            "Ilsa Dren was born in Velmora.",
            "Is this statement true? Ilsa Dren was born in Velmora. A:",
        ),
        (
            "slot_filling",
            "Ilsa Dren [SEP] place of birth",
            "Ilsa Dren [SEP] place of birth Provide the answer corresponding to the relation specified "
            "after [SEP] for the entity mentioned before [SEP] A:",
        ),
        (
            "entity_linking",
            "[START] Redhand [END] visited Velmora.",
            "[START] Redhand [END] visited Velmora. Output the Wikipedia page title of the entity "
            "mentioned between [START] and [END] in the given text A:",
        ),
        (
            "prompt",
            "Ilsa Dren, home town please. Answer with one word. A:",
            "Ilsa Dren, home town please. Answer with one word. A:",
        ),
        (
            "instruction",
            "Passage: x. Write the sentence that comes next. A:",
            "Passage: x. Write the sentence that comes next. A:",
        ),
        ("corpus_text", "", ""),
    ],
)
def test_prompts_exact(fmt, text, prompt):
    assert format_prompt(_ex(fmt, text)) == prompt


def test_braces_in_input_are_literal():
    assert format_prompt(_ex("qa", "What is {input}?")) == "Q: What is {input}? A:"


def test_target_and_example():
    assert format_target("Velmora") == " Velmora"
    assert format_example(_ex("qa", "Where?")) == ("Q: Where? A:", " Velmora")
    with pytest.raises(ValueError, match="no answer"):
        format_example(_ex("qa", "Where?", answers=()))


def test_passage_with_and_without_title():
    assert format_passage(Passage("p1", "Ilsa Dren", "She was born.")) == "Ilsa Dren: She was born."
    assert format_passage(Passage("p1", "", "She was born.")) == "She was born."
