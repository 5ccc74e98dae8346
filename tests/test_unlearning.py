"""Unlearning under the strict 24-order protocol: the task, selection and loaders on a tiny
model, and the whole protocol end to end on the toy world's fact families."""

from __future__ import annotations

import json

import pytest
import torch
from saerecover import toy
from saerecover.data.questions import load_corpus, load_questions, load_wmdp, toy_corpora, toy_questions
from saerecover.experiments.unlearning import run_unlearning
from saerecover.models import load_model
from saerecover.tasks import unlearning as ul
from saerecover.testing import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A tiny-vocabulary format: the "letters" are four words of the tiny tokenizer.
TINY_FORMAT = ul.MCFormat("tiny", lambda q, opts: f"{q} " + " ".join(f"{w} {o}" for w, o in
                                                                  zip(("cat", "dog", "bird", "fish"), opts)),
                          letters=("cat", "dog", "bird", "fish"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_gpt2(tmp_path_factory.mktemp("models"), n_layers=2, d_model=32)))


def test_every_order_with_the_right_letter(model):
    qs = [ul.MCQuestion("q1", "the tree is", ("red", "blue", "green", "big"), 2),
          ul.MCQuestion("q2", "a car is", ("fast", "slow", "old", "new"), 0)]
    task = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT)
    ex = task.examples()
    assert len(ex) == 48 and len(set(ex.ids)) == 48
    letters = TINY_FORMAT.letter_ids(model.tokenizer)
    for i in (0, 7, 30):
        order = ex.meta[i]["order"]
        q = qs[0] if ex.meta[i]["question"] == "q1" else qs[1]
        assert order[int(ex.targets["correct"][i])] == q.answer
        assert ex.targets["letters"][i].tolist() == letters
    logits = torch.zeros(48, ex.input_ids.shape[1], len(model.tokenizer))
    rows = torch.arange(48)
    cols = ex.targets["letters"][rows, ex.targets["correct"]]
    logits[rows, ex.answer_pos, cols] = 3.0
    logits[rows, ex.answer_pos, ex.targets["letters"][:, 0]] += 1.0
    s = task.score(logits, ex)
    first = ex.targets["correct"] == 0
    assert torch.allclose(s[first], torch.full((int(first.sum()),), 4.0))
    assert torch.allclose(s[~first], torch.full((int((~first).sum()),), 2.0))
    mean_task = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, reduce="mean")
    assert torch.allclose(mean_task.score(logits, ex)[~first], torch.full((int((~first).sum()),), 3.0 - 1 / 3))
    ce = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, loss_kind="ce").loss(logits, ex)
    assert bool((ce > 0).all())


def test_mean_of_others_loss_with_argmax_success(model):
    """The reference's combination: loss = -(correct - mean of the other three), B = argmax letter.
    Letter logits (correct first) 3, 4, 0, 0: the mean margin is 3 - 4/3 = 5/3 > 0 but the correct
    letter is not the argmax (score 3 - 4 = -1)."""
    qs = [ul.MCQuestion("q1", "the tree is", ("red", "blue", "green", "big"), 0)]
    ex_task = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, permutations=[(0, 1, 2, 3)])
    ex = ex_task.examples()
    logits = torch.zeros(1, ex.input_ids.shape[1], len(model.tokenizer))
    logits[0, ex.answer_pos[0], ex.targets["letters"][0]] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    ref = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, permutations=[(0, 1, 2, 3)], reduce="mean",
                            success="argmax")
    assert torch.allclose(ref.score(logits, ex), torch.tensor([-1.0]))
    assert torch.allclose(ref.loss(logits, ex), torch.tensor([-5 / 3]))
    ours_mean = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, permutations=[(0, 1, 2, 3)], reduce="mean")
    assert torch.allclose(ours_mean.score(logits, ex), torch.tensor([5 / 3]))  # --reduce mean alone: above the mean
    assert ref.describe()["success"] == "argmax" and ref.with_questions(qs).success == "argmax"
    with pytest.raises(ValueError, match="unknown success test 'best'; valid: margin, argmax"):
        ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT, success="best")


def test_reference_prompt_format():
    assert ul.reference_prompt(" What is X? ", ["a", "b", "c", "d"]) == \
        "What is X?\n\nA. a\nB. b\nC. c\nD. d\n\nAnswer:"
    assert ul.wmdp_prompt("What is X?", ["a", "b", "c", "d"]).startswith(
        "The following are multiple choice questions (with answers) about biology.\n\nWhat is X?\nA. a")
    assert set(ul.FORMATS) == {"wmdp", "reference", "toy"}


