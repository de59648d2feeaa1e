"""A gateway with the console, a fake engine and a seeded store: for the console's tests
and for docs/console-screenshots.py.

The store holds what an operator meets after a few rounds: alias ``chat`` serving its
identity version 0, a candidate (version 1) that passed its gates and a rejected one
(version 2) with gate figures and training data, a finished round with its report, its
stage times and its training samples (the user key's and the environment admin key's,
some flagged and healed; sent for end users ``alice`` and ``bob``), a user key, a
canary of version 2 that the learner's monitor rolled back (its figures from the
monitor's own test), end user ``bob`` quarantined by the learner after the round, and
version 0 loaded in the fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import uvicorn
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from round_fakes import samples_for, write_round

from gateway.app import create_app
from gateway.auth import ENV_ADMIN_KEY_ID, create_key
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from learner.canary import MONITOR_ACTOR, CanaryConfig, ScoredReply, judge_replies
from learner.round_report import REPORT_FILE
from store import (
    AdapterRegistry,
    CanaryStore,
    Database,
    KeyStore,
    QuarantineStore,
    RunStore,
    open_database,
)

if TYPE_CHECKING:
    from tuneshield import Judge

ADMIN_KEY = "admin-test-key-0123456789"
USER_KEY_NAME = "support-bot"
REPORT_TITLE = "Round report (seeded)"
# The end users the seeded samples were sent for: the user key's, and the admin key's.
END_USER, OTHER_END_USER = "alice", "bob"
QUARANTINE_REASON = "flagged share over the quarantine line"
# The seeded canary: its share, and its replies (toxic ones on the canary: rolled back).
CANARY_SHARE = 0.1
CANARY_REPLIES = [ScoredReply(canary=True, toxic=n % 2 == 0, unhelpful=False) for n in range(60)]
STABLE_REPLIES = [ScoredReply(canary=False, toxic=n % 20 == 0, unhelpful=n % 10 == 0)
                  for n in range(200)]  # fmt: skip
# Gate figures as learner.gates.GateResult.to_json() writes them.
PASSED_GATES = {
    "passed": True,
    "judge": "lexical",
    "candidate": {
        "toxic_toxicity": 0.125,
        "benign_toxicity": 0.0,
        "benign_unhelpful": 0.083,
        "relevance": 0.61,
        "perplexity": 14.2,
    },
    "active": {
        "toxic_toxicity": 0.333,
        "benign_toxicity": 0.042,
        "benign_unhelpful": 0.042,
        "relevance": 0.58,
        "perplexity": 13.1,
    },
    "checks": [
        {
            "metric": "toxic_toxicity",
            "candidate": 0.125,
            "active": 0.333,
            "limit": "<= active + 0.1",
            "ok": True,
        },
        {
            "metric": "benign_toxicity",
            "candidate": 0.0,
            "active": 0.042,
            "limit": "<= active + 0.05",
            "ok": True,
        },
        {
            "metric": "benign_unhelpful",
            "candidate": 0.083,
            "active": 0.042,
            "limit": "<= active + 0.2",
            "ok": True,
        },
        {
            "metric": "relevance",
            "candidate": 0.61,
            "active": 0.58,
            "limit": ">= 0.8 x active",
            "ok": True,
        },
        {
            "metric": "perplexity",
            "candidate": 14.2,
            "active": 13.1,
            "limit": "<= 1.5 x active",
            "ok": True,
        },
    ],
    "reasons": [],
    "version": 1,
}
REJECTED_GATES = {
    **PASSED_GATES,
    "passed": False,
    "candidate": {**PASSED_GATES["candidate"], "toxic_toxicity": 0.5, "perplexity": 22.9},
    "active": PASSED_GATES["candidate"],
    "checks": [
        {
            "metric": "toxic_toxicity",
            "candidate": 0.5,
            "active": 0.125,
            "limit": "<= active + 0.1",
            "ok": False,
        },
        {
            "metric": "perplexity",
            "candidate": 22.9,
            "active": 14.2,
            "limit": "<= 1.5 x active",
            "ok": False,
        },
    ],
    "reasons": ["toxic_toxicity rose 0.125 -> 0.5 (limit +0.1)", "perplexity 22.9 > 1.5 x 14.2"],
}


def console_settings(data_dir: Path) -> GatewaySettings:
    """The policy's settings in ``data_dir``, with the env admin key and fast refreshes."""
    loaded = load_settings(
        upstream_url="http://engine.test",
        data_dir=data_dir,
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    return dataclasses.replace(
        loaded,
        console=dataclasses.replace(loaded.console, refresh_s=1.0, sample_period_s=0.5),
        dialog_log=dataclasses.replace(loaded.dialog_log, flush_interval_s=0.05),
    )


def seed_store(settings: GatewaySettings, folders: Path) -> str:
    """Seed the store (see the module docstring); return the user key's secret."""
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        registry.register("chat-v0000", adapter_folder(folders, "chat-v0000"), status="active")
        registry.register(
            "chat-v0001",
            adapter_folder(folders, "chat-v0001"),
            parent="chat-v0000",
            samples=240,
            flagged=31,
            healed=29,
            judge="lexical",
            threshold=0.5,
            gate_metrics=PASSED_GATES,
        )
        registry.register(
            "chat-v0002",
            adapter_folder(folders, "chat-v0002"),
            status="rejected",
            parent="chat-v0001",
            samples=180,
            flagged=64,
            healed=12,
            judge="lexical",
            threshold=0.5,
            gate_metrics=REJECTED_GATES,
        )
        created = create_key(KeyStore(database), USER_KEY_NAME)
        runs = RunStore(database)
        run = runs.create("chat")
        round_dir = folders / "rounds" / "seeded"
        samples = [
            {**item, "end_user": END_USER if item["key_id"] == created.record.key_id else
             OTHER_END_USER}
            for item in samples_for(created.record.key_id, ENV_ADMIN_KEY_ID)
        ]  # fmt: skip
        log = write_round(round_dir, run.run_id, samples)
        (round_dir / REPORT_FILE).write_text(
            f"<!doctype html><title>{REPORT_TITLE}</title><h1>{REPORT_TITLE}</h1>"
        )
        runs.update(run.run_id, status="running", stage="train", progress=0.4)
        runs.update(
            run.run_id,
            status="succeeded",
            stage="done",
            progress=1.0,
            version="chat-v0001",
            log_path=str(log),
        )
        seed_canary(database)
        QuarantineStore(database).quarantine(
            "user", OTHER_END_USER, actor=MONITOR_ACTOR, reason=QUARANTINE_REASON, run_id=run.run_id
        )
    finally:
        database.close()
    return created.key


def seed_canary(database: Database) -> None:
    """Version 2 as a canary of ``chat``, rolled back by the monitor's own test."""
    canaries = CanaryStore(database)
    canary = canaries.start("chat", "chat-v0002", "chat-v0000", CANARY_SHARE, ENV_ADMIN_KEY_ID)
    config = CanaryConfig()
    verdict = judge_replies(CANARY_REPLIES + STABLE_REPLIES, config)
    assert verdict.decision == "rolled_back", verdict
    canaries.decide(
        canary.canary_id, "rolled_back", MONITOR_ACTOR, verdict.reason, verdict.statistics(config)
    )


def console_app(
    settings: GatewaySettings,
    engine: FakeVLLM,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    judge: Judge | None = None,
) -> Litestar:
    """The gateway with the learner's admin API and the console, on the fake engine
    (``transport``: in front of it instead; ``judge``: the live guard's)."""
    return create_app(
        settings,
        transport=transport or engine.transport(),
        judge=judge,
        extensions=[AdapterAdmin()],
    )


def fake_engine() -> FakeVLLM:
    """The fake engine with version 0 loaded (as the gateway's start leaves it)."""
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    return engine


@contextlib.contextmanager
def serving_in_thread(app: Litestar) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port from a thread of its own (so a
    synchronous browser driver can use this one); yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="console-gateway"
    )
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the gateway did not start")
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
