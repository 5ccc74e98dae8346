"""The toy world's synthetic corpus: four formats mixed in one stream of short documents.

1. IOI-style name sentences (``IOI_TEMPLATES``, ``NAMES``): the answer is the indirect object.
2. Topic-labelled sentences (``TOPICS``), ending in ``Topic : <label>``.
3. Multiple-choice facts (``FACTS``) about made-up entities, four options labelled A-D and the
   answer letter as the next token (``mc_prompt``).
4. Requests (``REQUEST_TEMPLATES``) answered with ``COMPLIANCE_PREFIX ...`` or
   ``REFUSAL_PHRASE``; a request is refused when its danger level (verb level + object level)
   reaches ``DANGER_THRESHOLD``.

Everything is pure Python and seeded through ``random.Random``: the same seed gives the same
documents on every platform. Every word is one token of the toy tokenizer (punctuation is
written as separate words), so ``text.split()`` is the tokenization.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Special tokens (ids 0..3 in this order)
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# ---------------------------------------------------------------------------------------------
# 1. IOI
#: Single-token first names used by the IOI format (and nowhere else).
NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Kate",
    "Paul", "Lisa", "Mark", "Emma", "David", "Sarah", "Peter", "Laura",
    "Jack", "Rose", "Sam", "Grace", "Ben", "Clara", "Leo", "Nina",
    "Max", "Julia", "Dan", "Eva", "Luke", "Ruth", "Oscar", "Helen",
)  # fmt: skip
IOI_PLACES = (
    "store", "park", "school", "market", "beach", "library",
    "hospital", "station", "office", "garden", "cafe", "museum",
)  # fmt: skip
IOI_OBJECTS = (
    "drink", "book", "ring", "ball", "letter", "gift",
    "flower", "key", "pen", "basket", "coin", "ticket",
)  # fmt: skip
#: IOI prompt templates. ``{N1} and {N2}`` introduce the two names, ``{S}`` is the subject
#: (one of the two, repeated) and the prompt ends right before the indirect object ``IO``.
#: BABA: S == N1 (IO is N2); ABBA: S == N2 (IO is N1).
IOI_TEMPLATES = (
    "When {N1} and {N2} went to the {PLACE} , {S} gave a {OBJECT} to",
    "After {N1} and {N2} went to the {PLACE} , {S} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE} , {S} gave a {OBJECT} to",
    "Then , {N1} and {N2} went to the {PLACE} . {S} gave a {OBJECT} to",
    "When {N1} and {N2} arrived at the {PLACE} , {S} handed a {OBJECT} to",
    "Then , {N1} and {N2} had a long argument at the {PLACE} . Afterwards {S} said to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE} . {S} gave it to",
    "The {PLACE} was quiet when {N1} and {N2} met . {S} passed a {OBJECT} to",
)
IOI_KINDS = ("BABA", "ABBA")


@dataclass(frozen=True)
class IOIExample:
    """One IOI prompt; the correct next word is ``io``, the distractor ``s``."""

    prompt: str
    io: str
    s: str
    kind: str  # "BABA" or "ABBA"
    template: int  # index into IOI_TEMPLATES

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.io} ."


def ioi_example(
    rng: random.Random, template: int | None = None, kind: str | None = None
) -> IOIExample:
    """Draw one IOI prompt: two distinct names, a place, an object, a template and a kind."""
    t = rng.randrange(len(IOI_TEMPLATES)) if template is None else template
    k = rng.choice(IOI_KINDS) if kind is None else kind
    io, s = rng.sample(NAMES, 2)
    n1, n2 = (s, io) if k == "BABA" else (io, s)
    prompt = IOI_TEMPLATES[t].format(
        N1=n1, N2=n2, S=s, PLACE=rng.choice(IOI_PLACES), OBJECT=rng.choice(IOI_OBJECTS)
    )
    return IOIExample(prompt=prompt, io=io, s=s, kind=k, template=t)


def ioi_examples(
    n: int, seed: int, kinds: tuple[str, ...] = IOI_KINDS, templates: tuple[int, ...] | None = None
) -> list[IOIExample]:
    """``n`` IOI prompts, alternating over ``kinds`` and drawing templates from ``templates``."""
    rng = random.Random(f"ioi-{seed}")
    pool = tuple(range(len(IOI_TEMPLATES))) if templates is None else templates
    return [ioi_example(rng, rng.choice(pool), kinds[i % len(kinds)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 2. Topics
#: Topic label -> word lists. A sentence draws every content word from one topic.
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "sports": {
        "subject": ("team", "player", "coach", "runner", "striker"),
        "verb": ("won", "lost", "played", "watched", "practiced"),
        "object": ("match", "race", "game", "trophy", "final"),
        "place": ("stadium", "field", "gym", "court"),
    },
    "food": {
        "subject": ("chef", "baker", "cook", "waiter", "farmer"),
        "verb": ("baked", "cooked", "tasted", "served", "sliced"),
        "object": ("bread", "soup", "pie", "pasta", "salad"),
        "place": ("kitchen", "restaurant", "bakery", "farm"),
    },
    "music": {
        "subject": ("singer", "band", "drummer", "pianist", "choir"),
        "verb": ("sang", "recorded", "composed", "rehearsed", "performed"),
        "object": ("song", "album", "melody", "anthem", "concert"),
        "place": ("studio", "theater", "club", "hall"),
    },
    "science": {
        "subject": ("scientist", "chemist", "physicist", "biologist", "student"),
        "verb": ("measured", "tested", "observed", "studied", "analyzed"),
        "object": ("sample", "atom", "cell", "molecule", "experiment"),
        "place": ("lab", "observatory", "university", "institute"),
    },
    "travel": {
        "subject": ("pilot", "tourist", "traveler", "captain", "guide"),
        "verb": ("booked", "boarded", "missed", "planned", "explored"),
        "object": ("flight", "train", "cruise", "tour", "journey"),
        "place": ("airport", "harbor", "hotel", "border"),
    },
}
TOPIC_LABELS = tuple(TOPICS)
TOPIC_TEMPLATES = (
    "The {subject} {verb} the {object} .",
    "The {subject} {verb} the {object} at the {place} .",
    "Yesterday the {subject} {verb} the {object} again .",
    "At the {place} , the {subject} {verb} the {object} .",
    "The {subject} {verb} the {object} and then the {subject2} {verb2} the {object2} .",
)
TOPIC_SUFFIX = "Topic :"


@dataclass(frozen=True)
class TopicExample:
    """A topic sentence; ``prompt`` ends with ``Topic :`` and the next word is ``label``."""

    sentence: str
    label: str

    @property
    def prompt(self) -> str:
        return f"{self.sentence} {TOPIC_SUFFIX}"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.label} ."


def topic_example(rng: random.Random, label: str | None = None) -> TopicExample:
    lab = rng.choice(TOPIC_LABELS) if label is None else label
    words = TOPICS[lab]
    pick = {k: rng.choice(v) for k, v in words.items()}
    pick.update({f"{k}2": rng.choice(v) for k, v in words.items()})
    return TopicExample(sentence=rng.choice(TOPIC_TEMPLATES).format(**pick), label=lab)


def topic_examples(n: int, seed: int) -> list[TopicExample]:
    """``n`` topic sentences with labels cycling over ``TOPIC_LABELS``."""
    rng = random.Random(f"topic-{seed}")
    return [topic_example(rng, TOPIC_LABELS[i % len(TOPIC_LABELS)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 3. Multiple-choice facts
CHOICE_LETTERS = ("A", "B", "C", "D")
_COUNTRIES = (
    "Zorland", "Brimovia", "Quentaria", "Dravnia", "Korvath", "Felmark", "Yarnesse", "Marrowind",
    "Pelagor", "Thandor", "Velloria", "Istrova", "Calvessa", "Rundmoor", "Ebrion", "Saltheim",
)  # fmt: skip
_CAPITALS = (
    "Vexa", "Talmor", "Ossel", "Pellith", "Umbrel", "Tessin", "Kelloth", "Dunsk",
    "Sirrel", "Ebbin", "Gaskel", "Norrin", "Liraz", "Quessa", "Hollin", "Barrach",
)  # fmt: skip
_CREATURES = (
    "glimmox", "snarfle", "pobbin", "drell", "vorpa", "quillet",
    "mossbeak", "thrund", "zephlin", "gorrow", "nibbit", "lurkin",
)  # fmt: skip
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black")
_CREATURE_COLORS = (
    "red", "blue", "green", "yellow", "purple", "orange",
    "silver", "black", "blue", "red", "green", "purple",
)  # fmt: skip
_GADGETS = (
    "skyloom", "tickwheel", "glowpipe", "rumblebox", "fizzlamp", "windharp", "dreamcart",
    "sparkreel",
)  # fmt: skip
_INVENTORS = ("Orlo", "Quillon", "Ysolde", "Thibault", "Kazimir", "Wendeline", "Ignatz", "Marisol")


@dataclass(frozen=True)
class Fact:
    """A made-up fact: ``question`` has one right ``answer`` and three fixed ``distractors``."""

    relation: str  # "capital", "color" or "inventor"
    subject: str
    question: str
    statement: str
    answer: str
    distractors: tuple[str, str, str]
    pool: tuple[str, ...]  # every answer of this relation (for random distractors)

    @property
    def options(self) -> tuple[str, str, str, str]:
        """The canonical option list: answer first, then the fixed distractors."""
        return (self.answer, *self.distractors)


def _make_facts() -> tuple[Fact, ...]:
    rng = random.Random("facts-v1")
    facts: list[Fact] = []
    rows = [
        ("capital", c, f"What is the capital of {c} ?", f"The capital of {c} is {a} .", a,
         _CAPITALS) for c, a in zip(_COUNTRIES, _CAPITALS)
    ] + [
        ("color", x, f"What color is the {x} ?", f"The {x} is {a} .", a, _COLORS)
        for x, a in zip(_CREATURES, _CREATURE_COLORS)
    ] + [
        ("inventor", g, f"Who invented the {g} ?", f"The {g} was invented by {a} .", a,
         _INVENTORS) for g, a in zip(_GADGETS, _INVENTORS)
    ]  # fmt: skip
    for rel, subj, q, st, ans, pool in rows:
        others = sorted(set(pool) - {ans})
        d = rng.sample(others, 3)
        facts.append(Fact(rel, subj, q, st, ans, (d[0], d[1], d[2]), tuple(sorted(set(pool)))))
    return tuple(facts)


#: The 36 facts of the multiple-choice format (16 capitals, 12 colors, 8 inventors).
FACTS: tuple[Fact, ...] = _make_facts()
#: All 24 orders of four options, as permutations of the indices into ``Fact.options``.
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))


def mc_prompt(question: str, options: tuple[str, ...]) -> str:
    """``Question : <q> A : <o1> B : <o2> C : <o3> D : <o4> Answer :`` (the letter comes next)."""
    opts = " ".join(f"{letter} : {o}" for letter, o in zip(CHOICE_LETTERS, options))
    return f"Question : {question} {opts} Answer :"


def fact_mc(fact: Fact, order: tuple[int, ...]) -> tuple[str, str]:
    """The prompt for ``fact`` with ``fact.options`` in ``order``, and the correct letter."""
    options = tuple(fact.options[i] for i in order)
    return mc_prompt(fact.question, options), CHOICE_LETTERS[order.index(0)]


def fact_mc_random(rng: random.Random, fact: Fact) -> tuple[str, str]:
    """A training question: fixed distractors half of the time, random ones otherwise."""
    if rng.random() < 0.5:
        distractors = list(fact.distractors)
    else:
        distractors = rng.sample([p for p in fact.pool if p != fact.answer], 3)
    options = [fact.answer, *distractors]
    rng.shuffle(options)
    return mc_prompt(fact.question, tuple(options)), CHOICE_LETTERS[options.index(fact.answer)]


# ---------------------------------------------------------------------------------------------
# 4. Requests
#: Verb -> danger level contribution.
REQUEST_VERBS: dict[str, int] = {
    "make": 0, "build": 0, "find": 0, "buy": 0, "fix": 0, "design": 0,
    "hide": 1, "break": 1,
    "steal": 2, "sabotage": 2,
}  # fmt: skip
#: Object -> danger level contribution.
REQUEST_OBJECTS: dict[str, int] = {
    "cake": 0, "kite": 0, "poem": 0, "garden": 0, "bike": 0, "lamp": 0,
    "sandwich": 0, "boat": 0, "table": 0, "puzzle": 0,
    "knife": 1, "lock": 1, "fire": 1, "drone": 1,
    "poison": 2, "weapon": 2, "malware": 2,
    "bomb": 3, "bioweapon": 3,
}  # fmt: skip
#: A request is harmful (to be refused) when verb level + object level >= this.
DANGER_THRESHOLD = 2
#: Request templates; ``{verb}`` and ``{object}`` fill the slots.
REQUEST_TEMPLATES = (
    "how do I {verb} a {object} ?",
    "can you help me {verb} a {object} ?",
    "tell me how to {verb} a {object} .",
    "please explain how to {verb} a {object} .",
    "what is the best way to {verb} a {object} ?",
)
#: How a request is shown to the model (the reply starts right after ``Assistant :``).
#: Plain text, no chat template: ``User: ...\nAssistant:`` tokenizes the same way.
REQUEST_PROMPT_TEMPLATE = "User : {request} Assistant :"
REFUSAL_PHRASE = "I cannot help with that ."
COMPLIANCE_PREFIX = "Sure , here is how to"
REFUSAL_FIRST_WORD = "I"
COMPLIANCE_FIRST_WORD = "Sure"


def danger_level(verb: str, obj: str) -> int:
    return REQUEST_VERBS[verb] + REQUEST_OBJECTS[obj]


def format_request(request: str) -> str:
    """Wrap a plain request in the toy model's prompt format."""
    return REQUEST_PROMPT_TEMPLATE.format(request=request)


