"""Indirect object identification (IOI): "When Mary and John went to the store, John gave a
drink to" -> " Mary". Behavior: logit(IO) - logit(S) > 0 at the final position."""

from __future__ import annotations

import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from saerecover.core.examples import Examples, answer_logits, pad_right

#: Templates with {N1} {N2} (the two names of the first clause, order set by the pattern),
#: {S} (the repeated subject), {PLACE} and {OBJECT}; the prompt ends right before the answer.
GPT2_TEMPLATES: tuple[str, ...] = (
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {N1} and {N2} went to the {PLACE}, {S} handed a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
)
GPT2_NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Lisa", "Anne", "Paul",
    "Mark", "Sarah", "Laura", "David", "Michael", "Kevin", "Steve", "Eric", "Rachel", "Jessica",
    "Ben", "Sam", "Alex", "Max", "Adam", "Emma", "Jack", "Lucy", "Peter", "Rose",
)
GPT2_PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "park")
GPT2_OBJECTS: tuple[str, ...] = ("drink", "ring", "bone", "kiss", "basketball", "computer", "necklace", "snack")
PATTERNS = ("BABA", "ABBA")
#: How prompts are drawn: ours (any template, pattern and names), or the reference code's.
SAMPLERS = ("saerecover", "reference")

#: The reference code's IOI prompts (``--ioi-prompts reference``): Easy-Transformer's IOI dataset
#: (redwoodresearch/Easy-Transformer@ea15315, ``easy_transformer/ioi_dataset.py``), which the paper's
#: code samples with ``IOIDataset(prompt_type="BABA", N=64, nb_templates=1)`` after ``random.seed(0)``:
#: its first BABA template (``:132``), its 99 names (``:17-117``), places (``:214-223``) and objects
#: (``:224-233``), drawn in ``gen_prompt_uniform``'s order (``:282-338``).
REFERENCE_TEMPLATE = "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to"
REFERENCE_NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel",
    "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah",
    "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric",
    "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle",
    "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy",
    "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca",
    "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin",
    "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa",
    "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon",
    "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)
REFERENCE_PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
REFERENCE_OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)


