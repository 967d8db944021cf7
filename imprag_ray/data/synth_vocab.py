"""Word lists and surface templates of the synthetic world (see synth.py).

The vocabulary is deliberately small and regular so that a tiny model with a BPE tokenizer
trained on the corpus learns it in minutes: all proper names are built from SYLLABLES,
all other words come from the short lists below. Templates use `str.format` slots:
  {name} full name, {first} first name, {alias}, {he}/{He}, {his}/{His}, {city}, {year},
  {occ}, {org}, {river}; question/claim frames add {o1}, {o2} (other people), {c2} (another city),
  {q} (the question) and {body} (a framed question).
"""

from __future__ import annotations

# Relations of a person and the surface name used for slot filling (KILT T-REx style).
RELATIONS: tuple[str, ...] = ("birthplace", "occupation", "employer", "river", "birth_year")
SLOT_NAMES: dict[str, str] = {
    "birthplace": "place of birth",
    "occupation": "occupation",
    "employer": "employer",
    "river": "nearby river",
    "birth_year": "year of birth",
}

SYLLABLES: tuple[str, ...] = (
    "ar",
    "bel",
    "cas",
    "dor",
    "dren",
    "el",
    "fen",
    "gal",
    "hal",
    "il",
    "jor",
    "kal",
    "lin",
    "mor",
    "nav",
    "ost",
    "pel",
    "quin",
    "ros",
    "sel",
    "tam",
    "ul",
    "vel",
    "wyn",
    "yor",
    "zor",
    "bri",
    "dra",
    "kra",
    "tha",
    "mi",
    "ra",
    "na",
    "lo",
    "va",
    "sa",
)

# Consonant-initial so that "a {occ}" never needs "an".
OCCUPATIONS: tuple[str, ...] = (
    "baker",
    "smith",
    "weaver",
    "sailor",
    "miller",
    "potter",
    "healer",
    "scribe",
    "farmer",
    "hunter",
    "mason",
    "tailor",
    "brewer",
    "fisher",
    "carpenter",
    "merchant",
    "painter",
    "singer",
    "teacher",
    "guard",
    "cook",
    "builder",
    "tanner",
    "shepherd",
)
YEAR_RANGE = (1720, 1899)  # inclusive

# Aliases are compounds like "Redhand": ALIAS_HEADS x ALIAS_TAILS.
ALIAS_HEADS: tuple[str, ...] = (
    "red",
    "grey",
    "iron",
    "stone",
    "swift",
    "bold",
    "dark",
    "gold",
    "silver",
    "black",
    "white",
    "green",
    "tall",
    "quick",
    "bright",
    "cold",
    "wild",
    "old",
    "sharp",
    "long",
    "high",
    "deep",
    "thorn",
    "storm",
    "ash",
    "frost",
    "sun",
    "moon",
    "star",
    "fire",
    "rain",
    "snow",
    "salt",
    "oak",
    "elm",
    "rust",
    "copper",
    "amber",
    "blue",
    "pale",
)
ALIAS_TAILS: tuple[str, ...] = (
    "hand",
    "wolf",
    "jaw",
    "eye",
    "fox",
    "crow",
    "bear",
    "heart",
    "blade",
    "wind",
    "hawk",
    "fist",
    "horn",
    "song",
    "tooth",
    "brook",
    "field",
    "helm",
    "foot",
    "beard",
    "cloak",
    "shield",
    "bow",
    "axe",
    "spear",
    "stag",
    "boar",
    "owl",
    "raven",
    "lark",
    "wing",
    "mane",
    "claw",
    "fang",
    "staff",
    "ring",
    "coat",
    "hood",
    "bell",
    "drum",
    "pipe",
    "horse",
    "hound",
    "cat",
    "bull",
)

PRONOUNS = {
    "m": {"he": "he", "He": "He", "his": "his", "His": "His"},
    "f": {"he": "she", "He": "She", "his": "her", "His": "Her"},
}

# ---- passage sentences -------------------------------------------------------------
INTRO_SENTENCES: tuple[str, ...] = (
    "{name}, known as {alias}, was born in {city} in {year}.",
    "{name} was born in {city} in {year} and was known as {alias}.",
    "Born in {city} in {year}, {name} was called {alias} by friends.",
    "{name}, called {alias} by all, was born in the city of {city} in {year}.",
)
WORK_SENTENCES: tuple[str, ...] = (
    "{He} worked as a {occ} for the {org} guild.",
    "{He} was a {occ} in the {org} guild.",
    "The {org} guild employed {first} as a {occ}.",
)
RIVER_SENTENCES: tuple[str, ...] = (
    "{His} house stood by the river {river}.",
    "{He} lived on the banks of the river {river}.",
    "The river {river} flowed past the home of {first}.",
)
WORK_RIVER_SENTENCES: tuple[str, ...] = (
    "{He} worked as a {occ} for the {org} guild and lived by the river {river}.",
    "As a {occ} of the {org} guild, {he} kept a house near the river {river}.",
)

