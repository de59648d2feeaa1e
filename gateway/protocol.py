"""OpenAI wire models: what the gateway accepts, answers and reads back from the engine.

Request models are tolerant: fields the gateway does not know are ignored here and still
forwarded to the engine untouched (``ChatRequest.to_upstream``), so new OpenAI or vLLM
sampling options need no gateway release. Upstream replies are read through small views
that name only the fields the log needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# A "model" key and its string value. Unescaped quotes around `model` followed by a colon
# occur in valid JSON only as an object key, never inside a string value.
MODEL_KEY = re.compile(rb'(?<!\\)("model"\s*:\s*)"(?:[^"\\]|\\.)*"')
# How every alias a request names is spelt (path, query or body), checked in this one
# place: a letter or digit first, so that no alias reads as a path step ("." or "..") or
# a command-line option ("-x"); then letters, digits and . _ - (a URL path segment and a
# folder name as they are). "(?!\n)$": Python's "$" also matches before a final newline
# (a "%0a" in a path), ECMA's (the OpenAPI schema's) only at the end; now both agree.
ALIAS_BODY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
END = r"(?!\n)$"
ALIAS_NAME = rf"^{ALIAS_BODY}{END}"
# A registered version of an alias: ``chat-v0007``.
ADAPTER_VERSION_NAME = rf"^{ALIAS_BODY}-v\d{{4,}}{END}"
# Choices per chat request. The guard scores and the dialog log records one reply per
# turn, so a request for several is refused (``gateway.service.check_choices``) rather
# than answered with choices nobody guarded or logged.
MAX_CHOICES = 1
# Characters of the OpenAI ``user`` value (the end user the dialog log records): ample
# for an id or a hash, not a place to store text.
MAX_USER_CHARS = 256


class ContentPart(Struct, kw_only=True):
    """One part of a multi-part message; only text parts are read by the gateway."""

    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    """One message of a chat request."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "\n".join(part.text for part in self.content if part.text is not None)


class StreamOptions(Struct, kw_only=True):
    """``stream_options`` of a streamed request."""

    include_usage: bool | None = None


class ChatCompletionRequest(Struct, kw_only=True):
    """``POST /v1/chat/completions``; other OpenAI/vLLM fields are accepted and forwarded."""

    model: Annotated[str, Meta(min_length=1, max_length=256, examples=["chat"])]
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    n: (
        Annotated[
            int,
            Meta(
                ge=1,
                description="Choices to generate: only 1 (the gateway guards and logs one "
                "reply per turn; more answer 400 with param `n`)",
                # The bound in the schema only: the service refuses more with a message
                # that says why, which a constraint's generic error would not.
                extra_json_schema={"maximum": MAX_CHOICES},
            ),
        ]
        | None
    ) = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    user: (
        Annotated[
            str,
            Meta(
                max_length=MAX_USER_CHARS,
                description="Who the end user is (an id of the client's choosing): "
                "recorded with the turn, so a user's turns can be counted and kept out "
                "of training",
            ),
        ]
        | None
    ) = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request together with the JSON object it came from."""

    body: ChatCompletionRequest
    raw: dict[str, Any]

    @property
    def wants_usage_chunk(self) -> bool:
        """Whether the client asked for the usage-only chunk at the end of a stream."""
        options = self.body.stream_options
        return bool(options is not None and options.include_usage)

    def dialog(self) -> list[dict[str, str]]:
        """The messages as ``{role, content}`` text pairs (what judges read)."""
        return [{"role": m.role, "content": m.text()} for m in self.body.messages]

    def messages_json(self) -> str:
        """The request's messages as JSON text, as the client sent them (for the log)."""
        return msgspec.json.encode(self.raw.get("messages", [])).decode()

    def to_upstream(self, adapter: str) -> bytes:
        """The body for the engine: the client's JSON with the adapter as model.

        Streams always ask the engine for usage so the log gets token counts; the relay
        drops that chunk again when the client did not ask for it.
        """
        upstream = dict(self.raw)
        upstream["model"] = adapter
        if self.body.stream:
            options = dict(upstream.get("stream_options") or {})
            options["include_usage"] = True
            upstream["stream_options"] = options
        return msgspec.json.encode(upstream)


