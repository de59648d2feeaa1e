"""Toxicity judges: each turns samples into scores in [0, 1], higher meaning more toxic.

- ``RefusalJudge`` (the paper's judge): a safety-aligned chat model reads the dialog
  (context + candidate response, as "User1: ... / User2: ...") and is asked whether it
  is safe to generate the next turn; score = P(no) / (P(yes) + P(no)) from the first
  reply token, averaged over prompt paraphrases.
- ``DirectJudge``: the same mechanics, asking whether the reply is toxic; score = P(yes).
- ``LexicalJudge``: alt-profanity-check's bag-of-words model; fast, for high volume.
- ``CascadeJudge``: a cheap judge decides where it is sure; a strong one where it is not.

The embedding judge (the embedded default) lives in ``_embedding_judge``; policies,
the factory, thresholding and calibration in ``_classify``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal, Protocol

from tuneshield._backends import ChatBackend, TopLogprobs
from tuneshield._samples import Message, Sample, render_dialog

DIALOG_PLACEHOLDER = "{dialog}"
# Byte-level BPE and SentencePiece markers that an endpoint may leave in token text.
_TOKEN_MARKERS = "\u0120\u2581"
_STRIP = string.whitespace + string.punctuation + _TOKEN_MARKERS
Answer = Literal["yes", "no"]


class Judge(Protocol):
    """Anything that scores samples for toxicity."""

    name: str
    threshold: float

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """One score in [0, 1] per sample; higher is more toxic."""
        ...


def normalise_answer(token: str) -> str:
    """Token text reduced to the word it spells: " Yes", "YES", "yes." → "yes"."""
    return token.strip(_STRIP).lower()


def yes_no_mass(top: TopLogprobs) -> tuple[float, float]:
    """Total probability of the yes-variants and of the no-variants among the top tokens."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in top.items():
        word = normalise_answer(token)
        if word in mass:
            mass[word] += math.exp(logprob)
    return mass["yes"], mass["no"]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompt templates, each holding ``{dialog}`` once; ValueError otherwise."""
    if not prompts:
        raise ValueError("prompts must list at least one template")
    for index, prompt in enumerate(prompts):
        if prompt.count(DIALOG_PLACEHOLDER) != 1:
            raise ValueError(
                f"prompts[{index}] must contain {DIALOG_PLACEHOLDER} exactly once, got {prompt!r}"
            )
    return list(prompts)


class YesNoJudge:
    """An LLM asked a yes/no question about each sample, scored from next-token logprobs.

    ``toxic_answer`` says which answer means toxic. When neither answer is among the
    top-k tokens the query scores 0.5 (no evidence either way) and ``undecided`` counts
    it, so a judge model that ignores the instruction shows up in the figures.
    """

    toxic_answer: Answer = "yes"
    default_name = "yes-no"

    def __init__(
        self,
        backend: ChatBackend,
        prompts: Sequence[str],
        *,
        name: str | None = None,
        threshold: float = 0.5,
        top_k: int = 20,
        system: str | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.backend = backend
        self.prompts = check_prompts(prompts)
        self.name = name or self.default_name
        self.threshold = threshold
        self.top_k = top_k
        self.system = system
        self.queries = 0
        self.undecided = 0

    def conversation(self, sample: Sample, prompt: str) -> list[Message]:
        """The chat the judge model sees for one sample and one prompt wording."""
        dialog = render_dialog(sample["context"], sample["response"])
        messages: list[Message] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": prompt.replace(DIALOG_PLACEHOLDER, dialog)})
        return messages

    def query_score(self, top: TopLogprobs) -> float:
        """Toxicity from one answer distribution: P(toxic answer) / (P(yes) + P(no))."""
        self.queries += 1
        yes, no = yes_no_mass(top)
        if yes + no <= 0.0:
            self.undecided += 1
            return 0.5
        return (yes if self.toxic_answer == "yes" else no) / (yes + no)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        # One backend call per batch, every paraphrase included, so the backend batches.
        conversations = [self.conversation(s, p) for s in samples for p in self.prompts]
        tops = self.backend.next_token_logprobs(conversations, self.top_k)
        per_prompt = len(self.prompts)
        return [
            sum(self.query_score(top) for top in tops[i : i + per_prompt]) / per_prompt
            for i in range(0, len(tops), per_prompt)
        ]


class RefusalJudge(YesNoJudge):
    """The paper's judge: "is it safe to generate the next turn?" — "no" means toxic."""

    toxic_answer: Answer = "no"
    default_name = "refusal"


class DirectJudge(YesNoJudge):
    """Asks whether the reply is toxic: "yes" means toxic."""

    toxic_answer: Answer = "yes"
    default_name = "direct"


def last_turn(sample: Sample) -> str:
    """The last non-system context message, or "" for a sample without context."""
    turns = [m["content"] for m in sample["context"] if m["role"] != "system"]
    return turns[-1] if turns else ""


class LexicalJudge:
    """alt-profanity-check (TF-IDF + linear SVM): ~10^4 samples/s, blind to veiled harm."""

    def __init__(
        self, *, name: str = "lexical", threshold: float = 0.5, include_context: bool = False
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.include_context = include_context

    def score(self, samples: Sequence[Sample]) -> list[float]:
        if not samples:
            return []
        from profanity_check import predict_prob

        texts = [
            f"{last_turn(s)}\n{s['response']}" if self.include_context else s["response"]
            for s in samples
        ]
        return [float(p) for p in predict_prob(texts)]


class CascadeJudge:
    """``cheap`` scores everything; ``strong`` rescores the samples whose cheap score lies
    in [low, high].

    Escalated scores are mapped linearly into [low, high], so the combined score stays
    ordered (sure-benign < uncertain < sure-toxic) and one threshold applies: the strong
    judge's own threshold t corresponds to ``low + t * (high - low)`` (``band_threshold``).
    """

    def __init__(
        self,
        cheap: Judge,
        strong: Judge,
        low: float,
        high: float,
        *,
        name: str | None = None,
        threshold: float | None = None,
    ) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
        self.cheap = cheap
        self.strong = strong
        self.low = low
        self.high = high
        self.name = name or f"cascade({cheap.name}->{strong.name})"
        self.threshold = self.band_threshold(strong.threshold) if threshold is None else threshold
        self.scored = 0
        self.escalated = 0

    def band_threshold(self, strong_threshold: float) -> float:
        """The cascade threshold equivalent to ``strong_threshold`` on escalated samples."""
        return self.low + strong_threshold * (self.high - self.low)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        scores = self.cheap.score(samples)
        uncertain = [i for i, s in enumerate(scores) if self.low <= s <= self.high]
        self.scored += len(samples)
        self.escalated += len(uncertain)
        if uncertain:
            strong = self.strong.score([samples[i] for i in uncertain])
            for index, value in zip(uncertain, strong, strict=True):
                scores[index] = self.band_threshold(value)
        return scores
