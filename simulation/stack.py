"""The real stack for the demo: vLLM engine + gateway + adapter admin, in this process.

It is ``tuneshield serve``'s composition (``ServeStack`` bootstraps identity adapters
and starts the engine inside the gateway's lifespan, ``AdapterAdmin`` owns hot-swaps),
run by uvicorn in a background thread on loopback, plus ``DemoBridge``: an extension
that hands the demo the gateway's own event loop, database connection and learner
resources. The gateway process is the one DuckDB writer, so the demo exports snapshots
and registers adapters through that connection, on that loop, as the learner does.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import logging
import secrets
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from litestar import Litestar, Router

from simulation.loopback import LOOPBACK, free_port
from simulation.sigterm import SigtermUnwinds
from store import Database

if TYPE_CHECKING:
    import pyarrow as pa
    import uvicorn

    from gateway import EnginePool, GatewaySettings
    from learner.admin_routes import LearnerResources
    from learner.serve import Engine, OnReady
    from tuneshield import OpenAIChat

logger = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_S = 600.0
HEAL_TIMEOUT_S = 600.0
START_POLL_S = 0.5
STOP_TIMEOUT_S = 120.0
# Flush intervals (x2) of the dialog log to wait for logged turns before giving up.
EXPORT_ATTEMPTS = 20


class StackError(RuntimeError):
    """The demo's stack did not start or did not answer; the message says why."""


class DemoBridge:
    """Gateway extension: remembers the app, its loop and its database for the demo."""

    def __init__(self) -> None:
        self.app: Litestar | None = None
        self.database: Database | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def routers(self) -> Sequence[Router]:
        return []

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[None]:
            self.app, self.database = app, database
            self.loop = asyncio.get_running_loop()
            try:
                yield
            finally:
                self.loop = None

        return opened()


class Stack(abc.ABC):
    """What a demo run drives: the stack in this process (``DemoStack``) or one already
    running (``RemoteStack``); a context manager."""

    settings: GatewaySettings
    data_dir: Path
    _sigterm: SigtermUnwinds

    @property
    @abc.abstractmethod
    def gateway_url(self) -> str:
        """The OpenAI base URL users call."""

    @property
    @abc.abstractmethod
    def api_key(self) -> str:
        """The key simulated users, healing and evaluation call the gateway with."""

    @abc.abstractmethod
    def start(self) -> None:
        """Make the stack ready: every alias served, at least by its identity adapter."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Let go of the stack (idempotent)."""

    @abc.abstractmethod
    def active_version(self, alias: str) -> str | None:
        """The version ``alias`` serves now."""

    @abc.abstractmethod
    def activate(self, version: str) -> dict[str, Any]:
        """Hot-swap ``version`` in under its alias; the swap's record."""

    @abc.abstractmethod
    def adapter_path(self, version: str) -> Path:
        """The folder of a registered version."""

    @abc.abstractmethod
    def install(self, alias: str, built: Path, **metadata: Any) -> str:
        """Register a finished adapter folder as ``alias``'s next version; its name."""

    @abc.abstractmethod
    def healer(self, concurrency: int) -> OpenAIChat:
        """Contextual healing through the engine, on an identity adapter (never the base),
        ``concurrency`` requests in flight."""

    @abc.abstractmethod
    def _turns(self, conversation_ids: Collection[str]) -> pa.Table:
        """The turns logged so far for ``conversation_ids``."""

    def export_turns(self, name: str, conversation_ids: Collection[str], expected: int) -> pa.Table:
        """The logged turns of ``conversation_ids``, saved as a Parquet snapshot.

        A turn is logged once its reply has ended, a moment after the client saw it end:
        until ``expected`` turns are there, the export is tried again (then it holds what
        was logged).
        """
        import pyarrow.parquet as pq

        from learner.snapshot import SNAPSHOTS_FOLDER

        table = self._turns(conversation_ids)
        for _ in range(EXPORT_ATTEMPTS):
            if table.num_rows >= expected:
                break
            time.sleep(self.settings.dialog_log.flush_interval_s * 2)
            table = self._turns(conversation_ids)
        path = self.data_dir / SNAPSHOTS_FOLDER / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return table

    def __enter__(self) -> Self:
        self._sigterm = SigtermUnwinds().__enter__()
        try:
            self.start()
        except BaseException:
            # A start cut short (a SIGTERM, Ctrl-C, a failure) may have launched the engine.
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            with self._sigterm.held():
                self.stop()
        finally:
            self._sigterm.__exit__(None, None, None)