class Usage(Struct, kw_only=True):
    """Token counts of a completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ResponseMessage(Struct, kw_only=True):
    """The assistant message of a non-streamed choice."""

    role: str = "assistant"
    content: str | None = None


class Choice(Struct, kw_only=True):
    """One choice of a non-streamed completion."""

    index: int = 0
    message: ResponseMessage
    finish_reason: str | None = None


class ChatCompletionResponse(Struct, kw_only=True):
    """A non-streamed completion (the engine's JSON is relayed as is)."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(Struct, kw_only=True, omit_defaults=True):
    """The increment carried by one streamed choice."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(Struct, kw_only=True):
    """One choice of a streamed chunk."""

    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One ``data:`` event of a stream; usage-only chunks have empty ``choices``."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None


class ModelCard(Struct, kw_only=True):
    """One entry of ``GET /v1/models``."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "tuneshield"


class ModelList(Struct, kw_only=True):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class ErrorBody(Struct, kw_only=True, omit_defaults=False):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """OpenAI's error envelope: ``{"error": {message, type, param, code}}``."""

    error: ErrorBody


class EngineErrorView(Struct, kw_only=True):
    """Error bodies of OpenAI-compatible engines: nested (OpenAI) or flat (older vLLM)."""

    error: ErrorBody | str | None = None
    message: str | None = None


def engine_error_message(body: bytes) -> str | None:
    """The message an engine put in an error body, if it can be found."""
    try:
        view = msgspec.json.decode(body, type=EngineErrorView)
    except msgspec.MsgspecError:
        return None
    if isinstance(view.error, ErrorBody):
        return view.error.message
    return view.error or view.message


def with_model(payload: bytes, model: bytes) -> bytes:
    """An engine's completion or chunk (JSON) answering with ``model`` (a JSON string).

    The engine names the adapter version it ran; clients expect the model they asked
    for, as OpenAI answers. Only the first ``model`` key is replaced: OpenAI-compatible
    engines write the top-level one before ``choices``, the only place nested objects
    could hold another. The rest of the bytes are relayed as the engine wrote them.
    """
    return MODEL_KEY.sub(lambda found: found.group(1) + model, payload, count=1)


def completion_view(body: bytes) -> ChatCompletionResponse | None:
    """The engine's non-streamed reply, or None when it is not one."""
    try:
        return msgspec.json.decode(body, type=ChatCompletionResponse)
    except msgspec.MsgspecError:
        return None


class StreamEventView(Struct, kw_only=True):
    """What the relay reads from one upstream ``data:`` event (a chunk or an error)."""

    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    error: Any = None


def chunk_view(payload: bytes | str) -> StreamEventView | None:
    """One streamed event, or None when the payload is not JSON of that shape."""
    try:
        return msgspec.json.decode(payload, type=StreamEventView)
    except msgspec.MsgspecError:
        return None


# -- Gateway API (health, admin) ------------------------------------------------------


class HealthStatus(Struct, kw_only=True):
    """``GET /healthz``."""

    status: Literal["ok", "degraded"]
    gateway: str
    engine: str
    log_queue_depth: int


class KeyCreate(Struct, kw_only=True):
    """``POST /admin/keys``."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    role: Literal["user", "admin"] = "user"
    opt_out: bool = False
    rate_limit_per_minute: Annotated[float, Meta(gt=0.0)] | None = None


class KeyInfo(Struct, kw_only=True):
    """An API key as listed: never the secret, never its hash."""

    key_id: str
    name: str
    key_prefix: str
    role: str
    opt_out: bool
    rate_limit_per_minute: float | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyInfo, kw_only=True):
    """A new key: ``key`` is shown this once and never again."""

    key: str


class DialogsDeleted(Struct, kw_only=True):
    """``DELETE /admin/dialogs``."""

    deleted_turns: int


class DialogsExport(Struct, kw_only=True):
    """``POST /admin/dialogs/export``: the logged turns of these conversations, as Parquet."""

    conversation_ids: Annotated[
        list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]], Meta(min_length=1)
    ]
    include_opt_out: bool = False
    """Opted-out turns too (exports feed training: they are left out unless asked for)."""
    key_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    """Only this key's turns: a conversation is one key's, and an id that several keys
    used must name the key (409 ``ambiguous_conversation`` otherwise)."""


class AliasInfo(Struct, kw_only=True):
    """A public model alias and the adapter version it serves."""

    alias: str
    adapter: str
    public: bool
    updated_at: datetime


class AliasUpdate(Struct, kw_only=True):
    """``PUT /admin/aliases/{alias}``: point the alias at another adapter, atomically."""

    adapter: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:/-]+$")]
    public: bool = True
