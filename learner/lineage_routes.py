"""``GET /admin/turns/{turn_id}/lineage``: what made a served reply.

The chain (``learner.lineage``): the turn as logged → the adapter version that wrote it →
the learning round that trained that version → the snapshot file the round trained on
(its SHA-256 when the round read it, and whether the file is still that) → the defense
judge that scored the round's samples (the hash of its files). Where the chain ends early
(the base model served the turn, a version registered by hand, a round older than lineage
records) ``gap`` says why. Registered with the other learner routes
(``learner.admin_routes.AdapterAdmin``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from litestar import get
from litestar.params import Parameter

from gateway import NotFoundError, Principal
from gateway.routes import Resources, error_responses
from learner.admin_routes import ADMIN_ERRORS, LearnerResources
from learner.lineage import (
    JudgeLineage,
    SnapshotLineage,
    SnapshotState,
    read_lineage,
    snapshot_state,
)
from store import AdapterRecord, RegistryError, RunRecord, TurnRecord

# Turn ids as the gateway writes them (hex), with room for ids written by other means.
TURN_ID = r"^[A-Za-z0-9._:-]{1,128}$"


class LineageTurn(msgspec.Struct, kw_only=True):
    """The turn as the dialog log keeps it (not its messages: export those)."""

    turn_id: str
    conversation_id: str
    key_id: str
    created_at: datetime
    alias: str
    """The alias the client asked for."""
    adapter: str | None
    """The version that wrote the reply (null: the base model, no adapter)."""
    engine: str | None


class LineageVersion(msgspec.Struct, kw_only=True):
    """The adapter version that wrote the reply, as the registry keeps it."""

    version: str
    registered: bool
    """False: the version was removed from the registry since (nothing more is known)."""
    status: str | None
    parent: str | None
    judge: str | None
    """The defense judge's name as registered."""
    created_at: datetime | None


class LineageRound(msgspec.Struct, kw_only=True):
    """The learning round that trained the version."""

    run_id: str
    status: str
    created_at: datetime
    finished_at: datetime | None


class TurnLineage(msgspec.Struct, kw_only=True):
    """``GET /admin/turns/{turn_id}/lineage``: a served turn back to its training data."""

    turn: LineageTurn
    version: LineageVersion | None
    round: LineageRound | None
    snapshot: SnapshotLineage | None
    """The snapshot file as the round read it (path, SHA-256, rows, watermark range)."""
    snapshot_now: SnapshotState | None
    """Whether the file is still what the round read (``changed``: rewritten since, e.g.
    by a deletion of dialogs; ``missing``: removed)."""
    judge: JudgeLineage | None
    gap: str | None
    """Why the chain stops before the judge; null when it reaches it."""


@dataclass
class _Chain:
    version: LineageVersion | None = None
    round: LineageRound | None = None
    snapshot: SnapshotLineage | None = None
    snapshot_now: SnapshotState | None = None
    judge: JudgeLineage | None = None
    gap: str | None = None


def _utc(moment: datetime | None) -> datetime | None:
    # Stored naive (UTC); answered with the zone, as the other admin routes do.
    return moment.replace(tzinfo=UTC) if moment is not None else None


def _turn(record: TurnRecord) -> LineageTurn:
    return LineageTurn(
        turn_id=record.turn_id,
        conversation_id=record.conversation_id,
        key_id=record.key_id,
        created_at=record.created_at.replace(tzinfo=UTC),
        alias=record.alias,
        adapter=record.adapter,
        engine=record.engine,
    )


def _version(record: AdapterRecord) -> LineageVersion:
    return LineageVersion(
        version=record.version,
        registered=True,
        status=record.status,
        parent=record.parent,
        judge=record.judge,
        created_at=_utc(record.created_at),
    )


def _round(run: RunRecord) -> LineageRound:
    return LineageRound(
        run_id=run.run_id,
        status=run.status,
        created_at=run.created_at.replace(tzinfo=UTC),
        finished_at=_utc(run.finished_at),
    )


def follow(learner: LearnerResources, turn: TurnRecord) -> _Chain:
    """The chain from ``turn`` as far as the records reach (blocking: a thread)."""
    chain = _Chain()
    version = turn.adapter
    if version is None:
        chain.gap = "the base model served this turn (no adapter): nothing was learnt"
        return chain
    try:
        record = learner.registry.get(version)
    except RegistryError:
        chain.version = LineageVersion(
            version=version, registered=False, status=None, parent=None, judge=None,
            created_at=None,
        )  # fmt: skip
        chain.gap = f"{version} is no longer registered"
        return chain
    chain.version = _version(record)
    hyperparameters = record.hyperparameters
    run_id = hyperparameters.get("run_id")
    if not isinstance(run_id, str):
        chain.gap = (
            f"{version} is its alias's identity adapter (the base model, untrained)"
            if hyperparameters.get("kind") == "identity"
            else f"{version} was registered by hand (POST /admin/adapters): no round trained it"
        )
        return chain
    try:
        run = learner.runs.get(run_id)
    except RegistryError:
        chain.gap = f"{version} names round {run_id}, which is not recorded"
        return chain
    if run.version != version:
        # The run row is the learner's own record: a version that names a round which
        # registered another version did not come from it.
        chain.gap = f"{version} names round {run_id}, which registered {run.version}, not it"
        return chain
    chain.round = _round(run)
    lineage = read_lineage(hyperparameters)
    if lineage is None or lineage.run_id != run_id:
        chain.gap = f"round {run_id} ran before rounds recorded their snapshot and judge"
        return chain
    chain.snapshot = lineage.snapshot
    chain.snapshot_now = snapshot_state(lineage.snapshot)
    chain.judge = lineage.judge
    if lineage.judge is None:
        chain.gap = f"round {run_id} ran without the defense: no judge scored its samples"
    return chain


@get(
    "/admin/turns/{turn_id:str}/lineage",
    summary="A served turn's lineage: version, round, snapshot hash, judge hash",
    responses=error_responses(*ADMIN_ERRORS, 404, meanings={404: "No turn with this id is logged"}),
)
async def turn_lineage(
    turn_id: Annotated[str, Parameter(pattern=TURN_ID)],
    principal: Principal,
    learner: LearnerResources,
    resources: Resources,
) -> TurnLineage:
    """The adapter version that wrote the turn's reply, the round that trained it, the
    SHA-256 of the snapshot it trained on and the hash of the defense judge's files; ``gap``
    says where and why the chain ends early. 404 for a turn that is not logged."""
    record = await asyncio.to_thread(learner.dialogs.get, turn_id)
    if record is None:
        # The log writes in batches: a turn answered a moment ago may still be queued.
        await resources.log.flush()
        record = await asyncio.to_thread(learner.dialogs.get, turn_id)
    if record is None:
        raise NotFoundError(
            f"no turn {turn_id!r} is logged", param="turn_id", code="turn_not_found"
        )
    chain = await asyncio.to_thread(follow, learner, record)
    return TurnLineage(
        turn=_turn(record),
        version=chain.version,
        round=chain.round,
        snapshot=chain.snapshot,
        snapshot_now=chain.snapshot_now,
        judge=chain.judge,
        gap=chain.gap,
    )


LINEAGE_ROUTES = [turn_lineage]
