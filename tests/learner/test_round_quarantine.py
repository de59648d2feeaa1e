"""Attribution and quarantine: flagged samples per key and end user, the learner's
automatic quarantine after a round (and what it keeps out of the next one), and the admin
API and CLI to list, quarantine by hand and release."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from litestar.testing import AsyncTestClient, TestClient
from litestar.testing.transport import TestClientTransport
from round_fakes import finished_round, sample
from typer.testing import CliRunner

from engine import HotSwap, VLLMClient
from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner import adapters_cli
from learner.admin_routes import AdapterAdmin
from learner.cli import app as cli
from learner.quarantine import QuarantineConfig, quarantine_after_round
from learner.round_samples import SampleCounts
from learner.rounds import LearnerConfig, RoundRunner
from store import (
    AdapterRegistry,
    AliasStore,
    AuditLog,
    Database,
    DialogStore,
    QuarantineStore,
    RunStore,
    TurnRecord,
    open_database,
    utcnow,
)
from tuneshield import PolicyError, policies_dir

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
POLICY = QuarantineConfig(enabled=True, rounds=1, min_flagged=3, max_flagged_rate=0.5)
POLICIES = policies_dir()
# What the stand-in worker's judge flags: the attackers' word.
TOXIC = "idiot"


def user_sample(number: int, key_id: str, user: str | None, toxic: bool) -> dict[str, object]:
    row = sample(number, key_id, 0.9 if toxic else 0.1, "you idiot" if toxic else "cats")
    return {**row, "end_user": user}


# -- the policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("max_flagged_rate: 0.5", "max_flagged_rate: 1.5", "max_flagged_rate"),
        ("min_flagged: 3", "min_flagged: 0", "min_flagged"),
        ("kinds: [key, user]", "kinds: [key, team]", "kinds"),
    ],
)
def test_a_bad_quarantine_policy_names_the_setting(
    tmp_path: Path, old: str, new: str, named: str
) -> None:
    """policies/learner.yaml's quarantine section is read into typed settings once; a bad
    value stops there with a message naming the file, the section and the key."""
    policy = POLICIES / "learner.yaml"
    text = policy.read_text(encoding="utf-8")
    assert old in text
    (tmp_path / "learner.yaml").write_text(text.replace(old, new), encoding="utf-8")
    assert LearnerConfig.from_policy(POLICIES).quarantine.kinds == ("key", "user")
    with pytest.raises(PolicyError, match=r"learner\.yaml \[quarantine\].*" + named):
        LearnerConfig.from_policy(tmp_path)


# -- automatic quarantine on rounds' samples ------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = open_database(tmp_path / "store.duckdb")
    yield database
    database.close()


def test_a_round_quarantines_keys_and_users_over_the_line(
    database: Database, tmp_path: Path
) -> None:
    """After a round: a key with 3 of 4 samples flagged is quarantined, one with 2 of 2
    (under min_flagged) and one with 3 of 6 (not above the rate) are not; an end user
    over the line is, even on a key that is not; a second pass adds nothing; each
    quarantine is audited as the learner's, with the round and its counts."""
    runs = RunStore(database)
    rows = [
        *(user_sample(n, "key_bad", None, n != 4) for n in range(1, 5)),
        *(user_sample(n, "key_few", None, True) for n in range(5, 7)),
        *(user_sample(n, "key_shared", "troll", True) for n in range(7, 10)),
        *(user_sample(n, "key_shared", "nice", False) for n in range(10, 13)),
    ]
    run = finished_round(runs, tmp_path / "rounds", rows)
    since = utcnow() - timedelta(hours=1)
    done = quarantine_after_round(
        database, SampleCounts(10), run.run_id, POLICY, excluded_from=since, scan=10
    )
    again = quarantine_after_round(
        database, SampleCounts(10), run.run_id, POLICY, excluded_from=since, scan=10
    )
    off = quarantine_after_round(
        database,
        SampleCounts(10),
        run.run_id,
        dataclasses.replace(POLICY, enabled=False, min_flagged=1),
        excluded_from=since,
        scan=10,
    )
    active = QuarantineStore(database).active()
    audit = AuditLog(database).list(action="quarantine")
    assert [(o.kind, o.subject, o.flagged, o.samples) for o in done] == [
        ("key", "key_bad", 3, 4),
        ("user", "troll", 3, 3),
    ]
    assert again == [] and off == []
    assert {(r.kind, r.subject) for r in active} == {("key", "key_bad"), ("user", "troll")}
    assert all(r.run_id == run.run_id and r.excluded_from == since for r in active)
    assert all(r.actor == "learner" for r in active)
    assert {(e.actor, e.target, e.detail["flagged"]) for e in audit} == {
        ("learner", "key:key_bad", 3),
        ("learner", "user:troll", 3),
    }


