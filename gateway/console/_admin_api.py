"""The admin API as the console calls it: through this gateway's own app, in process.

Every page reads, and every button acts, through the very ``/admin`` routes the CLI calls
over HTTP, with the signed-in operator's own key and address: the same validation, rate
limits, audit entries and answers, and nothing computed a second time. A call is one ASGI
request handed to the app (no socket, no second HTTP client).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, urlencode

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

JSON = "application/json"
# What the inner requests name as their server; no socket is involved.
INTERNAL_SERVER = ("console.internal", 0)
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
# HTTP statuses the console treats specially.
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409


class AdminApiError(Exception):
    """The admin API refused a call; ``message`` is its OpenAI-shaped error's message."""

    def __init__(self, status_code: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code

    @property
    def key_refused(self) -> bool:
        """The operator's key no longer passes (revoked, or no longer an admin key)."""
        return self.status_code in (UNAUTHORIZED, FORBIDDEN)

    @property
    def route_missing(self) -> bool:
        """The route is not mounted here (a gateway without the learner's admin API)."""
        return self.status_code == NOT_FOUND and self.code is None


@dataclass(frozen=True)
class Caller:
    """Who a call is made for: the operator's key and address (for the failed-auth limit)."""

    key: str
    client: str | None


def path(*parts: str) -> str:
    """An admin path from parts, each percent-encoded (ids come from the browser)."""
    return "/" + "/".join(quote(part, safe="") for part in parts)


class AdminApi:
    """Calls ``/admin`` routes of ``app`` (this gateway) for a ``Caller``."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def get(self, caller: Caller, route: str, **params: Any) -> Any:
        """``GET route`` answered as decoded JSON."""
        return msgspec.json.decode(await self._call("GET", route, caller, params))

    async def post(
        self, caller: Caller, route: str, body: Mapping[str, Any] | None = None, **params: Any
    ) -> Any:
        """``POST route`` (with a JSON body, if given) answered as decoded JSON."""
        return msgspec.json.decode(await self._call("POST", route, caller, params, body))

    async def delete(self, caller: Caller, route: str, **params: Any) -> Any:
        """``DELETE route`` answered as decoded JSON."""
        return msgspec.json.decode(await self._call("DELETE", route, caller, params))

    async def text(self, caller: Caller, route: str) -> str:
        """``GET route`` answered as text (an HTML report)."""
        return (await self._call("GET", route, caller, {})).decode()

    async def _call(
        self,
        method: str,
        route: str,
        caller: Caller,
        params: Mapping[str, Any],
        body: Mapping[str, Any] | None = None,
    ) -> bytes:
        query = urlencode(
            {name: _query_value(value) for name, value in params.items() if value is not None}
        )
        content = msgspec.json.encode(body) if body is not None else b""
        headers = [(b"authorization", f"Bearer {caller.key}".encode())]
        if body is not None:
            headers += [(b"content-type", JSON.encode()), (b"content-length", b"%d" % len(content))]
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": route,
            "raw_path": route.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": headers,
            "client": (caller.client, 0) if caller.client else None,
            "server": INTERNAL_SERVER,
            "state": {},
            "extensions": {},
        }
        sent = False
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._app(cast(Scope, scope), cast(Receive, receive), cast(Send, send))
        answer = b"".join(chunks)
        if status >= 400:
            raise _error(status, answer)
        return answer


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _error(status: int, answer: bytes) -> AdminApiError:
    """The gateway's one error shape (``{"error": {message, type, param, code}}``) read."""
    try:
        error = msgspec.json.decode(answer)["error"]
        return AdminApiError(status, str(error["message"]), error.get("code"))
    except (msgspec.DecodeError, KeyError, TypeError):
        return AdminApiError(status, f"the admin API answered HTTP {status}")
