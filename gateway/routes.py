"""HTTP routes: thin handlers that authenticate, call the service or a store, and answer.

``/v1`` speaks OpenAI's API for users; ``/admin`` needs an admin key; ``/healthz`` and
``/metrics`` are open so probes and Prometheus need no key (bind the gateway to a
trusted interface or put them behind the proxy's ACL).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, cast

import msgspec
from litestar import Request, Response, Router, delete, get, post, put, route
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import ResponseHeader, State
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import Parameter
from litestar.response import Stream

from gateway.auth import (
    LIMIT_HEADER,
    REMAINING_HEADER,
    RESET_HEADER,
    Authenticator,
    Principal,
    RateLimitState,
    RequestLimits,
    create_key,
)
from gateway.dialog_log import DialogLogWriter
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    UnprocessableRequestError,
)
from gateway.metrics import Metrics
from gateway.protocol import (
    ALIAS_NAME,
    AliasInfo,
    AliasUpdate,
    ChatCompletionRequest,
    ChatRequest,
    DialogsDeleted,
    DialogsExport,
    ErrorResponse,
    HealthStatus,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    ModelCard,
    ModelList,
)
from gateway.service import ChatContext, ChatService
from gateway.settings import GatewaySettings
from store import (
    AliasRecord,
    AliasStore,
    AmbiguousConversation,
    ApiKeyRecord,
    DialogStore,
    KeyStore,
)

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
T = TypeVar("T")
FIELD_PATH = re.compile(r"at `\$\.?([^`]*)`")
TRUTHY = frozenset({"1", "true", "yes", "on"})
# An opt-out header must say yes or no: anything else is refused rather than read as
# "no", which would put the turn into training data against the client's wish.
FALSY = frozenset({"", "0", "false", "no", "off"})
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
JSON_MEDIA_TYPE = "application/json"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# Which adapter version wrote a reply (its body names the alias the client asked for).
VERSION_HEADER = "x-tuneshield-version"
# nginx's status for a request whose client hung up before the answer: never sent (nobody
# is there), only counted by the request metrics.
CLIENT_CLOSED_REQUEST = 499
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
ERROR_MEANINGS = {
    400: "Unreadable request, or a field with the wrong type or value (named in param)",
    401: "Missing, unknown or revoked API key",
    403: "The key lacks the admin role",
    404: "Unknown model alias, route or record",
    409: "The request conflicts with the current state (code says which)",
    413: "Request body too large",
    429: "Rate limit exceeded (see Retry-After and x-ratelimit-*-requests)",
    500: "Internal error (details only in the gateway log)",
    502: "The engine failed or is unreachable",
    503: "The engine is busy or no connection is free",
    504: "The engine did not answer in time",
}


def error_responses(
    *codes: int, meanings: Mapping[int, str] | None = None
) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error answers of a route (OpenAI's error shape); ``meanings``
    replaces the generic description of a status where the route means more by it."""
    codes = codes or (400, 401, 403, 404, 413, 429, 500)
    meanings = {**ERROR_MEANINGS, **(meanings or {})}
    return {
        code: ResponseSpec(data_container=ErrorResponse, description=meanings[code])
        for code in codes
    }


# One event of a stream: its data is a chunk's JSON (or an error's, in OpenAI's shape)
# and, last, the text [DONE].
SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    description="One Server-Sent Event: `data: <chunk JSON>`, ..., then `data: [DONE]`",
    required=["data"],
    properties={
        "data": Schema(type=OpenAPIType.STRING),
        "event": Schema(type=OpenAPIType.STRING),
        "id": Schema(type=OpenAPIType.STRING),
        "retry": Schema(type=OpenAPIType.INTEGER),
    },
)


@dataclass
class StreamingOperation(Operation):
    """An operation whose 200 is JSON, or Server-Sent Events when the request asks for
    ``stream`` (Litestar documents one media type per status)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {
                **(ok.content or {}),
                "text/event-stream": OpenAPIMediaType(schema=SSE_EVENT),
            }


@dataclass(frozen=True)
class Resources:
    """What the lifespan opened, handed to handlers by dependency injection."""

    settings: GatewaySettings
    service: ChatService
    keys: KeyStore
    aliases: AliasStore
    dialogs: DialogStore
    log: DialogLogWriter
    authenticator: Authenticator
    limits: RequestLimits
    metrics: Metrics


def provide_resources(state: State) -> Resources:
    """The app's resources (set by the lifespan)."""
    return cast(Resources, state.resources)


