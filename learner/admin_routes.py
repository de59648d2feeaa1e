"""``/admin/adapters``: list, show, register, promote and roll back adapter versions;
``/admin/aliases/{alias}/history``: the alias's flips (promotes, rollbacks), newest first;
``/admin/learner``: queue a learning round, the learner's status, its runs (progress, log
tail, stage times), their reports and their training samples; ``/admin/keys/flagged``: per
API key, the samples the rounds trained on and how many their judge flagged.

Added to every gateway as an extension (``create_app(settings, extensions=[AdapterAdmin(
config)])``) so that it shares the gateway's store, alias cache and engine client. Rounds
are queued in the store; the active learner (``tuneshield learner``, or the one inside
``tuneshield serve``) claims and runs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from engine import EngineUnavailable, HotSwap, SwapRefused, SwapResult, VLLMClient, VLLMError
from gateway import (
    ADAPTER_VERSION_NAME,
    ALIAS_NAME,
    BEARER,
    EnginePool,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    Principal,
    UpstreamError,
    UpstreamUnavailableError,
    provide_admin,
    provide_resources,
    strict_body,
)
from gateway.errors import PermissionDeniedError
from gateway.routes import error_responses, options_handler
from learner.contracts import RoundSettings, RoundStage
from learner.gates import GateResult
from learner.round_report import REPORT_FILE, read_gate_verdict, read_stage_times
from learner.round_samples import (
    SAMPLES_POLICY,
    FlaggedByKey,
    NoSamples,
    SampleCounts,
    SamplesConfig,
    SamplesPage,
    SamplesUnreadable,
    read_page,
    samples_file,
)
from learner.rounds import LearnerConfig, RoundBusy, queue_round, watermark
from learner.scheduler import next_fire_time
from store import (
    ADAPTERS_FOLDER,
    FINISHED,
    AdapterImportRefused,
    AdapterRecord,
    AdapterRegistry,
    AliasChangeKind,
    AuditEntry,
    AuditLog,
    CanaryStore,
    Database,
    DialogStore,
    IncompleteAdapter,
    QuarantineStore,
    RegistryError,
    RunRecord,
    RunStore,
    UnknownRun,
    UnknownVersion,
    leader,
)

logger = logging.getLogger(__name__)

Record = TypeVar("Record", AdapterRecord, AuditEntry, RunRecord)
# Statuses every route here may answer (OpenAI's error shape), and what some add.
ADMIN_ERRORS = (400, 401, 403, 429, 500)
SWAP_ERRORS = error_responses(
    *ADMIN_ERRORS,
    404,
    409,
    502,
    503,
    meanings={
        404: "No such adapter version",
        409: "The swap is refused (a rejected version without force, nothing to roll back "
        "to, a version of another alias); the alias is unchanged",
        502: "The engine refused the adapter; the alias is unchanged",
        503: "The engine is unavailable; the alias is unchanged",
    },
)
# How the file system says that a path names no folder (missing, a file on the way, a
# name too long to exist): 404, nothing there to import.
NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


@dataclass(frozen=True)
class LearnerResources:
    """What the adapter routes use, opened by ``AdapterAdmin.lifespan``."""

    registry: AdapterRegistry
    hotswap: HotSwap
    runs: RunStore
    dialogs: DialogStore
    default_alias: str
    adapters_dir: Path
    """Where registered folders live (copies made by ``POST /admin/adapters`` too)."""
    import_root: Path
    """The only folder ``POST /admin/adapters`` copies from (policies/learner.yaml)."""
    config: LearnerConfig
    """policies/learner.yaml as this gateway read it at start."""
    round_settings: RoundSettings
    """What rounds queued here run with: the policies as read at this gateway's start."""
    active_learner: Callable[[], str | None]
    """Who holds the leader lock (None: no learner is running)."""
    audit: AuditLog
    samples: SamplesConfig
    """What the samples routes read (the rounds summed per key; the route that pages is
    built with the same config)."""
    sample_counts: SampleCounts
    """Per-key (and per end user) counts of the rounds' samples files, each file read once."""
    quarantine: QuarantineStore
    """Quarantined keys and end users (learner/quarantine_routes.py)."""
    canaries: CanaryStore
    """Canary rollouts (learner/canary_routes.py)."""


