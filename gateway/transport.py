"""A lean HTTP/1.1 transport for the gateway's ``httpx.AsyncClient`` towards the engine.

httpx's default pool (httpcore) scans every pooled connection, polling each socket, on
every request and every release: with 64 streams in flight that scan was most of the
gateway's CPU. This transport keeps idle connections in a LIFO list (O(1) per request),
parses responses with httptools (llhttp, the parser uvicorn uses), and hands a stream's
body to httpx one network read at a time. Errors are httpx's, so callers see no
difference; without httptools the gateway falls back to httpx's own transport.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

try:
    import httptools
except ImportError:  # pragma: no cover - an optional speed-up
    httptools = None  # type: ignore[assignment]

# Above this many unread bytes the socket stops being read (back-pressure).
HIGH_WATER = 256 * 1024
Origin = tuple[str, str, int]


def available() -> bool:
    """Whether httptools is installed (else use httpx's default transport)."""
    return httptools is not None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        # A stream waits once per token: one read timer per connection, re-armed only
        # when it fires before the deadline, instead of one made and cancelled per wait.
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.error: Exception | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(httpx.RemoteProtocolError(f"malformed reply from the engine: {error}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            self._fail(httpx.ReadError("the engine closed the connection"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- used by the transport
    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until the parser made progress; ``httpx.ReadTimeout`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        if timeout is not None:
            self.deadline = loop.time() + timeout
            # A kept-alive connection may still hold the timer of its previous request,
            # armed for a later deadline (a chat's read timeout before a 2 s health probe):
            # an earlier deadline needs its own timer, else it is only seen when that fires.
            if self.timer is not None and self.timer.when() > self.deadline:
                self.timer.cancel()
                self.timer = None
            if self.timer is None:
                self.timer = loop.call_at(self.deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self.waiter = None

    def _check_deadline(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms a timer again
        loop = waiter.get_loop()
        if loop.time() >= self.deadline:
            waiter.set_exception(httpx.ReadTimeout("the engine did not answer in time"))
        else:
            self.timer = loop.call_at(self.deadline, self._check_deadline)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.resume_reading()
        self.buffered = 0
        return data

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.lost = True


class _Body(httpx.AsyncByteStream):
    def __init__(
        self, pool: LeanTransport, origin: Origin, connection: _Connection, read_s: float | None
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._read_s = read_s
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
                continue
            if connection.complete:
                return
            if connection.error is not None:
                raise connection.error
            await connection.wait(self._read_s)

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._origin, self._connection)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport with an O(1) pool (see module docstring).

    ``limits.max_connections`` bounds the requests in flight (waiting for a slot longer
    than the pool timeout raises ``httpx.PoolTimeout``); ``max_keepalive_connections``
    bounds idle connections; ``keepalive_expiry`` drops idle ones before the engine does.
    """

    def __init__(self, limits: httpx.Limits) -> None:
        if httptools is None:  # pragma: no cover
            raise RuntimeError("LeanTransport needs httptools")
        self._max = limits.max_connections or 1_000_000
        self._max_idle = limits.max_keepalive_connections or 0
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0
        self._idle: dict[Origin, list[_Connection]] = {}
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        await self._slot(timeouts.get("pool"))
        try:
            connection = await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._free_slot()
            raise
        connection.reset()
        head = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += [name, b": ", value, b"\r\n"]
        head += [b"\r\n", body]
        try:
            assert connection.transport is not None
            connection.transport.write(b"".join(head))
            while not connection.head_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(timeouts.get("read"))
        except BaseException:
            connection.close()
            self._free_slot()
            raise
        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=_Body(self, origin, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _slot(self, timeout: float | None) -> None:
        if self._in_flight < self._max and not self._waiters:
            self._in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection to the engine") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on to the waiter
                return
        self._in_flight -= 1

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.lost and now - connection.idle_since < self._expiry:
                return connection
            connection.close()
        scheme, host, port = origin
        context = None
        if scheme == "https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port, ssl=context), timeout
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as error:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}") from None
        return connection

    def release(self, origin: Origin, connection: _Connection) -> None:
        """Back to the idle list when its reply was read to the end, else closed."""
        self._free_slot()
        idle = self._idle.setdefault(origin, [])
        reusable = connection.complete and connection.keep_alive and not connection.lost
        if reusable and len(idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            idle.append(connection)
            return
        connection.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
