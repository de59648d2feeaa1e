"""``create_app(settings)``: the Litestar app, its lifespan and its one error handler."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import msgspec
from litestar import Litestar, Request, Response, Router
from litestar.di import Provide
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, OpenAPIType, Reference, Schema, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway import protocol
from gateway.apidocs import OfflineDocsPlugin
from gateway.auth import Authenticator, open_limits
from gateway.console import Console
from gateway.dialog_journal import JOURNAL_DIRNAME, DialogJournal
from gateway.dialog_log import DialogLogWriter
from gateway.engine_pool import Engine, EnginePool
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableRequestError,
)
from gateway.guard import Guard
from gateway.logs import LogLevel, log_config
from gateway.metrics import Metrics
from gateway.routes import GatewayRequest, Resources, build_routers, provide_resources
from gateway.service import ChatService
from gateway.settings import GatewaySettings
from gateway.transport import LeanTransport
from gateway.transport import available as lean_transport_available
from store import AliasStore, Database, DialogStore, KeyStore, open_database

if TYPE_CHECKING:
    from tuneshield import Judge

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
REF_TEMPLATE = "#/components/schemas/{name}"
CAMEL = re.compile(r"[A-Z]")
MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
EMPTY_BODY = {"message": "'data'", "key": "data", "source": "body"}


def _field_name(problem: dict[str, Any]) -> str | None:
    """The field a validation problem is about: ``messages[0].content``, not ``$.…``."""
    key = str(problem.get("key") or "").removeprefix("$.")
    if key in ("data", "$"):
        key = ""
    # A missing field's path ends at its parent; msgspec names the field in the message.
    missing = MISSING_FIELD.search(str(problem.get("message", "")))
    if missing:
        key = f"{key}.{missing.group(1)}" if key else missing.group(1)
    return key or None


def _validation_error(exc: ValidationException) -> GatewayError:
    """A framework validation failure as 400, naming the field in ``param``."""
    problems = [item for item in (exc.extra or []) if isinstance(item, dict)]
    if not problems:
        return InvalidRequestError(f"the request could not be read: {exc.detail}")
    if problems == [EMPTY_BODY]:
        # Litestar's way of saying that a route that reads a body got none.
        return InvalidRequestError("the request has no body: send a JSON object")
    first = problems[0]
    names = [_field_name(item) for item in problems]
    field = names[0]
    message = "; ".join(
        f"{name or 'body'}: {item.get('message', 'invalid')}"
        for name, item in zip(names, problems, strict=True)
    )
    if first.get("source") in ("query", "path", "header", "cookie"):
        return InvalidRequestError(message, param=field)
    return UnprocessableRequestError(message, param=field)


def to_gateway_error(exc: Exception) -> GatewayError:
    """Any exception as a ``GatewayError``; unexpected ones keep their details in the log."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ValidationException):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        if exc.status_code == 413:
            return PayloadTooLargeError(
                "the request body is larger than the gateway accepts", code="payload_too_large"
            )
        if exc.status_code == 404:
            return NotFoundError("no such route")
        if exc.status_code == 400:
            # Litestar raises a plain 400 for bodies that are not JSON at all, and for
            # requests it cannot read otherwise (a bad Host or Content-Length header).
            if isinstance(exc.__cause__, SerializationException):
                return InvalidRequestError(f"the request body is not valid JSON: {exc.detail}")
            return InvalidRequestError(f"the request could not be read: {exc.detail}")
        if exc.status_code < 500:
            # Keeps headers such as Allow (405).
            return GatewayError(
                exc.detail,
                type="invalid_request_error",
                status_code=exc.status_code,
                headers=dict(exc.headers or {}),
            )
    logger.error("unexpected error", exc_info=exc)
    return GatewayError("internal error in the gateway", code="internal_error")


class AppExtension(Protocol):
    """A package that adds routes and resources to the gateway (the learner's admin API).

    Its lifespan runs inside the gateway's, after ``app.state.resources`` is set, with
    the gateway's one database connection and its engines.
    """

    def routers(self) -> Sequence[Router]:
        """Routers added to the app."""
        ...

    def lifespan(
        self, app: Litestar, database: Database, engines: EnginePool
    ) -> AbstractAsyncContextManager[None]:
        """Open the extension's resources for the app's lifetime."""
        ...


