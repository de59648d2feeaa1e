"""Learner runs: one row per learning round, readable by the admin API while it goes.

Rows live in the ``learner_runs`` table of ``m004_adapters``. A run is ``queued``, then
``running`` (``stage`` and ``progress`` move), and ends ``succeeded``, ``rejected`` (the
gates refused the candidate) or ``failed`` (with its error). Whoever queues a run (an
admin request, the learner's schedule) stores the round settings it was queued with; the
active learner claims queued runs one at a time. A learner that takes over marks the runs
its predecessor left ``running`` as failed: nothing is running them any more.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from store._database import Connection, Database, utcnow
from store._migrations import RUN_STATUSES
from store._registry import RegistryError

FINISHED = frozenset({"succeeded", "failed", "rejected"})
# Any constant the queueing processes agree on: pg_advisory_xact_lock's key.
QUEUE_LOCK_KEY = 7_302_114_003


class UnknownRun(RegistryError):
    """No learner run has this id."""


@dataclass(frozen=True)
class RunRecord:
    """One learning round."""

    run_id: str
    alias: str
    status: str
    stage: str | None
    progress: float | None
    version: str | None
    log_path: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    claimed_by: str | None = None
    """The learner (host:pid) that runs or ran it."""


_COLUMNS = tuple(field.name for field in fields(RunRecord))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM learner_runs"
_UNSET: Any = object()


class RunStore:
    """Learner run rows in the store (blocking calls)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def create(self, alias: str, settings: str | None = None) -> RunRecord:
        """A new ``queued`` run for ``alias``, with the encoded round settings it runs with."""
        now = utcnow()
        run_id = f"run_{now:%Y%m%d%H%M%S}_{secrets.token_hex(3)}"
        record = RunRecord(
            run_id, alias, "queued", None, None, None, None, None, now, None, None, now
        )
        self._database.call(
            lambda c: c.execute(
                f"INSERT INTO learner_runs ({', '.join(_COLUMNS)}, settings) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?)",
                [*(getattr(record, name) for name in _COLUMNS), settings],
            )
        )
        return record

    def queue(self, alias: str, settings: str | None = None) -> RunRecord | None:
        """``create`` a run unless one is queued or running (then None), atomically: two
        gateways asking at once queue one round between them."""
        now = utcnow()
        run_id = f"run_{now:%Y%m%d%H%M%S}_{secrets.token_hex(3)}"
        record = RunRecord(
            run_id, alias, "queued", None, None, None, None, None, now, None, None, now
        )
        finished = ", ".join(f"'{status}'" for status in sorted(FINISHED))

        def run(connection: Connection) -> bool:
            if self._database.backend == "postgresql":
                # READ COMMITTED would let two transactions both see no waiting run.
                connection.execute("SELECT pg_advisory_xact_lock(?)", [QUEUE_LOCK_KEY])
            waiting = connection.execute(
                f"SELECT 1 FROM learner_runs WHERE status NOT IN ({finished}) LIMIT 1"
            ).fetchone()
            if waiting is not None:
                return False
            connection.execute(
                f"INSERT INTO learner_runs ({', '.join(_COLUMNS)}, settings) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?)",
                [*(getattr(record, name) for name in _COLUMNS), settings],
            )
            return True

        return record if self._database.transaction(run) else None

    def settings(self, run_id: str) -> str | None:
        """The encoded round settings ``run_id`` was queued with."""
        row = self._database.call(
            lambda c: c.execute(
                "SELECT settings FROM learner_runs WHERE run_id = ?", [run_id]
            ).fetchone()
        )
        if row is None:
            raise UnknownRun(f"no learner run {run_id!r}")
        return None if row[0] is None else str(row[0])

    def claim_next(self, learner: str, run_id: str | None = None) -> RunRecord | None:
        """Mark the oldest ``queued`` run (or ``run_id``) ``running`` for ``learner``; None
        when none waits."""
        now = utcnow()

        def run(connection: Connection) -> str | None:
            where, params = ("AND run_id = ?", [run_id]) if run_id else ("", [])
            row = connection.execute(
                f"SELECT run_id FROM learner_runs WHERE status = 'queued' {where} "
                "ORDER BY created_at, run_id LIMIT 1",
                params,
            ).fetchone()
            if row is None:
                return None
            # Guarded: another learner that claimed it first makes this update change no row.
            claimed = connection.execute(
                "UPDATE learner_runs SET status = 'running', claimed_by = ?, started_at = ?, "
                "updated_at = ? WHERE run_id = ? AND status = 'queued' RETURNING run_id",
                [learner, now, now, row[0]],
            ).fetchone()
            return None if claimed is None else str(claimed[0])

        claimed = self._database.transaction(run)
        return None if claimed is None else self.get(claimed)

    def update(
        self,
        run_id: str,
        *,
        status: str | None = None,
        stage: str | None = _UNSET,
        progress: float | None = _UNSET,
        version: str | None = _UNSET,
        log_path: str | None = _UNSET,
        error: str | None = _UNSET,
    ) -> RunRecord:
        """Change the named fields; entering ``running`` or a final status stamps the time."""
        if status is not None and status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if progress not in (_UNSET, None) and not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        now = utcnow()
        changes: dict[str, Any] = {"updated_at": now}
        given = {
            "stage": stage,
            "progress": progress,
            "version": version,
            "log_path": log_path,
            "error": error,
        }
        changes.update({name: value for name, value in given.items() if value is not _UNSET})
        if status is not None:
            changes["status"] = status
            if status == "running":
                changes["started_at"] = now
            if status in FINISHED:
                changes["finished_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in changes)

        def run(connection: Connection) -> None:
            if (
                connection.execute(
                    "SELECT 1 FROM learner_runs WHERE run_id = ?", [run_id]
                ).fetchone()
                is None
            ):
                raise UnknownRun(f"no learner run {run_id!r}")
            connection.execute(
                f"UPDATE learner_runs SET {assignments} WHERE run_id = ?",
                [*changes.values(), run_id],
            )

        self._database.transaction(run)
        return self.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        """The run with this id (``UnknownRun`` when none)."""
        row = self._database.call(
            lambda c: c.execute(f"{_SELECT} WHERE run_id = ?", [run_id]).fetchone()
        )
        if row is None:
            raise UnknownRun(f"no learner run {run_id!r}")
        return RunRecord(*row)

    def unfinished(self) -> list[RunRecord]:
        """Runs that are queued or running."""
        finished = ", ".join(f"'{status}'" for status in sorted(FINISHED))
        rows = self._database.call(
            lambda c: c.execute(
                f"{_SELECT} WHERE status NOT IN ({finished}) ORDER BY created_at"
            ).fetchall()
        )
        return [RunRecord(*row) for row in rows]

    def fail_running(self, reason: str) -> list[str]:
        """Fail the runs left ``running`` (their learner is gone); queued ones stay queued."""
        ids = [run.run_id for run in self.unfinished() if run.status == "running"]
        for run_id in ids:
            self.update(run_id, status="failed", error=reason)
        return ids

    def fail_unfinished(self, reason: str) -> list[str]:
        """Mark every queued or running run failed (at start, after a crash); return ids."""
        ids = [run.run_id for run in self.unfinished()]
        for run_id in ids:
            self.update(run_id, status="failed", error=reason)
        return ids

    def list(self, limit: int = 50) -> list[RunRecord]:
        """The latest runs, newest first."""
        rows = self._database.call(
            lambda c: c.execute(
                f"{_SELECT} ORDER BY created_at DESC, run_id DESC LIMIT ?", [limit]
            ).fetchall()
        )
        return [RunRecord(*row) for row in rows]
