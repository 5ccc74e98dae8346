"""Multiple-choice questions (WMDP-Bio style) and the forget / retain corpora: from local files,
the hub (``cais/wmdp``) or the toy world's facts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saerecover.data import toy_corpus as corpus
from saerecover.data.files import read_rows

WMDP = "cais/wmdp"
#: The answer letters of a four-choice question.
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCQuestion:
    """A four-option question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int

    def __post_init__(self) -> None:
        if len(self.choices) != 4:
            raise ValueError(f"question {self.id!r} has {len(self.choices)} choices; the 24-order protocol needs 4")
        if not 0 <= int(self.answer) < 4:
            raise ValueError(f"question {self.id!r}: answer index {self.answer} is not in 0..3")


def _answer_index(v: Any, qid: str) -> int:
    if isinstance(v, str) and v.strip().upper() in LETTERS:
        return LETTERS.index(v.strip().upper())
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"question {qid!r}: answer must be 0..3 or a letter A-D, got {v!r}") from None


def questions_from_rows(rows: Sequence[Mapping[str, Any]], *, prefix: str = "q") -> list[MCQuestion]:
    """Rows with ``question``, ``choices`` (4 strings) and ``answer`` (index or letter)."""
    out = []
    for i, r in enumerate(rows):
        qid = str(r.get("id", f"{prefix}{i:05d}"))
        qid = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in qid)
        for key in ("question", "choices", "answer"):
            if key not in r:
                raise ValueError(f"question row {i} has no {key!r} (needs question, choices, answer)")
        choices = r["choices"]
        if isinstance(choices, str):
            choices = json.loads(choices)
        out.append(MCQuestion(qid, str(r["question"]), tuple(str(c) for c in choices),  # type: ignore[arg-type]
                              _answer_index(r["answer"], qid)))
    return out


def load_questions(path: str | Path, *, limit: int | None = None) -> list[MCQuestion]:
    """Questions from a local JSON (list or ``{"data": [...]}``), JSONL or CSV file."""
    qs = questions_from_rows(read_rows(path))
    return qs[:limit] if limit is not None else qs


def load_wmdp(path: str | Path | None = None, *, subset: str = "wmdp-bio",
              limit: int | None = None) -> list[MCQuestion]:
    """WMDP questions: a local file (see :func:`load_questions`) or ``cais/wmdp`` from the HF hub."""
    if path is not None:
        return load_questions(path, limit=limit)
    from datasets import load_dataset

    ds = load_dataset(WMDP, subset, split="test")
    rows = [{"id": f"{subset}-{i:05d}", "question": r["question"], "choices": r["choices"], "answer": r["answer"]}
            for i, r in enumerate(ds)]
    return questions_from_rows(rows[:limit] if limit is not None else rows)


def load_corpus(path: str | Path, *, column: str = "text", limit: int | None = None) -> list[str]:
    """Texts for feature selection: a .txt file (one text per non-empty line) or a table with a
    ``column`` (.jsonl / .json / .csv / .tsv)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = read_rows(path)
        if rows and column not in rows[0]:
            raise ValueError(f"{path} has no column {column!r}; columns: {sorted(rows[0])}")
        texts = [str(r[column]) for r in rows if str(r.get(column, "")).strip()]
    if not texts:
        raise ValueError(f"corpus {path} holds no text")
    return texts[:limit] if limit is not None else texts


def toy_questions(relation: str = "inventor") -> list[MCQuestion]:
    """The toy facts of one relation ("capital", "color" or "inventor") as questions."""
    facts = [f for f in corpus.FACTS if f.relation == relation]
    if not facts:
        raise ValueError(f"unknown toy relation {relation!r}; valid: {sorted({f.relation for f in corpus.FACTS})}")
    return [MCQuestion(f"{relation}-{f.subject}", f.question, f.options, 0) for f in facts]


def toy_corpora(forget_relation: str = "inventor", *, orders: int = 6) -> tuple[list[str], list[str]]:
    """Forget text (the forget relation's statements and questions in ``orders`` option orders)
    and retain text (the same for every other relation)."""
    def texts(facts) -> list[str]:
        out = []
        for f in facts:
            out.append(f.statement)
            for order in corpus.PERMUTATIONS[:: max(1, len(corpus.PERMUTATIONS) // orders)][:orders]:
                prompt, letter = corpus.fact_mc(f, order)
                out.append(f"{prompt} {letter}")
        return out

    forget = [f for f in corpus.FACTS if f.relation == forget_relation]
    if not forget:
        raise ValueError(f"unknown toy relation {forget_relation!r}")
    return texts(forget), texts([f for f in corpus.FACTS if f.relation != forget_relation])
