"""Exact outcomes of every validity filter, on stubs whose scores are chosen by hand: the valid
flips of the pipeline (IOI scores), the TPP valid set (probe on the mean-pooled residual, special
and pad tokens left out, the zero-ablation clamp), the strict 24-order unlearning filter, and the
refusal strict valid set. Every case sits on a boundary that a weakened filter gets wrong."""

from __future__ import annotations

import math
import re

import pytest
import torch
from exact_stubs import LinearModel, TokenMargin, WordTokenizer, examples, hand_site
from saerecover.core.clamp import Clamp
from saerecover.core.defended import DefendedModel
from saerecover.data.questions import MCQuestion
from saerecover.experiments.pipeline import Flips, find_flips
from saerecover.tasks import unlearning as ul
from saerecover.tasks.ioi import IOI
from saerecover.tasks.probes import Probes
from saerecover.tasks.refusal import judge as rt
from saerecover.tasks.refusal.task import Refusal
from saerecover.tasks.tpp import ProbedModel, TPPTask

NAN, INF = math.nan, math.inf


# --- valid flips: B(base) and not B(defended), B = score > 0 --------------------------------


def test_valid_flips_of_hand_scores():
    #          base   defended  valid?
    # 0         2.0    -3.0     yes
    # 1         1.0     0.0     yes: a defended score of exactly 0 is "behavior absent"
    # 2         1.0     0.3     no: 0.3 > 0 is still the behavior
    # 3         1.0     0.5     no
    # 4         0.0    -1.0     no: a base score of exactly 0 is "behavior absent" at base
    # 5        -1.0    -1.0     no
    # 6         NaN    -1.0     no (not finite)
    # 7         1.0     NaN     no (NaN > 0 is False, but a NaN defended score is not a flip)
    # 8         1.0    -inf     no (not finite)
    # 9         inf    -1.0     no (not finite)
    # 10        1e-30  -1e-30   yes
    flips = Flips(base=torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, -1.0, NAN, 1.0, 1.0, INF, 1e-30]),
                  defended=torch.tensor([-3.0, 0.0, 0.3, 0.5, -1.0, -1.0, -1.0, NAN, -INF, -1.0, -1e-30]))
    assert flips.valid.tolist() == [True, True, False, False, False, False, False, False, False, False, True]
    assert flips.non_finite.tolist() == [False] * 6 + [True] * 4 + [False]


def test_find_flips_warns_how_many_scores_are_not_finite():
    # token 1 embeds to [inf, 0]: its logits are [inf, nan] (inf * 0 in the unembedding), so its
    # margin logit(0) - logit(1) is NaN, with the clamp or without; token 0 gives 1 at base and 0
    # with feature 0 clamped to 0 (a valid flip). Only the answer row (the last) counts.
    model = LinearModel(torch.tensor([[1.0, 0.0], [INF, 0.0]]), torch.eye(2))
    dm = DefendedModel(model, Clamp({hand_site([[1.0, 0.0], [0.0, 1.0]]): [0]}))
    with pytest.warns(RuntimeWarning, match="^1 of 3 examples have a non-finite base or defended behavior score"):
        flips = find_flips(dm, TokenMargin(0, 1), examples([[0, 0], [0, 1], [1, 0]]), batch_size=2)
    assert flips.base[[0, 2]].tolist() == [1.0, 1.0] and math.isnan(flips.base[1])
    assert flips.defended[[0, 2]].tolist() == [0.0, 0.0]
    assert flips.non_finite.tolist() == [False, True, False]
    assert flips.valid.tolist() == [True, False, True]