# ---- questions: relation wording is paraphrased relative to the passages -----------
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Where was {name} born?",
        "Which city is {name} from?",
        "What is the home town of {name}?",
        "Which city saw the birth of {name}?",
    ),
    "occupation": (
        "What was the trade of {name}?",
        "What did {name} do for a living?",
        "What job did {name} have?",
    ),
    "employer": (
        "Which guild did {name} work for?",
        "{name} belonged to which guild?",
        "Which guild paid {name}?",
    ),
    "river": (
        "Which river ran near the home of {name}?",
        "By which river did {name} live?",
        "Near what river was the house of {name}?",
    ),
    "birth_year": (
        "In which year was {name} born?",
        "When was {name} born?",
        "What year did {name} come into the world?",
    ),
}

# Frames make the whole prompt a poor explicit query: other people and places around the need.
SINGLE_FRAMES: tuple[str, ...] = ("{q}",)
TWO_FRAMES: tuple[str, ...] = (
    "{o1} met {name} in {c2}. {q}",
    "{name} and {o1} traveled to {c2} together. {q}",
    "{o1} once wrote a letter to {name} from {c2}. {q}",
    "{o1} spent a long winter in {c2} with old friends. {q}",
)
THREE_FRAMES: tuple[str, ...] = (
    "{o1}, {o2} and {name} met at the market in {c2}. {q}",
    "{o1} introduced {o2} to {name} in {c2}. {q}",
    "{o1} and {o2} argued in {c2} for a long time. {q}",
)
LONG_WRAPS: tuple[str, ...] = (
    "Read the short story below and answer the question at the end with a single word. {body}",
    "The text below mentions several people, but the question asks about only one of them. "
    "Answer with one word. {body}",
)

# ---- wrappers of retrieval-training questions (train/qa_varied.jsonl) ------------------
# Instruction text before or after the question, so that the implicit query is learned for
# a need inside a longer prompt. None of it is the wording of an eval template: the
# slot-filling, fact-check and entity-linking instructions stay unseen.
QUESTION_PREFIXES: tuple[str, ...] = (
    "Answer the question below. ",
    "Here is a question about one person. ",
    "Use what the records say about the person who is asked about. ",
    "A reader wants to know a single fact. ",
    "Please help with the following question, which is about one person only. ",
    "Can you help? ",
    "Do you know this one? Think about the records. ",
    "Here is a request. Can you do it? ",
    "Is the answer known? Look it up. ",
)
QUESTION_SUFFIXES: tuple[str, ...] = (
    " Answer with one word.",
    " Reply with the value only and no other words.",
    " Give a short answer taken from the record of the person who is asked about.",
    " The answer is a single name, place, trade, guild, river or year from that person's record.",
    " Write only the answer, as briefly as you can, without repeating the question or explaining it.",
)
# The need as a request: no question mark, the person named first, mid-way or last.
REQUESTS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Tell me the home town of {name}.", "{name} was born somewhere; name the city.",
                   "{name}, home town please.", "Name the city where {name} was born."),
    "occupation": ("Tell me what {name} did for a living.", "{name} had a trade; name it.",
                   "{name}, trade please.", "Name the trade of {name}."),
    "employer": ("Tell me which guild {name} worked for.", "{name} belonged to a guild; name it.",
                 "{name}, guild please.", "Name the guild of {name}."),
    "river": ("Tell me the river near the house of {name}.", "{name} lived by a river; name it.",
              "{name}, home river please.", "Name the river that ran past the home of {name}."),
    "birth_year": ("Tell me the year {name} was born.", "{name} was born in some year; give it.",
                   "{name}, year born please.", "Give the birth year of {name}."),
}
# Other people mentioned after the need (the frames of QA put them before it).
AFTER_FRAMES: tuple[str, ...] = (
    "{q} {o1} asked this in {c2}.",
    "{q} {o1} and {o2} argued about it in {c2}.",
)

# ---- claims (fact checking); every claim starts with {name} -----------------------
CLAIMS: dict[str, tuple[str, ...]] = {
    "birthplace": ("{name} was born in the city of {v}.", "{name} comes from {v}."),
    "occupation": ("{name} earned a living as a {v}.", "{name} was trained as a {v}."),
    "employer": ("{name} was hired by the {v} guild.", "{name} served the {v} guild."),
    "river": ("{name} lived near the river {v}.", "{name} had a house close to the river {v}."),
    "birth_year": ("{name} was born in the year {v}.", "{name} came into the world in {v}."),
}
CLAIM_FRAMES: tuple[str, ...] = (
    "{claim}",
    "{claim}",
    "According to {o1}, {claim}",
    "{o1} and {o2} both believe that {claim}",
)

# ---- entity linking: the person is mentioned by alias only --------------------------
LINKING_TEXTS: tuple[str, ...] = (
    "[START] {alias} [END] visited {c2} with {o1} in the spring.",
    "{o1} once shared a meal with [START] {alias} [END] in {c2}.",
    "In {c2}, {o1} and [START] {alias} [END] argued about the weather.",
    "Everyone in {c2} knew that [START] {alias} [END] was a friend of {o1}.",
)