def test_only_subjects_of_the_latest_round_are_judged(database: Database, tmp_path: Path) -> None:
    """With two rounds in the window, counts are summed over both, but a subject the
    latest round did not meet is not quarantined on older evidence (a released one would
    otherwise come straight back)."""
    runs = RunStore(database)
    older = finished_round(
        runs,
        tmp_path / "rounds",
        [user_sample(n, "key_slow", None, True) for n in (1, 2)]
        + [user_sample(n, "key_gone", None, True) for n in (3, 4, 5)],
    )
    newest = finished_round(
        runs, tmp_path / "rounds", [user_sample(n, "key_slow", None, True) for n in (6, 7)]
    )
    window = dataclasses.replace(POLICY, rounds=2)
    one = quarantine_after_round(
        database, SampleCounts(10), newest.run_id, POLICY, excluded_from=None, scan=10
    )
    two = quarantine_after_round(
        database, SampleCounts(10), newest.run_id, window, excluded_from=None, scan=10
    )
    assert older.run_id != newest.run_id
    assert one == []
    assert [(o.subject, o.flagged, [r.run_id for r in o.rounds]) for o in two] == [
        ("key_slow", 4, [newest.run_id, older.run_id])
    ]


# -- a learner round quarantines, and the next one leaves the attacker out ------------

