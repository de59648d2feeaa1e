"""``/admin/adapters``: list, show, register, promote and roll back adapter versions;
``/admin/learner``: start a learning round, its status, its runs (progress, log tail) and
their reports.

Added to the gateway as an extension (``create_app(settings, extensions=[AdapterAdmin()])``)
so that it shares the gateway's database connection, alias cache and engine client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
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
from gateway.auth import Principal
from gateway.errors import (
    GatewayError,
    NotFoundError,
    UnprocessableRequestError,
    UpstreamError,
    UpstreamUnavailableError,
)
from gateway.routes import ALIAS_NAME, BEARER, provide_admin, provide_resources, strict_body
from learner.round_report import REPORT_FILE
from learner.rounds import LearnerOptions, RoundBusy, RoundRunner
from learner.scheduler import build_scheduler, next_run_time
from store import (
    ADAPTERS_FOLDER,
    AdapterRecord,
    AdapterRegistry,
    Database,
    IncompleteAdapter,
    RegistryError,
    RunRecord,
    RunStore,
    UnknownRun,
    UnknownVersion,
)

logger = logging.getLogger(__name__)

VERSION = r"^[A-Za-z0-9._:-]+-v\d{4,}$"


@dataclass(frozen=True)
class LearnerResources:
    """What the adapter routes use, opened by ``AdapterAdmin.lifespan``."""

    registry: AdapterRegistry
    hotswap: HotSwap
    runs: RunStore
    default_alias: str
    adapters_dir: Path
    """Where registered folders live (copies made by ``POST /admin/adapters`` too)."""
    rounds: RoundRunner | None = None
    """None when the gateway runs without a learner (``tuneshield gateway``)."""
    scheduler: Any = None
    log_tail_lines: int = 40


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
    """Absolute path of the folder on the gateway's machine; the registry keeps a copy."""
    parent: Annotated[str, msgspec.Meta(pattern=VERSION)] | None = None
    samples: Annotated[int, msgspec.Meta(ge=0)] | None = None
    flagged: Annotated[int, msgspec.Meta(ge=0)] | None = None
    healed: Annotated[int, msgspec.Meta(ge=0)] | None = None
    judge: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    threshold: float | None = None
    hyperparameters: dict[str, Any] = msgspec.field(default_factory=dict)


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
    alias: Annotated[str | None, Parameter(query="alias", min_length=1)] = None,
) -> list[AdapterRecord]:
    """Every registered version with status, lineage and gate metrics, oldest first."""
    records = await asyncio.to_thread(learner.registry.list, alias)
    return [_aware(record) for record in records]


