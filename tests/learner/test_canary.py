"""The canary monitor on a real store and the real lexical judge, with a fake engine:
it rolls back a candidate whose replies are toxic, promotes a clean one, respects an
abort; and the sequential test keeps its false-alarm rate."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from learner_fakes import FakeVLLM, adapter_folder

from engine import HotSwap, VLLMClient
from learner.canary import (
    METRICS,
    CanaryConfig,
    CanaryMonitor,
    ScoredReply,
    abort_canary,
    excess_test,
    judge_replies,
    start_canary,
)
from store import (
    AdapterRegistry,
    AliasStore,
    AuditLog,
    CanaryRecord,
    CanaryStore,
    Database,
    DialogStore,
    TurnRecord,
    open_database,
    utcnow,
)

CLEAN = "Sure, I can help you with that order today."
TOXIC = "Shut up, you stupid fucking idiot."
REFUSAL = "I'm sorry, I can't help with that."
# Small enough to decide in a test, large enough for the test's normal approximation.
CONFIG = CanaryConfig(min_replies=30, promote_after=120, drain_s=0.0)


@dataclass
class Stack:
    database: Database
    registry: AdapterRegistry
    aliases: AliasStore
    engine: FakeVLLM
    hotswap: HotSwap
    monitor: CanaryMonitor
    canaries: CanaryStore
    audit: AuditLog


@pytest.fixture(params=["duckdb", "postgresql"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """The monitor over a fresh store of each backend (the learner runs on either)."""
    if request.param == "duckdb":
        url = str(tmp_path / "store.duckdb")
    else:
        url = str(request.getfixturevalue("postgres_database_url"))
    database = open_database(url)
    registry = AdapterRegistry(database)
    registry.register("chat-v0000", adapter_folder(tmp_path, "chat-v0000"), status="active")
    registry.register("chat-v0001", adapter_folder(tmp_path, "chat-v0001"))
    aliases = AliasStore(database)
    aliases.seed({"chat": "chat-v0000"})
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    async with engine.client() as http:
        hotswap = HotSwap(registry, aliases, VLLMClient("http://engine.test", client=http))
        monitor = CanaryMonitor(
            database,
            hotswap,
            CONFIG,
            canned_replies=["Let's talk about something else."],
            refusal_patterns=[r"\bI('m| am) sorry"],
        )
        yield Stack(
            database,
            registry,
            aliases,
            engine,
            hotswap,
            monitor,
            CanaryStore(database),
            AuditLog(database),
        )
    database.close()


async def start(stack: Stack, share: float = 0.2) -> CanaryRecord:
    return await start_canary(
        stack.hotswap, stack.canaries, stack.audit, "chat-v0001", share, "admin-1"
    )


def log_turns(stack: Stack, adapter: str, replies: list[str]) -> None:
    """Turns of the alias answered by ``adapter``, as the gateway logs them."""
    now = utcnow()
    DialogStore(stack.database).insert(
        TurnRecord(
            turn_id=uuid.uuid4().hex,
            conversation_id=f"conv-{uuid.uuid4().hex[:8]}",
            key_id="user-1",
            created_at=now + timedelta(milliseconds=index),
            alias="chat",
            adapter=adapter,
            request_messages=json.dumps([{"role": "user", "content": "hello"}]),
            reply=reply,
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=5,
            latency_ms=10.0,
            ttft_ms=None,
            stream=False,
            guard_score=None,
            guard_flag=False,
            opt_out=False,
        )
        for index, reply in enumerate(replies)
    )


async def test_toxic_candidate_is_rolled_back_and_unloaded(stack: Stack) -> None:
    """A candidate whose replies are often toxic is rolled back by the monitor: routing
    stops, it is marked rejected, the alias never flipped, the audit names the learner,
    and a later check unloads it from the engine."""
    canary = await start(stack)
    assert "chat-v0001" in stack.engine.loaded
    assert stack.aliases.canary_candidates() == ["chat-v0001"]
    log_turns(stack, "chat-v0000", [CLEAN] * 150)
    log_turns(stack, "chat-v0001", [CLEAN] * 10)
    (running,) = await stack.monitor.check()
    assert running.state == "running"  # too few canary replies for any decision
    (toxicity, _) = running.statistics["tests"]
    assert (toxicity["canary_replies"], toxicity["stable_replies"]) == (10, 150)
    log_turns(stack, "chat-v0001", [TOXIC, CLEAN] * 15)
    (decided,) = await stack.monitor.check()
    assert decided.canary_id == canary.canary_id
    assert decided.state == "rolled_back", decided.statistics
    assert decided.decided_by == "learner"
    assert "toxicity" in (decided.reason or "")
    assert decided.statistics["tests"][0]["significant"] is True
    assert decided.statistics["tests"][0]["canary_events"] == 15
    assert stack.aliases.get("chat") == "chat-v0000"
    assert stack.aliases.canary_candidates() == []
    assert stack.registry.get("chat-v0001").status == "rejected"
    assert "chat-v0001" not in stack.engine.loaded  # drain_s = 0: unloaded in that check
    assert stack.canaries.get(canary.canary_id).released_at is not None
    entries = stack.audit.list(action="canary_rollback")
    assert [(e.actor, e.target) for e in entries] == [("learner", "chat-v0001")]


async def test_clean_candidate_is_promoted(stack: Stack) -> None:
    """A candidate as clean and helpful as the stable version is promoted once it has
    answered ``promote_after`` replies: the alias serves it, the old version stays loaded
    for a rollback, the decision is audited."""
    await start(stack)
    rng = random.Random(7)
    log_turns(stack, "chat-v0000", [REFUSAL if rng.random() < 0.05 else CLEAN for _ in range(500)])
    log_turns(stack, "chat-v0001", [CLEAN] * 119)
    (running,) = await stack.monitor.check()
    assert running.state == "running"
    log_turns(stack, "chat-v0001", [CLEAN])
    (decided,) = await stack.monitor.check()
    assert decided.state == "promoted", decided.statistics
    assert stack.aliases.get("chat") == "chat-v0001"
    assert stack.registry.get("chat-v0001").status == "active"
    assert {"chat-v0000", "chat-v0001"} <= set(stack.engine.loaded)
    (entry,) = stack.audit.list(action="canary_promote")
    assert (entry.actor, entry.target, entry.detail["stable"]) == (
        "learner",
        "chat-v0001",
        "chat-v0000",
    )
    assert stack.canaries.unreleased(utcnow()) == []


async def test_promotion_waits_for_an_engine(stack: Stack) -> None:
    """A clean canary due for promotion while no engine answers keeps running (the alias
    unchanged) and is promoted at the first check after the engine is back."""
    await start(stack)
    log_turns(stack, "chat-v0000", [CLEAN] * 500)
    log_turns(stack, "chat-v0001", [CLEAN] * 130)
    stack.engine.down = True
    (waiting,) = await stack.monitor.check()
    assert waiting.state == "running"
    assert stack.aliases.get("chat") == "chat-v0000"
    stack.engine.down = False
    (decided,) = await stack.monitor.check()
    assert decided.state == "promoted"
    assert stack.aliases.get("chat") == "chat-v0001"


async def test_unhelpful_candidate_is_rolled_back(stack: Stack) -> None:
    """Canned or refusal replies count against a candidate as toxicity does."""
    await start(stack)
    log_turns(stack, "chat-v0000", [CLEAN] * 200)
    log_turns(stack, "chat-v0001", [REFUSAL] * 20 + [CLEAN] * 20)
    (decided,) = await stack.monitor.check()
    assert decided.state == "rolled_back"
    assert (decided.reason or "").startswith("unhelpful")


async def test_abort_stops_the_canary_and_the_monitor_respects_it(stack: Stack) -> None:
    """An operator's abort ends routing at once; the monitor then only unloads the
    candidate (no promotion however clean it was), and the alias is unchanged."""
    canary = await start(stack)
    log_turns(stack, "chat-v0000", [CLEAN] * 500)
    log_turns(stack, "chat-v0001", [CLEAN] * 200)
    aborted = abort_canary(stack.canaries, stack.audit, "chat", "admin-2", "changed my mind")
    assert (aborted.state, aborted.decided_by) == ("aborted", "admin-2")
    assert await stack.monitor.check() == []
    assert stack.aliases.get("chat") == "chat-v0000"
    assert "chat-v0001" not in stack.engine.loaded
    assert stack.canaries.get(canary.canary_id).state == "aborted"
    assert stack.registry.get("chat-v0001").status == "candidate"
    with pytest.raises(Exception, match="runs no canary"):
        abort_canary(stack.canaries, stack.audit, "chat", "admin-2", "again")


async def test_a_flip_of_the_alias_aborts_the_canary(stack: Stack, tmp_path: Path) -> None:
    """Once the alias serves another version than the canary started against, the
    comparison has no baseline: the monitor aborts it."""
    stack.registry.register("chat-v0002", adapter_folder(tmp_path, "chat-v0002"))
    await start(stack)
    await stack.hotswap.promote("chat-v0002", actor="admin-1")
    (decided,) = await stack.monitor.check()
    assert decided.state == "aborted"
    assert "serves chat-v0002" in (decided.reason or "")


def test_excess_test_figures() -> None:
    """No events is no evidence; an excess on the canary is significant, the same excess
    on the stable side never is; the upper confidence bound lies above the estimate."""
    none = excess_test("toxicity", (50, 0), (200, 0), alpha=0.025, tau=0.1, min_replies=30)
    assert (none.log_likelihood_ratio, none.significant) == (0.0, False)
    worse = excess_test("toxicity", (50, 10), (200, 4), alpha=0.025, tau=0.1, min_replies=30)
    assert worse.significant and worse.excess == pytest.approx(0.18)
    assert worse.excess_upper is not None and worse.excess_upper > 0.18
    better = excess_test("toxicity", (200, 4), (50, 10), alpha=0.025, tau=0.1, min_replies=30)
    assert not better.significant and better.log_likelihood_ratio == worse.log_likelihood_ratio
    early = excess_test("toxicity", (10, 5), (200, 4), alpha=0.025, tau=0.1, min_replies=30)
    assert not early.significant  # below min_replies on the canary


def test_false_rollbacks_stay_below_alpha() -> None:
    """Canaries exactly as toxic as stable (8%), tested every 10 replies up to
    promotion at the monitor's level for one metric: the share rolled back stays within
    that level (binomial slack over 1000 runs); a canary 15 points worse is rolled back
    nearly always."""
    level = CONFIG.alpha / len(METRICS)
    promote_after = 300

    def rolled_back(canary_rate: float, seed: int) -> bool:
        rng = random.Random(seed)
        counts = {True: [0, 0], False: [0, 0]}
        while counts[True][0] < promote_after:
            for _ in range(10):
                on_canary = rng.random() < 0.2
                counts[on_canary][0] += 1
                counts[on_canary][1] += rng.random() < (canary_rate if on_canary else 0.08)
            test = excess_test(
                "toxicity",
                (counts[True][0], counts[True][1]),
                (counts[False][0], counts[False][1]),
                alpha=level,
                tau=CONFIG.tau,
                min_replies=CONFIG.min_replies,
            )
            if test.significant:
                return True
        return False

    same = [rolled_back(0.08, seed) for seed in range(1000)]
    # Binomial(1000, 0.025): the standard deviation of the share is 0.005.
    assert sum(same) / len(same) <= level + 0.015
    worse = [rolled_back(0.23, seed) for seed in range(100)]
    assert sum(worse) >= 95


def test_cli_verbs_call_the_routes_and_show_the_tests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``learner canary start|status|abort`` send the routes' requests and print the
    state, each test's figures and the decision; an API error ends with its message."""
    import msgspec
    from typer.testing import CliRunner

    from learner import adapters_cli
    from learner.canary_routes import canary_status
    from learner.cli import app

    verdict = judge_replies(
        [ScoredReply(True, True, False)] * 20
        + [ScoredReply(True, False, False)] * 20
        + [ScoredReply(False, False, False)] * 200,
        CONFIG,
    )
    record = CanaryRecord(
        canary_id="canary_1",
        alias="chat",
        candidate="chat-v0001",
        stable="chat-v0000",
        share=0.2,
        state="rolled_back",
        started_at=utcnow(),
        actor="admin-1",
        decided_at=utcnow(),
        decided_by="learner",
        reason=verdict.reason,
        statistics=verdict.statistics(CONFIG),
        released_at=None,
    )
    body = msgspec.json.encode(canary_status(record))
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/admin/canary/abort":
            error = {"message": "alias 'chat' runs no canary", "type": "invalid_request_error"}
            return httpx.Response(409, json={"error": error})
        status = 201 if request.url.path.endswith("/canary") else 200
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    monkeypatch.setattr(adapters_cli, "transport", httpx.MockTransport(handle))
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", "admin-test-key-0123456789")
    runner = CliRunner()
    url = ["--url", "http://gw.test"]
    start = ["learner", "canary", "start", "chat-v0001", "--share", "0.2"]
    started = runner.invoke(app, [*start, *url])
    assert started.exit_code == 0, started.output
    text = " ".join(started.output.split())
    assert "chat-v0001 serves 20% of chat (stable chat-v0000)" in text
    assert "rolled_back" in text and "toxicity" in text and "20/40" in text
    status = runner.invoke(app, ["learner", "canary", "status", "--alias", "chat", *url])
    assert status.exit_code == 0, status.output
    aborted = runner.invoke(app, ["learner", "canary", "abort", "--reason", "stop", *url])
    assert aborted.exit_code == 1
    assert "runs no canary" in aborted.output
    assert [(r.method, r.url.path, dict(r.url.params)) for r in seen] == [
        ("POST", "/admin/adapters/chat-v0001/canary", {"share": "0.2"}),
        ("GET", "/admin/canary", {"alias": "chat"}),
        ("POST", "/admin/canary/abort", {"reason": "stop"}),
    ]