@dataclass(frozen=True)
class RunDetail(RunRecord):
    """A run row, with the tail of its worker log, its stage times and whether its
    report and samples exist."""

    log_tail: list[str] = field(default_factory=list)
    report: bool = False
    stages: list[RoundStage] = field(default_factory=list)
    """Its stages in the order they ran, with wall seconds (the report's table); empty
    until the round ends."""
    samples: bool = False
    """Whether its training samples are on disk (``GET .../samples`` serves them)."""
    gates: GateResult | None = None
    """The gates' verdict once the round has ended: per metric the candidate's value and
    Wilson interval, the active version's and version 0's, the bound and the reference
    that set it (null: running, failed before the gates, or gates skipped)."""


# A count that fits the registry's INTEGER columns. ``gt=-1`` is ``ge=0`` for integers,
# spelt so because Litestar leaves a constraint whose value is 0 out of the OpenAPI schema.
Count = Annotated[int, msgspec.Meta(gt=-1, le=2**31 - 1)]


class AdapterRegistration(msgspec.Struct, kw_only=True):
    """``POST /admin/adapters``: copy a finished adapter folder in as a new version."""

    alias: Annotated[str, msgspec.Meta(pattern=ALIAS_NAME)]
    """The alias it becomes the next version of (a new alias starts at ``-v0000``)."""
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
    """Absolute path of the folder on the gateway's machine, inside the import root
    (policies/learner.yaml ``import_root``); the registry keeps a copy."""
    parent: Annotated[str, msgspec.Meta(pattern=ADAPTER_VERSION_NAME)] | None = None
    samples: Count | None = None
    flagged: Count | None = None
    healed: Count | None = None
    judge: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    threshold: float | None = None
    hyperparameters: dict[str, Any] = msgspec.field(default_factory=dict)


class AliasHistoryEntry(msgspec.Struct, kw_only=True):
    """``GET /admin/aliases/{alias}/history``: one flip of the alias."""

    version: str
    """The version the alias served from this flip on."""
    previous: str | None
    kind: AliasChangeKind
    actor: str | None
    """Key id of the admin who flipped it; null for the learner's swaps and seeds."""
    changed_at: datetime
    active: bool
    """Whether this flip made the version the alias serves now (the newest entry)."""


class LearnerStatus(msgspec.Struct, kw_only=True):
    """``GET /admin/learner/status``: who learns, what runs, when the next round comes."""

    enabled: bool
    """Whether a learner holds the leader lock (rounds queued here are run)."""
    active_learner: str | None
    alias: str
    """The alias the learner trains (policies/learner.yaml)."""
    active_version: str | None
    running: str | None
    """The run id of the round running now."""
    queued: list[str]
    watermark: datetime | None
    """Dialogs logged after this went into no round yet."""
    new_conversations: int
    min_new_dialogs: int
    """How many new conversations a scheduled round needs."""
    schedule: str
    scheduled: bool
    next_run: str | None
    """When the schedule fires next (ISO 8601, UTC); null when not scheduled."""
    recent_runs: list[RunRecord]


def provide_learner(state: State) -> LearnerResources:
    """The learner's resources (set by the extension's lifespan)."""
    return cast(LearnerResources, state.learner)


def _aware(record: Record) -> Record:
    # Stored naive (UTC); answered with the zone so clients need not guess (and as the
    # schema's date-time says: RFC 3339 needs one).
    changes: dict[str, Any] = {
        field.name: value.replace(tzinfo=UTC)
        for field in dataclasses.fields(record)
        if isinstance(value := getattr(record, field.name), datetime)
    }
    return dataclasses.replace(record, **changes)


