"""Lineage: from a served reply back to the data and the judge behind its adapter.

    turn → adapter version (the turn's ``adapter``) → learning round (the version's
    ``run_id``) → snapshot (its file's SHA-256) → defense judge (its artefact hash)

A round records its part of the chain when it runs (``round_lineage``): once its snapshot
is written and before its worker starts, the snapshot file's SHA-256 and the hash of the
defense judge's files (``tuneshield.judge_artefact``). The register step keeps it in the
version's ``hyperparameters`` under ``lineage``, beside the ``run_id`` that is already
there, so the chain needs no schema change; ``GET /admin/turns/{turn_id}/lineage``
(``learner.lineage_routes``) follows it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from store import utcnow
from tuneshield import file_sha256, judge_artefact

if TYPE_CHECKING:
    from learner.contracts import RoundSettings
    from learner.snapshot import Snapshot

# The key of a round's lineage in its registered version's ``hyperparameters``.
LINEAGE_KEY = "lineage"
# Whether a snapshot file is still what its round read (``snapshot_state``).
SnapshotState = Literal["unchanged", "changed", "missing"]


class SnapshotLineage(msgspec.Struct, kw_only=True):
    """The Parquet file a round trained on, as it was when the round read it."""

    path: str
    sha256: str
    """Of the file's bytes when the round read it."""
    rows: int
    conversations: int
    watermark_from: datetime | None
    """Exclusive lower bound: dialogs logged after it (null: from the start)."""
    watermark_to: datetime | None


class JudgeLineage(msgspec.Struct, kw_only=True):
    """The defense judge that scored the round's samples, by content."""

    judge: str
    """Its name in policies/judges.yaml as the round recorded it."""
    sha256: str
    """One digest over its files (``files``) and the remote models it calls (``remote``)."""
    files: dict[str, str]
    """``<judge>/<part>/<path>`` → SHA-256: the artefact, encoder or model files it loads."""
    remote: list[str]
    """Models it calls that are no files here (an endpoint, a hub id): named, not hashed."""


class RoundLineage(msgspec.Struct, kw_only=True):
    """What a learning round trained from, recorded when it ran."""

    run_id: str
    recorded_at: datetime
    """When the round hashed its snapshot and judge (UTC; so are the watermarks)."""
    snapshot: SnapshotLineage
    judge: JudgeLineage | None
    """Null: the round ran without the defense (no judge scored its samples)."""


def round_lineage(run_id: str, snapshot: Snapshot, settings: RoundSettings) -> RoundLineage:
    """Hash the round's snapshot file and its defense judge's files (blocking: a thread).

    File digests are cached per process, so the judge's files are read once per learner.
    """
    judge = None
    if settings.plan.defense:
        artefact = judge_artefact(settings.plan.judge, settings.judges_policy())
        judge = JudgeLineage(
            judge=artefact.judge,
            sha256=artefact.sha256,
            files=artefact.files,
            remote=artefact.remote,
        )
    return RoundLineage(
        run_id=run_id,
        recorded_at=_aware(utcnow()),
        snapshot=SnapshotLineage(
            path=str(snapshot.path),
            sha256=file_sha256(snapshot.path),
            rows=snapshot.rows,
            conversations=snapshot.conversations,
            watermark_from=_aware(snapshot.watermark_from),
            watermark_to=_aware(snapshot.watermark_to),
        ),
        judge=judge,
    )


def _aware(moment: datetime | None) -> Any:
    # The store keeps naive UTC; the record says so, and reads back the same anywhere.
    return moment.replace(tzinfo=UTC) if moment is not None else None


def lineage_json(lineage: RoundLineage) -> dict[str, Any]:
    """The lineage as the registry's JSON keeps it."""
    return dict(msgspec.to_builtins(lineage))


def read_lineage(hyperparameters: dict[str, Any]) -> RoundLineage | None:
    """The round lineage a version's ``hyperparameters`` keep; None when there is none
    (registered by hand, or by a round that ran before lineage was recorded) or when it
    does not decode (edited by hand)."""
    raw = hyperparameters.get(LINEAGE_KEY)
    if raw is None:
        return None
    try:
        return msgspec.convert(raw, RoundLineage)
    except msgspec.ValidationError:
        return None


def snapshot_state(snapshot: SnapshotLineage) -> SnapshotState:
    """Whether the snapshot file is still what the round read: ``unchanged``, ``changed``
    (rewritten since, e.g. by a deletion of dialogs) or ``missing``."""
    path = Path(snapshot.path)
    if not path.is_file():
        return "missing"
    return "unchanged" if file_sha256(path) == snapshot.sha256 else "changed"