class MetricsMiddleware(ASGIMiddleware):
    """Counts requests and times them to their last byte, labelled by route template."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, send_with_status)
        finally:
            route = scope.get("path_template") or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _openapi_node(node: Any) -> Any:
    """One node of a JSON schema (msgspec's output) as Litestar's OpenAPI spec objects."""
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return Reference(ref=node["$ref"])
    fields: dict[str, Any] = {}
    for key, value in node.items():
        name = CAMEL.sub(lambda m: "_" + m.group(0).lower(), key)
        if name == "properties":
            value = {prop: _openapi_node(sub) for prop, sub in value.items()}
        elif name in ("any_of", "one_of", "all_of", "prefix_items"):
            value = [_openapi_node(sub) for sub in value]
        elif name in ("items", "additional_properties"):
            value = _openapi_node(value)
        elif name == "type":
            types = [OpenAPIType(t) for t in (value if isinstance(value, list) else [value])]
            value = types if isinstance(value, list) else types[0]
        fields[name] = value
    return Schema(**fields)


def exact_struct_schemas(app: Litestar) -> None:
    """Replace Litestar's schemas of the gateway's wire models with msgspec's own.

    Litestar drops constraints inside optional fields (``gt`` of ``float | None`` is lost,
    ``le`` lands beside the union), so its schema admits values the gateway refuses;
    msgspec derives the schema from the very types that validate requests.
    """
    components = app.openapi_schema.components
    registry = components.schemas if components.schemas is not None else {}
    structs = [
        value
        for name in registry
        if isinstance(value := getattr(protocol, name, None), type)
        and issubclass(value, msgspec.Struct)
    ]
    _, exact = msgspec.json.schema_components(structs, ref_template=REF_TEMPLATE)
    for name, node in exact.items():
        registry[name] = _openapi_node(node)


async def refresh_caches(keys: KeyStore, aliases: AliasStore, period_s: float) -> None:
    """Re-read aliases and keys that other processes change (several gateways, a learner).

    An alias flip or a key revocation reaches this gateway within ``period_s``; a failed
    read keeps the last known state and is retried at the next period.
    """
    while True:
        await asyncio.sleep(period_s)
        try:
            await asyncio.to_thread(aliases.refresh)
            await asyncio.to_thread(keys.refresh)
        except Exception as error:  # the store is briefly unreachable: serve what we know
            logger.warning("store cache refresh failed: %s", error)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Stop a background task of the lifespan and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def open_engine_pool(
    settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[EnginePool]:
    """One client per engine of ``settings.upstream_urls`` (``transport``: tests' network),
    with the policy's timeouts and limits, closed on exit."""
    upstream = settings.upstream
    limits = httpx.Limits(
        max_connections=upstream.max_connections,
        max_keepalive_connections=upstream.max_keepalive_connections,
        keepalive_expiry=upstream.keepalive_expiry_s,
    )
    timeout = httpx.Timeout(
        connect=upstream.connect_timeout_s,
        read=upstream.read_timeout_s,
        write=upstream.write_timeout_s,
        pool=upstream.pool_timeout_s,
    )
    headers = (
        {"authorization": f"Bearer {settings.upstream_api_key}"}
        if settings.upstream_api_key
        else None
    )
    async with AsyncExitStack() as stack:
        clients = []
        for url in settings.upstream_urls:
            if transport is None and lean_transport_available():
                network: httpx.AsyncBaseTransport | None = LeanTransport(limits)
            else:
                network = transport
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url,
                        transport=network,
                        timeout=timeout,
                        limits=limits,
                        headers=headers,
                    )
                )
            )
        yield EnginePool(clients, probe_timeout_s=upstream.health_timeout_s)


def open_journal(settings: GatewaySettings, dialogs: DialogStore) -> DialogJournal | None:
    """The gateway's dialog journal (``dialog_log.journal``), after putting into the store
    what a previous process left in it (acknowledged, not yet committed, then killed)."""
    config = settings.dialog_log
    if not (config.durable_ack and config.journal):
        return None
    journal = DialogJournal(settings.data_dir / JOURNAL_DIRNAME, config.journal_segment_bytes)
    recovered = journal.recover()
    if recovered:
        inserted = dialogs.insert_missing(recovered)
        logger.warning(
            "dialog log: %d turns recovered from the journal, %d of them were not stored yet",
            len(recovered),
            inserted,
        )
    journal.discard_recovered()
    return journal


def server_options(
    settings: GatewaySettings,
    *,
    host: str,
    port: int,
    log_level: LogLevel | str,
    access_log: bool = True,
) -> dict[str, Any]:
    """How every role serves the gateway, as ``uvicorn.Config``'s (and ``uvicorn.run``'s)
    keyword arguments: the gateway's keep-alive for idle client connections and the roles'
    one log format (uvicorn applies it instead of its own)."""
    return {
        "host": host,
        "port": port,
        "timeout_keep_alive": settings.routing.keep_alive_s,
        "log_config": log_config(log_level),
        "log_level": LogLevel(str(log_level).lower()).value,
        "access_log": access_log,
    }


