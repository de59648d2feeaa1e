"""Helpers of the learner tests: a fake vLLM with runtime LoRA, registered adapter folders."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from store import REQUIRED_FILES, AdapterRegistry, Database, open_database


class FakeVLLM:
    """vLLM's LoRA routes and a chat route behind ``httpx.MockTransport``; ``down`` refuses all."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.probe_status: int | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport())

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            self.calls.append(("load", name))
            if name in self.loaded:
                message = f"The lora adapter '{name}' has already been loaded."
                return httpx.Response(400, json={"error": {"message": message}})
            self.loaded[name] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            self.calls.append(("unload", name))
            if self.loaded.pop(name, None) is None:
                return httpx.Response(404, json={"error": {"message": "cannot be found"}})
            return httpx.Response(200, text="Success")
        if path == "/v1/chat/completions":
            model = body["model"]
            self.calls.append(("chat", model))
            if self.probe_status is not None:
                return httpx.Response(self.probe_status, json={"error": {"message": "broken"}})
            if model not in self.loaded:
                return httpx.Response(404, json={"error": {"message": f"{model} not found"}})
            message = {"role": "assistant", "content": f"from {model}"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            reply = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
            return httpx.Response(200, json=reply)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": name} for name in self.loaded]})
        return httpx.Response(200)


def adapter_folder(root: Path, name: str) -> Path:
    """A folder with the files the registry requires (contents irrelevant to a fake engine)."""
    folder = root / name
    folder.mkdir(parents=True)
    for file in REQUIRED_FILES:
        (folder / file).write_text("{}")
    return folder


def open_registry(path: Path | str) -> tuple[Database, AdapterRegistry]:
    database = open_database(path)
    return database, AdapterRegistry(database)
