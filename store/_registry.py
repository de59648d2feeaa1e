"""The adapter registry: every LoRA version of every alias, its lineage and its state.

Rows live in the store (``m004_adapters``); adapter folders under the data dir.

Statuses::

    candidate  registered, never served, or served before and kept for rollback
    active     the version its alias serves (at most one per alias)
    rejected   failed the gates; served only through a forced promote
    retired    unloaded from the engine; folder kept, so rollback can load it again
    failed     a round that produced no usable adapter

A registered folder is never modified: vLLM may drop a loaded adapter from memory and
re-read its folder later. Removing a version therefore unregisters it first, then
deletes the folder. Version names are never reused, even after removal.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from store._database import Connection, Database, utcnow
from store._migrations import ADAPTER_STATUSES, AdapterStatus

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Registered folders live here, under the data dir.
ADAPTERS_FOLDER = "adapters"
VERSION_NAME = re.compile(r"^(?P<alias>[A-Za-z0-9._:-]+)-v(?P<number>\d{4,})$")


class RegistryError(Exception):
    """A registry operation was refused; the message says why."""


class UnknownVersion(RegistryError):
    """No registered adapter has this version name."""


class IncompleteAdapter(RegistryError):
    """The folder lacks a file that vLLM needs to load the adapter."""


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter version."""

    version: str
    alias: str
    parent: str | None
    path: str
    status: AdapterStatus
    snapshot_from: datetime | None
    snapshot_to: datetime | None
    samples: int | None
    flagged: int | None
    healed: int | None
    judge: str | None
    threshold: float | None
    hyperparameters: dict[str, Any]
    gate_metrics: dict[str, Any]
    error: str | None
    forced_promote_at: datetime | None
    activated_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AdapterRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        for name in ("hyperparameters", "gate_metrics"):
            values[name] = json.loads(values[name]) if values[name] else {}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (timestamps in ISO form, UTC)."""
        out: dict[str, Any] = {}
        for name in _COLUMNS:
            value = getattr(self, name)
            out[name] = value.isoformat() + "Z" if isinstance(value, datetime) else value
        return out


_COLUMNS = tuple(field.name for field in fields(AdapterRecord))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM adapters"


def check_adapter_folder(path: Path) -> None:
    """Raise ``IncompleteAdapter`` unless ``path`` holds a loadable adapter."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise IncompleteAdapter(f"adapter folder {path} lacks {', '.join(missing)}")


