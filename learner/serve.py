"""``tuneshield serve``: the embedded default (engine + gateway + learner) in one command,
composed from the roles' own code on one DuckDB file.

The gateway process is the one DuckDB writer, so the bootstrap (identity adapters, the
first admin key) runs inside the gateway app's lifespan as an extension, on the app's
own connection. The engine starts in that lifespan too, after the bootstrap: uvicorn
binds its port only once the lifespan has started, so no request arrives before the
engine has loaded every alias's active adapter (``on_ready``). Traffic never reaches
the bare base model. On shutdown uvicorn stops the gateway first, then the lifespan
stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import typer
from litestar import Litestar, Router

from engine import (
    EngineError,
    EngineSupervisor,
    ensure_identity_adapter,
    identity_version,
    restore_on_ready,
)
from gateway import (
    ADMIN_KEY_ENV,
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    LOG_LEVEL_OPTION,
    EnginePool,
    GatewaySettings,
    LogLevel,
    configure_logging,
    create_key,
    provide_resources,
)
from store import ADAPTERS_FOLDER, AdapterRegistry, AliasStore, Database, KeyStore, RegistryError

logger = logging.getLogger(__name__)

ADMIN_KEY_NAME = "tuneshield-serve-admin"
# The audit log's actor for what `tuneshield serve` does on its own (the first admin key).
SERVE_ACTOR = "serve"
ENGINE_LOG = Path("logs") / "engine.log"
STOP_POLL_S = 0.5


class Engine(Protocol):
    """What the stack needs of an engine: ``EngineSupervisor`` (or a test fake)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


OnReady = Callable[[EngineSupervisor], None]
EngineFactory = Callable[[OnReady], Engine]


@dataclass(frozen=True)
class BootstrapReport:
    """What the bootstrap created on this start (empty on later starts)."""

    identity_versions: list[str]
    """Identity adapters (``chat-v0000``) built and registered active now."""
    admin_key: str | None
    """An admin key created now; shown once, only its hash is stored."""


def ensure_admin_key(keys: KeyStore, env_admin_key: str | None) -> str | None:
    """Create an admin key when none can reach the admin API yet; return it (else None)."""
    if env_admin_key is not None:
        return None
    if any(record.role == "admin" and record.revoked_at is None for record in keys.list()):
        return None
    return create_key(keys, ADMIN_KEY_NAME, role="admin", actor=SERVE_ACTOR).key


def bootstrap(
    registry: AdapterRegistry,
    aliases: AliasStore,
    keys: KeyStore,
    settings: GatewaySettings,
    base_model: str | Path,
    adapters_dir: Path,
) -> BootstrapReport:
    """Seed aliases, build each seeded alias's identity adapter once, make an admin key.

    Idempotent: a second start finds everything registered and changes nothing.
    """
    aliases.seed(settings.routing.seed_aliases)
    created = []
    for alias, adapter in settings.routing.seed_aliases.items():
        version = identity_version(alias)
        if adapter != version:
            # A seed naming a trained version must already be registered.
            try:
                registry.get(adapter)
            except RegistryError:
                logger.warning("alias %s is seeded with unregistered %s", alias, adapter)
            continue
        try:
            registry.get(version)
        except RegistryError:
            ensure_identity_adapter(registry, alias, base_model, adapters_dir)
            created.append(version)
    return BootstrapReport(created, ensure_admin_key(keys, settings.admin_key))


