"""The engines behind the gateway: which one answers a request, and what each one holds.

Each engine has its own ``httpx.AsyncClient`` (its own connection pool, the engine's key
and timeouts). ``watch`` lists every engine's models (``GET /v1/models``: vLLM lists the
base model and each loaded LoRA adapter) every ``health_probe_s``: an engine that
answers is up, and the adapters it lists are the versions it can serve.

``route(adapter)`` orders the engines for one request: those up and holding the adapter
first, fewest requests in flight first; then the other engines that are up (the listing
may not have seen a load yet: a hot-swap loads the version on every engine before the
alias flips); engines seen down last, as a last resort. An engine that restarted lists no
adapter, and vLLM answers 404 for a version it lacks, so it serves a version only once
the learner's reconciliation has loaded it there.

A request moves on to the next engine when its exchange failed before any byte reached
the client (``ChatService``): the connection failed or broke before the reply's head (a
stream) or before the whole reply (a JSON reply, read in full before it is relayed); or
the engine answered 404 for the adapter, or 503. The engine is then marked down (a 404:
marked as lacking the adapter) until its next listing says otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from gateway.metrics import engine_label

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
JSON_HEADERS = {"content-type": "application/json"}
# Engine answers after which the same request may go to another engine: the adapter is
# not loaded there (404), or the engine is draining or overloaded (503).
RETRY_STATUSES = frozenset({404, 503})
# Transport failures that leave nothing sent to the client and nothing half-done on the
# engine's side worth waiting for; timeouts are not among them (a retry would double the
# client's wait).
RETRY_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class _ModelId(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelId]


_models_decoder = msgspec.json.Decoder(_ModelList)


class Engine:
    """One engine: its client, what its last listing said, and its requests in flight."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.url = engine_label(str(client.base_url))
        # Chat requests go straight to the transport the client would pick, with the URL,
        # headers and timeouts the client would give them: the client's per-request steps
        # (URL merging, cookie jar, auth and redirect hooks) cost ~0.2 ms CPU a request.
        template = client.build_request("POST", CHAT_PATH, headers=JSON_HEADERS)
        self._chat_url = template.url
        self._chat_headers = [
            (name, value)
            for name, value in template.headers.raw
            if name.lower() != b"content-length"
        ]
        self._chat_extensions = template.extensions
        self._transport = client._transport_for_url(template.url)
        self.up = True
        """False once a listing or a request failed, until a listing succeeds."""
        self.adapters: frozenset[str] | None = None
        """The models of the last listing; None before the first."""
        self.in_flight = 0

    def holds(self, adapter: str) -> bool:
        return self.adapters is not None and adapter in self.adapters

    async def send(self, body: bytes) -> httpx.Response:
        """POST a chat body; the reply's body is still to be read. Raises httpx's errors."""
        request = httpx.Request(
            "POST",
            self._chat_url,
            headers=self._chat_headers,
            content=body,
            extensions=dict(self._chat_extensions),
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def list_models(self, timeout_s: float) -> frozenset[str]:
        """The engine's model ids. Raises httpx's errors, or ``ValueError`` on a bad body."""
        response = await self.client.get(MODELS_PATH, timeout=timeout_s)
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        try:
            listing = _models_decoder.decode(response.content)
        except msgspec.ValidationError as error:  # DecodeError is one
            raise ValueError(f"not a model list ({error})") from None
        return frozenset(model.id for model in listing.data)

    def __repr__(self) -> str:
        return f"Engine({self.url!r}, up={self.up}, in_flight={self.in_flight})"


class EnginePool:
    """The gateway's engines (at least one), in the order they were configured."""

    def __init__(self, clients: Sequence[httpx.AsyncClient], *, probe_timeout_s: float) -> None:
        if not clients:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = tuple(Engine(client) for client in clients)
        self._probe_timeout_s = probe_timeout_s
        # Rotates the first choice among equally busy engines, so that light traffic is
        # spread too (min() alone would always pick the first).
        self._turn = itertools.count()

    @property
    def clients(self) -> tuple[httpx.AsyncClient, ...]:
        return tuple(engine.client for engine in self.engines)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(engine.url for engine in self.engines)

    def route(self, adapter: str) -> list[Engine]:
        """The engines to try for ``adapter``, best first (see the module's docstring)."""
        engines = self.engines
        if len(engines) == 1:
            return [engines[0]]
        start = next(self._turn) % len(engines)
        rotated = engines[start:] + engines[:start]

        def rank(engine: Engine) -> tuple[int, int]:
            tier = 0 if engine.up and engine.holds(adapter) else 1 if engine.up else 2
            return tier, engine.in_flight

        return sorted(rotated, key=rank)

    def failed(self, engine: Engine, reason: str) -> None:
        """An exchange with ``engine`` failed: no more traffic until a listing succeeds."""
        if engine.up:
            logger.warning("engine %s marked down: %s", engine.url, reason)
        engine.up = False

    def lacks(self, engine: Engine, adapter: str) -> None:
        """``engine`` answered 404 for ``adapter``: prefer the others for it."""
        if engine.adapters is not None:
            engine.adapters = engine.adapters - {adapter}

    async def probe(self) -> list[tuple[Engine, str | None]]:
        """List every engine's models now; per engine, None or why it did not answer."""
        return list(
            zip(
                self.engines,
                await asyncio.gather(*(self._probe(engine) for engine in self.engines)),
                strict=True,
            )
        )

    async def _probe(self, engine: Engine) -> str | None:
        # An engine never listed yet is most likely still starting (a gateway started beside
        # its engine): that is news, not a warning.
        starting = engine.adapters is None
        try:
            adapters = await engine.list_models(self._probe_timeout_s)
        except httpx.HTTPError as error:
            problem = f"unreachable ({type(error).__name__})"
        except ValueError as error:
            problem = str(error)
        else:
            if not engine.up:
                logger.info("engine %s answers%s", engine.url, "" if starting else " again")
            engine.adapters, engine.up = adapters, True
            return None
        if engine.up:
            log = logger.info if starting else logger.warning
            log("engine %s: %s%s", engine.url, problem, " (not started yet?)" if starting else "")
        engine.up = False
        return problem

    async def watch(self, period_s: float, report: Callable[[Engine], Any]) -> None:
        """Probe every ``period_s`` until cancelled; ``report(engine)`` after each probe.

        The first probe comes after one period: the caller probes once before serving, and a
        second listing at once would race the first requests for a connection.
        """
        while True:
            await asyncio.sleep(period_s)
            try:
                for engine, _ in await self.probe():
                    report(engine)
            except Exception as error:  # not an answer; watching goes on (it ends with the app)
                logger.warning("engine probe failed: %s", error)