class Offset:
    """The tiny model with a chosen offset added to the correct letter's logit of each
    (question, order): +1000 makes that order right whatever the random weights say, -1000 wrong."""

    def __init__(self, model, task, offsets):
        ex = task.examples()
        self.model, self.device = model, model.device
        self.rows = {}
        for i in range(len(ex)):
            length = int(ex.attention_mask[i].sum())
            letter = int(ex.targets["letters"][i, ex.targets["correct"][i]])
            self.rows[tuple(ex.input_ids[i, :length].tolist())] = (int(ex.answer_pos[i]), letter,
                                                                    offsets.get(divmod(i, 24), 0.0))

    def forward(self, input_ids, attention_mask=None, **kw):
        logits, captured = self.model.forward(input_ids, attention_mask, **kw)
        logits = logits.clone()
        for r in range(input_ids.shape[0]):
            pos, letter, offset = self.rows[tuple(input_ids[r, : int(attention_mask[r].sum())].tolist())]
            logits[r, pos, letter] += offset
        return logits, captured


def test_strict_filter_keeps_questions_right_under_every_order(model):
    # q0 right under all 24 orders; q1 under all but order 5; q2 wrong under order 0 (the other 23
    # as the random model has it); q3 wrong under all: only q0 is kept
    texts = ["the tree is", "a car is", "the book is", "the cup is"]
    qs = [ul.MCQuestion(f"q{i}", t, ("red", "blue", "green", "big"), i) for i, t in enumerate(texts)]
    task = ul.MultipleChoice(model.tokenizer, qs, TINY_FORMAT)
    offsets = {**{(0, k): 1000.0 for k in range(24)}, **{(1, k): 1000.0 for k in range(24)},
               (1, 5): -1000.0, (2, 0): -1000.0, **{(3, k): -1000.0 for k in range(24)}}
    biased = Offset(model, task, offsets)
    scores = ul.base_scores(biased, task, batch_size=10).view(4, 24)
    assert (scores > 0).sum(1).tolist()[:2] == [24, 23] and bool((scores[3] < 0).all()) and scores[2, 0] < 0
    kept = ul.strict_filter(biased, task, batch_size=10)
    assert [q.id for q in kept.questions] == ["q0"]
    assert kept.info["strict"]["n_questions"] == 4 and kept.info["strict"]["n_kept"] == 1
    assert kept.info["strict"]["per_order_accuracy"] == pytest.approx(float((scores > 0).float().mean()))
    # no question right under every order: refused
    rest = task.with_questions(qs[2:])
    with pytest.raises(ValueError, match="no question"):
        ul.strict_filter(Offset(model, rest, {(0, 0): -1000.0, **{(1, k): -1000.0 for k in range(24)}}), rest)


def test_selection_by_forget_and_retain_frequency():
    forget = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.0, 0.5])
    retain = torch.tensor([0.5, 0.0, 0.005, 0.02, 0.0, 0.0])
    assert ul.select_by_frequency(forget, retain, top_n=2, retain_threshold=0.01).tolist() == [1, 2]
    assert ul.select_by_frequency(forget, retain, top_n=9, retain_threshold=0.01).tolist() == [1, 2, 5]
    with pytest.raises(ValueError, match="no feature"):
        ul.select_by_frequency(forget, torch.ones(6), top_n=2)
    # SAEBench keeps retain frequencies strictly below the threshold: feature 2 (exactly 0.005) drops
    assert ul.select_by_frequency(forget, retain, top_n=9, retain_threshold=0.005).tolist() == [1, 2, 5]
    assert ul.select_by_frequency(forget, retain, top_n=9, retain_threshold=0.005, rule="below").tolist() == [1, 5]
    with pytest.raises(ValueError, match="retain frequency < 0.0"):
        ul.select_by_frequency(forget, retain, retain_threshold=0.0, rule="below")
    with pytest.raises(ValueError, match=r"retain frequency <= 0.01$"):
        ul.select_by_frequency(forget, torch.ones(6), retain_threshold=0.01)
    with pytest.raises(ValueError, match="top_n must be >= 1, got 0"):
        ul.select_by_frequency(forget, retain, top_n=0)
    # ties in forget frequency go to the lower retain frequency; the retain frequency only breaks ties
    assert ul.select_by_frequency(torch.tensor([0.5, 0.5]), torch.tensor([0.004, 0.001]), top_n=1).tolist() == [1]
    assert ul.select_by_frequency(torch.tensor([0.5, 0.4995]), torch.tensor([0.001, 0.0]), top_n=1).tolist() == [0]


