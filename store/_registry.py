"""The adapter registry: every LoRA version of every alias, its lineage and its state.

Rows live in the store (``m004_adapters``); adapter folders under the data dir.

Statuses::

    candidate  trained and registered, never served
    active     the version its alias serves (at most one per alias)
    rejected   failed the gates; served only through a forced promote
    retired    served before, then replaced or rolled back from; promote or roll back to
               serve it again (its folder stays, the engine may have unloaded it)
    failed     a round that produced no usable adapter

A registered folder is never modified: vLLM may drop a loaded adapter from memory and
re-read its folder later. Removing a version therefore unregisters it first, then
deletes the folder. Version names are never reused, even after removal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
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


class AdapterImportRefused(RegistryError):
    """A folder to copy in lies outside the import root, is a link, or holds something
    other than regular files and folders (a link, a device, a fifo, a socket)."""


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


def check_adapter_folder(path: Path, *, shown: Path | None = None) -> None:
    """Raise ``IncompleteAdapter`` unless ``path`` holds a loadable adapter (the message
    names ``shown``, where the caller's folder lies, if given)."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise IncompleteAdapter(f"adapter folder {shown or path} lacks {', '.join(missing)}")


# Opened relative to an already opened parent and never through a link: a link swapped
# in after a folder was listed fails the open (ELOOP) instead of being followed.
_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_FOLDER_FLAGS = _NO_FOLLOW | os.O_DIRECTORY
# O_NONBLOCK: a fifo swapped in for a file must not hang the open; fstat then refuses it.
_FILE_FLAGS = _NO_FOLLOW | os.O_NONBLOCK
_KINDS = (
    (stat.S_ISLNK, "a link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a fifo"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _open_no_follow(name: str, folder: int, flags: int, shown: Path) -> int:
    try:
        return os.open(name, flags, dir_fd=folder)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise AdapterImportRefused(f"{shown} is a link; links are never followed") from None
        if error.errno == errno.ENOTDIR:
            raise AdapterImportRefused(f"{shown} is not a folder (it changed)") from None
        raise


def _relative_to_root(source: Path, root: Path) -> Path | None:
    """``source`` (absolute, ``..`` removed) relative to ``root`` as configured or as
    resolved (when the root's own path goes through a link); None when outside it."""
    lexical = Path(os.path.normpath(source))
    for base in (root.absolute(), root.resolve()):
        if lexical.is_relative_to(base):
            return lexical.relative_to(base)
    return None


def _open_folder_under(root: Path, source: Path) -> int:
    """A descriptor of the folder ``source``, reached from ``root`` one folder at a time
    without following a link; ``AdapterImportRefused`` when it lies outside ``root``."""
    relative = _relative_to_root(source, root) if source.is_absolute() else None
    if relative is None:
        raise AdapterImportRefused(f"{source} is outside the import root {root}")
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise AdapterImportRefused(
            f"the import root {root} is not a readable folder: {error.strerror}"
        ) from None
    reached = root
    try:
        for part in relative.parts:
            reached = reached / part
            child = _open_no_follow(part, folder, _FOLDER_FLAGS, reached)
            os.close(folder)
            folder = child
    except BaseException:
        os.close(folder)
        raise
    return folder


def _copy_file(folder: int, name: str, target: Path, shown: Path) -> None:
    descriptor = _open_no_follow(name, folder, _FILE_FLAGS, shown)
    with open(descriptor, "rb") as reader:
        mode = os.fstat(reader.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterImportRefused(f"{shown} is {_kind(mode)}; only regular files are copied")
        with target.open("xb") as writer:
            shutil.copyfileobj(reader, writer)


def _copy_regular_tree(source: int, target: Path, shown: Path) -> None:
    """Copy the folder open as ``source`` to the new folder ``target``: regular files and
    folders only; any other entry refuses the whole folder (``AdapterImportRefused``)."""
    # A stack, not recursion: a deeply nested folder must not exhaust Python's stack.
    pending = [(os.dup(source), target, shown)]
    try:
        while pending:
            folder, into, where = pending.pop()
            try:
                into.mkdir()
                for name in sorted(os.listdir(folder)):
                    mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
                    if stat.S_ISDIR(mode):
                        child = _open_no_follow(name, folder, _FOLDER_FLAGS, where / name)
                        pending.append((child, into / name, where / name))
                    elif stat.S_ISREG(mode):
                        _copy_file(folder, name, into / name, where / name)
                    else:
                        raise AdapterImportRefused(
                            f"{where / name} is {_kind(mode)}; an adapter folder may hold "
                            "only regular files and folders"
                        )
            finally:
                os.close(folder)
    finally:
        for folder, _, _ in pending:
            os.close(folder)


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
        self, source: Path, adapters_dir: Path, alias: str, *, import_root: Path, **metadata: Any
    ) -> AdapterRecord:
        """Copy a finished adapter folder under ``import_root`` in as ``alias``'s next
        version (a ``candidate``).

        Only regular files and folders are read, each opened relative to its parent
        without following links, so neither a link inside the folder (to a secret, to
        another user's data) nor one swapped in during the copy is read: a link, device,
        fifo or socket anywhere below ``import_root`` on the way, a folder outside it, all
        raise ``AdapterImportRefused``. ``source`` stays the caller's; the registry's copy
        appears whole under its version name or not at all, and a refused folder takes no
        version number.
        """
        source = Path(source)
        scratch = Path(adapters_dir) / f".import-{secrets.token_hex(8)}.copying"
        try:
            scratch.parent.mkdir(parents=True, exist_ok=True)
            folder = _open_folder_under(Path(import_root), source)
            try:
                _copy_regular_tree(folder, scratch, source)
            finally:
                os.close(folder)
            check_adapter_folder(scratch, shown=source)
            version = self.next_version(alias)
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

    def version_zero(self, alias: str) -> AdapterRecord | None:
        """The alias's version 0: the first version that served it — its seed in the alias
        history (else its oldest flip), else its oldest version ever activated; None when
        none of these is registered. The gates check every candidate against it too."""
        row = self._database.call(
            lambda c: c.execute(
                "SELECT adapter FROM alias_history WHERE alias = ? "
                "ORDER BY CASE WHEN kind = 'seed' THEN 0 ELSE 1 END, changed_at LIMIT 1",
                [alias],
            ).fetchone()
        )
        if row is not None:
            with contextlib.suppress(UnknownVersion):
                return self.get(row[0])
        served = [record for record in self.list(alias) if record.activated_at is not None]
        return min(served, key=lambda record: _number(record.version)) if served else None

    def set_status(
        self, version: str, status: AdapterStatus, *, error: str | None = None
    ) -> AdapterRecord:
        """Change a version's status; ``active`` retires the alias's current one."""
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
        "UPDATE adapters SET status = 'retired', updated_at = ? "
        "WHERE alias = ? AND status = 'active'",
        [now, alias],
    )