def to_http_error(error: Exception) -> GatewayError:
    """A registry, swap, engine or folder-import error as the gateway's error answer.

    Only a request that does not fit the schema is a 400 (Litestar's validation, or
    ``strict_body``): one that fits names something missing (404), something the gateway
    may not import (403) or something in a state that refuses the action (409).
    """
    if isinstance(error, AdapterImportRefused):
        return PermissionDeniedError(
            f"path: {error.args[0]}", param="path", code="adapter_import_refused"
        )
    if isinstance(error, IncompleteAdapter):
        return GatewayError(
            f"path: {error.args[0]}",
            type="invalid_request_error",
            param="path",
            status_code=409,
            code="adapter_incomplete",
        )
    if isinstance(error, OSError):
        # Raised by the folder import only: the path is the request's one file-system name.
        reason = error.strerror or str(error)
        if error.errno in NOT_THERE:
            return NotFoundError(
                f"path: no folder to import there ({reason})",
                param="path",
                code="adapter_folder_not_found",
            )
        if error.errno in (errno.EACCES, errno.EPERM):
            return PermissionDeniedError(
                f"path: the gateway may not read it ({reason})",
                param="path",
                code="adapter_import_refused",
            )
        return GatewayError(
            f"path: could not copy the folder ({reason})",
            type="invalid_request_error",
            param="path",
            status_code=409,
            code="adapter_import_failed",
        )
    if isinstance(error, UnknownVersion):
        return NotFoundError(error.args[0], param="version", code="adapter_not_found")
    if isinstance(error, UnknownRun):
        return NotFoundError(error.args[0], param="run_id", code="run_not_found")
    if isinstance(error, NoSamples):
        return GatewayError(
            error.args[0], type="invalid_request_error", status_code=409, code="samples_not_ready"
        )
    if isinstance(error, SamplesUnreadable):
        return GatewayError(error.args[0], code="samples_unreadable")
    if isinstance(error, RoundBusy):
        return GatewayError(
            error.args[0], type="invalid_request_error", status_code=409, code="round_running"
        )
    if isinstance(error, SwapRefused):
        return GatewayError(
            error.args[0], type="invalid_request_error", status_code=409, code="swap_refused"
        )
    if isinstance(error, RegistryError):
        return GatewayError(error.args[0], type="invalid_request_error", status_code=409)
    if isinstance(error, EngineUnavailable):
        return UpstreamUnavailableError(
            f"the engine is unavailable; the alias is unchanged: {error.message}",
            code="engine_unavailable",
        )
    if isinstance(error, VLLMError):
        return UpstreamError(
            f"the engine refused the adapter; the alias is unchanged: {error.message}",
            code="adapter_refused",
        )
    raise error


async def _swap(operation: Any) -> SwapResult:
    try:
        return cast(SwapResult, await operation)
    except (RegistryError, VLLMError) as error:
        raise to_http_error(error) from None


adapters_options = options_handler("/admin/adapters", "GET", "POST")


@get("/admin/adapters", summary="List adapter versions", responses=error_responses(*ADMIN_ERRORS))
async def list_adapters(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", pattern=ALIAS_NAME)] = None,
) -> list[AdapterRecord]:
    """Every registered version with status, lineage and gate metrics, oldest first."""
    records = await asyncio.to_thread(learner.registry.list, alias)
    return [_aware(record) for record in records]


@get(
    "/admin/adapters/{version:str}",
    summary="Show one adapter version",
    responses=error_responses(*ADMIN_ERRORS, 404, meanings={404: "No such adapter version"}),
)
async def show_adapter(
    version: Annotated[str, Parameter(pattern=ADAPTER_VERSION_NAME)],
    principal: Principal,
    learner: LearnerResources,
) -> AdapterRecord:
    """One version's full record."""
    try:
        record = await asyncio.to_thread(learner.registry.get, version)
    except RegistryError as error:
        raise to_http_error(error) from None
    return _aware(record)


