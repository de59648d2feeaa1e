"""``/admin/adapters``: list, show, register, promote and roll back adapter versions;
``/admin/aliases/{alias}/history``: the alias's flips (promotes, rollbacks), newest first;
``/admin/learner``: queue a learning round, the learner's status, its runs (progress, log
tail) and their reports.

Added to every gateway as an extension (``create_app(settings, extensions=[AdapterAdmin(
config)])``) so that it shares the gateway's store, alias cache and engine client. Rounds
are queued in the store; the active learner (``tuneshield learner``, or the one inside
``tuneshield serve``) claims and runs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast

import httpx
import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import Parameter

from engine import EngineUnavailable, HotSwap, SwapRefused, SwapResult, VLLMClient, VLLMError
from gateway import (
    ADAPTER_VERSION_NAME,
    ALIAS_NAME,
    BEARER,
    GatewayError,
    NotFoundError,
    Principal,
    UnprocessableRequestError,
    UpstreamError,
    UpstreamUnavailableError,
    provide_admin,
    provide_resources,
    strict_body,
)
from learner.contracts import RoundSettings
from learner.round_report import REPORT_FILE
from learner.rounds import LearnerConfig, RoundBusy, queue_round, watermark
from learner.scheduler import next_fire_time
from store import (
    ADAPTERS_FOLDER,
    AdapterImportRefused,
    AdapterRecord,
    AdapterRegistry,
    AliasChangeKind,
    AuditEntry,
    AuditLog,
    Database,
    DialogStore,
    IncompleteAdapter,
    RegistryError,
    RunRecord,
    RunStore,
    UnknownRun,
    UnknownVersion,
    leader,
)

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RunDetail(RunRecord):
    """A run row, with the tail of its worker log and whether its report exists."""

    log_tail: list[str] = field(default_factory=list)
    report: bool = False


class AdapterRegistration(msgspec.Struct, kw_only=True):
    """``POST /admin/adapters``: copy a finished adapter folder in as a new version."""

    alias: Annotated[str, msgspec.Meta(pattern=ALIAS_NAME)]
    """The alias it becomes the next version of (a new alias starts at ``-v0000``)."""
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
    """Absolute path of the folder on the gateway's machine, inside the import root
    (policies/learner.yaml ``import_root``); the registry keeps a copy."""
    parent: Annotated[str, msgspec.Meta(pattern=ADAPTER_VERSION_NAME)] | None = None
    samples: Annotated[int, msgspec.Meta(ge=0)] | None = None
    flagged: Annotated[int, msgspec.Meta(ge=0)] | None = None
    healed: Annotated[int, msgspec.Meta(ge=0)] | None = None
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


def provide_learner(state: State) -> LearnerResources:
    """The learner's resources (set by the extension's lifespan)."""
    return cast(LearnerResources, state.learner)


def _aware(record: AdapterRecord) -> AdapterRecord:
    # Stored naive (UTC); answered with the zone so clients need not guess.
    changes: dict[str, Any] = {
        field.name: value.replace(tzinfo=UTC)
        for field in dataclasses.fields(record)
        if isinstance(value := getattr(record, field.name), datetime)
    }
    return dataclasses.replace(record, **changes)


def to_http_error(error: Exception) -> GatewayError:
    """A registry, swap or engine error as the gateway's error answer."""
    if isinstance(error, UnknownVersion):
        return NotFoundError(error.args[0], param="version", code="adapter_not_found")
    if isinstance(error, UnknownRun):
        return NotFoundError(error.args[0], param="run_id", code="run_not_found")
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


@get("/admin/adapters", summary="List adapter versions")
async def list_adapters(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", pattern=ALIAS_NAME)] = None,
) -> list[AdapterRecord]:
    """Every registered version with status, lineage and gate metrics, oldest first."""
    records = await asyncio.to_thread(learner.registry.list, alias)
    return [_aware(record) for record in records]


