"""The audit log: who changed what (promote, rollback, keys, rounds), when, and why."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store._database import Database, utcnow


@dataclass(frozen=True)
class AuditEntry:
    """One recorded operator or learner action."""

    at: datetime
    actor: str
    """Key id of the admin who acted, or ``learner``/``serve`` for the control plane."""
    action: str
    target: str | None
    detail: dict[str, Any]


class AuditLog:
    """Append-only ``audit_log`` rows."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def record(
        self, actor: str, action: str, target: str | None = None, **detail: Any
    ) -> AuditEntry:
        """Append one entry."""
        entry = AuditEntry(utcnow(), actor, action, target, detail)
        self._database.call(
            lambda c: c.execute(
                "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?)",
                [entry.at, actor, action, target, json.dumps(detail, default=str)],
            )
        )
        return entry

    def list(self, *, limit: int = 100, action: str | None = None) -> list[AuditEntry]:
        """The newest entries first (of one action, if given)."""
        where, params = ("WHERE action = ?", [action]) if action else ("", [])
        rows = self._database.call(
            lambda c: c.execute(
                f"SELECT recorded_at, actor, action, target, detail FROM audit_log "
                f"{where} ORDER BY recorded_at DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        )
        return [AuditEntry(at, actor, act, target, json.loads(detail or "{}"))
                for at, actor, act, target, detail in rows]  # fmt: skip