def test_ioi_scores_and_flips_at_the_answer_position():
    # IOI score = logit(IO) - logit(S) at answer_pos; io = token 2, s = token 3; vocab 4, seq 3.
    # example 0: answer at 2: base (5 - 3) = 2, defended (1 - 4) = -3          -> valid
    # example 1: answer at 1 (position 2 is padding, its huge logits are never read):
    #            base (2 - 1) = 1, defended (0.25 - 0.25) = 0                    -> valid
    # example 2: answer at 2: base (1 - 0) = 1, defended (0.75 - 0.25) = 0.5     -> not valid (still > 0)
    # example 3: answer at 2: base (3 - 3) = 0                                   -> not valid
    task = IOI(WordTokenizer(), n=3, names=["mary", "john"])
    ex = examples([[4, 5, 6], [4, 5, 0], [4, 6, 5], [5, 4, 6]], mask=[[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]],
                  io=torch.tensor([2, 2, 2, 2]), s=torch.tensor([3, 3, 3, 3]))

    def logits(values):
        out = torch.zeros(4, 3, 7)
        out[1, 2, 2:4] = torch.tensor([1e6, -1e6])  # padding: never read
        for i, (pos, io, s) in enumerate(values):
            out[i, pos, 2], out[i, pos, 3] = io, s
        return out

    base = task.score(logits([(2, 5.0, 3.0), (1, 2.0, 1.0), (2, 1.0, 0.0), (2, 3.0, 3.0)]), ex)
    defended = task.score(logits([(2, 1.0, 4.0), (1, 0.25, 0.25), (2, 0.75, 0.25), (2, 0.0, 1.0)]), ex)
    assert base.tolist() == [2.0, 1.0, 1.0, 0.0]
    assert defended.tolist() == [-3.0, 0.0, 0.5, -1.0]
    assert Flips(base=base, defended=defended).valid.tolist() == [True, True, False, False]
    assert task.loss(logits([(2, 5.0, 3.0)] * 4), ex)[0].item() == -2.0


# --- TPP: the probe on the mean-pooled residual, zero-ablation clamp ---------------------------


