"""The learner role's entry points: ``tuneshield learner`` (a process of its own, on the
shared store) and ``EmbeddedLearner`` (the same control loop inside ``tuneshield serve``,
on the one process's DuckDB connection).

Both build the same parts — registry, runs, a hot-swap per engine, the round runner — and
hand them to ``learner.control.Learner``, with the canary monitor (``learner.canary``)
beside its loop; only where the store connection and the alias cache come from differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from litestar import Litestar, Router
from prometheus_client import CollectorRegistry

from engine import HotSwap, VLLMClient, ensure_identity_adapter, identity_version
from gateway import EnginePool, provide_resources
from learner.admin_routes import engine_clients
from learner.canary import CanaryMonitor, run_with_monitor
from learner.control import Learner
from learner.metrics import LearnerMetrics, serve_metrics
from learner.rounds import LearnerOptions, RoundRunner
from store import (
    AdapterRegistry,
    AliasStore,
    Database,
    RunStore,
    StoreSettings,
    open_database,
)

logger = logging.getLogger(__name__)

# Loading an adapter on a busy CPU engine can take a while; the probe generates tokens.
ENGINE_TIMEOUT_S = 300.0
ENGINE_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LearnerSettings:
    """Everything ``tuneshield learner`` needs, read once at its start."""

    data_dir: Path
    store: StoreSettings
    engine_urls: tuple[str, ...]
    """Root URLs of the engines whose adapters this learner keeps in line."""
    engine_api_key: str | None
    seed_aliases: dict[str, str]
    """policies/gateway.yaml's seeded aliases: version 0 of each is built at start."""
    options: LearnerOptions


def seed_bootstrap(
    registry: AdapterRegistry,
    aliases: AliasStore,
    seed: dict[str, str],
    base_model: str | Path,
    adapters_dir: Path,
) -> Callable[[], list[str]]:
    """The learner's start-up step: seeded aliases exist and their version 0 is registered.

    Idempotent (every learner that becomes active runs it); returns the versions built now.
    """

    def bootstrap() -> list[str]:
        aliases.seed(seed)
        built = []
        for alias, adapter in seed.items():
            if adapter != identity_version(alias):
                continue
            record = ensure_identity_adapter(registry, alias, base_model, adapters_dir)
            if record.version not in built and record.hyperparameters.get("kind") == "identity":
                built.append(record.version)
        return built

    return bootstrap


def build_learner(
    database: Database,
    aliases: AliasStore,
    clients: Sequence[VLLMClient],
    options: LearnerOptions,
    data_dir: Path,
    *,
    bootstrap: Callable[[], object] | None = None,
    metrics: LearnerMetrics | None = None,
) -> Learner:
    """The control loop over ``database``, keeping ``clients``' engines in line, reporting
    to ``metrics``."""
    registry = AdapterRegistry(database)
    rounds = RoundRunner(
        database,
        registry,
        RunStore(database),
        HotSwap(registry, aliases, clients),
        base_model=options.base_model,
        data_dir=data_dir,
        adapters_dir=options.adapters_dir,
        config=options.config,
        gates=options.gates,
        worker_command=options.worker_command,
        metrics=metrics,
    )
    return Learner(database, rounds, bootstrap=bootstrap, metrics=metrics)


async def run_learner(settings: LearnerSettings, stop: asyncio.Event | None = None) -> None:
    """``tuneshield learner``: wait for leadership, then run rounds until SIGTERM/Ctrl-C.

    Its metrics are served on ``control.metrics_port`` while it runs (if set): a waiting
    learner too, so that a scrape tells it is alive.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    database = await asyncio.to_thread(open_database, settings.store.url, settings.store.config)
    try:
        aliases = AliasStore(database)
        registry = AdapterRegistry(database)
        options = settings.options
        control = options.config.control
        metrics = LearnerMetrics(CollectorRegistry(auto_describe=True))
        timeout = httpx.Timeout(ENGINE_TIMEOUT_S, connect=ENGINE_CONNECT_TIMEOUT_S)
        async with httpx.AsyncClient(timeout=timeout) as http:
            clients = [
                VLLMClient(url, api_key=settings.engine_api_key, client=http)
                for url in settings.engine_urls
            ]
            learner = build_learner(
                database,
                aliases,
                clients,
                options,
                settings.data_dir,
                bootstrap=seed_bootstrap(
                    registry,
                    aliases,
                    settings.seed_aliases,
                    options.base_model,
                    options.adapters_dir,
                ),
                metrics=metrics,
            )
            monitor = CanaryMonitor.from_policies(database, learner.hotswap, options.config.canary)
            with serve_metrics(metrics.registry, control.metrics_host, control.metrics_port):
                await run_with_monitor(learner, monitor, stop)
    finally:
        database.close()


def _report_end(task: asyncio.Task[None]) -> None:
    # Rounds stop with the loop: say so at once, not only when the server stops.
    if not task.cancelled() and task.exception() is not None:
        logger.error("the learner stopped: %s (no rounds run until a restart)", task.exception())


class EmbeddedLearner:
    """A gateway extension running the learner's control loop in the gateway's process
    (``tuneshield serve``: the process that owns the DuckDB file runs every role).

    Its lifespan starts the loop after the extensions before it (the engine) and stops it
    (a running round's worker is killed) before they stop. ``should_stop`` is the server's
    exit flag: a server stopped while the engine started does not start the loop at all
    (it would only report the engine it never saw).
    """

    def __init__(
        self, options: LearnerOptions, *, should_stop: Callable[[], bool] = lambda: False
    ) -> None:
        self.options = options
        self.should_stop = should_stop
        self.learner: Learner | None = None

    def active_name(self, database: Database) -> str | None:
        """The embedded learner's name while it is active (``AdapterAdmin``'s status)."""
        learner = self.learner
        return learner.name if learner is not None and learner.active.is_set() else None

    def routers(self) -> Sequence[Router]:
        return []

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            if self.should_stop():
                yield
                return
            resources = provide_resources(app.state)
            settings = resources.settings
            # On the gateway's /metrics; the gateway's own probe reports the engines' health.
            metrics = LearnerMetrics(resources.metrics.registry, report_engines=False)
            self.learner = build_learner(
                database,
                resources.aliases,
                engine_clients(engines),
                self.options,
                settings.data_dir,
                metrics=metrics,
            )
            monitor = CanaryMonitor.from_policies(
                database, self.learner.hotswap, self.options.config.canary
            )
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_with_monitor(self.learner, monitor, stop), name="learner"
            )
            task.add_done_callback(_report_end)
            try:
                yield
            finally:
                stop.set()
                try:
                    await task
                finally:
                    metrics.unregister()

        return opened()