@dataclass(frozen=True)
class Caller:
    """Who sent a ``/v1`` request, and their rate limit once it took its token."""

    principal: Principal
    rate_limit: RateLimitState


def _client(request: Request[Any, Any, Any]) -> str | None:
    """The client's address (behind a proxy: uvicorn takes it from X-Forwarded-For when
    the proxy is trusted, FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else None


def _authorization(request: Request[Any, Any, Any]) -> str | None:
    """The ``Authorization`` header; several are combined as HTTP combines repeated
    fields (", "), which no key matches: a proxy and the gateway must never each pick
    a different one of two keys."""
    values = request.headers.getall("authorization", [])
    return ", ".join(values) if values else None


async def provide_caller(request: Request[Any, Any, Any], resources: Resources) -> Caller:
    """Any valid key, within its rate limit."""
    principal = await resources.authenticator.authenticate(
        _authorization(request), client=_client(request)
    )
    return Caller(principal, await resources.limits.requests.acquire(principal))


async def provide_admin(request: Request[Any, Any, Any], resources: Resources) -> Principal:
    """An admin key, within the admin routes' rate limit."""
    principal = await resources.authenticator.authenticate(
        _authorization(request), client=_client(request), admin=True
    )
    await resources.limits.admin.acquire(principal)
    return principal


class GatewayRequest(Request[Any, Any, Any]):
    """Litestar's request, reading a JSON body only as the gateway accepts one.

    Both refusals are 400s before the key is checked or any work is done: a body that
    says it is something else (a form, plain text) is not guessed at, and one nested
    deeper than the decoder goes (msgspec raises ``RecursionError``, which Litestar lets
    through as a 500) is unreadable. A body without a Content-Type is read as JSON.
    """

    async def json(self) -> Any:
        media_type, _ = self.content_type
        if media_type and media_type != JSON_MEDIA_TYPE and not media_type.endswith("+json"):
            raise InvalidRequestError(
                f"Content-Type must be {JSON_MEDIA_TYPE}, got {media_type}",
                param="Content-Type",
                code="unsupported_content_type",
            )
        try:
            return await super().json()
        except RecursionError:
            raise InvalidRequestError(
                "the request body is not valid JSON the gateway reads: it nests too deeply",
                code="json_too_deep",
            ) from None


def strict_body(kind: type[T], raw: Any) -> T:
    """``raw`` as ``kind`` without lax conversions (Litestar's parse turns 0 into false).

    An integral float (``5.0``) still counts as an integer, as in JSON Schema.
    """
    if isinstance(raw, dict):
        for name, value in raw.items():
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
                raw[name] = int(value)
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as error:
        found = FIELD_PATH.search(str(error))
        field = found.group(1) if found else None
        raise UnprocessableRequestError(f"{field or 'body'}: {error}", param=field) from None


def _chat_context(
    request: Request[Any, Any, Any], principal: Principal, settings: GatewaySettings
) -> ChatContext:
    routing = settings.routing
    conversation_id = request.headers.get(routing.conversation_header)
    if conversation_id is None:
        conversation_id = "conv_" + uuid.uuid4().hex
    elif not CONVERSATION_ID.match(conversation_id):
        raise InvalidRequestError(
            f"header {routing.conversation_header} must be 1-128 characters of "
            "letters, digits and . _ : -",
            param=routing.conversation_header,
        )
    opt_out_header = request.headers.get(routing.opt_out_header, "").strip().lower()
    if opt_out_header not in TRUTHY | FALSY:
        raise InvalidRequestError(
            f"header {routing.opt_out_header} must be one of "
            f"{', '.join(sorted(TRUTHY))} (opt out) or {', '.join(sorted(FALSY - {''}))}",
            param=routing.opt_out_header,
        )
    return ChatContext(
        key_id=principal.key_id,
        conversation_id=conversation_id,
        opt_out=principal.opt_out or opt_out_header in TRUTHY,
        allow_private_aliases=principal.is_admin,
    )


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Return once the client has hung up. The body is read by now, so the server's next
    message is ``http.disconnect``: uvicorn sends it when the connection drops (or once
    the response is complete, when nobody waits here any more)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reply_headers(
    context: ChatContext, caller: Caller, adapter: str | None, settings: GatewaySettings
) -> dict[str, str]:
    headers = {settings.routing.conversation_header: context.conversation_id}
    headers.update(caller.rate_limit.headers())
    if adapter is not None:
        headers[VERSION_HEADER] = adapter
    return headers


