"""API keys: never the key itself, only its SHA-256; cached by hash in each process.

With several processes on one database (PostgreSQL) a key created or revoked elsewhere
reaches this process's cache on ``refresh`` (the gateway calls it every few hundred ms).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from store._audit import KEY_CREATE, KEY_REVOKE, AuditEntry, insert_entry
from store._database import Connection, Database, utcnow


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: never the key itself, only its SHA-256."""

    key_id: str
    name: str
    key_hash: str
    key_prefix: str
    role: str
    opt_out: bool
    rate_limit_per_minute: float | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked."""
        return self.revoked_at is not None


_KEY_COLUMNS = ", ".join(field.name for field in fields(ApiKeyRecord))


class KeyStore:
    """API key rows, cached in memory by hash."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self.refresh()

    def refresh(self) -> None:
        """Reload every key (keys created or revoked by other processes included)."""
        self._by_hash = {record.key_hash: record for record in self.list()}

    def list(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""
        rows = self._database.call(
            lambda c: c.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at"
            ).fetchall()
        )
        return [ApiKeyRecord(*row) for row in rows]

    def by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not, from memory.

        Never a query: authentication runs on the event loop, and unknown keys (anyone
        can send one) must not cost a database round trip. A key created by another
        process is known here after the next ``refresh``.
        """
        return self._by_hash.get(key_hash)

    def add(self, record: ApiKeyRecord, *, actor: str | None = None) -> None:
        """Store a new key; with ``actor`` (who made it), its audit entry in the same
        transaction. Without one nothing is audited: for fixtures and benchmarks only."""
        values = [getattr(record, field.name) for field in fields(ApiKeyRecord)]
        marks = ", ".join("?" for _ in values)

        def run(connection: Connection) -> None:
            connection.execute(f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ({marks})", values)
            if actor is not None:
                detail = {
                    "name": record.name,
                    "role": record.role,
                    "opt_out": record.opt_out,
                    "rate_limit_per_minute": record.rate_limit_per_minute,
                }
                entry = AuditEntry(utcnow(), actor, KEY_CREATE, record.key_id, detail)
                insert_entry(connection, entry)

        self._database.transaction(run)
        self._by_hash[record.key_hash] = record

    def revoke(self, key_id: str, *, actor: str | None = None) -> ApiKeyRecord | None:
        """Revoke a key (idempotent); None when no key has this id. With ``actor``, a
        revocation that changed the key is audited in the same transaction."""
        now = utcnow()

        def run(connection: Connection) -> Any:
            changed = connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL "
                "RETURNING name",
                [now, key_id],
            ).fetchone()
            if changed is not None and actor is not None:
                detail = {"name": changed[0], "revoked": True}
                insert_entry(connection, AuditEntry(now, actor, KEY_REVOKE, key_id, detail))
            return connection.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", [key_id]
            ).fetchone()

        row = self._database.transaction(run)
        if row is None:
            return None
        record = ApiKeyRecord(*row)
        self._by_hash[record.key_hash] = record
        return record