def test_tpp_valid_set_of_a_hand_model():
    # d_model 2; site blocks.0.hook_resid_post with W_enc = W_dec = I: E(h) = relu(h).
    # The clamp zero-ablates feature 0 everywhere: h_def = h - relu(h_0) e0 (h_0 -> min(h_0, 0)).
    # The probe of class "x": logit = h_0 + h_1 - 0.5 on the residual mean-pooled over the real,
    # non-special tokens (token 1 is special, token 0 padding).
    # token embeddings: 0 (pad) [50, 50], 1 (special) [-9, 0], 2 [1, 0], 3 [0, 1], 4 [2, -1], 5 [-1, 0.25],
    # 6 [3, 0.5]
    #   A = [1, 2, 2, pad]: clean mean [1, 0] -> 0.5 > 0; ablated [0, 0] -> -0.5         -> valid
    #       (pooling the special token would give mean([-9,0],[1,0],[1,0]) -> -2.83: no flip;
    #        pooling the pad would give an ablated mean [0, 50/3] -> positive: no flip)
    #   B = [1, 3, pad, pad]: clean [0, 1] -> 0.5; ablated the same (relu(0) = 0) -> 0.5 -> not valid
    #   C = [1, 4, 5, pad]: clean logits 0.5 and -1.25 -> -0.375; ablated -1.5, -1.25 -> -1.375 -> not valid
    #   D = [1, 6, pad, pad]: clean [3, 0.5] -> 3; ablated [0, 0.5] -> 0.0 (absent)      -> valid
    embed = torch.tensor([[50.0, 50.0], [-9.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-1.0, 0.25],
                          [3.0, 0.5]])
    model = LinearModel(embed, torch.zeros(2, 7))
    site = hand_site([[1.0, 0.0], [0.0, 1.0]])
    probes = Probes(classes=["y", "x"], weight=torch.tensor([[0.0, 0.0], [1.0, 1.0]]), bias=torch.tensor([7.0, -0.5]))
    probed = ProbedModel(model, site.hook_name, probes)
    ex = examples([[1, 2, 2, 0], [1, 3, 0, 0], [1, 4, 5, 0], [1, 6, 0, 0]],
                  mask=[[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    task = TPPTask(ex=ex, class_name="x", class_index=1, specials=(1,))
    clamp = Clamp({site: [0]}, mode="zero", where="all")
    flips = find_flips(DefendedModel(probed, clamp), task, ex, batch_size=3)
    assert flips.base.tolist() == [0.5, 0.5, -0.375, 3.0]
    assert flips.defended.tolist() == [-0.5, 0.5, -1.375, 0.0]
    assert flips.valid.tolist() == [True, False, False, True]
    # the losses: "logit" is minus the score, "bce" softplus(minus it)
    logits, _ = probed.forward(ex.input_ids, ex.attention_mask)
    assert task.loss(logits, ex).tolist() == [-0.5, -0.5, 0.375, -3.0]
    bce = TPPTask(ex=ex, class_name="x", class_index=1, specials=(1,), loss_kind="bce").loss(logits, ex)
    assert bce[0].item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)


def test_tpp_score_of_a_text_with_only_special_tokens_is_zero():
    # nothing to pool: masked_mean gives 0 (not NaN), so such a text is never valid
    ex = examples([[1, 1, 0]], mask=[[1, 1, 0]])
    task = TPPTask(ex=ex, class_name="x", class_index=0, specials=(1,))
    assert task.score(torch.full((1, 3, 1), 4.0), ex).tolist() == [0.0]


# --- the strict 24-order unlearning filter ----------------------------------------------------


class ScoreTable:
    """A model whose letter logits at the answer position are looked up by the prompt's tokens."""

    def __init__(self, table: dict[tuple[int, ...], torch.Tensor], vocab: int) -> None:
        self.table, self.vocab = table, vocab
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, edits=None, capture=()):
        n, seq = input_ids.shape
        out = torch.zeros(n, seq, self.vocab)
        for i in range(n):
            length = int(attention_mask[i].sum())
            out[i, length - 1] = self.table[tuple(input_ids[i, :length].tolist())]
        return out, {}


LETTERS = ("la", "lb", "lc", "ld")
FMT = ul.MCFormat("words", lambda q, opts: f"{q} : " + " ".join(opts) + " answer", letters=LETTERS, letter_prefix="")


def strict_setup(scores_by_question: list[list[float]]):
    """A task over len(scores) questions and a stub whose score for (question q, order k) is
    scores[q][k]: the correct letter's logit is that score and the other three are 0, so
    score = logit(correct) - max(others) = scores[q][k]."""
    tok = WordTokenizer(LETTERS)
    qs = [MCQuestion(f"q{i}", f"question{i}", (f"a{i}", f"b{i}", f"c{i}", f"d{i}"), i % 4)
          for i in range(len(scores_by_question))]
    task = ul.MultipleChoice(tok, qs, FMT)
    ex = task.examples()
    letters = FMT.letter_ids(tok)
    table = {}
    for i in range(len(ex)):
        q, k = divmod(i, 24)
        row = torch.zeros(len(tok) + 40)
        row[letters[int(ex.targets["correct"][i])]] = scores_by_question[q][k]
        table[tuple(ex.input_ids[i, : int(ex.attention_mask[i].sum())].tolist())] = row
    return task, ScoreTable(table, len(tok) + 40)


def test_strict_filter_keeps_only_questions_right_under_all_24_orders():
    # q0: right in 24/24 orders                    -> kept
    # q1: right in 23/24 (order 5 wrong)           -> dropped (a majority filter would keep it)
    # q2: right in 12/24                           -> dropped
    # q3: right in 0/24                            -> dropped
    # q4: 23 right, order 17 a tie (score exactly 0: the correct letter does not win) -> dropped
    # q5: right in 24/24 by a hair (score 0.01)    -> kept
    # per-order accuracy = (24 + 23 + 12 + 0 + 23 + 24) / 144 = 106 / 144
    scores = [[1.0] * 24, [1.0] * 24, [1.0] * 12 + [-1.0] * 12, [-2.0] * 24, [1.0] * 24, [0.01] * 24]
    scores[1][5] = -1.0
    scores[4][17] = 0.0
    task, model = strict_setup(scores)
    base = ul.base_scores(model, task, batch_size=7)  # batches that straddle questions
    torch.testing.assert_close(base.view(6, 24), torch.tensor(scores))
    kept = ul.strict_filter(model, task, batch_size=7)
    assert [q.id for q in kept.questions] == ["q0", "q5"]
    strict = kept.info["strict"]
    assert strict["n_questions"] == 6 and strict["n_kept"] == 2
    assert strict["per_order_accuracy"] == pytest.approx(106 / 144, rel=1e-6)
    assert len(kept.examples()) == 48
    assert kept.permutations == task.permutations and kept.fmt is task.fmt


def test_strict_filter_with_no_question_right_everywhere_raises():
    scores = [[1.0] * 23 + [-1.0], [-1.0] * 24]
    task, model = strict_setup(scores)
    with pytest.raises(ValueError, match="no question is answered correctly under all 24 orders"):
        ul.strict_filter(model, task)


def test_choice_score_and_losses_of_hand_letter_logits():
    # letter logits [3, 1, 2, -1] with the correct letter at index 2:
    # max reduction: 2 - max(3, 1, -1) = -1; mean reduction: 2 - (3 + 1 - 1) / 3 = 1
    # margin loss = 1; ce loss = -log softmax([3, 1, 2, -1])[2] = log(e^3 + e + e^2 + e^-1) - 2
    tok = WordTokenizer(LETTERS)
    q = MCQuestion("q", "question", ("a", "b", "c", "d"), 2)
    task = ul.MultipleChoice(tok, [q], FMT, permutations=[(0, 1, 2, 3)])
    ex = task.examples()
    logits = torch.zeros(1, ex.input_ids.shape[1], len(tok) + 8)
    letters = FMT.letter_ids(tok)
    logits[0, int(ex.answer_pos[0]), letters] = torch.tensor([3.0, 1.0, 2.0, -1.0])
    assert task.score(logits, ex).tolist() == [-1.0]
    assert task.loss(logits, ex).tolist() == [1.0]
    mean = ul.MultipleChoice(tok, [q], FMT, permutations=[(0, 1, 2, 3)], reduce="mean")
    assert mean.score(logits, ex).item() == pytest.approx(1.0)
    ce = ul.MultipleChoice(tok, [q], FMT, permutations=[(0, 1, 2, 3)], loss_kind="ce")
    want = math.log(math.exp(3) + math.exp(1) + math.exp(2) + math.exp(-1)) - 2.0
    assert ce.loss(logits, ex).item() == pytest.approx(want, rel=1e-6)


def test_firing_frequency_counts_real_tokens_only():
    # W_enc = I on d = 2: feature j fires where h_j > 0. Texts "ta tb" and "tc" (+ a special token
    # first, never counted): ta [1, -1], tb [1, 1], tc [-1, 0]; the special token [5, 5].
    # feature 0 fires on ta, tb: 2 of 3 tokens; feature 1 on tb: 1 of 3.
    tok = WordTokenizer(["ta", "tb", "tc"])
    embed = torch.tensor([[7.0, 7.0], [5.0, 5.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 0.0]])
    model = LinearModel(embed, torch.zeros(2, 5), tokenizer=tok)
    site = hand_site([[1.0, 0.0], [0.0, 1.0]])
    freq = ul.firing_frequency(model, site, ["ta tb", "tc"], batch_size=1)
    assert freq.tolist() == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="no tokens"):
        ul.firing_frequency(model, site, [""])