@get("/admin/adapters/{version:str}", summary="Show one adapter version")
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


@post("/admin/adapters", status_code=201, summary="Register an adapter folder")
async def register_adapter(
    data: AdapterRegistration,
    request: Request[Any, Any, Any],
    principal: Principal,
    learner: LearnerResources,
) -> AdapterRecord:
    """Copy a folder (``adapter_config.json`` + ``adapter_model.safetensors``) from the
    import root into the registry as the alias's next version, a ``candidate``; promote
    it to serve it. Regular files and folders only: a link or special file refuses it."""
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
    except (IncompleteAdapter, AdapterImportRefused) as error:
        raise UnprocessableRequestError(f"path: {error.args[0]}", param="path") from None
    except RegistryError as error:
        raise to_http_error(error) from None
    except (FileNotFoundError, NotADirectoryError):
        raise UnprocessableRequestError(
            f"path: {data.path} is not a folder on the gateway's machine", param="path"
        ) from None
    except OSError as error:
        # Any other file-system refusal (a name too long, no permission) is the path's.
        raise UnprocessableRequestError(
            f"path: could not copy {data.path}: {error.strerror or error}", param="path"
        ) from None
    return _aware(record)


@post("/admin/adapters/{version:str}/promote", status_code=200, summary="Serve a version")
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


@post("/admin/adapters/rollback", status_code=200, summary="Roll an alias back")
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


@get("/admin/aliases/{alias:str}/history", summary="An alias's promotes and rollbacks")
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


@get("/admin/audit", summary="The audit log")
async def list_audit(
    principal: Principal,
    learner: LearnerResources,
    action: Annotated[str | None, Parameter(query="action", min_length=1, max_length=64)] = None,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100,
) -> list[AuditEntry]:
    """Who promoted or rolled back what, and when (newest first; one action if given)."""
    return await asyncio.to_thread(learner.audit.list, limit=limit, action=action)


@get("/admin/learner/runs", summary="List learner runs")
async def list_runs(
    principal: Principal,
    learner: LearnerResources,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 50,
) -> list[RunRecord]:
    """The latest learning rounds, newest first, with stage, progress and error."""
    return await asyncio.to_thread(learner.runs.list, limit)


async def _run(learner: LearnerResources, run_id: str) -> RunRecord:
    try:
        return await asyncio.to_thread(learner.runs.get, run_id)
    except RegistryError as error:
        raise to_http_error(error) from None


def _round_dir(run: RunRecord) -> Path | None:
    return Path(run.log_path).parent if run.log_path else None


@get("/admin/learner/runs/{run_id:str}", summary="Show one learner run")
async def show_run(run_id: str, principal: Principal, learner: LearnerResources) -> RunDetail:
    """One learning round, readable while it runs: stage, progress, error, log tail."""
    from learner.rounds import log_tail

    run = await _run(learner, run_id)
    folder = _round_dir(run)
    tail: list[str] = []
    if run.log_path:
        lines = learner.config.worker.log_tail_lines
        tail = await asyncio.to_thread(log_tail, Path(run.log_path), lines)
    report = folder is not None and (folder / REPORT_FILE).is_file()
    return RunDetail(**dataclasses.asdict(run), log_tail=tail, report=report)


@get(
    "/admin/learner/runs/{run_id:str}/report",
    summary="A learner run's HTML report",
    media_type=MediaType.HTML,
)
async def run_report(run_id: str, principal: Principal, learner: LearnerResources) -> Response[str]:
    """The round's report page (plots inline); 404 until the round has ended."""
    folder = _round_dir(await _run(learner, run_id))
    path = folder / REPORT_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise NotFoundError(f"run {run_id} has no report (yet)", code="report_not_found")
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    return Response(text, media_type=MediaType.HTML)