CHAT_HEADERS = [
    ResponseHeader(
        name=LIMIT_HEADER,
        documentation_only=True,
        description="Requests the key may send at once (its token bucket's capacity)",
    ),
    ResponseHeader(
        name=REMAINING_HEADER,
        documentation_only=True,
        description="Requests the key may still send at once",
    ),
    ResponseHeader(
        name=RESET_HEADER,
        documentation_only=True,
        description="Time until the key's bucket is full again, e.g. 20ms, 1.5s, 6m0s",
    ),
    ResponseHeader(
        name=VERSION_HEADER,
        documentation_only=True,
        description="The adapter version that wrote the reply (absent when the guard "
        "refused the request)",
    ),
]


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="Create a chat completion",
    responses=error_responses(400, 401, 404, 413, 429, 500, 502, 503, 504),
    response_headers=CHAT_HEADERS,
    operation_class=StreamingOperation,
)
async def chat_completions(
    data: ChatCompletionRequest,
    request: Request[Any, Any, Any],
    caller: Caller,
    resources: Resources,
) -> Response[Any]:
    """OpenAI chat completions, JSON or SSE (``stream: true``), logged to the dialog log."""
    settings = resources.settings
    if len(data.messages) > settings.limits.max_messages:
        raise UnprocessableRequestError(
            f"messages: at most {settings.limits.max_messages} messages per request, "
            f"got {len(data.messages)}",
            param="messages",
        )
    raw = await request.json()
    chat = ChatRequest(body=strict_body(ChatCompletionRequest, raw), raw=raw)
    context = _chat_context(request, caller.principal, settings)
    if data.stream:
        relay = await resources.service.open_stream(chat, context)
        return Stream(
            relay.events(),
            media_type="text/event-stream",
            headers={**_reply_headers(context, caller, relay.adapter, settings), **SSE_HEADERS},
            background=BackgroundTask(relay.aclose),
        )
    reply = await resources.service.complete(chat, context, lambda: _client_gone(request))
    if reply is None:
        # Nobody reads this (the server drops it): the status is for the request metrics.
        return Response(b"", status_code=CLIENT_CLOSED_REQUEST)
    return Response(
        reply.body,
        media_type="application/json",
        headers=_reply_headers(context, caller, reply.adapter, settings),
    )


@get("/v1/models", summary="List the public model aliases", responses=error_responses())
async def list_models(caller: Caller, resources: Resources) -> ModelList:
    """The public aliases; adapter versions behind them stay internal."""
    return resources.service.list_models()


@get(
    "/v1/models/{model:str}",
    summary="Retrieve a public model alias",
    responses=error_responses(400, 401, 404, 429, 500),
)
async def retrieve_model(model: str, caller: Caller, resources: Resources) -> ModelCard:
    """One alias as listed by ``GET /v1/models``; 404 ``model_not_found`` otherwise."""
    return resources.service.model(model)


@get(
    "/healthz",
    summary="Gateway and engine health",
    responses={503: ResponseSpec(data_container=HealthStatus, description="Engine unhealthy")},
)
async def healthz(resources: Resources) -> Response[HealthStatus]:
    """200 when the engine answers its probe, 503 otherwise."""
    ok, detail = await resources.service.engine_health()
    status = HealthStatus(
        status="ok" if ok else "degraded",
        gateway="ok",
        engine=detail,
        log_queue_depth=resources.log.depth,
    )
    return Response(status, status_code=200 if ok else 503)


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(resources: Resources) -> bytes:
    """Prometheus text exposition of this app's registry."""
    return resources.metrics.render()