class ServeStack:
    """Gateway extension: bootstrap, then start the engine; stop it after the gateway.

    ``make_engine`` receives the ``on_ready`` hook that loads the active adapters.
    ``should_stop`` is polled while the engine starts (uvicorn's exit flag), so Ctrl-C
    during a minute-long engine start is not ignored.
    """

    def __init__(
        self,
        make_engine: EngineFactory,
        base_model: str | Path,
        adapters_dir: Path,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_bootstrap: Callable[[BootstrapReport], None] | None = None,
        restore_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.make_engine = make_engine
        self.base_model = base_model
        self.adapters_dir = adapters_dir
        self.should_stop = should_stop
        self.on_bootstrap = on_bootstrap
        self.restore_transport = restore_transport
        self.engine: Engine | None = None
        self.error: Exception | None = None

    def routers(self) -> Sequence[Router]:
        return []

    def stop_engine(self) -> None:
        """Stop the engine if it runs (idempotent; also the caller's safety net)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop()

    async def _start(self, engine: Engine) -> bool:
        starting = asyncio.create_task(asyncio.to_thread(engine.start))
        while not starting.done():
            await asyncio.wait({starting}, timeout=STOP_POLL_S)
            if not starting.done() and self.should_stop():
                engine.stop()
        try:
            starting.result()
        except EngineError as error:
            if self.should_stop():
                return False
            self.error = error
            raise
        return True

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            resources = provide_resources(app.state)
            registry = AdapterRegistry(database)
            try:
                report = await asyncio.to_thread(
                    bootstrap,
                    registry,
                    resources.aliases,
                    resources.keys,
                    resources.settings,
                    self.base_model,
                    self.adapters_dir,
                )
            except Exception as error:
                self.error = error
                raise
            if self.on_bootstrap is not None:
                self.on_bootstrap(report)
            # The gateway's alias cache: after a restart the engine gets what is served now.
            on_ready = restore_on_ready(
                registry,
                resources.aliases,
                api_key=resources.settings.upstream_api_key,
                transport=self.restore_transport,
            )
            self.engine = self.make_engine(on_ready)
            try:
                await self._start(self.engine)
                yield
            finally:
                await asyncio.to_thread(self.stop_engine)

        return opened()


def serve(
    model: str = typer.Option("default", help="Model folder, or 'default' (SmolLM2-135M)."),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, envvar=DATA_DIR_ENV, help="Holds gateway.duckdb, adapters/ and logs/."
    ),
    port: int | None = typer.Option(None, help="Gateway port (default: policies/gateway.yaml)."),
    engine_port: int | None = typer.Option(None, help="Engine port (policies/engine.yaml)."),
    host: str | None = typer.Option(None, help="Gateway interface (default: the policy's)."),
    log_level: LogLevel = LOG_LEVEL_OPTION,
) -> None:
    """Start the engine and the gateway in front of it; Ctrl-C stops both."""
    configure_logging(log_level)
    import uvicorn
    from rich.console import Console

    from engine import load_engine_config, require_rank_fits
    from gateway import create_app, load_settings, server_options
    from learner.admin_routes import AdapterAdmin
    from learner.process import EmbeddedLearner
    from learner.rounds import LearnerConfig, LearnerOptions
    from tuneshield import ModelError, PolicyError, resolve_model

    console = Console(stderr=True)
    try:
        # Policies first: a wrong setting is reported before the model is prepared.
        engine_config = load_engine_config(port=engine_port)
        require_rank_fits(engine_config)
        settings = load_settings(upstream_url=engine_config.base_url, data_dir=data_dir)
        learner_config = LearnerConfig.from_policy()
        model_path = resolve_model(model, prepare=True)
    except (ModelError, PolicyError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None

    def make_engine(on_ready: OnReady) -> Engine:
        console.print(
            f"starting the engine for {model_path} (log: {data_dir / ENGINE_LOG})", soft_wrap=True
        )
        return EngineSupervisor(
            engine_config, model_path, log_path=data_dir / ENGINE_LOG, on_ready=on_ready
        )

    def report(result: BootstrapReport) -> None:
        for version in result.identity_versions:
            console.print(f"registered identity adapter {version}")
        if result.admin_key is not None:
            console.print("admin key (shown only this once; stored as a hash):")
            typer.echo(result.admin_key)
        elif settings.admin_key is None:
            console.print(
                f"admin keys exist already; set {ADMIN_KEY_ENV} or stop the server and run "
                "`tuneshield keys create --role admin` for a new one"
            )

    gateway_host = host or settings.routing.host
    gateway_port = port or settings.routing.port
    server: uvicorn.Server | None = None
    stack = ServeStack(
        make_engine,
        model_path,
        settings.data_dir / ADAPTERS_FOLDER,
        should_stop=lambda: server is not None and server.should_exit,
        on_bootstrap=report,
    )
    # The learner's control loop runs in this process, on its one DuckDB connection, after
    # the engine has started (extensions enter in order).
    learner = EmbeddedLearner(
        LearnerOptions(model_path, settings.data_dir / ADAPTERS_FOLDER, learner_config),
        should_stop=lambda: server is not None and server.should_exit,
    )
    admin = AdapterAdmin(learner_config, active_learner=learner.active_name)
    app = create_app(settings, extensions=[admin, stack, learner])
    # No access log: the dialog log and /metrics count every request already, and a line per
    # request costs the gateway CPU time on the request path.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            **server_options(
                settings, host=gateway_host, port=gateway_port, log_level=log_level,
                access_log=False,
            ),
        )
    )  # fmt: skip
    console.print(f"gateway on http://{gateway_host}:{gateway_port}/v1 once the engine is ready")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            stack.stop_engine()
    if stack.error is not None:
        console.print(f"[red]error:[/red] {stack.error}")
        raise typer.Exit(1)
    console.print("stopped")
