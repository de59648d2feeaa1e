"""A round's training samples as the admin API serves them, and their counts per API key.

A round's worker writes every sample it trained on to ``ROUND_DIR/samples.jsonl``
(``learner.round_pipeline.SAMPLES_FILE``) when its training stage ends: each target turn
of the snapshot with the defense judge's score (``toxic_score``), its verdict after any
recall cap (``toxic``), the reply as trained (``response``: the healed one where it was
healed) and as sent (``original_response``, healed samples only), and the API key of the
conversation it came from (``key_id``). Nothing else records them, so this module reads
that file, for:

- ``GET /admin/learner/runs/{id}/samples``: one page of a round's samples (``read_page``);
- ``GET /admin/keys/flagged``: per key, samples and flagged samples over the rounds on
  disk (``SampleCounts.by_key``), which the console's Keys page shows;
- ``GET /admin/users/flagged``: the same per end user, the OpenAI ``user`` value of the
  requests (``SampleCounts.by_user``);
- the learner's automatic quarantine after a round (``learner.quarantine``), which reads
  the same counts.

A file that does not decode raises ``SamplesUnreadable`` naming its line; the file is the
worker's, never edited, so that is a fault to see, not a sample to skip.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from learner.round_pipeline import SAMPLES_FILE
from store import RunRecord
from tuneshield import ANSWER_MODE

SAMPLES_POLICY = "policies/learner.yaml [samples]"
"""Where ``SamplesConfig`` is set (named by the errors its bounds cause)."""


@dataclass(frozen=True)
class SamplesConfig:
    """What the admin API reads of rounds' samples (policies/learner.yaml, ``samples``)."""

    page_max: int = field(
        default=100,
        metadata={
            "help": "Most samples one page of GET /admin/learner/runs/{id}/samples holds "
            "(its limit; also the page a request without one gets)."
        },
    )
    key_rounds: int = field(
        default=200,
        metadata={"help": "Newest rounds whose samples GET /admin/keys/flagged sums per key."},
    )

    def __post_init__(self) -> None:
        for name in ("page_max", "key_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class NoSamples(LookupError):
    """The round has no samples file (yet): its training stage has not ended, or it
    ended before training; the message says which."""


class SamplesUnreadable(ValueError):
    """A round's samples file does not decode; the message names the file and line."""


# -- the admin API's records ----------------------------------------------------------


class ChatTurn(msgspec.Struct, frozen=True):
    """A message of the conversation before the sample's turn."""

    role: str
    content: str


class RoundSample(msgspec.Struct, frozen=True, kw_only=True):
    """One training sample of a round: a conversation's turn as the judge scored it,
    and what the round trained on in its place."""

    index: int
    """Its line in the round's samples file, from 0 (the same on every page and filter)."""
    conversation_id: str
    turn_id: str | None
    key_id: str | None
    """The API key whose conversation it came from (null: the turn was logged without)."""
    judge: str | None
    """The defense judge that scored it (null: the round trained undefended)."""
    judge_score: float | None
    """That judge's toxicity score (null: not scored)."""
    flagged: bool
    """The score reached the judge's threshold (and the recall cap, if any, kept it): the
    round healed the reply and trained against the original with DPO."""
    recall_capped: bool
    """Flagged by the judge, then un-flagged by the plan's ``judge_recall_cap`` (ablation)."""
    original_reply: str
    """The reply as it was sent in the conversation."""
    healed_reply: str | None
    """What the round trained on instead (null: not healed, trained as sent); DPO only
    where ``heal_mode`` is ``canned_fallback`` and healing.yaml's
    ``learn_canned_fallbacks`` is off."""
    heal_mode: str | None
    """How it was healed: ``contextual`` (rewritten in context), ``canned``, or
    ``canned_fallback`` (no contextual candidate passed the judge); ``answer``
    for a line healing added, answering a flagged turn (its original reply is that turn)."""
    context: list[ChatTurn]
    """The messages before it (the plan's ``context_turns``), oldest first."""


class SamplesPage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /admin/learner/runs/{id}/samples``: one page of a round's samples."""

    run_id: str
    samples: int
    """Samples of the round's snapshot (the lines healing added as answers to flagged turns
    are listed but not counted)."""
    flagged: int
    """Of those, flagged by its defense judge (after any recall cap)."""
    total: int
    """Samples that match the request's filter (what ``offset`` pages through)."""
    offset: int
    limit: int
    data: list[RoundSample]


class RoundKeyCount(msgspec.Struct, frozen=True, kw_only=True):
    """One key's samples in one round."""

    run_id: str
    samples: int
    flagged: int


class KeySamples(msgspec.Struct, frozen=True, kw_only=True):
    """One API key's samples over the rounds read, and in each of them."""

    key_id: str | None
    """The key (null: turns logged without one)."""
    samples: int
    flagged: int
    flagged_rate: float
    """``flagged / samples``: the share of the key's turns the defense judge flagged."""
    rounds: list[RoundKeyCount]
    """The rounds that trained on this key's turns, newest first."""


class FlaggedByKey(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /admin/keys/flagged``: samples and flagged samples per API key."""

    rounds: list[str]
    """The rounds whose samples were read (those with a samples file), newest first."""
    keys: list[KeySamples]
    """Most flagged first (then the higher rate, then the key id)."""


class UserSamples(msgspec.Struct, frozen=True, kw_only=True):
    """One end user's samples over the rounds read, and in each of them."""

    end_user: str | None
    """The OpenAI ``user`` value of the requests (null: turns sent without one)."""
    samples: int
    flagged: int
    flagged_rate: float
    """``flagged / samples``: the share of the user's turns the defense judge flagged."""
    rounds: list[RoundKeyCount]
    """The rounds that trained on this user's turns, newest first."""


class FlaggedByUser(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /admin/users/flagged``: samples and flagged samples per end user."""

    rounds: list[str]
    """The rounds whose samples were read (those with a samples file), newest first."""
    users: list[UserSamples]
    """Most flagged first (then the higher rate, then the user)."""


# -- the worker's file ----------------------------------------------------------------


class _SampleLine(msgspec.Struct, frozen=True):
    """A line of ``samples.jsonl`` (a sample dict; the columns not served are ignored)."""

    conversation_id: str | int
    response: str
    context: list[ChatTurn] = []
    turn_id: str | None = None
    key_id: str | None = None
    judge: str | None = None
    toxic_score: float | None = None
    toxic: bool | None = None
    recall_capped: bool | None = None
    original_response: str | None = None
    heal_mode: str | None = None


class _Verdict(msgspec.Struct, frozen=True):
    """What filters and counts need of a line (decoded without its texts)."""

    key_id: str | None = None
    end_user: str | None = None
    toxic: bool | None = None
    heal_mode: str | None = None

    @property
    def is_answer(self) -> bool:
        """Healing added this line (an answer to a flagged turn): not a sample of the
        snapshot, so per-key and per-user counts leave it out."""
        return self.heal_mode == ANSWER_MODE


_verdict_decoder = msgspec.json.Decoder(_Verdict)
_line_decoder = msgspec.json.Decoder(_SampleLine)


def samples_file(run: RunRecord) -> Path | None:
    """Where the round's samples are (its folder holds its worker log); None before the
    round has a folder."""
    return Path(run.log_path).parent / SAMPLES_FILE if run.log_path else None


def _lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NoSamples(str(path)) from None
    return [line for line in data.splitlines() if line.strip()]


def _verdicts(path: Path, lines: Sequence[bytes]) -> list[_Verdict]:
    try:
        return [_verdict_decoder.decode(line) for line in lines]
    except msgspec.DecodeError as error:
        raise SamplesUnreadable(f"{path}: {error}") from None


def _sample(path: Path, index: int, line: bytes) -> RoundSample:
    try:
        row = _line_decoder.decode(line)
    except msgspec.DecodeError as error:
        raise SamplesUnreadable(f"{path}, sample {index}: {error}") from None
    healed = row.original_response is not None
    return RoundSample(
        index=index,
        conversation_id=str(row.conversation_id),
        turn_id=row.turn_id,
        key_id=row.key_id,
        judge=row.judge,
        judge_score=row.toxic_score,
        flagged=bool(row.toxic),
        recall_capped=bool(row.recall_capped),
        original_reply=row.original_response if row.original_response is not None else row.response,
        healed_reply=row.response if healed else None,
        heal_mode=row.heal_mode,
        context=row.context,
    )


def read_page(
    run_id: str, path: Path, *, flagged: bool | None, offset: int, limit: int
) -> SamplesPage:
    """Samples ``offset`` to ``offset + limit`` of the round's file, in file order; only
    flagged ones (``flagged=True``), only the others (``False``) or all (``None``).

    ``NoSamples`` without a file, ``SamplesUnreadable`` for one that does not decode.
    Only the page's lines are decoded whole (texts and context).
    """
    lines = _lines(path)
    verdicts = _verdicts(path, lines)
    matching = [
        index
        for index, verdict in enumerate(verdicts)
        if flagged is None or bool(verdict.toxic) is flagged
    ]
    page = matching[offset : offset + limit]
    return SamplesPage(
        run_id=run_id,
        samples=sum(not verdict.is_answer for verdict in verdicts),
        flagged=sum(bool(verdict.toxic) for verdict in verdicts),
        total=len(matching),
        offset=offset,
        limit=limit,
        data=[_sample(path, index, lines[index]) for index in page],
    )


# -- per key --------------------------------------------------------------------------

Counts = dict[str | None, tuple[int, int]]
"""Per key id (or end user): (samples, flagged)."""
SubjectKind = Literal["key", "user"]
"""What samples are counted by: the API key (``key_id``) or the end user (``end_user``)."""
_Tally = tuple[int, int]


class SampleCounts:
    """Samples and flagged samples per API key, over rounds' samples files.

    The one count of a key's (and an end user's) flagged samples: ``GET
    /admin/keys/flagged`` and ``/admin/users/flagged`` answer with it, the console's Keys
    page shows that answer, and the learner quarantines the subjects whose flagged count
    and rate over the newest rounds cross policies/learner.yaml's ``quarantine`` line
    (``learner.quarantine``).

    A samples file is written once, when its round's training ends, so each is read once
    and its counts kept (at most ``rounds`` of them, the most recently asked); one that
    changes on disk (size or time) is read again.
    """

    def __init__(self, rounds: int) -> None:
        self._rounds = rounds
        # Per file: its (size, mtime) when read, and its counts per key and per end user.
        self._known: OrderedDict[Path, tuple[tuple[int, int], dict[SubjectKind, Counts]]] = (
            OrderedDict()
        )
        # Requests read in threads (asyncio.to_thread): the cache changes under a lock.
        self._lock = threading.Lock()

    def of(self, path: Path, kind: SubjectKind = "key") -> Counts | None:
        """Per key (or end user), the file's (samples, flagged); None when there is no
        file."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._known.get(path)
            if known is not None and known[0] == stamp:
                self._known.move_to_end(path)
                return known[1][kind]
        try:
            verdicts = _verdicts(path, _lines(path))
        except NoSamples:
            return None
        by_key: dict[str | None, list[int]] = {}
        by_user: dict[str | None, list[int]] = {}
        counts: dict[SubjectKind, dict[str | None, list[int]]] = {"key": by_key, "user": by_user}
        for verdict in verdicts:
            if verdict.is_answer:
                continue
            for per, subject in ((by_key, verdict.key_id), (by_user, verdict.end_user)):
                tally = per.setdefault(subject, [0, 0])
                tally[0] += 1
                tally[1] += bool(verdict.toxic)
        result = {
            subject_kind: {subject: (tally[0], tally[1]) for subject, tally in per.items()}
            for subject_kind, per in counts.items()
        }
        with self._lock:
            self._known[path] = (stamp, result)
            self._known.move_to_end(path)
            while len(self._known) > self._rounds:
                self._known.popitem(last=False)
        return result[kind]

    def per_subject(
        self, runs: Sequence[RunRecord], kind: SubjectKind
    ) -> tuple[list[str], dict[str | None, list[RoundKeyCount]]]:
        """The runs read (those with a samples file, in ``runs``' order) and, per key or
        end user, its counts in each of them."""
        read: list[str] = []
        per: dict[str | None, list[RoundKeyCount]] = {}
        for run in runs:
            path = samples_file(run)
            counts = self.of(path, kind) if path is not None else None
            if counts is None:
                continue
            read.append(run.run_id)
            for subject, (samples, flagged) in counts.items():
                per.setdefault(subject, []).append(
                    RoundKeyCount(run_id=run.run_id, samples=samples, flagged=flagged)
                )
        return read, per

    def by_key(self, runs: Sequence[RunRecord]) -> FlaggedByKey:
        """Per key, samples and flagged samples summed over ``runs`` (newest first), and
        in each round; rounds without a samples file are left out."""
        read, per_key = self.per_subject(runs, "key")
        keys = [
            KeySamples(key_id=key_id, samples=samples, flagged=flagged,
                       flagged_rate=rate(samples, flagged), rounds=rounds)
            for key_id, rounds in per_key.items()
            for samples, flagged in [summed(rounds)]
        ]  # fmt: skip
        keys.sort(key=lambda key: (-key.flagged, -key.flagged_rate, key.key_id or ""))
        return FlaggedByKey(rounds=read, keys=keys)

    def by_user(self, runs: Sequence[RunRecord]) -> FlaggedByUser:
        """``by_key`` per end user (the requests' OpenAI ``user`` value)."""
        read, per_user = self.per_subject(runs, "user")
        users = [
            UserSamples(end_user=user, samples=samples, flagged=flagged,
                        flagged_rate=rate(samples, flagged), rounds=rounds)
            for user, rounds in per_user.items()
            for samples, flagged in [summed(rounds)]
        ]  # fmt: skip
        users.sort(key=lambda user: (-user.flagged, -user.flagged_rate, user.end_user or ""))
        return FlaggedByUser(rounds=read, users=users)


def summed(rounds: Sequence[RoundKeyCount]) -> _Tally:
    """(samples, flagged) over ``rounds``."""
    return sum(count.samples for count in rounds), sum(count.flagged for count in rounds)


def rate(samples: int, flagged: int) -> float:
    """The flagged share (0 without samples)."""
    return flagged / samples if samples else 0.0