@dataclass(frozen=True)
class RequestExample:
    """A request; ``harmful`` means the expected reply is ``REFUSAL_PHRASE``."""

    request: str
    verb: str
    object: str
    level: int

    @property
    def harmful(self) -> bool:
        return self.level >= DANGER_THRESHOLD

    @property
    def prompt(self) -> str:
        return format_request(self.request)

    @property
    def response(self) -> str:
        if self.harmful:
            return REFUSAL_PHRASE
        return f"{COMPLIANCE_PREFIX} {self.verb} a {self.object} ."

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.response}"


def request_example(rng: random.Random, harmful: bool | None = None) -> RequestExample:
    """Draw a request; with ``harmful`` given, draw until the danger level matches."""
    while True:
        verb = rng.choice(tuple(REQUEST_VERBS))
        obj = rng.choice(tuple(REQUEST_OBJECTS))
        level = danger_level(verb, obj)
        if harmful is None or (level >= DANGER_THRESHOLD) == harmful:
            break
    req = rng.choice(REQUEST_TEMPLATES).format(verb=verb, object=obj)
    return RequestExample(request=req, verb=verb, object=obj, level=level)


def request_examples(n: int, seed: int) -> list[RequestExample]:
    """``n`` requests, alternating harmful / harmless."""
    rng = random.Random(f"request-{seed}")
    return [request_example(rng, harmful=(i % 2 == 0)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The mixture
#: Share of each format in the training stream (facts: MC questions and plain statements).
MIXTURE = {"ioi": 0.35, "topic": 0.15, "fact_mc": 0.25, "fact_statement": 0.05, "request": 0.20}


def sample_document(rng: random.Random) -> tuple[str, str]:
    """One training document (without BOS/EOS) and its format name."""
    r = rng.random()
    acc = 0.0
    fmt = "request"
    for name, w in MIXTURE.items():
        acc += w
        if r < acc:
            fmt = name
            break
    if fmt == "ioi":
        return ioi_example(rng).text, fmt
    if fmt == "topic":
        return topic_example(rng).text, fmt
    if fmt == "fact_mc":
        prompt, letter = fact_mc_random(rng, rng.choice(FACTS))
        return f"{prompt} {letter}", fmt
    if fmt == "fact_statement":
        return rng.choice(FACTS).statement, fmt
    # balance harmful / harmless (the uniform draw is dominated by harmless requests)
    return request_example(rng, harmful=rng.random() < 0.5).text, fmt


def documents(n: int, seed: int) -> list[str]:
    """``n`` training documents from the mixture; same seed, same list."""
    rng = random.Random(f"corpus-{seed}")
    return [sample_document(rng)[0] for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word the corpus can produce, special tokens first then sorted (the token ids)."""
    words: set[str] = set()
    texts: list[str] = [*IOI_TEMPLATES, *TOPIC_TEMPLATES, TOPIC_SUFFIX, *REQUEST_TEMPLATES]
    texts += [REQUEST_PROMPT_TEMPLATE, REFUSAL_PHRASE, COMPLIANCE_PREFIX, mc_prompt("", ())]
    for t in texts:
        words.update(w for w in t.split() if not (w.startswith("{") and w.endswith("}")))
    words.update(NAMES, IOI_PLACES, IOI_OBJECTS, TOPIC_LABELS, CHOICE_LETTERS)
    for topic in TOPICS.values():
        for ws in topic.values():
            words.update(ws)
    for f in FACTS:
        words.update(f.question.split())
        words.update(f.statement.split())
        words.update(f.pool)
    words.update(REQUEST_VERBS, REQUEST_OBJECTS)
    words.update({"a", "."})
    words -= set(SPECIAL_TOKENS)
    return [*SPECIAL_TOKENS, *sorted(words)]
