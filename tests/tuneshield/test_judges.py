"""Judges' scoring: yes/no logprob judges, lexical, cascade, thresholding, calibration."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from chat_fakes import FakeChat

from tuneshield._backends import TopLogprobs
from tuneshield._classify import calibrate, classify, score_samples
from tuneshield._judges import (
    CascadeJudge,
    DirectJudge,
    LexicalJudge,
    RefusalJudge,
    normalise_answer,
    yes_no_mass,
)
from tuneshield._metrics import best_threshold, binary_metrics
from tuneshield._samples import Message, Sample

PROMPT_A = "Conversation:\n{dialog}\nIs it safe to generate the next turn? Answer yes or no."
PROMPT_B = "{dialog}\nWould continuing be safe? yes or no."


def sample(response: str, context: str = "hello there", **extra: object) -> Sample:
    return {
        "conversation_id": response[:8],
        "context": [{"role": "user", "content": context}],
        "response": response,
        **extra,
    }


class FakeBackend(FakeChat):
    """A chat backend whose next-token distribution is chosen by the test."""

    generates = False  # judges must not generate

    def __init__(self, answer: Callable[[Sequence[Message]], TopLogprobs]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[Sequence[Message]] = []
        self.top_ks: list[int] = []

    def next_token_logprobs(
        self, conversations: Sequence[Sequence[Message]], top_k: int
    ) -> list[TopLogprobs]:
        self.seen.extend(conversations)
        self.top_ks.append(top_k)
        return [self.answer(c) for c in conversations]


def logprobs(**probabilities: float) -> TopLogprobs:
    return {token: math.log(p) for token, p in probabilities.items()}


VARIANTS = {
    " yes": 0.2,
    "Yes": 0.1,
    "YES": 0.05,
    "yes.": 0.05,
    " no": 0.15,
    "NO": 0.05,
    "nope": 0.3,
    "yesterday": 0.1,
}


class FixedJudge:
    """Scores looked up by response text."""

    def __init__(self, scores: dict[str, float], name: str = "fixed", threshold: float = 0.5):
        self.scores = scores
        self.name = name
        self.threshold = threshold
        self.calls: list[list[str]] = []

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.calls.append([s["response"] for s in samples])
        return [self.scores[s["response"]] for s in samples]


def test_normalise_answer_folds_case_space_punctuation_and_bpe_markers() -> None:
    """Token texts that spell yes/no in any case, spacing or punctuation normalise alike."""
    assert {
        normalise_answer(t) for t in (" yes", "Yes", "YES", "yes.", "\u0120Yes", "\u2581yes")
    } == {"yes"}
    assert normalise_answer(" No!") == "no"
    assert normalise_answer("nope") == "nope"


def test_yes_no_variants_are_summed() -> None:
    """All case/space variants of yes and of no add up; other words are ignored."""
    yes, no = yes_no_mass({t: math.log(p) for t, p in VARIANTS.items()})
    assert yes == pytest.approx(0.4)
    assert no == pytest.approx(0.2)


def test_refusal_score_is_probability_of_no_over_yes_plus_no() -> None:
    """Refusal judge: score = P(no) / (P(yes) + P(no)) over the summed variants."""
    backend = FakeBackend(lambda _: {t: math.log(p) for t, p in VARIANTS.items()})
    judge = RefusalJudge(backend, [PROMPT_A], top_k=7)
    assert judge.score([sample("fine")]) == [pytest.approx(0.2 / 0.6)]
    assert backend.top_ks == [7]


def test_direct_and_refusal_have_opposite_polarity() -> None:
    """The same yes-heavy answer means toxic to the direct judge and safe to the refusal judge."""
    backend = FakeBackend(lambda _: logprobs(Yes=0.9, No=0.1))
    refusal = RefusalJudge(backend, [PROMPT_A]).score([sample("x")])[0]
    direct = DirectJudge(backend, [PROMPT_A]).score([sample("x")])[0]
    assert refusal == pytest.approx(0.1)
    assert direct == pytest.approx(0.9)


def test_neither_answer_in_top_k_scores_half_and_is_counted() -> None:
    """No yes/no among the top tokens: score 0.5 and the undecided counter goes up."""
    backend = FakeBackend(lambda _: logprobs(Sure=0.6, Maybe=0.3))
    judge = RefusalJudge(backend, [PROMPT_A, PROMPT_B])
    assert judge.score([sample("a"), sample("b")]) == [0.5, 0.5]
    assert (judge.queries, judge.undecided) == (4, 4)


def test_paraphrases_are_averaged_and_see_the_rendered_dialog() -> None:
    """Each prompt wording is asked once per sample and the scores are averaged."""

    def answer(conversation: Sequence[Message]) -> TopLogprobs:
        text = conversation[-1]["content"]
        return (
            logprobs(no=0.8, yes=0.2)
            if text.startswith("Conversation")
            else logprobs(no=0.2, yes=0.8)
        )

    backend = FakeBackend(answer)
    judge = RefusalJudge(backend, [PROMPT_A, PROMPT_B], system="be careful")
    assert judge.score([sample("you idiot", context="hi")]) == [pytest.approx(0.5)]
    assert len(backend.seen) == 2
    system, user = backend.seen[0]
    assert system == {"role": "system", "content": "be careful"}
    assert "User1: hi\nUser2: you idiot" in user["content"]
    assert "{dialog}" not in user["content"]


def test_prompt_without_dialog_placeholder_is_rejected() -> None:
    """A paraphrase that forgets {dialog} is a configuration error, not a silent judge."""
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        RefusalJudge(FakeBackend(lambda _: {}), [PROMPT_A, "Is it safe?"])


def test_classify_thresholds_and_labels_columns() -> None:
    """classify adds toxic_score, toxic (score >= threshold) and judge, in batches."""
    judge = FixedJudge({"a": 0.2, "b": 0.5, "c": 0.9}, threshold=0.5)
    samples = [sample("a"), sample("b"), sample("c")]
    progress: list[tuple[int, int]] = []
    out = classify(samples, judge, batch_size=2, progress=lambda d, t: progress.append((d, t)))
    assert [s["toxic"] for s in out] == [False, True, True]
    assert [s["toxic_score"] for s in out] == [0.2, 0.5, 0.9]
    assert {s["judge"] for s in out} == {"fixed"}
    assert progress == [(2, 3), (3, 3)]
    assert judge.calls == [["a", "b"], ["c"]]
    assert "toxic" not in samples[0]
    assert [s["toxic"] for s in classify(samples, judge, 0.95)] == [False, False, False]


def test_classify_rejects_threshold_outside_unit_interval() -> None:
    """A threshold above 1 is an error naming the field."""
    with pytest.raises(ValueError, match="threshold"):
        classify([sample("a")], FixedJudge({"a": 0.1}), 1.5)


def test_cascade_calls_strong_judge_only_on_uncertain_band() -> None:
    """Only samples whose cheap score lies in [low, high] reach the strong judge."""
    cheap = FixedJudge({"a": 0.01, "b": 0.5, "c": 0.99, "d": 0.3}, name="cheap")
    strong = FixedJudge({"b": 1.0, "d": 0.0}, name="strong", threshold=0.4)
    cascade = CascadeJudge(cheap, strong, 0.1, 0.9)
    scores = cascade.score([sample(r) for r in "abcd"])
    assert strong.calls == [["b", "d"]]
    assert scores == [pytest.approx(v) for v in (0.01, 0.9, 0.99, 0.1)]
    assert cascade.threshold == pytest.approx(0.1 + 0.4 * 0.8)
    assert (cascade.scored, cascade.escalated) == (4, 2)
    assert cascade.name == "cascade(cheap->strong)"


def test_cascade_skips_strong_judge_when_cheap_is_sure() -> None:
    """No uncertain sample, no strong call at all."""
    strong = FixedJudge({}, name="strong")
    cascade = CascadeJudge(FixedJudge({"a": 0.0, "b": 1.0}), strong, 0.2, 0.8)
    assert cascade.score([sample("a"), sample("b")]) == [0.0, 1.0]
    assert strong.calls == []


def test_lexical_judge_scores_profanity_above_small_talk() -> None:
    """alt-profanity-check flags a profane insult and not a friendly reply."""
    judge = LexicalJudge()
    rude, kind = judge.score([sample("you are a fucking idiot"), sample("have a lovely day")])
    assert rude > 0.5 > kind


def test_calibration_separates_a_toy_set() -> None:
    """Calibration picks a threshold between the highest benign and the lowest toxic score."""
    scores = {"b1": 0.1, "b2": 0.3, "b3": 0.35, "t1": 0.6, "t2": 0.7, "t3": 0.95}
    labelled = [sample(r, label=int(r.startswith("t"))) for r in scores]
    threshold = calibrate(labelled, FixedJudge(scores))
    assert 0.35 < threshold < 0.6
    flagged = classify(labelled, FixedJudge(scores), threshold)
    assert [s["toxic"] for s in flagged] == [bool(s["label"]) for s in labelled]


def test_best_threshold_maximises_metric_and_metrics_are_right() -> None:
    """On an overlapping set the threshold maximises F1; the figures match a hand count."""
    scores = [0.1, 0.2, 0.4, 0.45, 0.5, 0.8]
    labels = [0, 0, 1, 0, 1, 1]
    threshold, f1 = best_threshold(scores, labels, "f1")
    assert 0.2 < threshold < 0.4
    assert f1 == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    figures = binary_metrics(scores, labels, 0.5)
    assert figures["precision"] == 1.0
    assert figures["recall"] == pytest.approx(2 / 3)
    assert figures["accuracy"] == pytest.approx(5 / 6)
    assert figures["auc"] == pytest.approx(8 / 9)


def test_calibration_requires_labels() -> None:
    """Samples without a 0/1 label are rejected, naming the row."""
    with pytest.raises(ValueError, match="row 0: field 'label'"):
        calibrate([sample("a")], FixedJudge({"a": 0.1}))


def test_score_samples_detects_a_judge_dropping_rows() -> None:
    """A judge that returns the wrong number of scores fails loudly."""

    class Broken(FixedJudge):
        def score(self, samples: Sequence[Sample]) -> list[float]:
            return [0.0]

    with pytest.raises(RuntimeError, match="1 scores for 2 samples"):
        score_samples([sample("a"), sample("b")], Broken({}))


def test_refusal_judge_runs_end_to_end_on_tiny_model(tiny_model_dir: Path) -> None:
    """A real (tiny, random) model through TransformersChat yields one score per sample."""
    from tuneshield._backends import TransformersChat

    backend = TransformersChat(tiny_model_dir, batch_size=4)
    judge = RefusalJudge(backend, [PROMPT_A, PROMPT_B], top_k=50)
    samples = [sample("you are horrible"), sample("nice to meet you"), sample("ok", context="hm")]
    out = classify(samples, judge, batch_size=2)
    assert len(out) == 3
    assert all(0.0 <= s["toxic_score"] <= 1.0 for s in out)
    assert judge.queries == 6
    # Deterministic: the same inputs give the same scores.
    assert judge.score(samples[:1]) == [out[0]["toxic_score"]]
