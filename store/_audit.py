"""The audit log: who changed what (promote, rollback, keys, rounds), when, and why.

Append-only. A change made in the store together with its entry (a key created or
revoked: ``KeyStore``) writes both in one transaction with ``insert_entry``, so neither
is ever recorded without the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store._database import Connection, Database, utcnow

# Actions on API keys (``KeyStore``): the entry's target is the key id; its detail says
# what the key became, never its secret or the secret's hash.
KEY_CREATE = "key.create"
KEY_REVOKE = "key.revoke"


@dataclass(frozen=True)
class AuditEntry:
    """One recorded operator or learner action."""

    at: datetime
    actor: str
    """Key id of the admin who acted, ``cli`` for the local command line, or
    ``learner``/``serve`` for the control plane."""
    action: str
    target: str | None
    detail: dict[str, Any]


def insert_entry(connection: Connection, entry: AuditEntry) -> None:
    """Append ``entry`` on ``connection`` (inside the caller's transaction)."""
    connection.execute(
        "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?)",
        [entry.at, entry.actor, entry.action, entry.target, json.dumps(entry.detail, default=str)],
    )


class AuditLog:
    """Append-only ``audit_log`` rows."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def record(
        self, actor: str, action: str, target: str | None = None, **detail: Any
    ) -> AuditEntry:
        """Append one entry."""
        entry = AuditEntry(utcnow(), actor, action, target, detail)
        self._database.call(lambda c: insert_entry(c, entry))
        return entry

    def list(
        self,
        *,
        limit: int = 100,
        action: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
    ) -> list[AuditEntry]:
        """The newest entries first: of one action, by one actor, on one target, and
        recorded at or after ``since`` (naive UTC, as stored), each when given."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("action", action), ("actor", actor), ("target", target)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("recorded_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._database.call(
            lambda c: c.execute(
                f"SELECT recorded_at, actor, action, target, detail FROM audit_log "
                f"{clause} ORDER BY recorded_at DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        )
        return [AuditEntry(at, actor, act, target, _detail(detail))
                for at, actor, act, target, detail in rows]  # fmt: skip


def _detail(stored: Any) -> dict[str, Any]:
    # DuckDB hands JSON back as text, psycopg as the decoded value.
    if isinstance(stored, dict):
        return stored
    return dict(json.loads(stored or "{}"))