@post(
    "/admin/adapters",
    status_code=201,
    summary="Register an adapter folder",
    responses=error_responses(
        *ADMIN_ERRORS,
        404,
        409,
        413,
        meanings={
            403: "The key lacks the admin role, or the folder may not be imported (outside "
            "the import root, a link or special file in it)",
            404: "No folder at that path",
            409: "The folder is no complete adapter, or could not be copied",
        },
    ),
)
async def register_adapter(
    data: AdapterRegistration,
    request: Request[Any, Any, Any],
    principal: Principal,
    learner: LearnerResources,
) -> AdapterRecord:
    """Copy a folder (``adapter_config.json`` + ``adapter_model.safetensors``) from the
    import root into the registry as the alias's next version, a ``candidate``; promote
    it to serve it. Regular files and folders only: a link or special file refuses it
    (403, as does a folder outside the import root); no folder there is a 404, one that
    lacks an adapter file a 409."""
    data = strict_body(AdapterRegistration, await request.json())
    metadata = msgspec.structs.asdict(data)
    del metadata["alias"], metadata["path"]
    try:
        record = await asyncio.to_thread(
            learner.registry.install_copy,
            Path(data.path),
            learner.adapters_dir,
            data.alias,
            import_root=learner.import_root,
            **metadata,
        )
    except (RegistryError, OSError) as error:
        raise to_http_error(error) from None
    return _aware(record)


@post(
    "/admin/adapters/{version:str}/promote",
    status_code=200,
    summary="Serve a version",
    responses=SWAP_ERRORS,
)
async def promote_adapter(
    version: Annotated[str, Parameter(pattern=ADAPTER_VERSION_NAME)],
    principal: Principal,
    learner: LearnerResources,
    force: Annotated[bool, Parameter(query="force")] = False,
) -> SwapResult:
    """Load, probe and serve ``version``; a rejected one needs ``?force=true`` (recorded)."""
    result = await _swap(learner.hotswap.promote(version, force=force, actor=principal.key_id))
    await _audit(learner, principal, "promote", result, force=force)
    return result


@post(
    "/admin/adapters/rollback",
    status_code=200,
    summary="Roll an alias back",
    responses=SWAP_ERRORS,
)
async def rollback_adapter(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", pattern=ALIAS_NAME)] = None,
    version: Annotated[str | None, Parameter(query="version", pattern=ADAPTER_VERSION_NAME)] = None,
) -> SwapResult:
    """Serve the version the alias served before its latest promote again (or
    ``version``, an earlier step of its promotions) in one step; 409 when there is none."""
    if alias is None and version is not None:
        try:
            record = await asyncio.to_thread(learner.registry.get, version)
        except RegistryError as error:
            raise to_http_error(error) from None
        alias = record.alias
    rollback = learner.hotswap.rollback(
        alias or learner.default_alias, version, actor=principal.key_id
    )
    result = await _swap(rollback)
    await _audit(learner, principal, "rollback", result)
    return result


@get(
    "/admin/aliases/{alias:str}/history",
    summary="An alias's promotes and rollbacks",
    responses=error_responses(*ADMIN_ERRORS, 404, meanings={404: "No such alias"}),
)
async def alias_history(
    alias: Annotated[str, Parameter(pattern=ALIAS_NAME)],
    principal: Principal,
    learner: LearnerResources,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100,
) -> list[AliasHistoryEntry]:
    """Every flip of the alias, newest first: the version, when, how, and by whom."""
    aliases = learner.hotswap.aliases
    await asyncio.to_thread(aliases.refresh)
    serving = aliases.get(alias)
    if serving is None:
        raise NotFoundError(f"no alias {alias!r}", param="alias", code="alias_not_found")
    changes = await asyncio.to_thread(aliases.history, alias, limit=limit)
    return [
        AliasHistoryEntry(
            version=change.adapter,
            previous=change.previous_adapter,
            kind=change.kind,
            actor=change.actor,
            changed_at=change.changed_at.replace(tzinfo=UTC),
            active=index == 0 and change.adapter == serving,
        )
        for index, change in enumerate(changes)
    ]