@get("/admin/adapters/{version:str}", summary="Show one adapter version")
async def show_adapter(
    version: Annotated[str, Parameter(pattern=VERSION)],
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
    """Copy a folder (``adapter_config.json`` + ``adapter_model.safetensors``) into the
    registry as the alias's next version, a ``candidate``; promote it to serve it."""
    data = strict_body(AdapterRegistration, await request.json())
    source = Path(data.path)
    if not source.is_dir():
        raise UnprocessableRequestError(
            f"path: {data.path} is not a folder on the gateway's machine", param="path"
        )
    metadata = msgspec.structs.asdict(data)
    del metadata["alias"], metadata["path"]
    try:
        record = await asyncio.to_thread(
            learner.registry.install_copy, source, learner.adapters_dir, data.alias, **metadata
        )
    except IncompleteAdapter as error:
        raise UnprocessableRequestError(f"path: {error.args[0]}", param="path") from None
    except RegistryError as error:
        raise to_http_error(error) from None
    except OSError as error:
        raise UnprocessableRequestError(
            f"path: could not copy {data.path}: {error.strerror or error}", param="path"
        ) from None
    return _aware(record)


@post("/admin/adapters/{version:str}/promote", status_code=200, summary="Serve a version")
async def promote_adapter(
    version: Annotated[str, Parameter(pattern=VERSION)],
    principal: Principal,
    learner: LearnerResources,
    force: Annotated[bool, Parameter(query="force")] = False,
) -> SwapResult:
    """Load, probe and serve ``version``; a rejected one needs ``?force=true`` (recorded)."""
    return await _swap(learner.hotswap.promote(version, force=force))


@post("/admin/adapters/rollback", status_code=200, summary="Roll an alias back")
async def rollback_adapter(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", min_length=1)] = None,
    version: Annotated[str | None, Parameter(query="version", pattern=VERSION)] = None,
) -> SwapResult:
    """Serve the previous version again (or ``version``) in one step."""
    if alias is None and version is not None:
        try:
            record = await asyncio.to_thread(learner.registry.get, version)
        except RegistryError as error:
            raise to_http_error(error) from None
        alias = record.alias
    return await _swap(learner.hotswap.rollback(alias or learner.default_alias, version))


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
        tail = await asyncio.to_thread(log_tail, Path(run.log_path), learner.log_tail_lines)
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


def _rounds(learner: LearnerResources) -> RoundRunner:
    if learner.rounds is None:
        raise GatewayError(
            "this gateway runs without a learner; start the stack with `tuneshield serve`",
            type="invalid_request_error",
            status_code=409,
            code="learner_disabled",
        )
    return learner.rounds


@post("/admin/learner/run", status_code=202, summary="Start a learning round now")
async def start_round(principal: Principal, learner: LearnerResources) -> RunRecord:
    """Queue a round on the dialogs logged since the last one; 409 if one is running."""
    try:
        return await _rounds(learner).start()
    except RegistryError as error:
        raise to_http_error(error) from None


@get("/admin/learner/status", summary="The learner's state")
async def learner_status(principal: Principal, learner: LearnerResources) -> dict[str, Any]:
    """Whether a round runs, the schedule, the watermark and the latest runs."""
    recent = await asyncio.to_thread(learner.runs.list, 5)
    status: dict[str, Any] = {"enabled": learner.rounds is not None, "recent_runs": recent}
    rounds = learner.rounds
    if rounds is not None:
        watermark = await asyncio.to_thread(rounds.watermark)
        status.update(
            alias=rounds.alias,
            running=rounds.current_run,
            watermark=watermark.replace(tzinfo=UTC).isoformat() if watermark else None,
            new_conversations=await asyncio.to_thread(rounds.new_conversations),
            min_new_dialogs=rounds.config.schedule.min_new_dialogs,
            schedule=rounds.config.schedule.cron
            or f"every {rounds.config.schedule.interval_minutes:g} min",
            scheduled=learner.scheduler is not None,
            next_run=next_run_time(learner.scheduler),
        )
        active = await asyncio.to_thread(learner.registry.active, rounds.alias)
        status["active_version"] = active.version if active else None
    return status


class AdapterAdmin:
    """The gateway extension serving ``/admin/adapters`` and ``/admin/learner``.

    With ``learner`` options it also runs learning rounds and their schedule.
    """

    def __init__(self, learner: LearnerOptions | None = None) -> None:
        self.learner = learner

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
                    list_runs,
                    show_run,
                    run_report,
                    start_round,
                    learner_status,
                ],
                dependencies={
                    "principal": Provide(provide_admin, sync_to_thread=False),
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
            runs = RunStore(database)
            # Runs belong to the process that started them: after a restart none goes on.
            stale = await asyncio.to_thread(
                runs.fail_unfinished, "the gateway stopped before the run finished"
            )
            if stale:
                logger.warning("marked unfinished learner runs failed: %s", stale)
            hotswap = HotSwap(registry, resources.aliases, engine)
            rounds, scheduler = None, None
            options = self.learner
            if options is not None:
                rounds = RoundRunner(
                    database,
                    registry,
                    runs,
                    hotswap,
                    base_model=options.base_model,
                    data_dir=settings.data_dir,
                    adapters_dir=options.adapters_dir,
                    config=options.config,
                    gates=options.gates,
                    worker_command=options.worker_command,
                )
                scheduler = build_scheduler(rounds.run_if_due, options.config.schedule)
            app.state.learner = LearnerResources(
                registry=registry,
                hotswap=hotswap,
                runs=runs,
                default_alias=settings.routing.default_alias,
                adapters_dir=options.adapters_dir
                if options
                else settings.data_dir / ADAPTERS_FOLDER,
                rounds=rounds,
                scheduler=scheduler,
                log_tail_lines=options.config.worker.log_tail_lines if options else 40,
            )
            if scheduler is not None:
                scheduler.start()
            try:
                yield
            finally:
                if scheduler is not None:
                    scheduler.shutdown(wait=False)
                if rounds is not None:
                    await rounds.close()

        return opened()
