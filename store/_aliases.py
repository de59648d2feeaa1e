"""Public model aliases → the adapter version each serves; ``set`` flips one atomically.

Reads come from memory (one dict lookup per request). The dict is replaced only after the
database transaction committed, so a reader sees the old or the new adapter, never a
half-done change. Other processes' flips arrive with ``refresh`` (the gateway polls).

Every flip is appended to ``alias_history`` with its kind (``seed``, ``promote``,
``rollback``, ``set``) and who made it. A rollback undoes promotions: it steps back to the
version served before the latest flip that is not undone yet, so ``promotion_chain``
replays the history as a stack (a rollback pops, anything else pushes).

A running canary (``store._canary``) sends a share of an alias's conversations to its
candidate: the cache holds the running canaries with the aliases, and ``route`` applies
them, so canaries reach other processes with the same refresh as flips.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store._canary import CanaryRoute, running_routes
from store._database import Connection, Database, utcnow
from store._migrations import ALIAS_CHANGE_KINDS, AliasChangeKind

_HISTORY_COLUMNS = "alias, adapter, previous_adapter, changed_at, kind, actor"


@dataclass(frozen=True)
class AliasRecord:
    """A public model name and the adapter version it serves."""

    alias: str
    adapter: str
    public: bool
    updated_at: datetime


@dataclass(frozen=True)
class AliasChange:
    """One flip of an alias, as ``alias_history`` recorded it."""

    alias: str
    adapter: str
    previous_adapter: str | None
    changed_at: datetime
    kind: AliasChangeKind
    actor: str | None
    """Key id of the admin who flipped it; None for the learner's own swaps and seeds."""


class AliasStore:
    """Alias rows, cached in memory."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._aliases: dict[str, AliasRecord] = {}
        self._canaries: dict[str, CanaryRoute] = {}
        self.refresh()

    def refresh(self) -> None:
        """Reload every alias and running canary (other processes' changes included)."""

        def read(connection: Connection) -> tuple[list[Any], dict[str, CanaryRoute]]:
            rows = connection.execute(
                "SELECT alias, adapter, public, updated_at FROM aliases ORDER BY alias"
            ).fetchall()
            return rows, running_routes(connection)

        rows, canaries = self._database.call(read)
        self._aliases = {row[0]: AliasRecord(*row) for row in rows}
        self._canaries = canaries

    def route(self, alias: str, conversation_id: str) -> str | None:
        """The adapter that answers this conversation's request for ``alias``: its
        running canary's candidate for the canary's share of conversations, else the
        alias's adapter (None for an unknown alias)."""
        record = self._aliases.get(alias)
        if record is None:
            return None
        canary = self._canaries.get(alias)
        if canary is not None and canary.takes(conversation_id):
            return canary.candidate
        return record.adapter

    def canary_candidates(self) -> builtins.list[str]:
        """The candidates of the running canaries (engines must keep them loaded)."""
        return [route.candidate for route in self._canaries.values()]

    def get(self, alias: str) -> str | None:
        """The adapter an alias serves, or None for an unknown alias."""
        record = self._aliases.get(alias)
        return None if record is None else record.adapter

    def record(self, alias: str) -> AliasRecord | None:
        """The full record of an alias, or None."""
        return self._aliases.get(alias)

    def list(self) -> list[AliasRecord]:
        """Every alias, sorted by name."""
        return sorted(self._aliases.values(), key=lambda record: record.alias)

    def set(
        self,
        alias: str,
        adapter: str,
        *,
        public: bool = True,
        kind: AliasChangeKind = "set",
        actor: str | None = None,
    ) -> AliasRecord:
        """Point ``alias`` at ``adapter`` (creating it); a new adapter is recorded in history
        as a flip of ``kind`` made by ``actor``."""
        if not alias or not adapter:
            raise ValueError(f"alias and adapter must not be empty, got {alias!r} → {adapter!r}")
        if kind not in ALIAS_CHANGE_KINDS:
            raise ValueError(f"kind must be one of {ALIAS_CHANGE_KINDS}, got {kind!r}")
        now = utcnow()

        def run(connection: Connection) -> None:
            # The previous adapter as committed, not as this process last saw it.
            row = connection.execute(
                "SELECT adapter FROM aliases WHERE alias = ?", [alias]
            ).fetchone()
            connection.execute(
                "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT (alias) DO UPDATE SET "
                "adapter = excluded.adapter, public = excluded.public, "
                "updated_at = excluded.updated_at",
                [alias, adapter, public, now],
            )
            previous = None if row is None else row[0]
            # Only a new adapter is a flip: the promotion chain has no steps in place.
            if previous != adapter:
                _record_change(connection, AliasChange(alias, adapter, previous, now, kind, actor))

        self._database.transaction(run)
        record = AliasRecord(alias, adapter, public, now)
        self._aliases = {**self._aliases, alias: record}
        return record

    def seed(self, aliases: dict[str, str]) -> None:
        """Create the aliases that do not exist yet; existing ones keep their adapter."""
        now = utcnow()

        def run(connection: Connection) -> None:
            for alias, adapter in aliases.items():
                # Several processes may seed at once: the first insert wins, quietly.
                created = connection.execute(
                    "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT (alias) DO NOTHING "
                    "RETURNING alias",
                    [alias, adapter, True, now],
                ).fetchone()
                if created is not None:
                    _record_change(connection, AliasChange(alias, adapter, None, now, "seed", None))

        self._database.transaction(run)
        self.refresh()

    def history(self, alias: str, *, limit: int | None = None) -> builtins.list[AliasChange]:
        """The flips of ``alias``, newest first (the latest ``limit`` if given)."""
        rows = self._database.call(
            lambda c: c.execute(
                f"SELECT {_HISTORY_COLUMNS} FROM alias_history WHERE alias = ? "
                "ORDER BY changed_at DESC LIMIT ?",
                [alias, limit],
            ).fetchall()
        )
        return [AliasChange(*row) for row in rows]

    def promotion_chain(self, alias: str) -> builtins.list[str]:
        """The versions a plain rollback steps back through, oldest first; the last is the
        one served now (empty for an unknown alias)."""
        return _replay_promotions(reversed(self.history(alias)))


def _replay_promotions(changes: Iterable[AliasChange]) -> list[str]:
    """The promotion chain left by ``changes`` (oldest first).

    A rollback goes back to the nearest earlier entry of its version, dropping the ones it
    undid; a rollback to a version not in the chain (recorded before flips had kinds) and
    every other flip push their version.
    """
    chain: list[str] = []
    for change in changes:
        earlier = chain[:-1]
        if change.kind == "rollback" and change.adapter in earlier:
            nearest = len(earlier) - 1 - earlier[::-1].index(change.adapter)
            del chain[nearest + 1 :]
        elif not chain or chain[-1] != change.adapter:
            chain.append(change.adapter)
    return chain


def _record_change(connection: Connection, change: AliasChange) -> None:
    connection.execute(
        f"INSERT INTO alias_history ({_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        [
            change.alias,
            change.adapter,
            change.previous_adapter,
            change.changed_at,
            change.kind,
            change.actor,
        ],
    )