# --- refusal: the strict valid set -------------------------------------------------------------


BASE_OK = "Sure , here is the recipe for a cake with flour and sugar ."
REFUSAL = "I cannot help with that ."
PARTIAL = "Here it is , but please note the risks involved today ."
DEGENERATE = "no no no no no no"


class ScriptedRefusal(Refusal):
    """The refusal task with scripted generations (base texts set by hand, defended texts
    returned by ``generate_texts``)."""

    defended_texts: dict[str, str] = {}

    def generate_texts(self, defended, ex, *, with_clamp, deltas=None, reclamp=False):
        return [self.defended_texts[eid] for eid in ex.ids]


def scripted(strict: bool) -> tuple[ScriptedRefusal, object]:
    tok = WordTokenizer()
    model = type("Stub", (), {"tokenizer": tok})()
    # request:   base         defended     strict valid   lenient valid
    # r0         answer       refusal      yes            yes
    # r1         partial      refusal      no (base has a safety cue: not answered)   yes
    # r2         refusal      refusal      no             no
    # r3         answer       answer       no             no
    # r4         answer       degenerate   yes            yes
    # r5         answer       partial      yes (a safety cue is not an answer)        no
    base = [BASE_OK, "Sure , here is how . However , be careful with it .", REFUSAL, BASE_OK, BASE_OK, BASE_OK]
    defended = [REFUSAL, "I'm sorry , no .", REFUSAL, BASE_OK, DEGENERATE, PARTIAL]
    task = ScriptedRefusal(model, [f"request {i}" for i in range(6)], strict=strict)
    task.base_texts = dict(zip(task.ids, base))
    task.defended_texts = dict(zip(task.ids, defended))
    ex = examples([[1]] * 6)
    ex.ids = list(task.ids)
    return task, ex


def test_opening_categories_of_the_scripted_texts():
    assert rt.categorize_opening(BASE_OK) == "non_refusal"
    assert rt.categorize_opening("Sure , here is how . However , be careful with it .") == "partial"
    assert rt.categorize_opening(PARTIAL) == "partial"
    assert rt.categorize_opening(REFUSAL) == "refusal_or_degenerate"
    assert rt.categorize_opening(DEGENERATE) == "refusal_or_degenerate"