async def _audit(
    learner: LearnerResources, principal: Principal, action: str, swap: SwapResult, **detail: Any
) -> None:
    await asyncio.to_thread(
        learner.audit.record,
        principal.key_id,
        action,
        swap.version,
        alias=swap.alias,
        previous=swap.previous,
        **detail,
    )


# An audit filter's text: printable (PostgreSQL refuses a NUL byte in any text).
AUDIT_TEXT = r"^[^\x00-\x1f\x7f]+$"
AuditAction = Annotated[
    str | None,
    Parameter(
        query="action",
        min_length=1,
        max_length=64,
        pattern=AUDIT_TEXT,
        description="Only this action (promote, rollback, key.create, key.revoke, ...).",
    ),
]
AuditActor = Annotated[
    str | None,
    Parameter(
        query="actor",
        min_length=1,
        max_length=256,
        pattern=AUDIT_TEXT,
        description="Only by this actor: an admin's key id, cli, serve or learner.",
    ),
]
AuditTarget = Annotated[
    str | None,
    Parameter(
        query="target",
        min_length=1,
        max_length=256,
        pattern=AUDIT_TEXT,
        description="Only on this target: an adapter version, a key id, ...",
    ),
]
# Read as text and parsed here: Litestar would take a number as a Unix time.
AuditSince = Annotated[
    str | None,
    Parameter(
        query="since",
        description="Only entries recorded at or after this time (RFC 3339, with its zone: "
        "2026-01-01T10:00:00Z).",
        schema_extra={"format": "date-time"},
    ),
]
# RFC 3339's date-time, which OpenAPI's ``date-time`` format means: the zone is required.
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def stored_time(text: str, param: str) -> datetime:
    """An RFC 3339 date-time as the store keeps times (naive UTC); a 400 naming ``param``
    for anything else. An offset that moves it past the calendar's ends clamps it there."""
    try:
        if not RFC3339.match(text):
            raise ValueError(text)
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        raise InvalidRequestError(
            f"{param}: {text!r} is no RFC 3339 date-time (such as 2026-01-01T10:00:00Z)",
            param=param,
            code="invalid_date_time",
        ) from None
    try:
        return moment.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        return datetime.min if moment.year == datetime.min.year else datetime.max


@get("/admin/audit", summary="The audit log", responses=error_responses(*ADMIN_ERRORS))
async def list_audit(
    principal: Principal,
    learner: LearnerResources,
    action: AuditAction = None,
    actor: AuditActor = None,
    target: AuditTarget = None,
    since: AuditSince = None,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100,
) -> list[AuditEntry]:
    """Who changed what, when and why (promotes, rollbacks, rounds' hot-swaps, key changes
    and the rest), newest first; each filter given narrows it."""
    entries = await asyncio.to_thread(
        learner.audit.list,
        limit=limit,
        action=action,
        actor=actor,
        target=target,
        since=None if since is None else stored_time(since, "since"),
    )
    return [_aware(entry) for entry in entries]


@get("/admin/learner/runs", summary="List learner runs", responses=error_responses(*ADMIN_ERRORS))
async def list_runs(
    principal: Principal,
    learner: LearnerResources,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 50,
) -> list[RunRecord]:
    """The latest learning rounds, newest first, with stage, progress and error."""
    runs = await asyncio.to_thread(learner.runs.list, limit)
    return [_aware(run) for run in runs]


async def _run(learner: LearnerResources, run_id: str) -> RunRecord:
    try:
        return _aware(await asyncio.to_thread(learner.runs.get, run_id))
    except RegistryError as error:
        raise to_http_error(error) from None


