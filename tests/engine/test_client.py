"""The runtime LoRA client against a faked vLLM (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest

from engine import (
    AdapterAlreadyLoaded,
    AdapterNotFound,
    AdapterRejected,
    EngineUnavailable,
    VLLMClient,
    VLLMError,
)

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def vllm_error(status: int, message: str) -> httpx.Response:
    """vLLM's error body, as its LoRA routes send it."""
    error = {"message": message, "type": "InvalidUserInput", "param": None, "code": status}
    return httpx.Response(status, json={"error": error})


def client_for(handler: Handler, api_key: str | None = None) -> VLLMClient:
    transport = httpx.MockTransport(handler)
    return VLLMClient(
        "http://engine.test/v1", api_key=api_key, client=httpx.AsyncClient(transport=transport)
    )


async def test_load_and_unload_send_vllm_contract() -> None:
    """load/unload POST lora_name (+ lora_path) to vLLM's routes, with the API key."""
    seen: list[tuple[str, dict[str, str], str | None]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            (request.url.path, json.loads(request.content), request.headers.get("authorization"))
        )
        return httpx.Response(200, text="Success")

    client = client_for(handler, api_key="k")
    await client.load_adapter("chat-v0001", "/adapters/chat-v0001")
    await client.unload_adapter("chat-v0001")
    assert seen == [
        (
            "/v1/load_lora_adapter",
            {"lora_name": "chat-v0001", "lora_path": "/adapters/chat-v0001"},
            "Bearer k",
        ),
        ("/v1/unload_lora_adapter", {"lora_name": "chat-v0001"}, "Bearer k"),
    ]


@pytest.mark.parametrize(
    ("operation", "response", "error"),
    [
        (
            "load",
            vllm_error(400, "The lora adapter 'a' has already been loaded. If you want ..."),
            AdapterAlreadyLoaded,
        ),
        (
            "load",
            vllm_error(404, "Loading lora a failed: No adapter found"),
            AdapterNotFound,
        ),
        (
            "load",
            vllm_error(400, "The lora adapter 'a' conflicts with a served base model."),
            AdapterRejected,
        ),
        ("load", vllm_error(500, "rank 128 is greater than max_lora_rank 64"), AdapterRejected),
        ("unload", vllm_error(404, "The lora adapter 'a' cannot be found."), AdapterNotFound),
        ("probe", vllm_error(404, "The model `a` does not exist."), AdapterNotFound),
        ("load", httpx.Response(503, text="overloaded"), EngineUnavailable),
        ("list", httpx.Response(500, text="oops"), VLLMError),
    ],
)
async def test_vllm_refusals_map_to_typed_errors(
    operation: str, response: httpx.Response, error: type[VLLMError]
) -> None:
    """vLLM's 400/404/5xx answers become the matching typed error, with vLLM's message."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return response

    client = client_for(handler)
    calls = {
        "load": lambda: client.load_adapter("a", "/x"),
        "unload": lambda: client.unload_adapter("a"),
        "probe": lambda: client.probe("a"),
        "list": client.list_models,
    }
    with pytest.raises(error) as caught:
        await calls[operation]()
    assert type(caught.value) is error
    assert caught.value.status_code == response.status_code


async def test_unreachable_engine_is_unavailable() -> None:
    """A refused connection raises EngineUnavailable, not an httpx error."""

    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EngineUnavailable, match="connection refused"):
        await client_for(handler).load_adapter("a", "/x")


async def test_list_models_and_probe() -> None:
    """list_models returns the ids; probe asks one greedy token from the named adapter."""
    bodies: list[dict[str, object]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "base"}, {"id": "chat-v0000"}]})
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Hi"}}]})

    client = client_for(handler)
    assert await client.list_models() == ["base", "chat-v0000"]
    assert await client.probe("chat-v0000") == "Hi"
    assert bodies[0]["model"] == "chat-v0000"
    assert bodies[0]["max_tokens"] == 1 and bodies[0]["temperature"] == 0.0


async def test_one_lock_per_adapter_name() -> None:
    """Operations on one name never overlap; operations on different names do."""
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    overall = {"now": 0, "peak": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        name = json.loads(request.content)["lora_name"]
        active[name] = active.get(name, 0) + 1
        overall["now"] += 1
        peak[name] = max(peak.get(name, 0), active[name])
        overall["peak"] = max(overall["peak"], overall["now"])
        await asyncio.sleep(0.05)
        active[name] -= 1
        overall["now"] -= 1
        return httpx.Response(200, text="Success")

    client = client_for(handler)
    await asyncio.gather(
        client.load_adapter("a", "/a"),
        client.unload_adapter("a"),
        client.load_adapter("a", "/a2"),
        client.load_adapter("b", "/b"),
        client.unload_adapter("b"),
    )
    assert peak == {"a": 1, "b": 1}
    assert overall["peak"] == 2
    assert client.lock("a") is client.lock("a") and client.lock("a") is not client.lock("b")