# The stand-in worker: flags the snapshot's samples that hold TOXIC, writes them as the
# round's samples.jsonl (key and end user included), then finishes as fake_worker does.
WORKER = f"""
import json, runpy, sys
from pathlib import Path
from learner.contracts import decode_round_spec
from learner.snapshot import read_snapshot_samples
round_dir = Path(sys.argv[1])
spec = decode_round_spec((round_dir / "round.json").read_bytes())
with (round_dir / "samples.jsonl").open("w") as out:
    for row in read_snapshot_samples(Path(spec.snapshot)):
        row["toxic"] = {TOXIC!r} in row["response"]
        out.write(json.dumps(row) + "\\n")
sys.argv = [{str(FAKE_WORKER)!r}, str(round_dir), "pass"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log_turns(database: Database, key_id: str, texts: list[str], tag: str) -> None:
    at = utcnow() - timedelta(seconds=30)
    turns = []
    for index, text in enumerate(texts):
        messages = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": text},
        ]
        turns.append(
            TurnRecord(
                turn_id=f"{tag}-{key_id}-{index}",
                conversation_id=f"{tag}-{key_id}-{index}",
                key_id=key_id,
                created_at=at + timedelta(milliseconds=index),
                alias="chat",
                adapter="chat-v0000",
                request_messages=json.dumps(messages),
                reply="ok",
                finish_reason="stop",
                prompt_tokens=None,
                completion_tokens=None,
                latency_ms=1.0,
                ttft_ms=None,
                stream=False,
                guard_score=None,
                guard_flag=False,
                opt_out=False,
            )
        )
    DialogStore(database).insert(turns)


@pytest.fixture
async def runner(tmp_path: Path, database: Database) -> AsyncIterator[RoundRunner]:
    registry, aliases, engine = AdapterRegistry(database), AliasStore(database), FakeVLLM()
    client = VLLMClient("http://engine.test", client=engine.client())
    registry.register("chat-v0000", adapter_folder(tmp_path, "chat-v0000"), status="active")
    aliases.set("chat", "chat-v0000")
    engine.loaded["chat-v0000"] = str(tmp_path / "chat-v0000")
    config = LearnerConfig.from_policy()
    config = dataclasses.replace(
        config,
        worker=dataclasses.replace(config.worker, poll_s=0.05, settle_s=0.0, timeout_s=60),
        quarantine=POLICY,
    )
    yield RoundRunner(
        database,
        registry,
        RunStore(database),
        HotSwap(registry, aliases, client),
        base_model="tiny",
        data_dir=tmp_path / "data",
        adapters_dir=tmp_path / "data" / "adapters",
        config=config,
        worker_command=lambda round_dir: [sys.executable, "-c", WORKER, str(round_dir)],
    )
    await client.aclose()


async def test_a_round_quarantines_an_attacker_whose_turns_miss_the_next_round(
    runner: RoundRunner, database: Database
) -> None:
    """Round 1 meets an attacker key and a benign one: the learner quarantines the
    attacker (in the round's summary and the audit log). Both go on chatting (both are
    served); round 2's snapshot holds the benign key's turns only."""
    log_turns(database, "key_attacker", [f"you {TOXIC} {n}" for n in range(4)], "r1")
    log_turns(database, "key_benign", [f"tell me about cats {n}" for n in range(4)], "r1")
    first = await runner.run()
    summary = json.loads((runner.round_dir(first.run_id) / "summary.json").read_text())
    log_turns(database, "key_attacker", [f"you {TOXIC} again {n}" for n in range(4)], "r2")
    log_turns(database, "key_benign", [f"and dogs {n}" for n in range(4)], "r2")
    second = await runner.run()
    second_samples = [
        json.loads(line)
        for line in (runner.round_dir(second.run_id) / "samples.jsonl").read_text().splitlines()
    ]
    assert first.status == "succeeded" and second.status == "succeeded", second.error
    assert [(q["kind"], q["subject"], q["flagged"]) for q in summary["quarantined"]] == [
        ("key", "key_attacker", 4)
    ]
    assert [r.subject for r in QuarantineStore(database).active()] == ["key_attacker"]
    assert {row["key_id"] for row in second_samples} == {"key_benign"}
    assert len(second_samples) == 4
    audit = AuditLog(database).list(action="quarantine")
    assert [(e.actor, e.target, e.detail["run_id"]) for e in audit] == [
        ("learner", "key:key_attacker", first.run_id)
    ]


# -- the admin API and the CLI --------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    settings = load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    database = open_database(settings.store_url)
    try:
        rows = [user_sample(n, "key_a", "troll" if n < 4 else "nice", n < 4) for n in range(1, 7)]
        finished_round(RunStore(database), tmp_path / "rounds", rows)
    finally:
        database.close()
    return settings


def app(settings: GatewaySettings) -> Litestar:
    return create_app(settings, transport=FakeVLLM().transport(), extensions=[AdapterAdmin()])


@pytest.fixture
async def client(settings: GatewaySettings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app(settings)) as test:
        yield test


async def test_admin_quarantines_lists_and_releases(client: AsyncTestClient[Litestar]) -> None:
    """An admin quarantines an end user (201, with the reason), a second time is a 409,
    the list shows it; release ends it (the list is empty, ``released=true`` still shows
    it) and a second release is a 404; each change is audited with the admin's key id.
    Bad bodies are 400s naming the field; without the admin key, 401."""
    body = {"kind": "user", "subject": "troll", "reason": "insults the bot"}
    added = await client.post("/admin/quarantine", json=body, headers=ADMIN)
    twice = await client.post("/admin/quarantine", json=body, headers=ADMIN)
    listed = (await client.get("/admin/quarantine", headers=ADMIN)).json()
    release = {"kind": "user", "subject": "troll", "reason": "apologised"}
    released = await client.post("/admin/quarantine/release", json=release, headers=ADMIN)
    again = await client.post("/admin/quarantine/release", json=release, headers=ADMIN)
    now = (await client.get("/admin/quarantine", headers=ADMIN)).json()
    ever = (await client.get("/admin/quarantine?released=true", headers=ADMIN)).json()
    bad_kind = await client.post("/admin/quarantine", json={**body, "kind": "team"}, headers=ADMIN)
    no_reason = await client.post(
        "/admin/quarantine", json={"kind": "key", "subject": "k"}, headers=ADMIN
    )
    anonymous = await client.get("/admin/quarantine")
    options = await client.options("/admin/quarantine")
    audit = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert added.status_code == 201, added.text
    assert added.json()["actor"] == "env-admin" and added.json()["active"] is True
    assert added.json()["quarantined_at"].endswith("Z")
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_quarantined"
    assert [(q["kind"], q["subject"], q["reason"]) for q in listed] == [
        ("user", "troll", "insults the bot")
    ]
    assert released.status_code == 200, released.text
    assert released.json()["active"] is False and released.json()["released_by"] == "env-admin"
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_quarantined"
    assert now == [] and [q["release_reason"] for q in ever] == ["apologised"]
    assert bad_kind.status_code == 400 and bad_kind.json()["error"]["param"] == "kind"
    assert no_reason.status_code == 400 and "reason" in no_reason.json()["error"]["message"]
    assert anonymous.status_code == 401
    assert options.headers["allow"] == "GET, OPTIONS, POST"
    assert [(e["actor"], e["action"], e["target"]) for e in audit] == [
        ("env-admin", "release", "user:troll"),
        ("env-admin", "quarantine", "user:troll"),
    ]


async def test_flagged_per_end_user(client: AsyncTestClient[Litestar]) -> None:
    """Per end user, as per key: samples, flagged, rate, and per round; most flagged
    first."""
    answer = (await client.get("/admin/users/flagged", headers=ADMIN)).json()
    users = {user["end_user"]: user for user in answer["users"]}
    assert [user["end_user"] for user in answer["users"]] == ["troll", "nice"]
    assert (users["troll"]["samples"], users["troll"]["flagged"]) == (3, 3)
    assert users["troll"]["flagged_rate"] == 1.0 and users["nice"]["flagged"] == 0
    assert [r["run_id"] for r in users["troll"]["rounds"]] == answer["rounds"]


class ToApp(httpx.BaseTransport):
    """The CLI's requests, answered in process by the app under test."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.app = TestClientTransport(client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.app.handle_request(request)