@post("/admin/learner/run", status_code=202, summary="Queue a learning round now")
async def start_round(principal: Principal, learner: LearnerResources) -> RunRecord:
    """Queue a round on the dialogs logged since the last one, with this gateway's learner
    policy; the active learner runs it. 409 while one is queued or running."""
    config = learner.config
    try:
        return await asyncio.to_thread(
            queue_round, learner.runs, config.alias, learner.round_settings
        )
    except RegistryError as error:
        raise to_http_error(error) from None


@get("/admin/learner/status", summary="The learner's state")
async def learner_status(principal: Principal, learner: LearnerResources) -> dict[str, Any]:
    """The active learner, the running round, the schedule, the watermark, recent runs."""
    config = learner.config
    recent = await asyncio.to_thread(learner.runs.list, 5)
    unfinished = await asyncio.to_thread(learner.runs.unfinished)
    since = await asyncio.to_thread(watermark, learner.registry, config.alias)
    active = await asyncio.to_thread(learner.registry.active, config.alias)
    schedule = config.schedule
    active_learner = await asyncio.to_thread(learner.active_learner)
    return {
        "enabled": active_learner is not None,
        "active_learner": active_learner,
        "alias": config.alias,
        "active_version": active.version if active else None,
        "running": next((run.run_id for run in unfinished if run.status == "running"), None),
        "queued": [run.run_id for run in unfinished if run.status == "queued"],
        "watermark": since.replace(tzinfo=UTC).isoformat() if since else None,
        "new_conversations": await asyncio.to_thread(
            learner.dialogs.count_new_conversations, since
        ),
        "min_new_dialogs": schedule.min_new_dialogs,
        "schedule": schedule.cron or f"every {schedule.interval_minutes:g} min",
        "scheduled": schedule.enabled,
        "next_run": next_fire_time(schedule) if schedule.enabled else None,
        "recent_runs": recent,
    }


class AdapterAdmin:
    """The gateway extension serving ``/admin/adapters`` and ``/admin/learner``.

    ``config`` is the learner policy, read once where the gateway is built (the policy's,
    when not given); ``active_learner`` says who holds the leader lock (default: asked of
    the store).
    """

    def __init__(
        self,
        config: LearnerConfig | None = None,
        *,
        adapters_dir: Path | None = None,
        active_learner: Callable[[Database], str | None] = leader,
    ) -> None:
        self.config = config or LearnerConfig.from_policy()
        # Read once, where the gateway is built (a bad policy stops it there, not a request).
        self.round_settings = RoundSettings.from_policies(plan=self.config.round)
        self.adapters_dir = adapters_dir
        self.active_learner = active_learner

    def routers(self) -> Sequence[Router]:
        return [
            Router(
                "/",
                route_handlers=[
                    list_adapters,
                    register_adapter,
                    rollback_adapter,
                    show_adapter,
                    promote_adapter,
                    alias_history,
                    list_runs,
                    show_run,
                    run_report,
                    start_round,
                    learner_status,
                    list_audit,
                ],
                dependencies={
                    "principal": Provide(provide_admin),
                    "learner": Provide(provide_learner, sync_to_thread=False),
                },
                security=BEARER,
            )
        ]

    def lifespan(
        self, app: Litestar, database: Database, client: httpx.AsyncClient
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            resources = provide_resources(app.state)
            settings = resources.settings
            registry = AdapterRegistry(database)
            # The gateway's client already carries the engine's key and timeouts.
            engine = VLLMClient(settings.upstream_url, client=client)
            app.state.learner = LearnerResources(
                registry=registry,
                hotswap=HotSwap(registry, resources.aliases, engine),
                runs=RunStore(database),
                dialogs=resources.dialogs,
                default_alias=settings.routing.default_alias,
                adapters_dir=self.adapters_dir or settings.data_dir / ADAPTERS_FOLDER,
                import_root=self.config.import_root_in(settings.data_dir),
                config=self.config,
                round_settings=self.round_settings,
                active_learner=lambda: self.active_learner(database),
                audit=AuditLog(database),
            )
            yield

        return opened()
