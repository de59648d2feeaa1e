"""``/admin/adapters``: list, show, promote and roll back adapter versions; ``/admin/learner/runs``.

Added to the gateway as an extension (``create_app(settings, extensions=[AdapterAdmin()])``)
so that it shares the gateway's database connection, alias cache and engine client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import httpx
from litestar import Litestar, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import Parameter

from gateway.auth import Principal
from gateway.db import Database
from gateway.errors import (
    GatewayError,
    NotFoundError,
    UpstreamError,
    UpstreamUnavailableError,
)
from gateway.routes import BEARER, provide_admin, provide_resources
from learner.hotswap import HotSwap, SwapRefused, SwapResult
from learner.registry import AdapterRecord, AdapterRegistry, RegistryError, UnknownVersion
from learner.runs import RunRecord, RunStore, UnknownRun
from learner.vllm_client import EngineUnavailable, VLLMClient, VLLMError

logger = logging.getLogger(__name__)

VERSION = r"^[A-Za-z0-9._:-]+-v\d{4,}$"


@dataclass(frozen=True)
class LearnerResources:
    """What the adapter routes use, opened by ``AdapterAdmin.lifespan``."""

    registry: AdapterRegistry
    hotswap: HotSwap
    runs: RunStore
    default_alias: str


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


@get("/admin/learner/runs/{run_id:str}", summary="Show one learner run")
async def show_run(run_id: str, principal: Principal, learner: LearnerResources) -> RunRecord:
    """One learning round, readable while it runs."""
    try:
        return await asyncio.to_thread(learner.runs.get, run_id)
    except RegistryError as error:
        raise to_http_error(error) from None


class AdapterAdmin:
    """The gateway extension serving ``/admin/adapters``."""

    def routers(self) -> Sequence[Router]:
        return [
            Router(
                "/",
                route_handlers=[
                    list_adapters,
                    rollback_adapter,
                    show_adapter,
                    promote_adapter,
                    list_runs,
                    show_run,
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
            app.state.learner = LearnerResources(
                registry=registry,
                hotswap=HotSwap(registry, resources.aliases, engine),
                runs=runs,
                default_alias=settings.routing.default_alias,
            )
            yield

        return opened()