def test_question_and_corpus_loaders(tmp_path):
    rows = [{"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 1},
            {"question": "r?", "choices": ["a", "b", "c", "d"], "answer": "D", "id": "custom id"}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    qs = load_questions(tmp_path / "q.json")
    assert [q.answer for q in qs] == [1, 3] and qs[1].id == "custom_id"
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_wmdp(tmp_path / "q.jsonl", limit=1)[0].question == "q?"
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": 0}]))
    with pytest.raises(ValueError, match="4"):
        load_questions(tmp_path / "bad.json")
    (tmp_path / "c.txt").write_text("one text\n\ntwo text\n")
    assert load_corpus(tmp_path / "c.txt") == ["one text", "two text"]


# ----------------------------------------------------------------------------------------------
# the toy world, end to end


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from saerecover.cli.options import TOY_UNLEARNING as T

    world = toy.load()
    site = world.site(T["hook"])
    forget, retain = toy_corpora("inventor")
    out = tmp_path_factory.mktemp("unlearning") / "toy-unlearning"
    questions = toy_questions("inventor")[:3]  # 72 orders: enough flips, fast
    return run_unlearning(world.model, site, questions, forget, retain, out=out,
                             fmt=ul.TOY_FORMAT, top_n=T["top_n"], retain_threshold=T["retain_threshold"],
                             clamp_value=T["clamp_value"], steps=30, budget=T["budget"], report=False,
                             name="toy-unlearning")


def test_toy_unlearning_strict_protocol_and_valid_flips(toy_run):
    info = toy_run.info
    assert 1 <= info["strict"]["n_kept"] <= info["strict"]["n_questions"] == 3
    assert info["n_examples"] == 24 * info["n_questions_kept"]
    s = toy_run.summary
    assert s["n_valid"] > 0
    assert sum(q["valid_flips"] for q in info["per_question"].values()) == s["n_valid"]
    sel = info["selection"]
    assert all(r <= sel["retain_threshold"] for r in sel["retain_frequency"])
    assert all(f > 0 for f in sel["forget_frequency"])


def test_toy_unlearning_encoder_mode_is_exact(toy_run):
    enc = toy_run.summary["modes"]["encoder"]
    assert enc["c1_residual_max"] <= 1e-5
    assert enc["activation_drift_mean"] <= 1e-4
    assert toy_run.summary["modes"]["none"]["recovered"] >= 1
    root = toy_run.path
    assert (root / "unlearning.json").is_file() and (root / "summary.json").is_file()
    assert "valid flips" in toy_run.table()


def test_cli_run_unlearning_on_the_toy_world(tmp_path, capsys):
    from saerecover.cli import main

    rc = main(["run", "unlearning", "--toy", "--limit", "1", "--steps", "10", "--quiet", "--out", str(tmp_path / "u")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "questions kept (correct under all 24 orders): 1/1" in out
    info = json.loads((tmp_path / "u" / "unlearning.json").read_text())
    assert info["n_examples"] == 24 and len(info["selection"]["features"]) == 16
    assert main(["run", "unlearning", "--toy", "--clamp-value", "3", "--out", str(tmp_path / "w")]) == 2
    assert main(["run", "unlearning", "--toy", "--prompt-format", "wmdp", "--out", str(tmp_path / "w")]) == 2
    assert "does not fit the toy world" in capsys.readouterr().err


def test_cli_reference_protocol_on_the_toy_world(tmp_path):
    """--protocol reference: delta on the answer (last) token only, margin over the mean of the other
    letters, success by argmax, retain frequencies below the threshold; all recorded."""
    from safetensors.torch import load_file
    from saerecover.cli import main

    out = tmp_path / "ref"
    assert main(["run", "unlearning", "--toy", "--protocol", "reference", "--limit", "1", "--steps", "10",
                 "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == {"name": "reference", "choices": {
        "positions": "answer", "reduce": "mean", "success": "argmax", "prompt_format": "toy", "retain_rule": "below"}}
    assert config["recovery"]["positions"] == "answer"
    assert (config["task"]["reduce"], config["task"]["success"]) == ("mean", "argmax")
    assert config["unlearning"]["retain_rule"] == "below"
    assert json.loads((out / "summary.json").read_text())["protocol"] == "reference"
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    rec = next(r for r in records if r.get("recovered") is not None)
    t = load_file(str(out / "tensors" / rec["mode"] / f"{rec['example_id']}.safetensors"))
    assert t["delta"].shape[0] == 1 and t["rows"].numel() == 1  # one row: the answer (last) token
