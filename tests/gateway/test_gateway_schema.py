"""schemathesis against the whole OpenAPI schema the gateway serves (its own routes and
the learner's admin API), on a real loopback server.

The schemathesis pytest plugin does not load under pytest 9, so this runs its CLI (dev
extra) against uvicorn serving the gateway with the learner's extension, in front of the
fake engine, on a store seeded so that the success answers are reachable too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest
from gateway_fakes import ADMIN_KEY, FakeEngine, serve_asgi
from learner_fakes import adapter_folder
from round_fakes import samples_for, write_round

from gateway.apidocs import METHODS
from gateway.app import create_app
from gateway.auth import ENV_ADMIN_KEY_ID, create_key
from gateway.settings import GatewaySettings
from learner.admin_routes import AdapterAdmin
from store import (
    AdapterRegistry,
    AdapterStatus,
    AliasStore,
    AuditLog,
    KeyStore,
    RunStore,
    open_database,
)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Every check schemathesis has: no 5xx, responses (status, headers, content type, body)
# as documented, invalid input refused, valid input accepted, auth enforced, Allow
# headers right, deleted resources gone.
CHECKS = "all"
# Test cases per operation and phase; over the schema's operations this generates more
# than MIN_REQUESTS requests (some operations have fewer distinct inputs than that).
# Measured with seed 0 on 2 cores: 450 gave 14,865 requests in 542 s (9 of the suite's
# 24 minutes), 320 gave 10,813 in 410 s, 340 gives 11,542 (15% over the bar) in 462 s.
MAX_EXAMPLES = 340
MIN_REQUESTS = 10_000
# Two workers: the fuzzer's generation (one process) overlaps the app's answers (this one).
WORKERS = 2
# A request the app never answers fails its test case instead of stalling the run.
REQUEST_TIMEOUT_S = 10
TIMEOUT_S = 840


class AdapterEngine(FakeEngine):
    """The gateway tests' fake engine, with vLLM's runtime LoRA routes (promote, rollback)."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, str] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/load_lora_adapter":
            body = json.loads(request.content)
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            self.loaded.pop(json.loads(request.content)["lora_name"], None)
            return httpx.Response(200, text="Success")
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": name} for name in self.loaded]})
        return await super().handle(request)


def seed_store(settings: GatewaySettings, folders: Path) -> None:
    """What makes every route's success reachable: adapter versions of the alias (retired,
    active, rejected, candidate) with a promote to roll back, a finished run with its log,
    report, stage times and training samples (the user key's and the env admin key's), a
    failed one without samples (409), an audit entry, a user key."""
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        versions: list[tuple[str, AdapterStatus]] = [
            ("chat-v0000", "retired"),
            ("chat-v0001", "active"),
            ("chat-v0002", "rejected"),
            ("chat-v0003", "candidate"),
        ]
        for version, status in versions:
            registry.register(version, adapter_folder(folders, version), status=status)
        aliases = AliasStore(database)
        aliases.set("chat", "chat-v0000", kind="seed")
        aliases.set("chat", "chat-v0001", kind="promote", actor="env-admin")
        AuditLog(database).record(
            "env-admin", "promote", "chat-v0001", alias="chat", previous="chat-v0000"
        )
        user = create_key(KeyStore(database), "a user")
        runs = RunStore(database)
        run = runs.create("chat")
        round_dir = folders / run.run_id
        log = write_round(round_dir, run.run_id, samples_for(user.record.key_id, ENV_ADMIN_KEY_ID))
        (round_dir / "report.html").write_text("<!DOCTYPE html><title>report</title>")
        runs.update(run.run_id, status="succeeded", version="chat-v0001", log_path=str(log))
        # Failed before its training: no samples (409); nothing left queued or running,
        # so that a round can still be queued (202).
        failed = runs.create("chat")
        runs.update(
            failed.run_id,
            status="failed",
            error="no new dialogs",
            log_path=str(write_round(folders / failed.run_id, failed.run_id, None)),
        )
    finally:
        database.close()


@pytest.mark.slow
@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis (dev extra) not installed")
async def test_schemathesis_finds_nothing(settings: GatewaySettings, tmp_path: Path) -> None:
    """Examples, coverage, fuzzing and stateful phases over every operation of the schema,
    all checks, at least MIN_REQUESTS requests: no failure (no 5xx, no undocumented status
    or content type, no answer off its schema, no valid request refused)."""
    # The fuzzer sends hundreds of requests a second with one key, many of them with no or
    # a wrong key on purpose, all from one address: no rate limit here.
    limits = dataclasses.replace(
        settings.limits,
        rate_limit_per_minute=1e9,
        rate_limit_burst=1_000_000_000,
        admin_rate_limit_per_minute=1e9,
        admin_rate_limit_burst=1_000_000_000,
        auth_failures_per_window=1_000_000_000,
    )
    settings = dataclasses.replace(settings, limits=limits)
    seed_store(settings, tmp_path / "folders")
    engine = AdapterEngine()
    engine.loaded["chat-v0001"] = "/adapters/chat-v0001"
    app = create_app(settings, transport=engine.transport(), extensions=[AdapterAdmin()])
    started = time.monotonic()
    async with serve_asgi(app) as url:
        async with httpx.AsyncClient() as http:
            schema = (await http.get(f"{url}/schema/openapi.json")).json()
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            f"{url}/schema/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--checks",
            CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "0",
            "--workers",
            str(WORKERS),
            "--request-timeout",
            str(REQUEST_TIMEOUT_S),
            "--no-color",
            "--generation-database",
            "none",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=TIMEOUT_S)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-8000:]
    # Every operation, the learner's admin API's included, was tested.
    paths = schema["paths"]
    operations = sum(method in METHODS for item in paths.values() for method in item)
    assert {"/admin/adapters", "/admin/learner/status", "/v1/chat/completions"} <= set(paths)
    tested = re.search(r"Tested: (\d+)", report)
    assert tested is not None and int(tested.group(1)) == operations, report[-2000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated is not None and int(generated.group(1)) >= MIN_REQUESTS, report[-2000:]
    print(f"schemathesis: {generated.group(1)} requests in {time.monotonic() - started:.0f}s")