def _round_dir(run: RunRecord) -> Path | None:
    return Path(run.log_path).parent if run.log_path else None


@get(
    "/admin/learner/runs/{run_id:str}",
    summary="Show one learner run",
    responses=error_responses(*ADMIN_ERRORS, 404, meanings={404: "No such run"}),
)
async def show_run(run_id: str, principal: Principal, learner: LearnerResources) -> RunDetail:
    """One learning round, readable while it runs: stage, progress, error, log tail; once
    it has ended, the wall time (and the worker's peak memory) of each stage and the gates'
    verdict."""
    from learner.rounds import log_tail

    run = await _run(learner, run_id)
    folder = _round_dir(run)
    tail: list[str] = []
    stages: list[RoundStage] = []
    if run.log_path:
        lines = learner.config.worker.log_tail_lines
        tail = await asyncio.to_thread(log_tail, Path(run.log_path), lines)
    gates: GateResult | None = None
    if folder is not None:
        stages = await asyncio.to_thread(read_stage_times, folder)
        gates = await asyncio.to_thread(read_gate_verdict, folder)
    report = folder is not None and (folder / REPORT_FILE).is_file()
    samples = samples_file(run)
    return RunDetail(
        **dataclasses.asdict(run),
        log_tail=tail,
        report=report,
        stages=stages,
        samples=samples is not None and samples.is_file(),
        gates=gates,
    )


# The most a page of samples may hold is the policy's (``SamplesConfig.page_max``): the
# route is built with it, so that its schema says so too. This is how the handler's
# ``limit`` reads to type checkers; Litestar reads the route's own (its namespace).
SamplesLimit = Annotated[int, Parameter(query="limit", ge=1)]
SAMPLES_ERRORS = error_responses(
    *ADMIN_ERRORS,
    404,
    409,
    meanings={
        404: "No such run",
        409: "The round has no samples (yet): they are written when its training ends",
        500: "The round's samples file does not decode",
    },
)


def samples_route(config: SamplesConfig) -> HTTPRouteHandler:
    """``GET /admin/learner/runs/{run_id}/samples`` with ``limit`` at most
    ``config.page_max`` (in its OpenAPI schema, and a 400 naming the setting past it)."""
    # The bound is checked in the handler (not as Litestar's ``le``): its 400 names the
    # setting to change.
    limit_param = Annotated[
        int,
        Parameter(
            query="limit",
            ge=1,
            schema_extra={"maximum": config.page_max},
            description=f"Samples on the page: 1 to {config.page_max} (the default; "
            f"page_max in {SAMPLES_POLICY}).",
        ),
    ]

    @get(
        "/admin/learner/runs/{run_id:str}/samples",
        summary="A learner run's training samples",
        responses=SAMPLES_ERRORS,
        signature_namespace={"SamplesLimit": limit_param},
    )
    async def run_samples(
        run_id: str,
        principal: Principal,
        learner: LearnerResources,
        flagged: Annotated[bool | None, Parameter(query="flagged")] = None,
        limit: SamplesLimit = config.page_max,
        offset: Annotated[int, Parameter(query="offset", gt=-1, le=2**31 - 1)] = 0,
    ) -> SamplesPage:
        """The samples a round trained on, in the order it read them: each with the
        defense judge's score and verdict, the reply as sent and as healed, and the API
        key it came from; ``flagged=true`` only the flagged ones (``false`` the others).
        409 until the round's training has ended (or when it never trained)."""
        if limit > config.page_max:
            raise InvalidRequestError(
                f"limit: {limit} is more than a page holds ({config.page_max}: page_max in "
                f"{SAMPLES_POLICY}); page with offset",
                param="limit",
                code="limit_too_large",
            )
        run = await _run(learner, run_id)
        path = samples_file(run)
        try:
            if path is None:  # not started: no folder yet
                raise NoSamples(run_id)
            return await asyncio.to_thread(
                read_page, run_id, path, flagged=flagged, offset=offset, limit=limit
            )
        except NoSamples:
            raise to_http_error(NoSamples(_no_samples(run))) from None
        except SamplesUnreadable as error:
            logger.error("run %s: %s", run_id, error)
            raise to_http_error(error) from None

    return run_samples


