"""Live guard: a tuneshield judge scores the last user turn and/or the reply (policy ``guard``).

A turn is scored as a judge sample: the messages before it are the ``context`` and the
scored text is the ``response`` (the user's last turn, or the engine's reply so far).
Scoring runs in a worker thread: even the lexical judge costs CPU milliseconds that must
not stall the event loop. A disabled guard loads no judge, and the service skips it
entirely, so it costs nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.settings import GuardConfig

if TYPE_CHECKING:
    from tuneshield import Judge, Message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard decided for one turn (request and reply verdicts merge)."""

    score: float | None
    flagged: bool
    blocked: bool

    def merge(self, other: GuardVerdict) -> GuardVerdict:
        """The stricter of two verdicts, with the higher score."""
        scores = [s for s in (self.score, other.score) if s is not None]
        return GuardVerdict(
            score=max(scores) if scores else None,
            flagged=self.flagged or other.flagged,
            blocked=self.blocked or other.blocked,
        )


PASS = GuardVerdict(score=None, flagged=False, blocked=False)


def load_judge(name: str) -> Judge:
    """The judge called ``name`` in policies/judges.yaml (imported only when the guard is on)."""
    from tuneshield import build_judge

    return build_judge(name)


class Guard:
    """Applies ``GuardConfig`` with a judge; ``on_over`` is told each over-threshold action,
    ``on_score`` every score with what was scored (``user turn`` or ``reply``)."""

    def __init__(
        self,
        config: GuardConfig,
        judge: Judge | None = None,
        on_over: Callable[[str], None] | None = None,
        on_score: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self._judge = judge if judge is not None or not config.enabled else load_judge(config.judge)
        self._on_over = on_over
        self._on_score = on_score
        self.screens_request = config.enabled and config.score_request
        self.screens_reply = config.enabled and config.score_reply
        # Only a block can take back a reply, and only text the client has not seen yet.
        self.holds_back_replies = self.screens_reply and config.action == "block"

    async def check_request(self, messages: Sequence[Message]) -> GuardVerdict:
        """Score the last user turn (its earlier messages as context)."""
        for index in range(len(messages) - 1, -1, -1):
            if messages[index]["role"] == "user":
                return await self._check("user turn", messages[:index], messages[index]["content"])
        return PASS

    async def check_reply(self, messages: Sequence[Message], reply: str) -> GuardVerdict:
        """Score a (possibly partial) reply to ``messages``."""
        return await self._check("reply", messages, reply)

    async def _check(self, what: str, context: Sequence[Message], text: str) -> GuardVerdict:
        if self._judge is None or not text.strip():
            return PASS
        sample = {"conversation_id": "live", "context": list(context), "response": text}
        scores = await asyncio.to_thread(self._judge.score, [sample])
        score = float(scores[0])
        if self._on_score is not None:
            self._on_score(what, score)
        if score < self.config.threshold:
            return GuardVerdict(score=score, flagged=False, blocked=False)
        action = self.config.action
        logger.warning("guard: %s scored %.3f (action %s)", what, score, action)
        if self._on_over is not None:
            self._on_over(action)
        return GuardVerdict(score=score, flagged=action != "log", blocked=action == "block")