# ---- retrieval-free instruction tasks (never use the eval templates' wording) -------
RC_PREFIX = "Read the passage and answer the question. Passage: {passage} Q: {q} A:"
RC_ALIAS_QUESTION = "Who is known as {alias}?"
VERIFY_PROMPT = (
    "Read the passage and decide whether the statement agrees with it. Passage: {passage} "
    "Statement: {claim} Answer true or false. A:"
)
NEXT_PROMPT = "Passage: {sentence} Write the sentence that comes next. A:"
PREV_PROMPT = "Passage: {sentence} Write the sentence that came before. A:"
DENOISE_PROMPT = "Fill in the [MASK] in the passage. Passage: {masked} A:"
# Reading curriculum (passages in the reader's slots, not in the prompt).
COPY_PROMPT = "Copy the passage about {name}. A:"
PROFILE_PROMPT = "List the facts about {name}. A:"
SLOT_NAMES_PROFILE: dict[str, str] = {  # not the slot-filling names: that format stays unseen
    "birthplace": "home town",
    "occupation": "trade",
    "employer": "guild",
    "river": "river",
    "birth_year": "born",
}

# ---- verification and look-up requests answered from retrieved passages -------------
# (train/tasks_varied.jsonl). The task kinds of fact checking, slot filling and entity
# linking in other words than their eval templates: no "Is this statement true?", no "[SEP]",
# no part of the slot-filling or entity-linking instructions, no "[START]"/"[END]". A test
# checks it.
VERIFY_BEFORE: tuple[str, ...] = (  # the cue before the claim, as the fact-check template has it
    "True or false? {claim}",
    "Does the record support this? {claim}",
    "Check this claim about one person. {claim}",
    "Someone said the following. Is it right? {claim}",
    "Please verify: {claim}",
    "Is the next sentence correct? {claim}",
)
VERIFY_AFTER: tuple[str, ...] = (  # the cue after the claim
    "{claim} True or false?",
    "{claim} Is that right?",
    "{claim} Is this correct? Answer true or false.",
    "{claim} Does the record agree?",
    "Claim: {claim} Verdict?",
    "{claim} Right or not?",
)
# Relation labels of look-up requests. The slot-filling relation name (SLOT_NAMES) is one of
# five: it is vocabulary a pretrained LLM has ("occupation", "employer" appear nowhere else in
# the world, so no model could map them), while the slot-filling format (entity [SEP] relation
# + its instruction) stays unseen. Measured on a base continued with look-ups whose labels
# left the names out: gold-passage EM 41% as "{name} | birth year", 11% as
# "{name} | year of birth".
SLOT_LABELS: dict[str, tuple[str, ...]] = {
    rel: (*labels, SLOT_NAMES[rel])
    for rel, labels in {
        "birthplace": ("birthplace", "home town", "city of origin", "born where"),
        "occupation": ("trade", "job", "profession", "line of work"),
        "employer": ("guild", "guild served", "hired by", "works for"),
        "river": ("river", "home river", "river by the house", "river close by"),
        "birth_year": ("birth year", "year born", "born when", "born in year"),
    }.items()
}
SLOT_FORMS: tuple[str, ...] = (
    "{name} | {label}",
    "{name} -- {label}?",
    "{name} :: {label}. Give the value from the record of this person.",
    "Entity: {name}. Attribute: {label}. What is its value?",
    "{name} ({label})",
    "Look up {label} for {name}.",
    "{name} / {label}. The part after the slash names what to give for the person before it.",
    "Record of {name}, field {label}.",
)
# Instruction text after half of the look-ups (with QUESTION_SUFFIXES), so that the query is
# learned for a need followed by instruction text. (Measured on that base, the slot-filling
# instruction after "{name} [SEP] {relation}" cut recall@1 from 95.5% to 19.5%; most of that
# was its words' untrained embedding rows: see checkpoint.mean_init_unused_rows.)
LOOKUP_SUFFIXES: tuple[str, ...] = (
    " Give the value of the named field for the person named first.",
    " Reply with the value from that person's record and nothing else.",
    " The words after the mark name a field; answer with that field's value for the person before the mark.",
    " Find the person in the records and return what the field asks for, in one or two words.",
)
# Who is meant by an alias: training aliases are shared by 3-4 people, so each request adds a
# fact that tells them apart. No "[START]"/"[END]" markers and no "Wikipedia page title".
LINK_FACTS: dict[str, str] = {
    "birthplace": "was born in {v}",
    "occupation": "worked as a {v}",
    "employer": "served the {v} guild",
    "river": "lived by the river {v}",
    "birth_year": "was born in the year {v}",
}
LINK_FORMS: tuple[str, ...] = (
    "Who is the person called {alias} who {fact}?",
    "Someone known as {alias} {fact}. Name this person.",
    "{o1} met the one they call {alias}, who {fact}. Give the full name of {alias}.",
    "Which person goes by {alias} and {fact}?",
    "The nickname {alias} belongs to someone who {fact}. Whose nickname is it?",
    "In {c2}, {o1} spoke with {alias}, who {fact}. Who is {alias}?",
)
