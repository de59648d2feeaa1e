"""Public model aliases → the adapter version each serves; ``set`` flips one atomically.

Reads come from memory (one dict lookup per request). The dict is replaced only after the
database transaction committed, so a reader sees the old or the new adapter, never a
half-done change. Other processes' flips arrive with ``refresh`` (the gateway polls).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from store._database import Connection, Database, utcnow


@dataclass(frozen=True)
class AliasRecord:
    """A public model name and the adapter version it serves."""

    alias: str
    adapter: str
    public: bool
    updated_at: datetime


class AliasStore:
    """Alias rows, cached in memory."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._aliases: dict[str, AliasRecord] = {}
        self.refresh()

    def refresh(self) -> None:
        """Reload every alias (flips made by other processes included)."""
        rows = self._database.call(
            lambda c: c.execute(
                "SELECT alias, adapter, public, updated_at FROM aliases ORDER BY alias"
            ).fetchall()
        )
        self._aliases = {row[0]: AliasRecord(*row) for row in rows}

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

    def set(self, alias: str, adapter: str, *, public: bool = True) -> AliasRecord:
        """Point ``alias`` at ``adapter`` (creating it), recording the change in history."""
        if not alias or not adapter:
            raise ValueError(f"alias and adapter must not be empty, got {alias!r} → {adapter!r}")
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
            connection.execute(
                "INSERT INTO alias_history VALUES (?, ?, ?, ?)",
                [alias, adapter, None if row is None else row[0], now],
            )

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
                    connection.execute(
                        "INSERT INTO alias_history VALUES (?, ?, ?, ?)", [alias, adapter, None, now]
                    )

        self._database.transaction(run)
        self.refresh()