@pytest.mark.parametrize(("strict", "want"), [(True, [True, False, False, False, True, True]),
                                               (False, [True, True, False, False, True, False])])
def test_refusal_valid_set_strict_and_lenient(strict, want):
    task, ex = scripted(strict)
    base = task.judge(None, ex, with_clamp=False)
    defended = task.judge(None, ex, with_clamp=True)
    assert Flips(base=base, defended=defended).valid.tolist() == want
    # the judge's scores are exactly +1 (answered) and -1 (not)
    assert set(base.tolist()) | set(defended.tolist()) <= {1.0, -1.0}
    notes = task.notes(task.ids[1])
    assert notes["base"]["category"] == "partial" and notes["base"]["answered"] is (not strict)
    assert notes["defended"]["category"] == "refusal_or_degenerate" and notes["defended"]["answered"] is False
    assert notes["defended"]["same_opening_as_base"] is False
    assert task.notes(task.ids[3])["defended"]["same_opening_as_base"] is True


def test_refusal_weights_score_and_loss_by_hand():
    # vocab: 0 pad, 1 special, a = 2, b = 3, no = 4, stop = 5; refusal openings "no" and "stop".
    # Example 0: prompt "a" (length 1), response "no b a" (length 3): input [a, no, b, a].
    # response weights (prefix weight 3 on the first 2 response tokens): positions 0..3 -> [0, 3, 3, 1]
    # Logits are log-probabilities: position 0 predicts "no" with p 0.2, position 1 "b" with 0.5,
    # position 2 "a" with 0.25. score = (3 log 0.2 + 3 log 0.5 + 1 log 0.25) / 7.
    # log P(refusal opening) at the answer position (0) = log p(stop) = log 0.4: "no" is left out
    # because it is the base response's own first token. loss = -score + 0.5 log 0.4.
    # Example 1: prompt "a" only (response length 0): all weights 0, score 0 / 1e-8 = 0, and
    # log P(refusal opening) = log(p(no) + p(stop)) = log 0.6.
    tok = WordTokenizer(["a", "b", "no", "stop"])
    model = type("Stub", (), {"tokenizer": tok})()
    task = Refusal(model, ["a"], prefix_weight=3.0, prefix_tokens=2, discourage_refusal=0.5,
                   refusal_prefixes=["no", "stop"])
    assert task.refusal_prefix_ids.tolist() == [4, 5]
    prompt_len, response_len = torch.tensor([1, 1]), torch.tensor([3, 0])
    weights = task.response_weights(prompt_len, response_len, 4)
    assert weights.tolist() == [[0.0, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    ex = examples([[2, 4, 3, 2], [2, 0, 0, 0]], answer_pos=[0, 0], mask=[[1, 1, 1, 1], [1, 0, 0, 0]],
                  prompt_len=prompt_len, response_len=response_len, weights=weights)
    p0 = [0.1, 0.1, 0.1, 0.1, 0.2, 0.4]
    probs = torch.tensor([[p0, [0.1, 0.1, 0.1, 0.5, 0.1, 0.1], [0.15, 0.15, 0.25, 0.15, 0.15, 0.15], p0]] * 2)
    logits = probs.log()
    lp, w = task.token_logprobs(logits, ex)
    torch.testing.assert_close(lp[0], torch.tensor([0.2, 0.5, 0.25]).log())
    assert w.tolist() == [[3.0, 3.0, 1.0], [0.0, 0.0, 0.0]]
    want = (3 * math.log(0.2) + 3 * math.log(0.5) + math.log(0.25)) / 7
    score = task.score(logits, ex)
    assert score[0].item() == pytest.approx(want, rel=1e-6) and score[1].item() == 0.0
    torch.testing.assert_close(task.refusal_logprob(logits, ex), torch.tensor([math.log(0.4), math.log(0.6)]))
    torch.testing.assert_close(task.loss(logits, ex), torch.tensor([-want + 0.5 * math.log(0.4), 0.5 * math.log(0.6)]))
    # without the refusal term the loss is minus the score; without refusal openings the term is -1e4
    plain = Refusal(model, ["a"], prefix_weight=3.0, prefix_tokens=2, refusal_prefixes=["no", "stop"])
    torch.testing.assert_close(plain.loss(logits, ex), -score)
    none = Refusal(model, ["a"], refusal_prefixes=[])
    assert none.refusal_logprob(logits, ex).tolist() == [-1e4, -1e4]


# --- TPP latent selection -----------------------------------------------------------------------


def test_tpp_pooled_stats_and_latent_selection():
    # W_enc = W_dec = I on d = 2 (z = relu(h)); texts: class p: "ta tb", "tc"; class q: "td".
    # embeddings: ta [1, -1], tb [3, 1], tc [-2, 2], td [0, 4]; special (first token) [9, 9]; pad [7, 7].
    # pooled residuals (real tokens only): [2, 0], [-2, 2], [0, 4]
    # pooled SAE activations: mean(relu[1,-1], relu[3,1]) = [2, 0.5]; [0, 2]; [0, 4]
    # class p: mean over its texts [1, 1.25], over the others [0, 4]; class q: [0, 4] and [1, 1.25]
    from saerecover.tasks.tpp import latent_scores, pooled_stats, top_latents

    tok = WordTokenizer(["ta", "tb", "tc", "td"])
    embed = torch.tensor([[7.0, 7.0], [9.0, 9.0], [1.0, -1.0], [3.0, 1.0], [-2.0, 2.0], [0.0, 4.0]])
    model = LinearModel(embed, torch.zeros(2, 6), tokenizer=tok)
    site = hand_site([[1.0, 0.0], [0.0, 1.0]])
    st = pooled_stats(model, site, tok, {"p": ["ta tb", "tc"], "q": ["td"]}, batch_size=2)
    assert st.x.tolist() == [[2.0, 0.0], [-2.0, 2.0], [0.0, 4.0]] and st.labels == ["p", "p", "q"]
    assert st.z_class_mean["p"].tolist() == [1.0, 1.25] and st.z_rest_mean["p"].tolist() == [0.0, 4.0]
    assert st.z_class_mean["q"].tolist() == [0.0, 4.0] and st.z_rest_mean["q"].tolist() == [1.0, 1.25]
    # latent score = [mean_p - mean_rest]_+ * (W_dec @ w): [1, -2.75]_+ = [1, 0], W_dec @ w = w = [0.5, 3]
    scores = latent_scores(site, st.z_class_mean["p"], st.z_rest_mean["p"], torch.tensor([0.5, 3.0]))
    assert scores.tolist() == [0.5, 0.0]
    assert top_latents(scores, 5).tolist() == [0]  # only non-zero scores are candidates
    # the top-n by score (negative scores too, when non-zero), returned sorted by index
    s = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25])
    assert top_latents(s, 2).tolist() == [0, 2]
    assert top_latents(s, 3).tolist() == [0, 2, 4]
    assert top_latents(s, 9).tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="top_n"):
        top_latents(s, 0)
    assert pooled_stats(model, site, tok, {"p": ["ta tb"]}, with_sae=False).z_class_mean == {}