def _no_samples(run: RunRecord) -> str:
    if run.status not in FINISHED:
        return (
            f"run {run.run_id} has no samples yet ({run.status}, stage {run.stage}): they "
            "are written when its training ends"
        )
    return f"run {run.run_id} has no samples: it ended ({run.status}) before its training did"


@get(
    "/admin/keys/flagged",
    summary="Samples and flagged samples per API key",
    responses=error_responses(*ADMIN_ERRORS),
)
async def flagged_by_key(principal: Principal, learner: LearnerResources) -> FlaggedByKey:
    """Per API key: the samples the newest rounds on disk trained on (policies/learner.yaml
    ``samples.key_rounds`` of them), how many their defense judge flagged, the rate, and the
    same per round; most flagged first."""
    runs = await asyncio.to_thread(learner.runs.list, learner.samples.key_rounds)
    return await asyncio.to_thread(learner.sample_counts.by_key, runs)


@get(
    "/admin/learner/runs/{run_id:str}/report",
    summary="A learner run's HTML report",
    media_type=MediaType.HTML,
    responses=error_responses(
        *ADMIN_ERRORS, 404, meanings={404: "No such run, or it has no report (yet)"}
    ),
)
async def run_report(run_id: str, principal: Principal, learner: LearnerResources) -> Response[str]:
    """The round's report page (plots inline); 404 until the round has ended."""
    folder = _round_dir(await _run(learner, run_id))
    path = folder / REPORT_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise NotFoundError(f"run {run_id} has no report (yet)", code="report_not_found")
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    return Response(text, media_type=MediaType.HTML)


@post(
    "/admin/learner/run",
    status_code=202,
    summary="Queue a learning round now",
    responses=error_responses(
        *ADMIN_ERRORS, 409, meanings={409: "A round is already queued or running"}
    ),
)
async def start_round(principal: Principal, learner: LearnerResources) -> RunRecord:
    """Queue a round on the dialogs logged since the last one, with this gateway's learner
    policy; the active learner runs it. 409 while one is queued or running."""
    config = learner.config
    try:
        run = await asyncio.to_thread(
            queue_round, learner.runs, config.alias, learner.round_settings
        )
    except RegistryError as error:
        raise to_http_error(error) from None
    return _aware(run)


@get(
    "/admin/learner/status",
    summary="The learner's state",
    responses=error_responses(*ADMIN_ERRORS),
)
async def learner_status(principal: Principal, learner: LearnerResources) -> LearnerStatus:
    """The active learner, the running round, the schedule, the watermark, recent runs."""
    config = learner.config
    recent = await asyncio.to_thread(learner.runs.list, 5)
    unfinished = await asyncio.to_thread(learner.runs.unfinished)
    since = await asyncio.to_thread(watermark, learner.registry, config.alias)
    active = await asyncio.to_thread(learner.registry.active, config.alias)
    schedule = config.schedule
    active_learner = await asyncio.to_thread(learner.active_learner)
    return LearnerStatus(
        enabled=active_learner is not None,
        active_learner=active_learner,
        alias=config.alias,
        active_version=active.version if active else None,
        running=next((run.run_id for run in unfinished if run.status == "running"), None),
        queued=[run.run_id for run in unfinished if run.status == "queued"],
        watermark=since.replace(tzinfo=UTC) if since else None,
        new_conversations=await asyncio.to_thread(learner.dialogs.count_new_conversations, since),
        min_new_dialogs=schedule.min_new_dialogs,
        schedule=schedule.cron or f"every {schedule.interval_minutes:g} min",
        scheduled=schedule.enabled,
        next_run=next_fire_time(schedule) if schedule.enabled else None,
        recent_runs=[_aware(run) for run in recent],
    )


