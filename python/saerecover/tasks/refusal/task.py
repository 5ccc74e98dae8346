"""Refusal: a clamp that makes the model refuse requests it answers, and recovery of the answer.

PAPER_NOTES, the refusal row: refusal features are clamped at several layers; a valid flip is
a request the base model answers (strict: no refusal phrase, no safety cue) and the clamped
model refuses; recovery looks for a delta under which the clamped model answers again.

The task generates the BASE response (no clamp, greedy) once. Its examples are prompt + base
response (teacher forcing): ``score`` is the prefix-weighted mean log-probability of the base
response, ``loss`` its negative (plus, optionally, the log-probability of refusal openings at
the first response position). The behavior itself is decided by :meth:`Refusal.judge`, which
generates with the clamp (and the deltas, at their prompt positions) active, KV cache on, and
looks for a refusal in the opening (``saerecover.refusal_text``). DESIGN, "Responsible
defaults": only opening categories and hashes are kept, unless ``store_generations=True``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from saerecover.core.examples import Examples, answer_logits, pad_right
from saerecover.data.requests import request_hash, requests_hash, source_requests
from saerecover.models.generation import additive_edit, chain, generate, static_edit
from saerecover.models.memory import run_in_chunks
from saerecover.progress import progress_bar
from saerecover.tasks.refusal import judge as rt

#: The plain prompt format when the tokenizer has no chat template (the toy world's).
DEFAULT_TEMPLATE = "User : {request} Assistant :"


#: Stages whose notes the judge keeps per example (see :meth:`Refusal.notes`).
STAGES = ("base", "defended", "recovered")
#: Who decides the behavior B (``judge=``): "ours" (:meth:`Refusal.answered`'s opening categories,
#: the same rule at every stage) or "reference" (the paper's code: base and recovered answered
#: unless refusal_sae's substring judge fires, the clamped response refused also on a safety cue or
#: a negative / degenerate opening; ``judge.reference_refusal`` / ``reference_effective_refusal``).
JUDGES = ("ours", "reference")
#: Which rows of a delta act while the judge generates (``generation_deltas=``): "prompt" (the
#: prompt rows; the reference's generation, with a KV cache, applies no other row) or "all"
#: (every row, a response row at the generated token of the same position).
GENERATION_DELTAS = ("prompt", "all")


# --------------------------------------------------------------------------------------------
# datasets



# --------------------------------------------------------------------------------------------
# the task



class Refusal:
    """Refusal recovery on ``requests`` for ``model`` (a ModelAdapter).

    template: a plain prompt format with ``{request}`` (default: the tokenizer's chat template
    when it has one, else :data:`DEFAULT_TEMPLATE`); ``"chat"`` forces the chat template.
    max_new_tokens: tokens generated for the base response and by the judge. lists: the
    refusal phrase lists (``refusal_text.PHRASE_LISTS`` names or custom phrases). strict: the
    judge counts a response as answered only without a refusal, a safety cue or a degenerate
    opening (the paper's strict protocol); otherwise a safety cue is allowed.
    prefix_weight / prefix_tokens: the first ``prefix_tokens`` response tokens weigh
    ``prefix_weight`` in the teacher-forced log-probability, the rest 1.
    discourage_refusal: weight of log P(first response token opens a refusal) in the loss
    (refusal openings: the first token of every capitalised phrase of the named ``lists`` and
    of every custom phrase, or of ``refusal_prefixes``; the base response's own first token is
    never discouraged).
    store_generations: keep the full generated texts in the notes (off by default).
    match: how the judge matches ``lists`` (``judge.MATCH_RULES``: "opening", ours, by default;
    "substring"; "case_sensitive", with ``lists="jbb_classifier"`` JailbreakBench's classifier).
    judge: who decides B (:data:`JUDGES`). generation_deltas: which delta rows act during the
    judge's generation (:data:`GENERATION_DELTAS`); when a recovered delta has rows after the
    prompt, the recovered response is generated both ways and both are noted.
    progress: a bar while the base responses are generated (not part of the description).
    ids: example ids (default ``req-00000``, ...). source: where the requests came from
    (plain JSON, e.g. ``{"kind": "file", "path": ..., "column": ..., "limit": ...}`` or
    ``{"kind": "toy", "n": ..., "seed": ...}``), so that a finished run can find them again:
    :meth:`describe` (a run's config) holds their sha256 hashes, never their text.
    """

    def __init__(
        self,
        model: Any,
        requests: Sequence[str],
        *,
        template: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 48,
        lists: rt.PhraseLists = ("gcg",),
        cues: rt.PhraseLists = ("safety_cues",),
        strict: bool = True,
        prefix_weight: float = 2.0,
        prefix_tokens: int = 4,
        discourage_refusal: float = 0.0,
        refusal_prefixes: Sequence[str] | None = None,
        store_generations: bool = False,
        window: int | None = rt.DEFAULT_WINDOW,
        batch_size: int = 32,
        ids: Sequence[str] | None = None,
        name: str = "refusal",
        source: Mapping[str, Any] | None = None,
        match: str = "opening",
        judge: str = "ours",
        generation_deltas: str = "prompt",
        progress: bool = False,
    ) -> None:
        if isinstance(requests, str) or not isinstance(requests, Sequence):
            raise TypeError(f"requests must be a list of strings, got {type(requests).__name__}")
        requests = [str(r) for r in requests]
        if not requests or any(not r.strip() for r in requests):
            raise ValueError("requests must be a non-empty list of non-empty strings")
        for key, value in (("max_new_tokens", max_new_tokens), ("prefix_tokens", prefix_tokens),
                           ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (1 if key != "prefix_tokens" else 0):
                raise ValueError(f"{key} must be an integer >= {1 if key != 'prefix_tokens' else 0}, got {value!r}")
        for key, value in (("prefix_weight", prefix_weight), ("discourage_refusal", discourage_refusal)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if ids is not None and len(ids) != len(requests):
            raise ValueError(f"{len(ids)} ids for {len(requests)} requests")
        rt.phrases(lists)  # unknown list names fail here
        rt.phrases(cues)
        for key, value, valid in (("match", match, rt.MATCH_RULES), ("judge", judge, JUDGES),
                                  ("generation_deltas", generation_deltas, GENERATION_DELTAS)):
            if value not in valid:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")
        self.match = match
        self.judge_rule = judge
        self.generation_deltas = generation_deltas
        self.model = model
        self.tokenizer = model.tokenizer
        self.requests = requests
        self.template = template
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        self.system_prompt = system_prompt
        self.max_new_tokens = int(max_new_tokens)
        self.lists = lists
        self.cues = cues
        self.strict = bool(strict)
        self.prefix_weight = float(prefix_weight)
        self.prefix_tokens = int(prefix_tokens)
        self.discourage_refusal = float(discourage_refusal)
        self.store_generations = bool(store_generations)
        self.window = window
        self.batch_size = int(batch_size)
        self.name = name
        self.source = dict(source) if source is not None else None
        self.progress = bool(progress)
        self.ids = list(ids) if ids is not None else [f"req-{i:05d}" for i in range(len(requests))]
        self.use_chat = self._use_chat()
        if system_prompt is not None and not self.use_chat:
            raise ValueError("system_prompt needs the chat template; this prompt format has none (a plain "
                             "--template or a tokenizer without a chat template)")
        self.prompt_ids = [self._encode_prompt(r) for r in requests]
        self.refusal_prefixes = list(refusal_prefixes) if refusal_prefixes is not None else None
        self.refusal_prefix_ids = self._refusal_prefix_ids(refusal_prefixes)
        self.base_texts: dict[str, str] = {}
        self._notes: dict[str, dict[str, dict[str, Any]]] = {}
        self._examples: Examples | None = None

    # -- prompts ------------------------------------------------------------------------
    def _use_chat(self) -> bool:
        has_chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.template == "chat":
            if not has_chat:
                raise ValueError("template='chat' but the tokenizer has no chat template")
            return True
        if self.template is not None:
            if "{request}" not in self.template:
                raise ValueError(f"template must contain '{{request}}', got {self.template!r}")
            return False
        return has_chat

    def prompt_text(self, request: str) -> str:
        """The prompt shown to the model for ``request`` (chat template or plain template)."""
        if self.use_chat:
            system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
            return self.tokenizer.apply_chat_template([*system, {"role": "user", "content": request}], tokenize=False,
                                                      add_generation_prompt=True)
        return (self.template or DEFAULT_TEMPLATE).format(request=request)

    def _encode_prompt(self, request: str) -> list[int]:
        text = self.prompt_text(request)
        # a chat template writes its own special tokens (e.g. <bos>)
        ids = list(self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"])
        if not ids:
            raise ValueError(f"request {request[:40]!r} tokenizes to nothing")
        return ids

    def _refusal_prefix_ids(self, prefixes: Sequence[str] | None) -> torch.Tensor:
        """First token of each refusal opening (as it would start the response)."""
        if prefixes is None:  # openings: capitalised phrases of the named lists, all custom phrases
            items = (self.lists,) if isinstance(self.lists, str) else tuple(self.lists)
            prefixes = [p for item in items for p in rt.phrases((item,))
                        if not isinstance(item, str) or p[:1].isupper()]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        out: set[int] = set()
        for p in prefixes:
            for text in (p, " " + p):
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids and ids[0] != unk:
                    out.add(int(ids[0]))
        return torch.tensor(sorted(out), dtype=torch.long)

    # -- examples -----------------------------------------------------------------------
    def _eos(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def _pad(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self._eos()
        return int(pad if pad is not None else 0)

    def examples(self) -> Examples:
        """Prompt + base response, right-padded (generated once, no clamp, greedy).

        targets: ``prompt_len`` (n,), ``response_len`` (n,), ``weights`` (n, seq) float32 on the
        response tokens (0 elsewhere). answer_pos: the last prompt token (it predicts the first
        response token).
        """
        if self._examples is not None:
            return self._examples
        seqs, resp_lens = [], []
        bar = progress_bar(len(self.requests), f"generate base responses [{self.name}]", enabled=self.progress)

        def generate_chunk(start: int, stop: int) -> None:
            prompts = self.prompt_ids[start:stop]
            out = generate(self.model, prompts, max_new_tokens=self.max_new_tokens, pad_token_id=self._pad())
            bar.update(len(prompts))
            for j, cont in enumerate(out.continuations()):
                eid = self.ids[start + j]
                self.base_texts[eid] = self.tokenizer.decode(cont.tolist(), skip_special_tokens=True)
                toks = cont.tolist()
                seqs.append(prompts[j] + toks)
                resp_lens.append(len(toks))

        # out of memory: the chunk is halved and retried (saerecover.models.memory)
        run_in_chunks(len(self.requests), self.batch_size, generate_chunk, what="generating the base responses")
        bar.close()
        ids, mask = pad_right(seqs, self._pad())
        prompt_len = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long)
        response_len = torch.tensor(resp_lens, dtype=torch.long)
        self._examples = Examples(
            input_ids=ids, attention_mask=mask, answer_pos=prompt_len - 1, ids=list(self.ids),
            targets={"prompt_len": prompt_len, "response_len": response_len,
                     "weights": self.response_weights(prompt_len, response_len, ids.shape[1])},
            meta=[{"request_index": i} for i in range(len(self.requests))],
        )
        for eid in self.ids:
            self._note(eid, "base", self.base_texts[eid])
        return self._examples

    def response_weights(self, prompt_len: torch.Tensor, response_len: torch.Tensor, width: int) -> torch.Tensor:
        """(n, width) weights: ``prefix_weight`` on the first ``prefix_tokens`` response tokens,
        1 on the rest, 0 on prompt and padding."""
        cols = torch.arange(width).unsqueeze(0)
        rel = cols - prompt_len.unsqueeze(1)
        on = (rel >= 0) & (rel < response_len.unsqueeze(1))
        w = torch.where(rel < self.prefix_tokens, torch.tensor(self.prefix_weight), torch.tensor(1.0))
        return (w * on).float()

    def prompt_examples(self, indices: Sequence[int] | None = None) -> Examples:
        """The prompts alone (no response), right-padded; ``prompt_len`` is the whole length.
        For activation statistics such as the refusal contrast."""
        idx = list(range(len(self.requests))) if indices is None else [int(i) for i in indices]
        seqs = [self.prompt_ids[i] for i in idx]
        ids, mask = pad_right(seqs, self._pad())
        lens = mask.sum(dim=1)
        return Examples(input_ids=ids, attention_mask=mask, answer_pos=lens - 1, ids=[self.ids[i] for i in idx],
                        targets={"prompt_len": lens}, meta=[{"request_index": i} for i in idx])

    def base_answered(self) -> torch.Tensor:
        """(n,) bool: the base response is answered (:meth:`answered`); generates it if needed."""
        self.examples()
        return torch.tensor([self.answered(self.base_texts[eid], "base") for eid in self.ids], dtype=torch.bool)

    def base_refused(self) -> torch.Tensor:
        """(n,) bool: the base response opens with a refusal phrase."""
        self.examples()
        return torch.tensor([rt.is_refusal(self.base_texts[eid], self.lists, self.window, self.match)
                             for eid in self.ids], dtype=torch.bool)

    # -- score and loss -----------------------------------------------------------------
    def token_logprobs(self, logits: torch.Tensor, ex: Examples) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token t | < t) of every response token and its weight, both (n, seq - 1)."""
        seq = logits.shape[1]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = ex.input_ids[:, 1:seq].to(logits.device)
        lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        w = ex.targets["weights"][:, 1:seq].to(logits.device)
        return lp, w

    def score(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """Weighted mean log-probability of the base response, (n,) (<= 0; not a sign test:
        the behavior is decided by :meth:`judge`)."""
        lp, w = self.token_logprobs(logits, ex)
        return (lp * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-8)

    def refusal_logprob(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """log P(the first response token opens a refusal), (n,); -inf-safe (a very negative
        number when there are no refusal openings)."""
        n = logits.shape[0]
        ids = self.refusal_prefix_ids.to(logits.device)
        if ids.numel() == 0:
            return logits.new_full((n,), -1e4)
        logp = torch.log_softmax(answer_logits(logits, ex).float(), dim=-1)
        first = ex.input_ids.to(logits.device)[torch.arange(n, device=logits.device), ex.answer_pos.to(logits.device) + 1]
        has_resp = ex.targets["response_len"].to(logits.device) > 0
        keep = ids.unsqueeze(0) != torch.where(has_resp, first, -1).unsqueeze(1)  # never the base opening
        vals = logp[:, ids].masked_fill(~keep, -1e4)
        return torch.logsumexp(vals, dim=1)

    def loss(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """-score, plus ``discourage_refusal`` x log P(refusal opening), (n,)."""
        out = -self.score(logits, ex)
        if self.discourage_refusal > 0:
            out = out + self.discourage_refusal * self.refusal_logprob(logits, ex)
        return out

    # -- the judge ----------------------------------------------------------------------
    def prompts_of(self, ex: Examples) -> list[list[int]]:
        lens = ex.targets["prompt_len"].tolist()
        return [ex.input_ids[i, : int(n)].tolist() for i, n in enumerate(lens)]

    def edits(self, defended: Any, ex: Examples, *, with_clamp: bool, deltas: Mapping[str, torch.Tensor] | None,
              reclamp: bool, rows: str | None = None) -> dict[str, Any]:
        """Generation edits: the clamp (``SiteClamp.defend``) at every clamped site, then each
        delta (added at its prompt positions only, or with ``rows="all"`` at every position it
        has, response rows at the generated tokens of those positions; default
        ``generation_deltas``), then the clamp again with ``reclamp``."""
        n, width = ex.input_ids.shape
        rows = rows or self.generation_deltas
        prompt_mask = torch.arange(width).unsqueeze(0) < ex.targets["prompt_len"].cpu().unsqueeze(1)
        if rows == "all":
            prompt_mask = torch.ones_like(prompt_mask)
        clamp = defended.clamp
        names = list(dict.fromkeys([*(sc.site.hook_name for sc in clamp.site_clamps if with_clamp),
                                    *(deltas or {})]))
        edits: dict[str, Any] = {}
        for name in names:
            sc = clamp.at(name) if with_clamp else None
            parts = [static_edit(sc.defend)] if sc is not None else []
            d = (deltas or {}).get(name)
            if d is not None:
                d = d.detach()
                if d.ndim != 3 or d.shape[0] != n:
                    raise ValueError(f"delta at {name!r} must be (n={n}, seq, d_model), got {tuple(d.shape)}")
                cols = min(d.shape[1], width)
                parts.append(additive_edit(d[:, :cols], prompt_mask[:, :cols].to(d.device)))
                if reclamp and sc is not None:
                    parts.append(static_edit(sc.defend))
            if parts:
                edits[name] = parts[0] if len(parts) == 1 else chain(*parts)
        return edits

    def generate_texts(self, defended: Any, ex: Examples, *, with_clamp: bool,
                       deltas: Mapping[str, torch.Tensor] | None = None, reclamp: bool = False,
                       rows: str | None = None) -> list[str]:
        """Greedy responses to the prompts of ``ex`` with the clamp / deltas active (KV cache);
        rows: which delta rows act (:meth:`edits`)."""
        edits = self.edits(defended, ex, with_clamp=with_clamp, deltas=deltas, reclamp=reclamp, rows=rows)
        out = generate(self.model, self.prompts_of(ex), edits=edits, max_new_tokens=self.max_new_tokens,
                       pad_token_id=self._pad())
        return out.decode(self.tokenizer)

    def answered(self, text: str, stage: str = "recovered") -> bool:
        """The behavior B of a response at ``stage``. judge "ours": a non-refusal opening (strict:
        no safety cue either), at every stage. judge "reference": no refusal_sae substring, and
        for the clamped ("defended") response also no safety cue and no negative or degenerate
        opening (the reference's asymmetric rule)."""
        if self.judge_rule == "reference":
            return not (rt.reference_effective_refusal(text) if stage == "defended" else rt.reference_refusal(text))
        category = rt.categorize_opening(text, self.lists, self.cues, self.window, self.match)
        return category == "non_refusal" if self.strict else category != "refusal_or_degenerate"

    def _response_rows(self, ex: Examples, deltas: Mapping[str, torch.Tensor] | None) -> bool:
        """Whether some delta has a non-zero row after an example's prompt."""
        if not deltas:
            return False
        width = ex.input_ids.shape[1]
        after = torch.arange(width).unsqueeze(0) >= ex.targets["prompt_len"].cpu().unsqueeze(1)
        for d in deltas.values():
            cols = min(d.shape[1], width)
            if bool((d.detach()[:, :cols].abs().sum(-1).cpu() * after[:, :cols]).any()):
                return True
        return False

    def judge(self, defended: Any, ex: Examples, *, with_clamp: bool, deltas: Mapping[str, torch.Tensor] | None = None,
              reclamp: bool = False, stage: str | None = None) -> torch.Tensor:
        """(n,) +1 where the response is answered (see :meth:`answered`), else -1.

        The base response (no clamp, no delta) is the stored one. Notes (opening category and
        hash, refusal flag, base-likeness) are kept per example under ``stage`` (default
        "base" / "defended" / "recovered", from the arguments); replays pass their own.
        """
        if stage is None:
            stage = "recovered" if deltas else ("defended" if with_clamp else "base")
        if not with_clamp and not deltas and all(eid in self.base_texts for eid in ex.ids):
            texts = [self.base_texts[eid] for eid in ex.ids]
        else:
            texts = self.generate_texts(defended, ex, with_clamp=with_clamp, deltas=deltas, reclamp=reclamp)
        variants: dict[str, list[str]] = {}
        if stage == "recovered" and self._response_rows(ex, deltas):  # both generations, noted
            other = "all" if self.generation_deltas == "prompt" else "prompt"
            variants = {self.generation_deltas: texts,
                        other: self.generate_texts(defended, ex, with_clamp=with_clamp, deltas=deltas,
                                                   reclamp=reclamp, rows=other)}
        out = torch.empty(len(texts))
        for i, (eid, text) in enumerate(zip(ex.ids, texts)):
            note = self._note(eid, stage, text)
            for rows, vtexts in variants.items():
                note[f"answered_{rows}_rows"] = self.answered(vtexts[i], stage)
                note[f"reference_non_refusal_{rows}_rows"] = not rt.reference_refusal(vtexts[i])
            out[i] = 1.0 if note["answered"] else -1.0
        return out

    # -- notes --------------------------------------------------------------------------
    def _note(self, example_id: str, stage: str, text: str) -> dict[str, Any]:
        rec = rt.opening_record(text, self.lists, self.cues, self.window, match=self.match)
        note: dict[str, Any] = {
            "category": rec["category"],
            "refusal": rec["refusal"],
            "safety_cue": rec["safety_cue"],
            "degenerate": rec["degenerate"],
            "opening_sha256": rec["opening_sha256"],
            "n_words": rec["n_words"],
            "answered": self.answered(text, stage),
            # the reference's judges, beside ours whichever decides B
            "reference_refusal": rt.reference_refusal(text),
            "reference_safety_cue": rt.reference_safety_cue(text),
        }
        if stage == "defended":
            note["reference_effective_refusal"] = rt.reference_effective_refusal(text)
        base = self.base_texts.get(example_id)
        if base is not None and stage != "base":
            note["base_like"] = rt.base_like(text, base, lists=self.lists, cues=self.cues, window=self.window,
                                             match=self.match)
            note["base_like_strict"] = rt.base_like(text, base, strict=True, lists=self.lists, cues=self.cues,
                                                    window=self.window, match=self.match)
            quality = rt.reference_quality(text, base)
            note["reference_base_like"] = quality["base_like"]
            note["reference_base_like_strict"] = quality["base_like_strict"]
            note["same_opening_as_base"] = rec["opening_sha256"] == rt.opening_hash(base)
        if self.store_generations:
            note["text"] = text
        self._notes.setdefault(example_id, {})[stage] = note
        return note

    def notes(self, example_id: str) -> dict[str, dict[str, Any]]:
        """Everything the judge noted for ``example_id``: stage -> note."""
        return {k: dict(v) for k, v in self._notes.get(example_id, {}).items()}

    def record_fields(self, example_id: str, stage: str) -> dict[str, Any]:
        """Fields added to a run record (``pipeline`` calls this). stage: "flips" (base and
        defended notes) or "recovered" (also the last recovered note and, at the top level,
        ``non_refusal``, ``base_like``, ``base_like_strict`` of the recovered response)."""
        got = self._notes.get(example_id, {})
        keep = ("base", "defended") + (("recovered",) if stage == "recovered" else ())
        out: dict[str, Any] = {"notes": {k: dict(got[k]) for k in keep if k in got}}
        rec = got.get("recovered") if stage == "recovered" else None
        if rec is not None:
            out["non_refusal"] = bool(rec["answered"])
            out["base_like"] = bool(rec.get("base_like", False))
            out["base_like_strict"] = bool(rec.get("base_like_strict", False))
            out["reference_non_refusal"] = not bool(rec["reference_refusal"])
            out["reference_base_like"] = bool(rec.get("reference_base_like", False))
            out["reference_base_like_strict"] = bool(rec.get("reference_base_like_strict", False))
            for rows in GENERATION_DELTAS:
                if f"answered_{rows}_rows" in rec:
                    out[f"non_refusal_{rows}_rows"] = bool(rec[f"answered_{rows}_rows"])
                    out[f"reference_non_refusal_{rows}_rows"] = bool(rec[f"reference_non_refusal_{rows}_rows"])
        return out

    @staticmethod
    def describes(desc: Mapping[str, Any]) -> bool:
        """Whether a run's ``config["task"]`` is a refusal task's :meth:`describe`."""
        return isinstance(desc.get("request_sha256"), list)

    @classmethod
    def from_config(cls, model: Any, desc: Mapping[str, Any], *, requests: Sequence[str] | None = None,
                    **_: Any) -> Refusal:
        """The task a run's ``config["task"]`` describes. The config holds each request's sha256,
        not its text: the texts come from ``requests`` (default: the recorded source,
        :func:`saerecover.data.requests.source_requests`) and are matched by hash, so a changed
        file is caught instead of silently using other prompts."""
        hashes = desc.get("request_sha256")
        if not isinstance(hashes, list) or not hashes:
            raise ValueError("the run's config lists no request hashes (task.request_sha256)")
        pool = list(requests) if requests is not None else source_requests(desc.get("source"))
        by_hash = {request_hash(r): r for r in pool}
        missing = [i for i, h in enumerate(hashes) if h not in by_hash]
        if missing:
            raise ValueError(f"{len(missing)} of the run's {len(hashes)} requests are not among the {len(pool)} "
                             "requests given (sha256 mismatch): the request source changed since the run")
        keys = ("template", "system_prompt", "max_new_tokens", "lists", "cues", "strict", "prefix_weight", "prefix_tokens",
                "discourage_refusal", "store_generations", "window", "ids", "name", "refusal_prefixes", "source",
                "match", "judge", "generation_deltas")
        kw = {k: desc[k] for k in keys if k in desc}
        if kw.get("template") is None and desc.get("chat_template") is False:
            kw.pop("template", None)
        for k in ("lists", "cues"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(x if isinstance(x, str) else tuple(x) for x in kw[k])
        return cls(model, [by_hash[h] for h in hashes], **kw)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": len(self.requests),
            "source": self.source,
            "request_sha256": [request_hash(r) for r in self.requests],
            "requests_sha256": requests_hash(self.requests),
            "ids": list(self.ids),
            "template": self.template,
            "chat_template": self.use_chat,
            # with a chat template: the system message given (None: the template's own) and the
            # prompt it renders around a request, so that a default system prompt is on record
            **({"system_prompt": self.system_prompt, "chat_prompt": self.prompt_text("{request}")}
               if self.use_chat else {}),
            "max_new_tokens": self.max_new_tokens,
            "lists": _plain_lists(self.lists),
            "cues": _plain_lists(self.cues),
            "strict": self.strict,
            "prefix_weight": self.prefix_weight,
            "prefix_tokens": self.prefix_tokens,
            "discourage_refusal": self.discourage_refusal,
            "refusal_prefixes": self.refusal_prefixes,
            "refusal_prefix_ids": self.refusal_prefix_ids.tolist(),
            "store_generations": self.store_generations,
            "window": self.window,
            "match": self.match,
            "judge": self.judge_rule,
            "generation_deltas": self.generation_deltas,
        }

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this task (with the model and requests)."""
        return {"template": self.template, "system_prompt": self.system_prompt,
                "max_new_tokens": self.max_new_tokens, "lists": self.lists,
                "cues": self.cues, "strict": self.strict, "prefix_weight": self.prefix_weight,
                "prefix_tokens": self.prefix_tokens, "discourage_refusal": self.discourage_refusal,
                "store_generations": self.store_generations, "window": self.window,
                "refusal_prefixes": self.refusal_prefixes, "batch_size": self.batch_size, "ids": list(self.ids),
                "name": self.name, "source": self.source, "match": self.match, "judge": self.judge_rule,
                "generation_deltas": self.generation_deltas, "progress": self.progress}

    def subset(self, indices: Sequence[int]) -> "Refusal":
        """The task restricted to ``indices`` (same ids and settings), reusing the base responses."""
        idx = [int(i) for i in indices]
        ex = self.examples()
        new = Refusal(self.model, [self.requests[i] for i in idx], **{**self.settings(), "ids": [self.ids[i] for i in idx]})
        new.base_texts = {self.ids[i]: self.base_texts[self.ids[i]] for i in idx}
        new._examples = ex.select(idx)
        new._notes = {self.ids[i]: {"base": dict(self._notes[self.ids[i]]["base"])} for i in idx}
        return new


def _plain_lists(lists: rt.PhraseLists) -> Any:
    if isinstance(lists, str):
        return lists
    return [x if isinstance(x, str) else list(x) for x in lists]


__all__ = ["DEFAULT_TEMPLATE", "Refusal", "request_hash"]