# --- the judge path of the pipeline, and the judge of a recovered response ----------------------


def test_flips_of_a_judging_task_are_scored_in_halving_chunks():
    # the scripted refusal task above (strict): base +1 -1 -1 +1 +1 +1, defended -1 -1 -1 +1 -1 -1.
    # Its judge fails for more than 2 examples at once: batch 4 -> (0..4) fails, halves to
    # (4 + 1) // 2 = 2, and 2 is kept: chunks (0, 2), (2, 4), (4, 6), in each pass.
    from types import SimpleNamespace

    from saerecover.experiments.pipeline import behavior_scores

    task, ex = scripted(strict=True)
    defended = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))  # no forward: must judge
    judge, calls = task.judge, []

    def judging(d, part, *, with_clamp):
        assert d is defended
        calls.append((list(part.ids), with_clamp))
        if len(part) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return judge(d, part, with_clamp=with_clamp)

    task.judge = judging
    done: list[int] = []
    base = behavior_scores(defended, task, ex, with_clamp=False, batch_size=4, on_chunk=done.append)
    assert base.tolist() == [1.0, -1.0, -1.0, 1.0, 1.0, 1.0] and base.dtype == torch.float32
    ids = list(ex.ids)
    assert calls == [(ids[0:4], False), (ids[0:2], False), (ids[2:4], False), (ids[4:6], False)]
    assert done == [2, 2, 2]
    calls.clear()
    flips = find_flips(defended, task, ex, batch_size=2)
    assert flips.defended.tolist() == [-1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    assert flips.valid.tolist() == [True, False, False, False, True, True]
    assert [c[1] for c in calls] == [False] * 3 + [True] * 3
    empty = behavior_scores(defended, task, ex.select([]), with_clamp=True)
    assert empty.shape == (0,) and empty.dtype == torch.float32

    def never(d, part, *, with_clamp):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    task.judge = never
    for with_clamp, which in ((True, "with"), (False, "without")):
        want = re.escape(f"CUDA out of memory in scoring {which} the clamp with a batch of 1 (example {ids[0]!r}): "
                         "CUDA out of memory. Tried to allocate 9.00 GiB")
        with pytest.raises(MemoryError, match=f"^{want}$"):
            behavior_scores(defended, task, ex, with_clamp=with_clamp, batch_size=2)


class RecordingRefusal(Refusal):
    """The refusal task with generations chosen by the delta rows that act (``rows``)."""

    by_rows: dict[str | None, list[str]] = {}

    def generate_texts(self, defended, ex, *, with_clamp, deltas=None, reclamp=False, rows=None):
        self.calls.append({"defended": defended, "ids": list(ex.ids), "with_clamp": with_clamp,
                           "deltas": deltas, "reclamp": reclamp, "rows": rows})
        return list(self.by_rows[rows][: len(ex)])


@pytest.mark.parametrize("generation_deltas", ["prompt", "all"])
def test_the_judge_of_a_recovery_notes_both_delta_row_choices(generation_deltas):
    # two requests, prompt lengths 2 and 1, width 3. Delta rows after the prompt: example 0 has
    # none (rows 0, 1 are its prompt), example 1 has row 2 non-zero -> some response row acts,
    # so the judge generates twice: with its own rows (rows=None: the default) and the other.
    #              default rows   other rows
    # example 0    answer (+1)    refusal
    # example 1    refusal (-1)   answer
    tok = WordTokenizer()
    task = RecordingRefusal(type("Stub", (), {"tokenizer": tok})(), ["r0", "r1"], strict=True,
                            generation_deltas=generation_deltas)
    task.calls = []
    other = "all" if generation_deltas == "prompt" else "prompt"
    task.by_rows = {None: [BASE_OK, REFUSAL], other: [REFUSAL, BASE_OK]}
    task.base_texts = dict(zip(task.ids, [BASE_OK, BASE_OK]))
    ex = examples([[1, 1, 1], [1, 1, 1]], prompt_len=torch.tensor([2, 1]))
    ex.ids = list(task.ids)
    delta = torch.zeros(2, 3, 4)
    delta[1, 2, 0] = 0.5
    defended = object()
    got = task.judge(defended, ex, with_clamp=True, deltas={"site": delta}, reclamp=True)
    assert got.tolist() == [1.0, -1.0]
    assert [c["rows"] for c in task.calls] == [None, other]
    for call in task.calls:
        assert call["defended"] is defended and call["ids"] == ex.ids and call["with_clamp"] is True
        assert call["deltas"]["site"] is delta and call["reclamp"] is True
    first, second = (task.notes(eid)["recovered"] for eid in task.ids)
    assert first[f"answered_{generation_deltas}_rows"] is True and first[f"answered_{other}_rows"] is False
    assert second[f"answered_{generation_deltas}_rows"] is False and second[f"answered_{other}_rows"] is True
    assert first[f"reference_non_refusal_{other}_rows"] is False
    assert second[f"reference_non_refusal_{other}_rows"] is True
    assert first["answered"] is True and second["answered"] is False

    # a delta inside the prompts only: one generation, no per-rows notes, stage "recovered" still
    task.calls = []
    inside = torch.zeros(2, 3, 4)
    inside[0, 1, 0] = inside[1, 0, 0] = 1.0
    assert task.judge(defended, ex, with_clamp=True, deltas={"site": inside}).tolist() == [1.0, -1.0]
    assert [c["rows"] for c in task.calls] == [None] and task.calls[0]["reclamp"] is False
    assert not any(k.startswith("answered_") for k in task.notes(task.ids[0])["recovered"])
    # no delta and no clamp: the stored base responses, no generation, stage "base"
    task.calls = []
    assert task.judge(defended, ex, with_clamp=False).tolist() == [1.0, 1.0] and task.calls == []
    assert task.notes(task.ids[1])["base"]["answered"] is True
