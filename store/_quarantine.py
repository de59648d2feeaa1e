"""Quarantine: API keys and end users (the OpenAI ``user`` value) whose turns stay out of
training.

A quarantined subject is still served; only the training export
(``DialogStore.export``) leaves its turns out, those created at or after the row's
``excluded_from`` and before its release. Each quarantine is one ``quarantine`` row
(``m011_quarantine``), kept after its release, so the store shows who was quarantined
when, by whom, why, and who released them. A subject has at most one unreleased row: the
``active_subject`` column holds ``kind:subject`` until the release clears it, and its
UNIQUE constraint makes two quarantines of one subject at once (the learner's and an
admin's, from two processes) one row.

Every quarantine and release is also written to the audit log (``store._audit``), with
the actor who made it: an admin's key id, or ``learner`` for the automatic ones.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, get_args

from store._audit import AuditLog
from store._database import Connection, Database, utcnow
from store._registry import RegistryError

SubjectKind = Literal["key", "user"]
"""``key``: an API key id; ``user``: an end user, the ``user`` value of OpenAI requests."""
SUBJECT_KINDS: tuple[SubjectKind, ...] = get_args(SubjectKind)
QUARANTINE_ACTION = "quarantine"
RELEASE_ACTION = "release"


class AlreadyQuarantined(RegistryError):
    """The subject is quarantined already (its row is in the message)."""


class NotQuarantined(RegistryError):
    """The subject has no unreleased quarantine."""


@dataclass(frozen=True)
class QuarantineRecord:
    """One quarantine of one subject, released or not."""

    quarantine_id: str
    kind: SubjectKind
    subject: str
    quarantined_at: datetime
    excluded_from: datetime
    """The subject's turns created from here on (until ``released_at``) stay out of
    training: the time of a manual quarantine; for an automatic one, the oldest turn of
    the subject that the deciding rounds judged (turns of those rounds that were not
    trained on yet, and every later one, stay out)."""
    actor: str
    """Key id of the admin who quarantined it, or ``learner``."""
    reason: str
    run_id: str | None
    """The round whose samples made the learner quarantine it (null: by hand)."""
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None


_COLUMNS = tuple(field.name for field in fields(QuarantineRecord))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM quarantine"


def _active_subject(kind: SubjectKind, subject: str) -> str:
    return f"{kind}:{subject}"


def _check(kind: str, subject: str) -> None:
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SUBJECT_KINDS)}, got {kind!r}")
    if not subject:
        raise ValueError("subject must not be empty")


class QuarantineStore:
    """``quarantine`` rows (blocking calls); each change is written to the audit log."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._audit = AuditLog(database)

    def quarantine(
        self,
        kind: SubjectKind,
        subject: str,
        *,
        actor: str,
        reason: str,
        run_id: str | None = None,
        excluded_from: datetime | None = None,
        detail: dict[str, Any] | None = None,
    ) -> QuarantineRecord:
        """Quarantine ``subject`` (its turns from ``excluded_from`` on, default now, stay
        out of training); ``AlreadyQuarantined`` when it is. ``detail`` (the counts behind
        an automatic one) goes to the audit entry."""
        _check(kind, subject)
        now = utcnow()
        record = QuarantineRecord(
            quarantine_id=f"q_{now:%Y%m%d%H%M%S}_{secrets.token_hex(4)}",
            kind=kind,
            subject=subject,
            quarantined_at=now,
            excluded_from=excluded_from or now,
            actor=actor,
            reason=reason,
            run_id=run_id,
        )

        def run(connection: Connection) -> Any:
            # The UNIQUE active_subject turns a second quarantine into no row, whichever
            # process wrote the first one.
            connection.execute(
                f"INSERT INTO quarantine ({', '.join(_COLUMNS)}, active_subject) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?) ON CONFLICT DO NOTHING",
                [*(getattr(record, name) for name in _COLUMNS), _active_subject(kind, subject)],
            )
            return connection.execute(
                f"{_SELECT} WHERE active_subject = ?", [_active_subject(kind, subject)]
            ).fetchone()

        stored = QuarantineRecord(*self._database.call(run))
        if stored.quarantine_id != record.quarantine_id:
            raise AlreadyQuarantined(
                f"{kind} {subject!r} is quarantined already (since "
                f"{stored.quarantined_at:%Y-%m-%d %H:%M:%S} UTC, by {stored.actor})"
            )
        self._audit.record(
            actor,
            QUARANTINE_ACTION,
            _active_subject(kind, subject),
            reason=reason,
            run_id=run_id,
            excluded_from=record.excluded_from,
            **(detail or {}),
        )
        return stored

    def release(
        self, kind: SubjectKind, subject: str, *, actor: str, reason: str | None = None
    ) -> QuarantineRecord:
        """End the subject's quarantine (its later turns train again; those logged while
        it was quarantined stay out); ``NotQuarantined`` when it has none."""
        _check(kind, subject)
        now = utcnow()
        active = _active_subject(kind, subject)

        def run(connection: Connection) -> Any:
            row = connection.execute(f"{_SELECT} WHERE active_subject = ?", [active]).fetchone()
            if row is None:
                return None
            connection.execute(
                "UPDATE quarantine SET released_at = ?, released_by = ?, release_reason = ?, "
                "active_subject = NULL WHERE quarantine_id = ?",
                [now, actor, reason, row[0]],
            )
            return connection.execute(f"{_SELECT} WHERE quarantine_id = ?", [row[0]]).fetchone()

        row = self._database.transaction(run)
        if row is None:
            raise NotQuarantined(f"{kind} {subject!r} is not quarantined")
        record = QuarantineRecord(*row)
        self._audit.record(
            actor, RELEASE_ACTION, active, reason=reason, quarantine_id=record.quarantine_id
        )
        return record

    def active(self, kind: SubjectKind | None = None) -> list[QuarantineRecord]:
        """The unreleased quarantines (of one kind, if given), oldest first."""
        where, params = "active_subject IS NOT NULL", []
        if kind is not None:
            where += " AND kind = ?"
            params.append(kind)
        return self._select(where, params)

    def history(
        self, *, include_released: bool = False, limit: int | None = None
    ) -> list[QuarantineRecord]:
        """The quarantines, newest first: the unreleased ones, or every one ever made."""
        where = "TRUE" if include_released else "active_subject IS NOT NULL"
        return self._select(where, [], newest_first=True, limit=limit)

    def get(self, kind: SubjectKind, subject: str) -> QuarantineRecord | None:
        """The subject's unreleased quarantine (None: not quarantined)."""
        found = self._select("active_subject = ?", [_active_subject(kind, subject)])
        return found[0] if found else None

    def _select(
        self,
        where: str,
        params: list[Any],
        *,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[QuarantineRecord]:
        order = "DESC" if newest_first else "ASC"
        query = f"{_SELECT} WHERE {where} ORDER BY quarantined_at {order}, quarantine_id {order}"
        if limit is not None:
            query += " LIMIT ?"
            params = [*params, limit]
        rows = self._database.call(lambda c: c.execute(query, params).fetchall())
        return [QuarantineRecord(*row) for row in rows]