def quarantine_routes() -> Sequence[HTTPRouteHandler]:
    """``/admin/quarantine`` and ``/admin/users/flagged`` (imported here: their module
    builds on this one)."""
    from learner.quarantine_routes import QUARANTINE_ROUTES

    return QUARANTINE_ROUTES


def canary_routes() -> Sequence[HTTPRouteHandler]:
    """``/admin/adapters/{version}/canary`` and ``/admin/canary`` (imported here: their
    module builds on this one)."""
    from learner.canary_routes import CANARY_ROUTES

    return CANARY_ROUTES


def lineage_routes() -> Sequence[HTTPRouteHandler]:
    """``/admin/turns/{turn_id}/lineage`` (imported here: its module builds on this one)."""
    from learner.lineage_routes import LINEAGE_ROUTES

    return LINEAGE_ROUTES


def engine_clients(engines: EnginePool) -> list[VLLMClient]:
    """vLLM's adapter API on each engine of the gateway's pool, through the gateway's own
    clients (they carry the engines' key and timeouts)."""
    return [VLLMClient(str(client.base_url), client=client) for client in engines.clients]


class AdapterAdmin:
    """The gateway extension serving ``/admin/adapters``, ``/admin/learner`` and
    ``/admin/keys/flagged``.

    ``config`` is the learner policy, read once where the gateway is built (the policy's,
    when not given); ``active_learner`` says who holds the leader lock (default: asked of
    the store); ``samples`` what the samples routes read (default: ``SamplesConfig()``).
    """

    def __init__(
        self,
        config: LearnerConfig | None = None,
        *,
        adapters_dir: Path | None = None,
        active_learner: Callable[[Database], str | None] = leader,
        samples: SamplesConfig | None = None,
    ) -> None:
        self.config = config or LearnerConfig.from_policy()
        self.samples = samples or self.config.samples
        # Read once, where the gateway is built (a bad policy stops it there, not a request).
        self.round_settings = RoundSettings.from_policies(plan=self.config.round)
        self.adapters_dir = adapters_dir
        self.active_learner = active_learner

    def routers(self) -> Sequence[Router]:
        return [
            Router(
                "/",
                route_handlers=[
                    adapters_options,
                    list_adapters,
                    register_adapter,
                    rollback_adapter,
                    show_adapter,
                    promote_adapter,
                    alias_history,
                    list_runs,
                    show_run,
                    run_report,
                    samples_route(self.samples),
                    flagged_by_key,
                    start_round,
                    learner_status,
                    list_audit,
                    *quarantine_routes(),
                    *canary_routes(),
                    *lineage_routes(),
                ],
                dependencies={
                    "principal": Provide(provide_admin),
                    "learner": Provide(provide_learner, sync_to_thread=False),
                },
                security=BEARER,
            )
        ]

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            resources = provide_resources(app.state)
            settings = resources.settings
            registry = AdapterRegistry(database)
            app.state.learner = LearnerResources(
                registry=registry,
                hotswap=HotSwap(registry, resources.aliases, engine_clients(engines)),
                runs=RunStore(database),
                dialogs=resources.dialogs,
                default_alias=settings.routing.default_alias,
                adapters_dir=self.adapters_dir or settings.data_dir / ADAPTERS_FOLDER,
                import_root=self.config.import_root_in(settings.data_dir),
                config=self.config,
                round_settings=self.round_settings,
                active_learner=lambda: self.active_learner(database),
                audit=AuditLog(database),
                samples=self.samples,
                sample_counts=SampleCounts(self.samples.key_rounds),
                quarantine=QuarantineStore(database),
                canaries=CanaryStore(database),
            )
            yield

        return opened()
