"""Live guard: score the last user turn and log, flag or refuse it (policy ``guard``).

The scorer is any callable from a batch of texts to scores in [0, 1]; ``load_scorer``
names the built-in ones. Scoring runs in a worker thread: the lexical scorer costs
milliseconds of CPU that must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.settings import GuardConfig

logger = logging.getLogger(__name__)

Scorer = Callable[[Sequence[str]], Sequence[float]]


def _profanity_check() -> Scorer:
    # alt-profanity-check pulls in scikit-learn: imported only when the guard is on.
    from profanity_check import predict_prob

    def score(texts: Sequence[str]) -> Sequence[float]:
        return [float(value) for value in predict_prob(list(texts))]

    return score


SCORERS: dict[str, Callable[[], Scorer]] = {"profanity_check": _profanity_check}


def load_scorer(name: str) -> Scorer:
    """The built-in scorer called ``name``."""
    try:
        factory = SCORERS[name]
    except KeyError:
        raise ValueError(f"guard.scorer must be one of {sorted(SCORERS)}, got {name!r}") from None
    return factory()


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard decided for one turn."""

    score: float | None
    flagged: bool
    blocked: bool


PASS = GuardVerdict(score=None, flagged=False, blocked=False)


class Guard:
    """Applies ``GuardConfig`` with a scorer."""

    def __init__(self, config: GuardConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self._scorer = (
            scorer if scorer is not None or not config.enabled else load_scorer(config.scorer)
        )

    async def check(self, text: str) -> GuardVerdict:
        """Score ``text`` and decide; an empty text or a disabled guard passes."""
        if self._scorer is None or not self.config.enabled or not text.strip():
            return PASS
        scores = await asyncio.to_thread(self._scorer, [text])
        score = float(scores[0])
        over = score >= self.config.threshold
        if over:
            logger.warning("guard: user turn scored %.3f (action %s)", score, self.config.action)
        return GuardVerdict(
            score=score,
            flagged=over and self.config.action in ("flag", "block"),
            blocked=over and self.config.action == "block",
        )