def _utc(stamp: datetime) -> datetime:
    # Stored naive (UTC); answered with the zone so clients need not guess.
    return stamp.replace(tzinfo=UTC)


def _key_info(record: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=record.key_id,
        name=record.name,
        key_prefix=record.key_prefix,
        role=record.role,
        opt_out=record.opt_out,
        rate_limit_per_minute=record.rate_limit_per_minute,
        created_at=_utc(record.created_at),
        revoked_at=None if record.revoked_at is None else _utc(record.revoked_at),
    )


def _alias_info(record: AliasRecord) -> AliasInfo:
    return AliasInfo(
        alias=record.alias,
        adapter=record.adapter,
        public=record.public,
        updated_at=_utc(record.updated_at),
    )


@post(
    "/admin/keys",
    status_code=201,
    summary="Create an API key (shown once)",
    responses=error_responses(),
)
async def create_api_key(
    data: KeyCreate, request: Request[Any, Any, Any], principal: Principal, resources: Resources
) -> KeyCreated:
    """A new key; the response is the only place its secret ever appears (the audit log
    records who made it and its settings, never the secret)."""
    data = strict_body(KeyCreate, await request.json())
    created = await asyncio.to_thread(
        create_key,
        resources.keys,
        data.name,
        role=data.role,
        opt_out=data.opt_out,
        rate_limit_per_minute=data.rate_limit_per_minute,
        actor=principal.key_id,
    )
    info = _key_info(created.record)
    return KeyCreated(
        **{name: getattr(info, name) for name in info.__struct_fields__}, key=created.key
    )


def options_handler(path: str, *methods: str) -> HTTPRouteHandler:
    """``OPTIONS path`` answering the path's methods in ``Allow``: Litestar's automatic
    answer lists only the first handler's method where a path has several (a bug in 2.25:
    a path whose handlers are registered one by one keeps the first route's Allow)."""
    allow = ", ".join(sorted({*methods, "OPTIONS"}))

    async def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(path, http_method="OPTIONS", include_in_schema=False, name=f"{path} OPTIONS")(
        options
    )


keys_options = options_handler("/admin/keys", "GET", "POST")


@get("/admin/keys", summary="List API keys", responses=error_responses())
async def list_api_keys(principal: Principal, resources: Resources) -> list[KeyInfo]:
    """Every key with its state; secrets and hashes are never listed."""
    records = await asyncio.to_thread(resources.keys.list)
    return [_key_info(record) for record in records]


@delete(
    "/admin/keys/{key_id:str}",
    status_code=200,
    summary="Revoke an API key",
    responses=error_responses(),
)
async def revoke_api_key(key_id: str, principal: Principal, resources: Resources) -> KeyInfo:
    """Revoke a key at once (idempotent; audited when it changed the key)."""
    record = await asyncio.to_thread(resources.keys.revoke, key_id, actor=principal.key_id)
    if record is None:
        raise NotFoundError(f"no API key {key_id!r}", param="key_id", code="key_not_found")
    return _key_info(record)


# A conversation is one key's (a second key sending the same X-Conversation-Id logs its
# own): a conversation id that several keys used is refused unless the key is named.
AMBIGUOUS_CONVERSATION = (
    "A conversation id that several keys used, given without key_id (code ambiguous_conversation)"
)


def _ambiguous(error: AmbiguousConversation, param: str) -> GatewayError:
    return GatewayError(
        str(error),
        type="invalid_request_error",
        param=param,
        code="ambiguous_conversation",
        status_code=409,
    )