class AdapterRegistry:
    """Adapter rows in the gateway's database (blocking calls: use a thread from async code)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def next_version(self, alias: str) -> str:
        """Reserve and return the next unused version name of ``alias`` (``chat-v0007``)."""
        if not re.fullmatch(r"[A-Za-z0-9._:-]+", alias):
            raise ValueError(f"alias must be letters, digits and . _ : -, got {alias!r}")

        def run(connection: Connection) -> int:
            taken = connection.execute(
                "SELECT version FROM adapters WHERE alias = ?", [alias]
            ).fetchall()
            floor = max([-1, *(_number(version) for (version,) in taken)]) + 1
            # One statement: a concurrent reservation (another process) waits on the row
            # and then takes the number after this one, never the same.
            row = connection.execute(
                "INSERT INTO adapter_sequences VALUES (?, ?) ON CONFLICT (alias) DO UPDATE "
                "SET last_number = greatest(adapter_sequences.last_number + 1, "
                "excluded.last_number) RETURNING last_number",
                [alias, floor],
            ).fetchone()
            return int(row[0])

        return f"{alias}-v{self._database.transaction(run):04d}"

    def register(
        self,
        version: str,
        path: Path,
        *,
        status: AdapterStatus = "candidate",
        parent: str | None = None,
        snapshot_from: datetime | None = None,
        snapshot_to: datetime | None = None,
        samples: int | None = None,
        flagged: int | None = None,
        healed: int | None = None,
        judge: str | None = None,
        threshold: float | None = None,
        hyperparameters: dict[str, Any] | None = None,
        gate_metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> AdapterRecord:
        """Record a complete adapter folder as ``version`` (alias taken from the name)."""
        match = VERSION_NAME.match(version)
        if match is None:
            raise ValueError(f"version must look like 'chat-v0007', got {version!r}")
        _check_status(status)
        path = Path(path).resolve()
        if status != "failed":
            check_adapter_folder(path)
        now = utcnow()
        values: dict[str, Any] = {
            "version": version,
            "alias": match["alias"],
            "parent": parent,
            "path": str(path),
            "status": status,
            "snapshot_from": snapshot_from,
            "snapshot_to": snapshot_to,
            "samples": samples,
            "flagged": flagged,
            "healed": healed,
            "judge": judge,
            "threshold": threshold,
            "hyperparameters": json.dumps(hyperparameters or {}),
            "gate_metrics": json.dumps(gate_metrics or {}),
            "error": error,
            "forced_promote_at": None,
            "activated_at": now if status == "active" else None,
            "created_at": now,
            "updated_at": now,
        }

        def run(connection: Connection) -> None:
            if connection.execute("SELECT 1 FROM adapters WHERE version = ?", [version]).fetchone():
                raise RegistryError(f"version {version} is already registered")
            if status == "active":
                _deactivate(connection, match["alias"], now)
            connection.execute(
                f"INSERT INTO adapters ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                [values[name] for name in _COLUMNS],
            )

        self._database.transaction(run)
        return self.get(version)

    def install(
        self, built: Path, adapters_dir: Path, version: str, **metadata: Any
    ) -> AdapterRecord:
        """Move a finished adapter folder to ``adapters_dir/version`` and register it.

        The folder is checked before the move and renamed in one step (same file system),
        so no half-written folder ever carries a registered version's name.
        """
        check_adapter_folder(Path(built))
        target = Path(adapters_dir) / version
        if target.exists():
            raise RegistryError(f"{target} already exists; version names are never reused")
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(built).rename(target)
        return self.register(version, target, **metadata)

    def install_copy(
        self, source: Path, adapters_dir: Path, alias: str, **metadata: Any
    ) -> AdapterRecord:
        """Copy a finished adapter folder in as ``alias``'s next version (a ``candidate``).

        ``source`` stays the caller's; the registry's copy appears whole under its version
        name or not at all.
        """
        check_adapter_folder(Path(source))
        version = self.next_version(alias)
        scratch = Path(adapters_dir) / f".{version}.copying"
        try:
            shutil.copytree(source, scratch)
            return self.install(scratch, adapters_dir, version, **metadata)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def get(self, version: str) -> AdapterRecord:
        """The record of ``version`` (``UnknownVersion`` when none)."""
        row = self._database.call(
            lambda c: c.execute(f"{_SELECT} WHERE version = ?", [version]).fetchone()
        )
        if row is None:
            raise UnknownVersion(f"no registered adapter {version!r}")
        return AdapterRecord.from_row(row)

    def list(self, alias: str | None = None) -> list[AdapterRecord]:
        """Every version (of one alias, if given), oldest first."""
        where, params = ("WHERE alias = ?", [alias]) if alias is not None else ("", [])
        rows = self._database.call(
            lambda c: c.execute(f"{_SELECT} {where} ORDER BY alias, version", params).fetchall()
        )
        return [AdapterRecord.from_row(row) for row in rows]

    def active(self, alias: str) -> AdapterRecord | None:
        """The version ``alias`` serves, per the registry."""
        rows = [record for record in self.list(alias) if record.status == "active"]
        return rows[0] if rows else None

    def previous_active(self, alias: str) -> AdapterRecord | None:
        """The version served before the active one (the target of a plain rollback)."""
        served = [
            record
            for record in self.list(alias)
            if record.activated_at is not None and record.status in ("candidate", "retired")
        ]
        return max(
            served, key=lambda record: record.activated_at or record.created_at, default=None
        )

    def set_status(
        self, version: str, status: AdapterStatus, *, error: str | None = None
    ) -> AdapterRecord:
        """Change a version's status; ``active`` demotes the alias's current one to candidate."""
        _check_status(status)
        record = self.get(version)
        now = utcnow()

        def run(connection: Connection) -> None:
            if status == "active":
                _deactivate(connection, record.alias, now)
            connection.execute(
                "UPDATE adapters SET status = ?, error = coalesce(?, error), updated_at = ?, "
                "activated_at = CASE WHEN ? THEN ? ELSE activated_at END WHERE version = ?",
                [status, error, now, status == "active", now, version],
            )

        self._database.transaction(run)
        return self.get(version)

    def record_forced_promote(self, version: str) -> AdapterRecord:
        """Stamp that a rejected version was promoted anyway (kept for the audit)."""
        now = utcnow()
        self.get(version)
        self._database.call(
            lambda c: c.execute(
                "UPDATE adapters SET forced_promote_at = ?, updated_at = ? WHERE version = ?",
                [now, now, version],
            )
        )
        return self.get(version)

    def remove(self, version: str) -> None:
        """Unregister ``version``, then delete its folder; the active version cannot go."""
        record = self.get(version)
        if record.status == "active":
            raise RegistryError(f"{version} is active; promote or roll back to another first")
        self._database.call(
            lambda c: c.execute("DELETE FROM adapters WHERE version = ?", [version])
        )
        shutil.rmtree(record.path, ignore_errors=True)


def _number(version: str) -> int:
    match = VERSION_NAME.match(version)
    return int(match["number"]) if match else -1


def _check_status(status: str) -> None:
    if status not in ADAPTER_STATUSES:
        raise ValueError(f"status must be one of {ADAPTER_STATUSES}, got {status!r}")


def _deactivate(connection: Connection, alias: str, now: datetime) -> None:
    connection.execute(
        "UPDATE adapters SET status = 'candidate', updated_at = ? "
        "WHERE alias = ? AND status = 'active'",
        [now, alias],
    )
