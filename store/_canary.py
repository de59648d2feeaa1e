"""Canary rollouts: a candidate version serves a share of its alias's traffic until the
learner's monitor promotes it, rolls it back, or an operator aborts it.

One ``canaries`` row per rollout, kept after its decision (the history). ``running_alias``
holds the alias while the canary runs and is NULL after: its UNIQUE constraint (NULLs
never collide, on both backends) lets the database itself refuse a second running canary
of one alias, whichever process starts it.

Routing reads the running canaries from memory (``AliasStore.route``): ``running_routes``
is what ``AliasStore.refresh`` loads with the aliases, so a canary reaches every gateway
within its cache period, as an alias flip does. ``CanaryRoute.takes`` is the split: a hash
of the conversation id (salted with the canary's id) below the share goes to the
candidate, so a conversation stays on one version and every gateway replica agrees.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store._database import Connection, Database, utcnow
from store._migrations import CANARY_STATES, CanaryState
from store._registry import RegistryError

# The states a decision ends a canary in (everything but running).
DECIDED_STATES: tuple[CanaryState, ...] = CANARY_STATES[1:]
_COLUMNS = (
    "canary_id, alias, candidate, stable, share, state, started_at, actor, decided_at, "
    "decided_by, reason, statistics, released_at"
)
# 64 bits of the hash: the split's resolution is far finer than any share a policy sets.
_HASH_BYTES = 8
_HASH_RANGE = float(2 ** (8 * _HASH_BYTES))


class CanaryConflict(RegistryError):
    """The canary cannot start or end so (one already runs, none runs, bad version)."""


@dataclass(frozen=True)
class CanaryRoute:
    """What routing needs of a running canary."""

    canary_id: str
    candidate: str
    share: float

    def takes(self, conversation_id: str) -> bool:
        """Whether this conversation's requests go to the candidate (stable per id)."""
        digest = hashlib.blake2b(
            f"{self.canary_id}:{conversation_id}".encode(), digest_size=_HASH_BYTES
        ).digest()
        return int.from_bytes(digest, "big") / _HASH_RANGE < self.share


@dataclass(frozen=True)
class CanaryRecord:
    """One canary rollout, running or decided."""

    canary_id: str
    alias: str
    candidate: str
    stable: str
    """The version the alias served when the canary started (what the candidate is
    compared with)."""
    share: float
    state: CanaryState
    started_at: datetime
    actor: str
    """Key id of the admin who started it."""
    decided_at: datetime | None
    decided_by: str | None
    """``learner`` for the monitor's decisions, an admin's key id for an abort."""
    reason: str | None
    statistics: dict[str, Any]
    """The monitor's latest figures (counts, rates, test statistics)."""
    released_at: datetime | None
    """When the candidate was unloaded from the engines after a rollback or abort."""

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CanaryRecord:
        values = list(row)
        values[11] = json.loads(values[11]) if values[11] else {}
        return cls(*values)

    def route(self) -> CanaryRoute:
        return CanaryRoute(self.canary_id, self.candidate, self.share)


def running_routes(connection: Connection) -> dict[str, CanaryRoute]:
    """Alias → its running canary's route (read with the aliases by ``AliasStore``)."""
    rows = connection.execute(
        "SELECT alias, canary_id, candidate, share FROM canaries WHERE state = 'running'"
    ).fetchall()
    return {alias: CanaryRoute(canary_id, candidate, share)
            for alias, canary_id, candidate, share in rows}  # fmt: skip