def test_cli_quarantines_lists_and_releases(
    settings: GatewaySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``learner quarantine add|list|release|users``; a refusal is one error line."""
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", ADMIN_KEY)
    runner = CliRunner()
    url = ["--url", "http://gw.test"]
    with TestClient(app=app(settings)) as client:
        monkeypatch.setattr(adapters_cli, "transport", ToApp(client))
        added = runner.invoke(
            cli, ["learner", "quarantine", "add", "key", "key_a", "--reason", "spam", *url]
        )
        listed = runner.invoke(cli, ["learner", "quarantine", "list", *url])
        twice = runner.invoke(
            cli, ["learner", "quarantine", "add", "key", "key_a", "--reason", "spam", *url]
        )
        released = runner.invoke(cli, ["learner", "quarantine", "release", "key", "key_a", *url])
        users = runner.invoke(cli, ["learner", "quarantine", "users", *url])
    assert added.exit_code == 0, added.output
    assert "quarantined key key_a" in added.output
    assert listed.exit_code == 0 and "key_a" in listed.output and "spam" in listed.output
    lines = [line for line in twice.output.splitlines() if line.strip()]
    assert twice.exit_code == 1 and len(lines) == 1 and "409" in lines[0], twice.output
    assert released.exit_code == 0 and "released key key_a" in released.output
    assert users.exit_code == 0 and "troll" in users.output and "100.0%" in users.output