def create_app(
    settings: GatewaySettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    judge: Judge | None = None,
    extensions: Sequence[AppExtension] = (),
) -> Litestar:
    """The gateway app. ``transport`` replaces the network, ``judge`` the guard's (tests)."""
    metrics = Metrics()
    guard = Guard(
        settings.guard,
        judge,
        on_over=lambda action: metrics.guard.labels(action).inc(),
        on_score=lambda scored, score: metrics.guard_scores.labels(scored).observe(score),
    )
    if settings.console.enabled:
        # The operator console (/console): pages over the admin API, off the chat path.
        extensions = (*extensions, Console(settings.console))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        database = open_database(settings.store_url, settings.store.config)
        refreshing: asyncio.Task[None] | None = None
        probing: asyncio.Task[None] | None = None
        journal: DialogJournal | None = None
        try:
            keys, aliases = KeyStore(database), AliasStore(database)
            # Shared by every replica on PostgreSQL, in memory on DuckDB.
            request_limits = open_limits(settings.limits, database)
            aliases.seed(settings.routing.seed_aliases)
            if database.multi_process:
                refreshing = asyncio.create_task(
                    refresh_caches(keys, aliases, settings.store.config.cache_refresh_s),
                    name="store-cache-refresh",
                )
            dialogs = DialogStore(database)
            dialogs.prepare()
            journal = open_journal(settings, dialogs)
            # The dialog log's threads hand their results back through the GIL.
            sys.setswitchinterval(settings.dialog_log.gil_switch_interval_s)
            log = DialogLogWriter(
                dialogs,
                settings.dialog_log,
                journal=journal,
                on_written=metrics.turns.labels("logged").inc,
                on_lost=metrics.turns.labels("lost").inc,
            )
            metrics.watch_queue(lambda: log.depth)
            metrics.watch_aliases(lambda: [(item.alias, item.adapter) for item in aliases.list()])
            upstream = settings.upstream
            async with open_engine_pool(settings, transport) as engines:
                log.start()
                try:
                    app.state.resources = Resources(
                        settings=settings,
                        service=ChatService(
                            engines=engines,
                            aliases=aliases,
                            log=log,
                            guard=guard,
                            metrics=metrics,
                        ),
                        keys=keys,
                        aliases=aliases,
                        dialogs=dialogs,
                        log=log,
                        authenticator=Authenticator(
                            keys, settings.admin_key, request_limits.failed_auth
                        ),
                        limits=request_limits,
                        metrics=metrics,
                    )

                    # Routing needs each engine's adapters before the first request.
                    def report(engine: Engine) -> None:
                        metrics.report_engine(engine.url, engine.up, engine.in_flight)

                    for engine, _ in await engines.probe():
                        report(engine)
                    probing = asyncio.create_task(
                        engines.watch(upstream.health_probe_s, report),
                        name="engine-probe",
                    )
                    async with AsyncExitStack() as stack:
                        try:
                            for extension in extensions:
                                await stack.enter_async_context(
                                    extension.lifespan(app, database, engines)
                                )
                            # What startup built (modules, schemas, the app) lives as long
                            # as the process: frozen, the collector stops re-scanning it,
                            # which made full collections pause the event loop for tens of
                            # ms.
                            gc.freeze()
                            try:
                                yield
                            finally:
                                gc.unfreeze()
                        finally:
                            # Before the extensions stop what they started (serve's engine),
                            # also when a later one failed to start: an engine shutting down
                            # on purpose is not an outage to report.
                            await _cancel(probing)
                finally:
                    # Before the client closes: a probe must not meet a closed client.
                    await _cancel(probing)
                    await log.stop()
        finally:
            await _cancel(refreshing)
            if journal is not None:
                journal.close()
            database.close()

    def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        error = to_gateway_error(exc)
        metrics.errors.labels(error.type, str(error.status_code)).inc()
        return Response(
            error.to_json(),
            status_code=error.status_code,
            media_type="application/json",
            headers=error.headers,
        )

    app = Litestar(
        route_handlers=[
            *build_routers(),
            *(router for extension in extensions for router in extension.routers()),
        ],
        lifespan=[lifespan],
        dependencies={"resources": Provide(provide_resources, sync_to_thread=False)},
        exception_handlers={Exception: handle_error},
        # Reads JSON bodies as the gateway accepts them (content type, nesting): see there.
        request_class=GatewayRequest,
        middleware=[MetricsMiddleware(metrics)],
        request_max_body_size=settings.limits.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="TuneShield Gateway",
            version=API_VERSION,
            path="/schema",
            # /schema renders offline; /schema/openapi.json is added by Litestar.
            render_plugins=[OfflineDocsPlugin()],
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        # Logging is the role's one configuration (gateway.logs), applied by its command;
        # Litestar's own would replace it. Unexpected errors are logged once, by handle_error.
        logging_config=None,
        debug=False,
    )
    exact_struct_schemas(app)
    return app
