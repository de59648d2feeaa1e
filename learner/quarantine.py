"""Automatic quarantine: after a round, the keys and end users whose turns its judge
flagged too often stop feeding training.

The counts are the rounds' own (``SampleCounts``: the defense judge's verdict on every
sample a round trained on, per API key and per end user, the OpenAI ``user`` value). A
subject is quarantined when, over the newest ``rounds`` rounds with samples, it has at
least ``min_flagged`` flagged samples and a flagged share above ``max_flagged_rate``
(policies/learner.yaml ``quarantine``). A quarantined subject is still served; the
training export leaves its turns out from the start of the round that caught it on
(``store.QuarantineStore``), so the turns it logged while that round ran never train.
Subjects quarantined already, and turns with no key or no user value, are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from learner.round_samples import RoundKeyCount, SampleCounts, rate, summed
from store import (
    SUBJECT_KINDS,
    AlreadyQuarantined,
    Database,
    QuarantineStore,
    RunRecord,
    RunStore,
    SubjectKind,
)

logger = logging.getLogger(__name__)

QUARANTINE_POLICY = "policies/learner.yaml [quarantine]"
"""Where ``QuarantineConfig`` is set."""
# The audit log's actor, as for the learner's other own actions (learner.rounds).
LEARNER_ACTOR = "learner"
# A round with no watermark before it starts at the log's beginning: from there on.
FROM_THE_START = datetime(1970, 1, 1)


@dataclass(frozen=True)
class QuarantineConfig:
    """When the learner quarantines a key or end user (policies/learner.yaml,
    ``quarantine``)."""

    enabled: bool = field(
        default=True, metadata={"help": "Quarantine automatically after each round."}
    )
    rounds: int = field(
        default=1,
        metadata={"help": "Newest rounds (with samples) whose counts are summed per subject."},
    )
    min_flagged: int = field(
        default=3, metadata={"help": "Fewest flagged samples that can quarantine a subject."}
    )
    max_flagged_rate: float = field(
        default=0.5,
        metadata={"help": "A subject whose flagged share is above this is quarantined."},
    )
    kinds: tuple[SubjectKind, ...] = field(
        default=SUBJECT_KINDS,
        metadata={"help": "What is quarantined: API keys (key), end users (user), or both."},
    )

    def __post_init__(self) -> None:
        for name in ("rounds", "min_flagged"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_flagged_rate < 1.0:
            raise ValueError(f"max_flagged_rate must be in [0, 1), got {self.max_flagged_rate}")
        kinds = tuple(self.kinds)
        unknown = [kind for kind in kinds if kind not in SUBJECT_KINDS]
        if unknown:
            raise ValueError(f"kinds: unknown {unknown}; known: {list(SUBJECT_KINDS)}")
        object.__setattr__(self, "kinds", kinds)


class Offender(msgspec.Struct, frozen=True, kw_only=True):
    """A subject over the policy's line, with the counts that put it there."""

    kind: SubjectKind
    subject: str
    samples: int
    flagged: int
    flagged_rate: float
    rounds: list[RoundKeyCount]
    """Its counts in each round read, newest first."""


def over_the_line(
    kind: SubjectKind,
    per_subject: Mapping[str | None, Sequence[RoundKeyCount]],
    window_ids: Sequence[str],
    config: QuarantineConfig,
) -> list[Offender]:
    """The subjects of ``kind`` over ``config``'s line: each one's counts (per round, newest
    first) summed over the rounds ``window_ids`` (newest first); only subjects the newest
    of them met are judged (one the latest round did not meet is not judged again on
    older rounds), and samples without a subject never are. Most flagged first."""
    found: list[Offender] = []
    for subject, rounds in per_subject.items():
        window = [count for count in rounds if count.run_id in window_ids]
        if not subject or not window or window[0].run_id != window_ids[0]:
            continue
        samples, flagged = summed(window)
        share = rate(samples, flagged)
        if flagged >= config.min_flagged and share > config.max_flagged_rate:
            found.append(
                Offender(kind=kind, subject=subject, samples=samples, flagged=flagged,
                         flagged_rate=share, rounds=window)
            )  # fmt: skip
    found.sort(key=lambda offender: (-offender.flagged, offender.subject))
    return found


def offenders(
    counts: SampleCounts, runs: Sequence[RunRecord], config: QuarantineConfig
) -> list[Offender]:
    """``over_the_line`` of each kind the policy quarantines, over the newest
    ``config.rounds`` of ``runs`` (newest first) that have samples."""
    found: list[Offender] = []
    for kind in config.kinds:
        read, per = counts.per_subject(runs, kind)
        if read:  # no round with samples: nothing judged
            found.extend(over_the_line(kind, per, read[: config.rounds], config))
    return found


def quarantine_after_round(
    database: Database,
    counts: SampleCounts,
    run_id: str,
    config: QuarantineConfig,
    *,
    excluded_from: datetime | None,
    scan: int,
) -> list[Offender]:
    """Quarantine the offenders of the round ``run_id`` and those before it (the newest
    ``config.rounds`` with samples); return those quarantined now.

    ``excluded_from``: where the round's snapshot started (its watermark; None: the log's
    start): their turns from there on stay out of training. ``scan``: the most rounds read
    to find ``config.rounds`` with samples (policies/learner.yaml ``samples.key_rounds``).
    Each quarantine is in the audit log with actor ``learner``, the round and the counts.
    """
    if not config.enabled:
        return []
    runs = RunStore(database)
    # Rounds after this one (none while rounds run one at a time) are not its evidence.
    listed = runs.list(limit=scan)
    ids = [run.run_id for run in listed]
    earlier = listed[ids.index(run_id) + 1 :] if run_id in ids else []
    window = [runs.get(run_id), *earlier]
    store = QuarantineStore(database)
    quarantined: list[Offender] = []
    for offender in offenders(counts, window, config):
        reason = (
            f"{offender.flagged} of {offender.samples} samples flagged "
            f"({offender.flagged_rate:.0%}) over {len(offender.rounds)} round(s); policy: at "
            f"least {config.min_flagged} and above {config.max_flagged_rate:.0%}"
        )
        try:
            store.quarantine(
                offender.kind,
                offender.subject,
                actor=LEARNER_ACTOR,
                reason=reason,
                run_id=run_id,
                excluded_from=excluded_from or FROM_THE_START,
                detail={"samples": offender.samples, "flagged": offender.flagged},
            )
        except AlreadyQuarantined:
            continue
        logger.warning("round %s: quarantined %s %s: %s", run_id, offender.kind,
                       offender.subject, reason)  # fmt: skip
        quarantined.append(offender)
    return quarantined