@delete(
    "/admin/dialogs",
    status_code=200,
    summary="Delete one key's or one conversation's dialogs, and their copies",
    responses=error_responses(
        400, 401, 403, 404, 409, 413, 429, 500, meanings={409: AMBIGUOUS_CONVERSATION}
    ),
)
async def delete_dialogs(
    principal: Principal,
    resources: Resources,
    key_id: Annotated[str | None, Parameter(query="key_id", min_length=1)] = None,
    conversation_id: Annotated[str | None, Parameter(query="conversation_id", min_length=1)] = None,
) -> DialogsDeleted:
    """Remove one key's or one conversation's logged turns (both given: that key's turns
    in that conversation; neither: nothing). Queued turns are written first, then deleted.

    The store records the deletion, marks the adapters trained on the turns and audits it
    as this admin's (``DialogStore.erase``); the gateway's journal drops their lines at
    once; the active learner purges its snapshots and round files (learner/privacy.py).
    """
    if key_id is None and conversation_id is None:
        # No filter deletes nothing (never everything).
        return DialogsDeleted(deleted_turns=0)
    await resources.log.flush()
    try:
        deletion = await asyncio.to_thread(
            resources.dialogs.erase,
            actor=principal.key_id,
            key_id=key_id,
            conversation_id=conversation_id,
        )
    except AmbiguousConversation as error:
        raise _ambiguous(error, "key_id") from None
    journal = resources.log.journal
    if journal is not None and deletion.turn_ids:
        files = await asyncio.to_thread(journal.purge, deletion.turn_ids)
        await asyncio.to_thread(
            resources.dialogs.record_purge,
            [deletion.deletion_id],
            actor=principal.key_id,
            files=[str(path) for path in files],
            learner_files=False,
        )
    return DialogsDeleted(deleted_turns=deletion.turns)


@post(
    "/admin/dialogs/export",
    status_code=200,
    summary="Export named conversations' turns as Parquet",
    media_type=PARQUET_MEDIA_TYPE,
    responses=error_responses(
        400, 401, 403, 404, 409, 413, 429, 500, meanings={409: AMBIGUOUS_CONVERSATION}
    ),
)
async def export_dialogs(
    data: DialogsExport, request: Request[Any, Any, Any], principal: Principal, resources: Resources
) -> Response[bytes]:
    """The logged turns of ``conversation_ids`` (of ``key_id`` when given), oldest first,
    as one Parquet file (the columns of ``tuneshield dialogs export``). Queued turns are
    written first."""
    data = strict_body(DialogsExport, await request.json())
    await resources.log.flush()
    try:
        body = await asyncio.to_thread(
            resources.dialogs.export_parquet,
            conversation_ids=data.conversation_ids,
            include_opt_out=data.include_opt_out,
            key_id=data.key_id,
        )
    except AmbiguousConversation as error:
        raise _ambiguous(error, "conversation_ids") from None
    return Response(body, media_type=PARQUET_MEDIA_TYPE)


@get("/admin/aliases", summary="List model aliases", responses=error_responses())
async def list_aliases(principal: Principal, resources: Resources) -> list[AliasInfo]:
    """Every alias (public or not) and its active adapter."""
    return [_alias_info(record) for record in resources.aliases.list()]


@put(
    "/admin/aliases/{alias:str}",
    summary="Point an alias at an adapter",
    responses=error_responses(),
)
async def set_alias(
    alias: Annotated[str, Parameter(pattern=ALIAS_NAME)],
    data: AliasUpdate,
    request: Request[Any, Any, Any],
    principal: Principal,
    resources: Resources,
) -> AliasInfo:
    """Flip an alias atomically; the adapter must already be loaded in the engine."""
    data = strict_body(AliasUpdate, await request.json())
    record = await asyncio.to_thread(resources.aliases.set, alias, data.adapter, public=data.public)
    return _alias_info(record)


def build_routers() -> list[Router]:
    """The app's routers, each with the principal dependency its routes need."""
    user = Provide(provide_caller)
    admin = Provide(provide_admin)
    return [
        Router(
            "/",
            route_handlers=[chat_completions, list_models, retrieve_model],
            dependencies={"caller": user},
            security=BEARER,
        ),
        Router(
            "/",
            route_handlers=[
                keys_options,
                create_api_key,
                list_api_keys,
                revoke_api_key,
                delete_dialogs,
                export_dialogs,
                list_aliases,
                set_alias,
            ],
            dependencies={"principal": admin},
            security=BEARER,
        ),
        Router("/", route_handlers=[healthz, metrics]),
    ]