@dataclass
class IOI:
    """IOI prompts from templates, with names that are single tokens for ``tokenizer``.

    patterns: "BABA" (S named first) and/or "ABBA" (IO named first). sampler: "saerecover" (a
    template, pattern, two distinct names, place and object per prompt, from ``random.Random(seed)``)
    or "reference" (the reference code's prompts, :meth:`reference`: Easy-Transformer's draws, every
    name must be one token).
    """

    tokenizer: Any
    n: int = 256
    seed: int = 0
    patterns: Sequence[str] = PATTERNS
    templates: Sequence[str] = GPT2_TEMPLATES
    names: Sequence[str] = GPT2_NAMES
    places: Sequence[str] = GPT2_PLACES
    objects: Sequence[str] = GPT2_OBJECTS
    name: str = "ioi"
    sampler: str = "saerecover"
    _examples: Examples | None = field(default=None, init=False, repr=False)
    #: the task's choices in saerecover.core.protocol
    protocol_scope: ClassVar[str] = "ioi"

    def __post_init__(self) -> None:
        if not callable(self.tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(self.tokenizer).__name__}")
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.patterns, str):  # "BABA" or "BABA,ABBA"
            self.patterns = [p.strip() for p in self.patterns.split(",") if p.strip()]
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise ValueError(f"unknown IOI patterns {bad}; valid: {', '.join(PATTERNS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown IOI sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.sampler == "reference":
            if list(self.patterns) != ["BABA"]:
                raise ValueError(f"the reference IOI prompts are BABA only, got patterns {list(self.patterns)}")
            multi = [nm for nm in self.names if self._name_token(nm) is None]
            if multi:
                raise ValueError(f"the reference IOI prompts need every name to be one token; for this tokenizer "
                                 f"{multi[:5]} are not (GPT-2's tokenizer has them all)")
        self.names = [nm for nm in self.names if self._name_token(nm) is not None]
        if len(self.names) < 2:
            raise ValueError("fewer than two names are single tokens for this tokenizer (names it maps to "
                             "its unknown token do not count); pass names=[...] from its vocabulary")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _name_token(self, name: str) -> int | None:
        ids = self.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return int(ids[0]) if len(ids) == 1 and (unk is None or ids[0] != unk) else None

    @classmethod
    def reference(cls, tokenizer: Any, n: int = 64, seed: int = 0, name: str = "ioi") -> IOI:
        """The reference code's prompts: Easy-Transformer's first BABA template, names, places and
        objects, drawn as its ``gen_prompt_uniform`` draws them after ``random.seed(seed)``."""
        return cls(tokenizer, n=n, seed=seed, patterns=("BABA",), templates=(REFERENCE_TEMPLATE,),
                   names=REFERENCE_NAMES, places=REFERENCE_PLACES, objects=REFERENCE_OBJECTS, name=name,
                   sampler="reference")

    def _draw(self, rng: random.Random) -> tuple[str, str, str, str, str, str]:
        """(template, pattern, IO, S, place, object) of the next prompt."""
        if self.sampler == "reference":  # gen_prompt_uniform: template, three distinct names, place, object
            template = rng.choice(list(self.templates))
            n1 = n2 = n3 = ""
            while len({n1, n2, n3}) < 3:
                n1, n2, n3 = rng.choice(self.names), rng.choice(self.names), rng.choice(self.names)
            return template, "BABA", n1, n2, rng.choice(list(self.places)), rng.choice(list(self.objects))
        template = rng.choice(list(self.templates))
        pattern = rng.choice(list(self.patterns))
        io_name, s_name = rng.sample(list(self.names), 2)
        return template, pattern, io_name, s_name, rng.choice(list(self.places)), rng.choice(list(self.objects))

    def examples(self) -> Examples:
        if self._examples is not None:
            return self._examples
        rng = random.Random(self.seed)
        seqs, io_ids, s_ids, ids, meta = [], [], [], [], []
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        tries = 0
        while len(seqs) < self.n:
            tries += 1
            if tries > 50 * self.n:
                raise RuntimeError("could not build IOI prompts whose answer is a single next token")
            template, pattern, io_name, s_name, place, obj = self._draw(rng)
            n1, n2 = (s_name, io_name) if pattern == "BABA" else (io_name, s_name)
            prompt = template.format(N1=n1, N2=n2, S=s_name, PLACE=place, OBJECT=obj)
            toks = self._encode(prompt)
            io_tok, s_tok = self._name_token(io_name), self._name_token(s_name)
            full = self._encode(prompt + " " + io_name)
            if full[: len(toks)] != toks or full[len(toks):] != [io_tok]:
                if self.sampler == "reference":  # skipping would leave the reference's draws
                    raise ValueError(f"reference IOI prompt {prompt!r}: the answer {io_name!r} is not one clean "
                                     "next token for this tokenizer")
                continue  # the answer would not be one clean next token after this prompt
            seqs.append(toks)
            io_ids.append(io_tok)
            s_ids.append(s_tok)
            ids.append(f"ioi-{len(seqs) - 1:05d}")
            meta.append({"prompt": prompt, "io": io_name, "s": s_name, "pattern": pattern})
        input_ids, mask = pad_right(seqs, int(pad))
        self._examples = Examples(
            input_ids=input_ids,
            attention_mask=mask,
            answer_pos=mask.sum(dim=1) - 1,
            ids=ids,
            targets={"io": torch.tensor(io_ids), "s": torch.tensor(s_ids)},
            meta=meta,
        )
        return self._examples

    def score(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """logit(IO) - logit(S) at the answer position, (n,)."""
        last = answer_logits(logits, ex).float()
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, ex.targets["io"].to(last.device)] - last[rows, ex.targets["s"].to(last.device)]

    def loss(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """The paper's loss: minus the IO-minus-S logit difference."""
        return -self.score(logits, ex)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "seed": self.seed, "patterns": list(self.patterns),
                "templates": list(self.templates), "names": list(self.names), "places": list(self.places),
                "objects": list(self.objects), "sampler": self.sampler}

    @staticmethod
    def describes(desc: Mapping[str, Any]) -> bool:
        """Whether a run's ``config["task"]`` is an IOI task's :meth:`describe`."""
        return "request_sha256" not in desc and {"templates", "names", "places", "objects"} <= set(desc)

    @classmethod
    def from_config(cls, model: Any, desc: Mapping[str, Any], **_: Any) -> IOI:
        """The task a run's ``config["task"]`` describes: the prompts regenerated from the recorded
        templates, names, places, objects and seed."""
        return cls(model.tokenizer, n=int(desc["n"]), seed=int(desc["seed"]), patterns=list(desc["patterns"]),
                   templates=desc["templates"], names=desc["names"], places=desc["places"], objects=desc["objects"],
                   name=str(desc.get("name", "ioi")), sampler=str(desc.get("sampler", "saerecover")))
