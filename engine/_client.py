"""vLLM's runtime LoRA contract, spoken by the hot-swap: load, probe, unload, list.

The engine must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(``engine.EngineSupervisor`` does both). Every adapter version gets a fresh name: reloading a
same-named adapter has stale-cache bugs, so a name already loaded is an error here
rather than an in-place reload. One ``asyncio.Lock`` per adapter name keeps a load and an
unload of one name from interleaving; different names proceed concurrently.

Errors::

    VLLMError
    ├── EngineUnavailable        connection refused, timeout, 502/503/504
    └── AdapterError
        ├── AdapterAlreadyLoaded 400 on load: the name is taken
        ├── AdapterNotFound      404: unknown name (unload, probe) or missing folder (load)
        └── AdapterRejected      any other refusal: invalid files, name of the base model
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


class VLLMError(Exception):
    """vLLM refused or could not be reached; ``status_code`` is vLLM's, when it answered."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class EngineUnavailable(VLLMError):
    """The engine did not answer (down, starting, overloaded or timed out)."""


class AdapterError(VLLMError):
    """vLLM answered, and refused the adapter operation."""


class AdapterAlreadyLoaded(AdapterError):
    """A load named an adapter that is already loaded (names are never reused)."""


class AdapterNotFound(AdapterError):
    """The adapter name is not loaded, or its folder does not exist on the engine."""


class AdapterRejected(AdapterError):
    """vLLM refused to load the adapter for another reason (see the message)."""


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]


class VLLMClient:
    """Async client for one vLLM server; ``base_url`` is its root or its ``/v1``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root.removesuffix("/v1")
        self.api_key = api_key
        self._owns_client = client is None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
        # Per request, so that an injected shared client carries the key too.
        self._headers = headers
        self._locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises operations on adapter ``name``."""
        return self._locks.setdefault(name, asyncio.Lock())

    async def _request(
        self, method: str, path: str, *, name: str | None = None, json: Any = None
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = await self._client.request(method, url, json=json, headers=self._headers)
        except httpx.TimeoutException as error:
            raise EngineUnavailable(f"{method} {url} timed out: {error!r}") from error
        except httpx.TransportError as error:
            raise EngineUnavailable(f"{method} {url} failed: {error!r}") from error
        if response.status_code < 400:
            return response
        message = f"{method} {path} → {response.status_code}: {_error_message(response)}"
        status = response.status_code
        if status in UNAVAILABLE_STATUSES:
            raise EngineUnavailable(message, status_code=status)
        if name is None:
            raise VLLMError(message, status_code=status)
        if status == 404:
            raise AdapterNotFound(message, status_code=status)
        if status == 400 and "already been loaded" in message:
            raise AdapterAlreadyLoaded(message, status_code=status)
        raise AdapterRejected(message, status_code=status)

    async def list_models(self) -> list[str]:
        """Served model ids: the base model's name and every loaded adapter's."""
        response = await self._request("GET", "/v1/models")
        return [str(entry["id"]) for entry in response.json().get("data", [])]

    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the adapter folder ``path`` (as the engine's machine sees it) as ``name``."""
        async with self.lock(name):
            await self._request(
                "POST",
                "/v1/load_lora_adapter",
                name=name,
                json={"lora_name": name, "lora_path": str(path)},
            )

    async def unload_adapter(self, name: str) -> None:
        """Unload ``name``; requests already running on it finish."""
        async with self.lock(name):
            await self._request(
                "POST", "/v1/unload_lora_adapter", name=name, json={"lora_name": name}
            )

    async def probe(self, name: str) -> str:
        """A one-token chat completion naming ``name``: proves it answers; returns the text."""
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 1,
            "temperature": 0.0,
        }
        async with self.lock(name):
            response = await self._request("POST", "/v1/chat/completions", name=name, json=body)
        choices = response.json().get("choices") or [{}]
        return str((choices[0].get("message") or {}).get("content") or "")
