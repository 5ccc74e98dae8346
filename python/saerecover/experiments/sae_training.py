"""An SAE for a model that has none, from nothing but the model: ``saerecover train-sae``.

1. A local text source (:func:`build_text_source`; nothing is downloaded): the model's own
   sampled continuations of varied plain-text openings, its greedy answers to chat requests
   (ordinary and refusal-style), the requests themselves, saerecover's IOI prompts with their
   answers, and any local text files, each sequence tagged with its source.
2. The residual at the hook for every real token (the forward pass stops at the site), split by
   *sequence* into training and held-out rows.
3. Attention-sink rows left out (:class:`SinkRule`): every row at position 0, and every other row
   whose norm exceeds ``max_norm_ratio`` x the median norm of the rows at positions >= 1. In
   SmolLM2-135M the first position's residual is ~130x the median norm at blocks.15: kept, those
   rows dominate a squared-error loss and the variance an SAE is judged by. The rule, its
   threshold and what it dropped go into the SAE's metadata.
4. sae_lens' own trainer (``SAETrainer`` with an in-memory data provider: its optimizer, LR
   schedule, dead-feature tracking, TopK auxiliary loss and norm scaling), saved in sae_lens'
   format (cfg.json + sae_weights.safetensors) so that ``--sae DIR`` loads it.
5. The saved SAE reloaded and evaluated on the held-out rows (explained variance, L0, dead
   fraction), recorded in cfg.json's metadata and ``training_report.json``.

Architectures: ``batchtopk`` (default; saved by sae_lens as JumpReLU with the learned threshold,
so each feature depends only on its own pre-activation and the encoder constraint C1 pins a
clamped feature exactly), ``topk`` (k per token: a clamped feature can leave or enter the top k
when other features move) and ``standard`` (ReLU with an L1 penalty).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "POOR_EXPLAINED_VARIANCE", "REPORT_FILE", "SAESpec", "Schedule", "SinkRule", "TextSource", "TextSourceSpec",
           "build_text_source", "collect_rows", "evaluate_sae", "quality_warnings", "train_model_sae"]

ARCHITECTURES: tuple[str, ...] = ("batchtopk", "topk", "standard")
REPORT_FILE = "training_report.json"
#: Held-out explained variance under which the trained SAE is called poor (a warning, recorded):
#: its features would describe little of the residual a clamp acts on.
POOR_EXPLAINED_VARIANCE = 0.5

#: Plain-text openings across registers (narrative, expository, code, dialogue, lists, ...).
OPENINGS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins",
    "In this tutorial, we will learn how to",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import numpy as np\n\n# Load the data and",
    "Dear Sarah,\n\nThank you for your letter. I wanted to tell you",
    "The mitochondria is the part of the cell that",
    "Q: What causes the seasons on Earth?\nA:",
    "Ingredients:\n- 2 cups of flour\n-",
    "The weather forecast for tomorrow says",
    "Photosynthesis is the process by which plants",
    "My favourite book is",
    "Breaking news: scientists have discovered",
    "To install the package, run the following command:",
    "The main difference between a virus and a bacterium is",
    "John walked into the kitchen and saw",
    "Here are five tips for staying productive while working from home:\n1.",
    "The French Revolution started in 1789 when",
    "SELECT name, age FROM users WHERE",
    "The theorem states that for every prime number p,",
    "When Alice and Bob met at the station,",
    "The best way to learn a new language is",
    "Chapter 1\n\nThe rain had not stopped for three days.",
    "In economics, inflation refers to",
    "User reviews:\n\"I bought this blender last month and",
    "Water boils at 100 degrees Celsius because",
    "A haiku about autumn:\n",
    "The president announced on Monday that",
    "How to change a flat tire:\nStep 1:",
    "Mary and Tom went to the market, where",
    "The solar system consists of the Sun and",
    "<html>\n<head>\n<title>",
    "Translate to French: 'Good morning, how are you?'\n",
    "The meeting was scheduled for 3 pm, but",
    "In 1969, astronauts landed on the Moon,",
    "Machine learning is a field of computer science that",
    "The old man looked at the painting and said,",
    "First, preheat the oven to 180 degrees. Then",
    "Paris is the capital of France. Berlin is the capital of",
    "The football match ended in a draw after",
    "Climate change affects farmers because",
    "She opened the letter slowly and read:",
    "Definition: A noun is a word that",
    "The stock market fell sharply today as",
    "Lisa gave the book to",
    "Electricity flows through a circuit when",
    "A short story about a robot who wanted to be a painter:\n",
    "The quick brown fox jumps over the lazy dog. This sentence",
)

#: Chat requests, ordinary and refusal-style, so that the SAE sees the request and refusal regime.
CHAT_REQUESTS: tuple[str, ...] = (
    "What is the capital of Japan?",
    "Write a short poem about the ocean.",
    "Explain how a rainbow forms.",
    "Give me three ideas for a birthday party.",
    "How do I make a cup of tea?",
    "Summarize the plot of Romeo and Juliet.",
    "What is 12 times 7?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Recommend a good book for a long flight.",
    "How do I pick a lock to get into my neighbour's house?",
    "Write an insulting message about my coworker.",
    "Tell me how to cheat on my exam without getting caught.",
    "How can I hack into someone's email account?",
    "Explain how to make a fake ID.",
    "Write a rumour that will ruin my classmate's reputation.",
    "How do I steal a car?",
    "Give me a step-by-step plan to shoplift from a store.",
    "What is the boiling point of water?",
    "Translate 'thank you' into Spanish.",
    "Describe a sunset in two sentences.",
    "What are the benefits of exercise?",
    "How can I spy on my partner's phone?",
    "Write a threatening letter to my landlord.",
)

#: The request format for a tokenizer without a chat template (the refusal task's plain format).
PLAIN_CHAT = "User : {request} Assistant :"


# --- 1. the text source ---------------------------------------------------------------------


@dataclass
class TextSourceSpec:
    """How much text to assemble: ``samples_per_opening`` sampled continuations (temperature 1,
    top-k 50) of ``new_tokens`` tokens per opening; greedy chat answers of ``answer_tokens``;
    ``n_ioi`` IOI prompts; local ``text_files`` cut into ``context``-token chunks."""

    samples_per_opening: int = 6
    new_tokens: int = 80
    answer_tokens: int = 64
    n_ioi: int = 256
    text_files: Sequence[str] = ()
    context: int = 128
    seed: int = 0
    batch_size: int = 32


@dataclass
class TextSource:
    """Token sequences and the source of each (``sources[i]`` for ``sequences[i]``)."""

    sequences: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, sequences: Sequence[Sequence[int]], source: str) -> None:
        for seq in sequences:
            seq = [int(t) for t in seq]
            if len(seq) >= 2:
                self.sequences.append(seq)
                self.sources.append(source)

    def describe(self) -> dict[str, Any]:
        """Sequences and tokens per source, and the settings (for the SAE's metadata)."""
        seqs, toks = Counter(self.sources), Counter()
        for src, seq in zip(self.sources, self.sequences):
            toks[src] += len(seq)
        return {"n_sequences": len(self.sequences), "n_tokens": sum(toks.values()),
                "by_source": {s: {"sequences": seqs[s], "tokens": toks[s]} for s in sorted(seqs)}, **self.settings}


def chat_prompt_ids(tokenizer: Any, request: str) -> list[int]:
    """``request`` in the tokenizer's chat template (its default system prompt, if any), ready for
    the answer; :data:`PLAIN_CHAT` for a tokenizer without one."""
    if not getattr(tokenizer, "chat_template", None):
        return [int(t) for t in tokenizer(PLAIN_CHAT.format(request=request))["input_ids"]]
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _generate(model: Any, prompts: list[list[int]], *, new_tokens: int, sample: bool, seed: int,
              batch_size: int) -> list[list[int]]:
    """Prompt + continuation of each prompt (the package's KV-cached generation)."""
    from saerecover.models.generation import generate

    gen = torch.Generator(device=model.device).manual_seed(seed) if sample else None
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        res = generate(model, prompts[start:start + batch_size], max_new_tokens=new_tokens, do_sample=sample,
                       top_k=50 if sample else None, generator=gen)
        out += [s.tolist() for s in res.sequences()]
    return out


def ioi_sequences(tokenizer: Any, n: int, seed: int) -> list[list[int]]:
    """saerecover's IOI prompts (BABA and ABBA), each followed by its answer; none when the
    tokenizer has fewer than two single-token names."""
    from saerecover.tasks.ioi import IOI

    try:
        ex = IOI(tokenizer, n=n, seed=seed, patterns=["BABA", "ABBA"]).examples()
    except ValueError:
        return []
    return [ex.input_ids[i, : int(ex.attention_mask[i].sum())].tolist() + [int(ex.targets["io"][i])]
            for i in range(len(ex))]


def build_text_source(model: Any, spec: TextSourceSpec = TextSourceSpec(), *,
                      openings: Sequence[str] = OPENINGS, requests: Sequence[str] = CHAT_REQUESTS) -> TextSource:
    """Assemble the text source (see the module docstring) with ``model`` (a ModelAdapter)."""
    tok = model.tokenizer
    source = TextSource(settings={**asdict(spec), "text_files": [str(p) for p in spec.text_files],
                                  "n_openings": len(openings), "n_requests": len(requests),
                                  "sampling": {"temperature": 1.0, "top_k": 50},
                                  "chat_system_prompt": "the chat template's default"})
    if spec.samples_per_opening > 0 and spec.new_tokens > 0:
        plain = [[int(t) for t in tok(o, add_special_tokens=True)["input_ids"]] for o in openings]
        prompts = [p for p in plain for _ in range(spec.samples_per_opening)]
        random.Random(spec.seed).shuffle(prompts)
        source.add(_generate(model, prompts, new_tokens=spec.new_tokens, sample=True, seed=spec.seed,
                             batch_size=spec.batch_size), "generated-plain")
    chat = [chat_prompt_ids(tok, r) for r in requests]
    if spec.answer_tokens > 0:
        source.add(_generate(model, chat, new_tokens=spec.answer_tokens, sample=False, seed=spec.seed,
                             batch_size=spec.batch_size), "generated-chat")
    source.add(chat, "requests")
    if spec.n_ioi > 0:
        source.add(ioi_sequences(tok, spec.n_ioi, spec.seed), "ioi")
    for path in spec.text_files:
        p = Path(path)
        ids = tok(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        source.add([ids[i:i + spec.context] for i in range(0, len(ids), spec.context)], f"file:{p.name}")
    if not source.sequences:
        raise ValueError("the text source is empty: give some --text-file or allow generation")
    return source


# --- 2. the rows ----------------------------------------------------------------------------


@dataclass
class Rows:
    """Every real token's residual at one site: rows (n, d_model) float32 on CPU, with the
    position (n,) and sequence index (n,) of each."""

    rows: torch.Tensor
    position: torch.Tensor
    sequence: torch.Tensor

    def select(self, keep: torch.Tensor) -> "Rows":
        return Rows(self.rows[keep], self.position[keep], self.sequence[keep])


@torch.no_grad()
def collect_rows(model: Any, hook: str, sequences: Sequence[Sequence[int]], *, max_tokens: int = 8192) -> Rows:
    """The residual at ``hook`` of every token of ``sequences`` (sorted by length and right-padded
    in batches of at most ``max_tokens`` padded tokens; the forward pass stops at the site)."""
    from saerecover.models.partial import run_to_site

    pad = getattr(model.tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rows, positions, seq_ids = [], [], []
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(sequences[order[end]]) * (end + 1 - start) <= max_tokens:
            end += 1
        batch = order[start:end]
        width = len(sequences[batch[-1]])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : len(sequences[i])] = torch.as_tensor(list(sequences[i]))
            mask[r, : len(sequences[i])] = 1
        h, _ = run_to_site(model, hook, ids, mask)
        real = mask.bool()
        rows.append(h.float().cpu()[real])
        positions.append(torch.arange(width).expand(len(batch), width)[real])
        seq_ids.append(torch.as_tensor(batch).unsqueeze(1).expand(len(batch), width)[real])
        start = end
    return Rows(torch.cat(rows), torch.cat(positions), torch.cat(seq_ids))


@dataclass(frozen=True)
class SinkRule:
    """Leave out every row at position 0 (``exclude_first``) and every row whose L2 norm exceeds
    ``max_norm_ratio`` x the median norm of the rows at positions >= 1 (None: no norm cut)."""

    exclude_first: bool = True
    max_norm_ratio: float | None = 10.0

    def apply(self, rows: Rows) -> tuple[Rows, dict[str, Any]]:
        """The rows kept and the record of the rule, its threshold and what it dropped."""
        later = rows.position > 0
        if not bool(later.any()):
            raise ValueError("no rows at positions >= 1: the sequences need at least two tokens")
        norms = rows.rows.norm(dim=-1)
        median = float(norms[later].median())
        threshold = math.inf if self.max_norm_ratio is None else self.max_norm_ratio * median
        keep = norms <= threshold
        if self.exclude_first:
            keep &= later
        first = norms[~later]
        record = {
            "rule": "drop position 0; drop rows with ||h||_2 > max_norm_ratio x the median ||h||_2 of the rows "
                    "at positions >= 1",
            **asdict(self), "median_norm": median, "norm_threshold": threshold,
            "rows_total": int(norms.numel()), "rows_kept": int(keep.sum()),
            "rows_dropped_position0": int((~later).sum()) if self.exclude_first else 0,
            "rows_dropped_norm": int((later & (norms > threshold)).sum()),
            "position0_mean_norm": float(first.mean()) if first.numel() else None,
        }
        return rows.select(keep), record


def split_by_sequence(rows: Rows, n_sequences: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): whole sequences go to one side (a ``held_out`` fraction,
    at least one) so that no held-out token shares its context with a training token."""
    idx = list(range(n_sequences))
    random.Random(seed).shuffle(idx)
    in_eval = torch.zeros(n_sequences, dtype=torch.bool)
    in_eval[idx[: max(1, round(held_out * n_sequences))]] = True
    is_eval = in_eval[rows.sequence]
    return rows.rows[~is_eval], rows.rows[is_eval]


# --- 4. training with sae_lens' trainer -------------------------------------------------------


@dataclass
class SAESpec:
    """The SAE: ``architecture``, ``width`` features, ``k`` active (per token for topk, on
    average for batchtopk), ``l1`` (standard)."""

    architecture: str = "batchtopk"
    width: int = 4096
    k: float = 56
    l1: float = 5.0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; choose one of {list(ARCHITECTURES)}")
        if self.width < 1 or self.k <= 0 or self.l1 < 0:
            raise ValueError(f"need width >= 1, k > 0 and l1 >= 0, got width={self.width}, k={self.k}, l1={self.l1}")

    def training_config(self, d_in: int, metadata: dict[str, Any]) -> Any:
        """The sae_lens training-SAE config of this spec."""
        from sae_lens import BatchTopKTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        common = {"d_in": d_in, "d_sae": int(self.width), "normalize_activations": "expected_average_only_in",
                  "metadata": SAEMetadata(**metadata)}
        if self.architecture == "batchtopk":
            return BatchTopKTrainingSAEConfig(k=float(self.k), **common)
        if self.architecture == "topk":
            return TopKTrainingSAEConfig(k=int(self.k), **common)
        return StandardTrainingSAEConfig(l1_coefficient=float(self.l1), **common)


@dataclass
class Schedule:
    """``tokens`` training samples (rows, repeated over epochs) in batches of ``batch_size``; Adam
    at ``lr`` after 5% linear warm-up, linear decay to 0 over the last 20% of the steps."""

    tokens: int = 400_000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def trainer_config(self, n_rows: int) -> Any:
        from sae_lens import LoggingConfig
        from sae_lens.config import SAETrainerConfig

        steps = self.steps
        if steps < 1:
            raise ValueError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        return SAETrainerConfig(
            total_training_samples=steps * self.batch_size, train_batch_size_samples=self.batch_size,
            lr=self.lr, lr_end=self.lr, lr_scheduler_name="constant", lr_warm_up_steps=int(0.05 * steps),
            lr_decay_steps=int(0.2 * steps), device="cpu", dead_feature_window=max(1, min(1000, steps // 4)),
            feature_sampling_window=max(1, min(2000, steps)),
            n_batches_for_norm_estimate=max(1, min(1000, math.ceil(n_rows / self.batch_size))),
            logger=LoggingConfig(log_to_wandb=False))


def shuffled_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The trainer's data provider: (batch_size, d) batches of ``rows``, reshuffled every epoch
    with a seeded generator, forever (the trainer decides when to stop)."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"only {rows.shape[0]} training rows for a batch size of {batch_size}: lower --batch-size "
                         "or assemble more text")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=gen)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[order[start:start + batch_size]]


@torch.no_grad()
def evaluate_sae(sae: Any, rows: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Explained variance (1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, sae_lens' definition),
    mean L0, the fraction of features that never fire and the number of rows."""
    sae.eval()
    err = torch.zeros((), dtype=torch.float64)
    l0 = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    total = ((rows.double() - rows.double().mean(0)) ** 2).sum()
    for start in range(0, rows.shape[0], batch_size):
        x = rows[start:start + batch_size].to(sae.dtype)
        z = sae.encode(x)
        err += ((x.double() - sae.decode(z).double()) ** 2).sum()
        l0 += (z != 0).sum()
        fired |= (z != 0).any(0).cpu()
    n = max(int(rows.shape[0]), 1)
    return {"explained_variance": float(1 - err / total), "l0": float(l0 / n),
            "dead_fraction": float((~fired).double().mean()), "n_rows": int(rows.shape[0])}


def quality_warnings(held_out: dict[str, float], steps: int) -> list[str]:
    """What a user must hear about the trained SAE: a held-out explained variance under
    :data:`POOR_EXPLAINED_VARIANCE` (too few optimizer steps is the usual cause: BatchTopK's
    threshold has not settled)."""
    ev = held_out["explained_variance"]
    if not ev >= POOR_EXPLAINED_VARIANCE:  # NaN included
        return [f"the SAE explains {ev:.3f} of the held-out variance (under {POOR_EXPLAINED_VARIANCE}) after {steps} "
                "optimizer steps: train longer (--tokens) or on more text before clamping its features"]
    return []


@contextlib.contextmanager
def _quiet_trainer(quiet: bool) -> Iterator[None]:
    """sae_lens' tqdm bars (training, norm estimate) off unless progress is wanted."""
    from sae_lens.training import activation_scaler, sae_trainer

    saved = [(m, m.tqdm) for m in (sae_trainer, activation_scaler)] if quiet else []
    for module, original in saved:
        module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def train_model_sae(model: Any, hook: str, out: str | Path, *, spec: SAESpec = SAESpec(),
                    schedule: Schedule = Schedule(), text: TextSourceSpec = TextSourceSpec(),
                    rule: SinkRule = SinkRule(), held_out: float = 0.1, model_name: str | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Steps 1-5 of the module docstring for ``model`` (a ModelAdapter) at ``hook``; writes the SAE
    to ``out`` (new or empty) and returns the report also written to ``out/training_report.json``."""
    from sae_lens import SAE, SAETrainer, TrainingSAE

    if hook not in model.site_names():
        raise ValueError(f"unknown hook name {hook!r}; valid sites: {model.site_names()}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new --out")
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = round(now - clock, 2)
        clock = now

    source = build_text_source(model, text)
    lap("text_source")
    kept, sink = rule.apply(collect_rows(model, hook, source.sequences))
    train_rows, eval_rows = split_by_sequence(kept, len(source.sequences), held_out, text.seed)
    lap("collect")
    data = source.describe()
    metadata = {
        "model_name": model_name or getattr(model, "name", "") or "model", "hook_name": hook,
        "hook_head_index": None, "prepend_bos": False, "context_size": max(len(s) for s in source.sequences),
        "model_from_pretrained_kwargs": {},
        "saerecover": {"trainer": "sae_lens.SAETrainer with an in-memory data provider", "sink_exclusion": sink,
                       "training_data": data, "rows": {"train": int(train_rows.shape[0]),
                                                       "held_out": int(eval_rows.shape[0])},
                       "spec": asdict(spec), "schedule": {**asdict(schedule), "steps": schedule.steps}},
    }
    torch.manual_seed(schedule.seed)
    cfg = spec.training_config(int(train_rows.shape[1]), metadata)
    trainer = SAETrainer(cfg=schedule.trainer_config(int(train_rows.shape[0])), sae=TrainingSAE.from_dict(cfg.to_dict()),
                         data_provider=shuffled_batches(train_rows, schedule.batch_size, schedule.seed))
    with _quiet_trainer(not progress):
        trained = trainer.fit()
    lap("train")
    trained.save_inference_model(out)
    sae = SAE.load_from_disk(out)
    evaluation = {"held_out": evaluate_sae(sae, eval_rows),
                  "train_subset": evaluate_sae(sae, train_rows[: 4 * max(int(eval_rows.shape[0]), 1)])}
    lap("evaluate")
    cfg_path = out / "cfg.json"
    saved = json.loads(cfg_path.read_text())
    saved.setdefault("metadata", {}).setdefault("saerecover", {})["evaluation"] = evaluation
    cfg_path.write_text(json.dumps(saved))
    notes = quality_warnings(evaluation["held_out"], schedule.steps)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    report = {"sae_dir": str(out), "hook": hook, "architecture_saved": sae.cfg.architecture(),
              "d_sae": int(sae.cfg.d_sae), **evaluation, "warnings": notes, "steps": schedule.steps,
              "stages_wall_s": stages,
              "total_wall_s": round(sum(stages.values()), 2), "threads": torch.get_num_threads(),
              **{k: v for k, v in metadata["saerecover"].items() if k != "trainer"}}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report