class CanaryStore:
    """The ``canaries`` rows."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def start(
        self, alias: str, candidate: str, stable: str, share: float, actor: str
    ) -> CanaryRecord:
        """Record a running canary; ``CanaryConflict`` when the alias already has one."""
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be in (0, 1), got {share}")
        record = CanaryRecord(
            canary_id="canary_" + uuid.uuid4().hex[:16],
            alias=alias,
            candidate=candidate,
            stable=stable,
            share=share,
            state="running",
            started_at=utcnow(),
            actor=actor,
            decided_at=None,
            decided_by=None,
            reason=None,
            statistics={},
            released_at=None,
        )

        def run(connection: Connection) -> None:
            # Checked here for a clear message; the UNIQUE column settles a race.
            if connection.execute(
                "SELECT 1 FROM canaries WHERE running_alias = ?", [alias]
            ).fetchone():
                raise CanaryConflict(f"alias {alias!r} already runs a canary; abort it first")
            connection.execute(
                f"INSERT INTO canaries ({_COLUMNS}, running_alias) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [record.canary_id, alias, candidate, stable, share, "running",
                 record.started_at, actor, None, None, None, "{}", None, alias],
            )  # fmt: skip

        try:
            self._database.transaction(run)
        except CanaryConflict:
            raise
        except Exception as error:
            if "unique" in str(error).lower() or "duplicate" in str(error).lower():
                raise CanaryConflict(f"alias {alias!r} already runs a canary") from None
            raise
        return record

    def running(self, alias: str | None = None) -> builtins.list[CanaryRecord]:
        """The running canaries (of one alias, if given)."""
        where, params = ("AND alias = ?", [alias]) if alias is not None else ("", [])
        return self._select(f"WHERE state = 'running' {where} ORDER BY started_at", params)

    def latest(self, alias: str) -> CanaryRecord | None:
        """The alias's running canary, else its latest decided one; None if it had none."""
        rows = self._select(
            "WHERE alias = ? ORDER BY (state = 'running') DESC, started_at DESC LIMIT 1", [alias]
        )
        return rows[0] if rows else None

    def list(self, *, limit: int = 100) -> builtins.list[CanaryRecord]:
        """Every canary, newest first."""
        return self._select("ORDER BY started_at DESC LIMIT ?", [limit])

    def get(self, canary_id: str) -> CanaryRecord:
        rows = self._select("WHERE canary_id = ?", [canary_id])
        if not rows:
            raise CanaryConflict(f"no canary {canary_id!r}")
        return rows[0]

    def update_statistics(self, canary_id: str, statistics: dict[str, Any]) -> None:
        """Store the monitor's latest figures of a running canary."""
        self._database.call(
            lambda c: c.execute(
                "UPDATE canaries SET statistics = ? WHERE canary_id = ? AND state = 'running'",
                [json.dumps(statistics, default=str), canary_id],
            )
        )

    def decide(
        self,
        canary_id: str,
        state: CanaryState,
        decided_by: str,
        reason: str,
        statistics: dict[str, Any] | None = None,
    ) -> CanaryRecord:
        """End a running canary in ``state``; ``CanaryConflict`` when it no longer runs
        (another decision came first: exactly one wins)."""
        if state not in DECIDED_STATES:
            raise ValueError(f"state must be one of {DECIDED_STATES}, got {state!r}")
        now = utcnow()

        def run(connection: Connection) -> Any:
            return connection.execute(
                "UPDATE canaries SET state = ?, running_alias = NULL, decided_at = ?, "
                "decided_by = ?, reason = ?, statistics = coalesce(?, statistics) "
                "WHERE canary_id = ? AND state = 'running' RETURNING canary_id",
                [state, now, decided_by, reason,
                 None if statistics is None else json.dumps(statistics, default=str),
                 canary_id],
            ).fetchone()  # fmt: skip

        if self._database.transaction(run) is None:
            raise CanaryConflict(f"canary {canary_id} is not running any more")
        return self.get(canary_id)

    def unreleased(self, decided_before: datetime) -> builtins.list[CanaryRecord]:
        """Rolled back or aborted canaries decided before ``decided_before`` whose candidate
        was not unloaded yet."""
        return self._select(
            "WHERE state IN ('rolled_back', 'aborted') AND released_at IS NULL "
            "AND decided_at <= ? ORDER BY decided_at",
            [decided_before],
        )

    def mark_released(self, canary_id: str) -> None:
        self._database.call(
            lambda c: c.execute(
                "UPDATE canaries SET released_at = ? WHERE canary_id = ?", [utcnow(), canary_id]
            )
        )

    def _select(self, tail: str, params: builtins.list[Any]) -> builtins.list[CanaryRecord]:
        rows = self._database.call(
            lambda c: c.execute(f"SELECT {_COLUMNS} FROM canaries {tail}", params).fetchall()
        )
        return [CanaryRecord.from_row(row) for row in rows]
