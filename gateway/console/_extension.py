"""``Console``: the operator console as a gateway extension (routes and a lifespan).

Mounted by ``create_app`` when ``console.enabled``; its lifespan runs inside the
gateway's, after the gateway's resources exist, and owns the console's own: the session
store, the in-process admin API client, the templates and the metrics sampler task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar, Router

from gateway.console._admin_api import AdminApi
from gateway.console._live import LiveMetrics
from gateway.console._pages import Pages
from gateway.console._routes import CONSOLE_PATH, ConsoleState, build_routers
from gateway.console._sessions import Sessions
from gateway.routes import provide_resources
from gateway.settings import ConsoleConfig
from store import Database

if TYPE_CHECKING:
    from gateway.engine_pool import EnginePool


class Console:
    """The operator console at ``/console`` (``config``: policies/gateway.yaml ``console``)."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config

    def routers(self) -> Sequence[Router]:
        return build_routers()

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            resources = provide_resources(app.state)
            live = LiveMetrics(resources.metrics, self.config.history_points)
            live.sample()
            app.state.console = ConsoleState(
                config=self.config,
                resources=resources,
                sessions=Sessions(self.config),
                api=AdminApi(app),
                live=live,
                pages=Pages(CONSOLE_PATH),
            )
            sampling = asyncio.create_task(
                live.run(self.config.sample_period_s), name="console-metrics"
            )
            try:
                yield
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling

        return opened()