class DemoStack(Stack):
    """Engine + gateway on loopback for the demo's lifetime (a context manager).

    ``aliases`` are seeded beside the policy's own, each at its identity adapter
    ``<alias>-v0000``. ``admin_key`` (16+ characters) is the gateway's admin key, also
    valid on ``/v1``; a random one is made when None.
    """

    def __init__(
        self,
        model_path: str,
        data_dir: Path,
        aliases: Sequence[str],
        *,
        admin_key: str | None = None,
        port: int | None = None,
        engine_overrides: dict[str, Any] | None = None,
        rate_limit_per_minute: float | None = None,
        log_level: str = "warning",
        announce: Callable[[str], None] = logger.info,
    ) -> None:
        from engine import load_engine_config, require_rank_fits
        from gateway import ADMIN_KEY_ENV, load_settings

        self.model_path = model_path
        self.data_dir = Path(data_dir)
        self.admin_key = admin_key or f"ts-demo-{secrets.token_urlsafe(24)}"
        self.port = port or free_port()
        self.announce = announce
        self.log_level = log_level
        overrides = {"port": free_port(), **(engine_overrides or {})}
        self.engine_config = load_engine_config(**overrides)
        require_rank_fits(self.engine_config)
        settings = load_settings(
            upstream_url=self.engine_config.base_url,
            data_dir=self.data_dir,
            environ={ADMIN_KEY_ENV: self.admin_key},
        )
        seeds = {**settings.routing.seed_aliases, **{a: f"{a}-v0000" for a in aliases}}
        limits = settings.limits
        if rate_limit_per_minute is not None:
            # One simulated population shares one key: the per-key bucket must not throttle it.
            limits = dataclasses.replace(
                limits,
                rate_limit_per_minute=rate_limit_per_minute,
                rate_limit_burst=max(limits.rate_limit_burst, int(rate_limit_per_minute)),
            )
        self.settings = dataclasses.replace(
            settings,
            routing=dataclasses.replace(settings.routing, seed_aliases=seeds, host=LOOPBACK),
            limits=limits,
        )
        self.bridge = DemoBridge()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._serve_stack: Any = None
        self._thread_error: BaseException | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def gateway_url(self) -> str:
        """The OpenAI base URL users call."""
        return f"http://{LOOPBACK}:{self.port}/v1"

    @property
    def api_key(self) -> str:
        """The key simulated users, healing and evaluation call the gateway with."""
        return self.admin_key

    @property
    def engine_url(self) -> str:
        """vLLM's own OpenAI base URL (loopback; for healing, never for users)."""
        return self.engine_config.base_url

    @property
    def adapters_dir(self) -> Path:
        from store import ADAPTERS_FOLDER

        return self.data_dir / ADAPTERS_FOLDER

    def start(self, timeout_s: float | None = None) -> None:
        """Bootstrap aliases, start vLLM, then the gateway; return once it listens."""
        import uvicorn

        from engine import EngineSupervisor
        from gateway import create_app, server_options
        from learner.admin_routes import AdapterAdmin
        from learner.serve import ENGINE_LOG, ServeStack

        log_path = self.data_dir / ENGINE_LOG
        config = self.engine_config

        def make_engine(on_ready: OnReady) -> Engine:
            self.announce(f"starting the engine (log: {log_path})")
            return EngineSupervisor(config, self.model_path, log_path=log_path, on_ready=on_ready)

        server: uvicorn.Server | None = None
        stack = ServeStack(
            make_engine,
            self.model_path,
            self.adapters_dir,
            should_stop=lambda: server is not None and server.should_exit,
        )
        # AdapterAdmin without learner options: no scheduled round may train on the demo's
        # traffic; the demo runs each arm's rounds itself, with the same round pipeline.
        app = create_app(self.settings, extensions=[AdapterAdmin(), stack, self.bridge])
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                **server_options(
                    self.settings, host=LOOPBACK, port=self.port, log_level=self.log_level
                ),
            )
        )
        self._server, self._serve_stack = server, stack

        def run() -> None:
            try:
                server.run()
            except BaseException as error:  # the main thread reports it
                self._thread_error = error

        self._thread = threading.Thread(target=run, name="demo-gateway", daemon=True)
        self._thread.start()
        limit = timeout_s or config.startup_timeout_s + 60
        deadline = time.monotonic() + limit
        while not server.started:
            if not self._thread.is_alive():
                cause = stack.error or self._thread_error
                self.stop()
                raise StackError(f"the stack did not start: {cause or 'see the engine log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"the stack did not start within {limit:.0f} s (log: {log_path})")
            time.sleep(START_POLL_S)

    def stop(self) -> None:
        """Stop the gateway, then the engine (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
        if self._serve_stack is not None:
            self._serve_stack.stop_engine()

    # ------------------------------------------------------- on the gateway's loop

    def call(self, make: Callable[[], Awaitable[T]], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run ``make()`` on the gateway's event loop and wait for its result."""
        loop = self.bridge.loop
        if loop is None:
            raise StackError("the gateway is not running")

        async def wrapped() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(timeout_s)

    def _learner(self) -> LearnerResources:
        from learner.admin_routes import provide_learner

        if self.bridge.app is None:
            raise StackError("the gateway is not running")
        return provide_learner(self.bridge.app.state)

    def adapter_path(self, version: str) -> Path:
        """The folder of a registered version."""
        registry = self._learner().registry
        return Path(self.call(lambda: asyncio.to_thread(registry.get, version)).path)

    def active_version(self, alias: str) -> str:
        """The version ``alias`` serves now (the gateway's alias table)."""
        from gateway import provide_resources

        if self.bridge.app is None:
            raise StackError("the gateway is not running")
        version = provide_resources(self.bridge.app.state).aliases.get(alias)
        if version is None:
            raise StackError(f"alias {alias!r} does not exist")
        return version

    def activate(self, version: str) -> dict[str, Any]:
        """Hot-swap ``version`` in under its alias; the swap's record."""
        hotswap = self._learner().hotswap
        return dataclasses.asdict(self.call(lambda: hotswap.activate(version)))

    def install(self, alias: str, built: Path, **metadata: Any) -> str:
        """Move a finished adapter folder into the registry as ``alias``'s next version."""
        registry = self._learner().registry
        adapters_dir = self.adapters_dir

        def install() -> str:
            version = registry.next_version(alias)
            return registry.install(built, adapters_dir, version, **metadata).version

        return self.call(lambda: asyncio.to_thread(install))

    def healer(self, concurrency: int) -> OpenAIChat:
        """Contextual healing through vLLM (batched), on an identity adapter: never the base."""
        from engine import identity_version
        from tuneshield import OpenAIChat

        alias = self.settings.routing.default_alias
        return OpenAIChat(
            self.engine_url,
            identity_version(alias),
            timeout_s=HEAL_TIMEOUT_S,
            concurrency=concurrency,
        )

    def _turns(self, conversation_ids: Collection[str]) -> pa.Table:
        from gateway import provide_resources
        from store import DialogStore

        database, app = self.bridge.database, self.bridge.app
        if database is None or app is None:
            raise StackError("the gateway is not running")
        log = provide_resources(app.state).log
        self.call(log.flush)
        export = functools.partial(
            DialogStore(database).export_table, conversation_ids=sorted(conversation_ids)
        )
        return self.call(functools.partial(asyncio.to_thread, export))
