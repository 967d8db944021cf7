"""Prompt templates of the paper (Table 1) and passage/target formatting.

prompt  = format_prompt(example)          e.g. "Q: Where was Ilsa Dren born? A:"
target  = format_target(answer)           e.g. " Velmora"   (leading space, no trailing text)
passage = format_passage(passage)         e.g. "Ilsa Dren: Ilsa Dren, known as Redhand, ..."
"""

from __future__ import annotations

from imprag_ray.data.records import Passage, TaskExample, check_format

SLOT_FILLING_INSTRUCTION = (
    "Provide the answer corresponding to the relation specified after [SEP] "
    "for the entity mentioned before [SEP]"
)
ENTITY_LINKING_INSTRUCTION = (
    "Output the Wikipedia page title of the entity mentioned between [START] and [END] in the given text"
)

# `{input}` is the example's input. KILT slot-filling inputs are already "entity [SEP] relation",
# and entity-linking inputs already carry the [START] mention [END] markers.
TEMPLATES: dict[str, str] = {
    "qa": "Q: {input} A:",
    "fact_check": "Is this statement true? {input} A:",
    "slot_filling": "{input} " + SLOT_FILLING_INSTRUCTION + " A:",
    "entity_linking": "{input} " + ENTITY_LINKING_INSTRUCTION + " A:",
    "prompt": "{input}",  # the input already is the full prompt; answered with passages
    "instruction": "{input}",  # the input already is the full prompt; no passages
    "corpus_text": "",  # plain LM text: no prompt, the whole text is the target
}


def format_prompt(example: TaskExample) -> str:
    """The model prompt for an example, per its format (no trailing space after 'A:')."""
    template = TEMPLATES[check_format(example.format)]
    return template.replace("{input}", example.input)


def format_target(answer: str) -> str:
    """The generation target that follows the prompt: a leading space plus the answer."""
    return " " + answer


def format_example(example: TaskExample) -> tuple[str, str]:
    """(prompt, target) using the first gold answer; for training."""
    if not example.answers:
        raise ValueError(f"example {example.id!r} has no answer to train on")
    return format_prompt(example), format_target(example.answers[0])


def format_passage(passage: Passage) -> str:
    """Reader/retriever text of a passage: "title: text", or just the text without a title."""
    return f"{passage.title}: {passage.text}" if passage.title else passage.text
