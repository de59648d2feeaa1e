"""The audit log and lineage: ``GET /admin/audit`` with its filters (and ``tuneshield
audit``), key changes recorded with the store's change, ``tuneshield serve``'s own admin
key, and a served turn traced back to its version, round, snapshot hash and judge hash
(``GET /admin/turns/{turn_id}/lineage``, ``tuneshield lineage``): a real gateway app with
an embedded learner, a fake worker and a fake vLLM."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from litestar.testing import TestClient
from litestar.testing.transport import TestClientTransport
from typer.testing import CliRunner

from engine import ensure_identity_adapter
from gateway import create_app, load_settings
from gateway.auth import create_key, hash_key
from gateway.settings import GatewaySettings
from learner import adapters_cli
from learner.admin_routes import AdapterAdmin
from learner.cli import app as cli
from learner.process import EmbeddedLearner
from learner.rounds import LearnerConfig, LearnerOptions
from learner.serve import SERVE_ACTOR, ensure_admin_key
from store import (
    KEY_CREATE,
    KEY_REVOKE,
    AdapterRegistry,
    AuditEntry,
    AuditLog,
    KeyStore,
    open_database,
)
from store._audit import insert_entry
from tuneshield import judge_artefact, load_judges_policy
from tuneshield._embedding_judge import JUDGES_DATA_DIR

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
URL = "http://gw.test"
# Between polls: well within the admin routes' rate limit.
POLL_S = 0.1
T0 = datetime(2026, 1, 1, 10, 0, 0)
# Entries recorded before the app starts: (minutes after T0, actor, action, target).
ENTRIES = [
    (0, "key_alice", "promote", "chat-v0001"),
    (10, "key_bob", "rollback", "chat-v0000"),
    (20, "key_alice", KEY_CREATE, "key_carol"),
    (30, "cli", KEY_REVOKE, "key_carol"),
]


@pytest.fixture(params=["duckdb", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each backend (as tests/store/conftest.py makes them)."""
    if request.param == "duckdb":
        return str(tmp_path / "store.duckdb")
    return str(request.getfixturevalue("postgres_database_url"))


class ToApp(httpx.BaseTransport):
    """The CLI's requests, answered in process by the app under test."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.app = TestClientTransport(client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.app.handle_request(request)


def _fake_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )


@pytest.fixture
def client(
    settings: GatewaySettings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient[Litestar]]:
    """A gateway with an embedded learner (fake worker: the round passes), the audit
    entries of ``ENTRIES`` already recorded; the CLI's requests reach it in process."""
    monkeypatch.setattr(
        "tuneshield.make_identity_adapter", lambda base, folder: _fake_adapter(Path(folder))
    )
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", ADMIN_KEY)
    database = open_database(settings.store_url)
    ensure_identity_adapter(
        AdapterRegistry(database), "chat", "tiny", settings.data_dir / "adapters"
    )
    for minutes, actor, action, target in ENTRIES:
        entry = AuditEntry(T0 + timedelta(minutes=minutes), actor, action, target, {"n": minutes})
        database.call(lambda connection, entry=entry: insert_entry(connection, entry))
    database.close()
    config = LearnerConfig.from_policy()
    config = dataclasses.replace(
        config,
        worker=dataclasses.replace(config.worker, poll_s=0.05, settle_s=0.0),
        control=dataclasses.replace(config.control, poll_s=0.05, reconcile_s=0.2),
    )
    learner = EmbeddedLearner(
        LearnerOptions(
            base_model="tiny",
            adapters_dir=settings.data_dir / "adapters",
            config=config,
            worker_command=lambda d: [sys.executable, str(FAKE_WORKER), str(d), "pass"],
        )
    )
    admin = AdapterAdmin(config, active_learner=learner.active_name)
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    app = create_app(settings, transport=engine.transport(), extensions=[admin, learner])
    with TestClient(app=app) as test:
        monkeypatch.setattr(adapters_cli, "transport", ToApp(test))
        yield test


def tuneshield(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [*args, "--url", URL])
    return result.exit_code, result.output


def words(output: str) -> str:
    # Rich wraps long lines to the terminal width.
    return " ".join(output.split())


def audit(client: TestClient[Litestar], **params: str) -> Any:
    return client.get("/admin/audit", params=params, headers=ADMIN)


# -- the audit log's filters ----------------------------------------------------------


def test_audit_log_filters_on_both_backends(store_url: str) -> None:
    """Action, actor, target and since each narrow the list and combine; newest first."""
    database = open_database(store_url)
    try:
        for minutes, actor, action, target in ENTRIES:
            entry = AuditEntry(T0 + timedelta(minutes=minutes), actor, action, target, {})
            database.call(lambda connection, entry=entry: insert_entry(connection, entry))
        log = AuditLog(database)

        def targets(**filters: Any) -> list[str | None]:
            return [entry.target for entry in log.list(**filters)]

        assert targets() == ["key_carol", "key_carol", "chat-v0000", "chat-v0001"]
        assert targets(actor="key_alice") == ["key_carol", "chat-v0001"]
        assert targets(action=KEY_REVOKE) == ["key_carol"]
        assert targets(target="key_carol") == ["key_carol", "key_carol"]
        assert targets(since=T0 + timedelta(minutes=10)) == ["key_carol", "key_carol", "chat-v0000"]
        assert targets(actor="key_alice", since=T0 + timedelta(minutes=1)) == ["key_carol"]
        assert targets(actor="key_alice", action="rollback") == []
        assert targets(limit=1) == ["key_carol"]
    finally:
        database.close()


def test_key_changes_are_audited_with_the_change_on_both_backends(store_url: str) -> None:
    """A key created or revoked with an actor writes its entry in the same transaction; a
    revocation that changes nothing writes none; the secret and its hash never appear."""
    database = open_database(store_url)
    try:
        keys = KeyStore(database)
        created = create_key(keys, "dora", rate_limit_per_minute=5.0, actor="key_admin")
        unaudited = create_key(keys, "fixture")  # no actor: set-up, not an operator's act
        keys.revoke(created.record.key_id, actor="key_admin")
        keys.revoke(created.record.key_id, actor="key_admin")
        assert keys.revoke("key_nobody", actor="key_admin") is None
        entries = AuditLog(database).list()
    finally:
        database.close()
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("key_admin", KEY_REVOKE, created.record.key_id),
        ("key_admin", KEY_CREATE, created.record.key_id),
    ]
    assert entries[1].detail == {
        "name": "dora",
        "role": "user",
        "opt_out": False,
        "rate_limit_per_minute": 5.0,
    }
    assert unaudited.record.key_id not in repr(entries)
    assert created.key not in repr(entries) and hash_key(created.key) not in repr(entries)


def test_serve_records_its_own_admin_key(tmp_path: Path) -> None:
    """The admin key ``tuneshield serve`` makes on a first start is audited as ``serve``."""
    database = open_database(tmp_path / "store.duckdb")
    try:
        key = ensure_admin_key(KeyStore(database), None)
        (entry,) = AuditLog(database).list()
    finally:
        database.close()
    assert key is not None
    assert (entry.actor, entry.action, entry.detail["role"]) == (SERVE_ACTOR, KEY_CREATE, "admin")


def test_audit_route_filters(client: TestClient[Litestar]) -> None:
    """The route's filters, an aware ``since`` compared in UTC, and times past the
    calendar's ends clamped rather than failing."""
    assert [e["target"] for e in audit(client, actor="key_alice").json()] == [
        "key_carol",
        "chat-v0001",
    ]
    assert [e["actor"] for e in audit(client, target="key_carol").json()] == ["cli", "key_alice"]
    revoked = audit(client, action=KEY_REVOKE).json()
    assert [(e["actor"], e["target"], e["detail"]) for e in revoked] == [
        ("cli", "key_carol", {"n": 30})
    ]
    assert revoked[0]["at"] == "2026-01-01T10:30:00Z"
    # 11:15 at +01:00 is 10:15 UTC: the two entries after it.
    since = audit(client, since="2026-01-01T11:15:00+01:00").json()
    assert [e["action"] for e in since] == [KEY_REVOKE, KEY_CREATE]
    lower = audit(client, since="2026-01-01t10:15:00z", actor="cli").json()
    assert [e["target"] for e in lower] == ["key_carol"]
    assert len(audit(client, since="0001-01-01T00:00:00+01:00").json()) == len(ENTRIES)
    assert audit(client, since="9999-12-31T23:59:59-01:00").json() == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("since=2026-01-01T10:00:00", "since"),  # no zone: RFC 3339 needs one
        ("since=0.5", "since"),  # not a Unix time either
        ("action=", "action"),
        ("actor=key%01", "actor"),
        (f"target={'x' * 257}", "target"),
        ("limit=0", "limit"),
    ],
)
def test_bad_audit_filters_are_400s_naming_the_field(
    client: TestClient[Litestar], query: str, field: str
) -> None:
    response = client.get(f"/admin/audit?{query}", headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_audit_cli_prints_a_table_or_json(client: TestClient[Litestar]) -> None:
    """``tuneshield audit`` with filters prints the entries as a table (newest first),
    ``--json`` the server's answer; a filter the server refuses ends with one line."""
    code, output = tuneshield("audit", "--actor", "key_alice")
    assert code == 0, output
    rows = [line for line in output.splitlines() if "key_alice" in line]
    assert len(rows) == 2
    assert "2026-01-01 10:20:00" in rows[0] and KEY_CREATE in rows[0] and "key_carol" in rows[0]
    assert "promote" in rows[1] and "chat-v0001" in rows[1] and "n=0" in rows[1]
    code, output = tuneshield("audit", "--target", "key_carol", "--since", "2026-01-01T10:25:00Z",
                              "--json")  # fmt: skip
    assert code == 0, output
    answer = json.loads(output)
    assert [(e["actor"], e["action"]) for e in answer] == [("cli", KEY_REVOKE)]
    code, output = tuneshield("audit", "--action", "nothing-like-it")
    assert (code, words(output)) == (0, "no audit entries match")
    code, output = tuneshield("audit", "--since", "yesterday")
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert output.startswith("error: 400: since:"), output


# -- lineage --------------------------------------------------------------------------


def chat(client: TestClient[Litestar], conversation: str) -> str:
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": f"tell me of {conversation}"}],
    }
    headers = {**ADMIN, "X-Conversation-Id": conversation}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def logged_turn(client: TestClient[Litestar], conversation: str) -> dict[str, Any]:
    """The conversation's one logged turn (the export flushes the log first)."""
    body = {"conversation_ids": [conversation]}
    exported = client.post("/admin/dialogs/export", json=body, headers=ADMIN)
    assert exported.status_code == 200, exported.text
    (row,) = pq.read_table(io.BytesIO(exported.content)).to_pylist()
    return dict(row)


def run_round(client: TestClient[Litestar]) -> dict[str, Any]:
    for _ in range(100):  # the learner sees the dialogs once the log has written them
        status = client.get("/admin/learner/status", headers=ADMIN).json()
        if status["enabled"] and status["new_conversations"] >= 2:
            break
        time.sleep(POLL_S)
    started = client.post("/admin/learner/run", headers=ADMIN)
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    for _ in range(600):
        run = client.get(f"/admin/learner/runs/{run_id}", headers=ADMIN).json()
        if run["status"] in ("succeeded", "failed", "rejected"):
            return dict(run)
        time.sleep(POLL_S)
    raise AssertionError(f"run {run_id} did not finish: {run}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lineage_of_a_turn_served_by_a_version_a_round_trained(
    client: TestClient[Litestar], settings: GatewaySettings
) -> None:
    """A turn served by the version a round trained leads to that version, the round, the
    SHA-256 of the snapshot file the round read and the hash of the defense judge's files;
    a turn served before the round ends at the identity adapter, saying so; a snapshot
    rewritten since is reported changed; ``tuneshield lineage`` prints the chain."""
    assert chat(client, "cats") == "from chat-v0000"
    chat(client, "dogs")
    run = run_round(client)
    assert (run["status"], run["version"]) == ("succeeded", "chat-v0001"), run
    assert chat(client, "birds") == "from chat-v0001"
    turn = logged_turn(client, "birds")
    assert turn["adapter"] == "chat-v0001"

    answer = client.get(f"/admin/turns/{turn['turn_id']}/lineage", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    lineage = answer.json()
    assert lineage["turn"]["turn_id"] == turn["turn_id"]
    assert lineage["turn"]["conversation_id"] == "birds"
    assert lineage["version"]["version"] == "chat-v0001"
    assert lineage["version"]["registered"] is True and lineage["version"]["judge"] == "embedding"
    assert lineage["round"]["run_id"] == run["run_id"]
    assert lineage["round"]["status"] == "succeeded"
    snapshot = settings.data_dir / "snapshots" / f"{run['run_id']}.parquet"
    assert lineage["snapshot"]["path"] == str(snapshot)
    assert lineage["snapshot"]["sha256"] == sha256_of(snapshot)
    assert lineage["snapshot"]["rows"] == 2 and lineage["snapshot_now"] == "unchanged"
    # The defense judge of policies/learner.yaml, by the content of its files: the
    # artefact's weights as shipped, and one digest over every file it loads.
    judge = lineage["judge"]
    expected = judge_artefact("embedding", load_judges_policy())
    assert judge["judge"] == "embedding" and judge["sha256"] == expected.sha256
    weights = JUDGES_DATA_DIR / "embedding-v1" / "weights.npz"
    assert judge["files"]["embedding/artefact/weights.npz"] == sha256_of(weights)
    assert "embedding/encoder/model.safetensors" in judge["files"]
    assert lineage["gap"] is None

    code, output = tuneshield("lineage", turn["turn_id"])
    assert code == 0, output
    printed = words(output)
    for part in ("chat-v0001", run["run_id"], sha256_of(snapshot), expected.sha256):
        assert part in printed, (part, printed)
    code, output = tuneshield("lineage", turn["turn_id"], "--json")
    assert code == 0 and json.loads(output)["judge"]["sha256"] == expected.sha256

    # Before the round, the identity adapter served: the chain ends there, and says why.
    before = logged_turn(client, "cats")
    early = client.get(f"/admin/turns/{before['turn_id']}/lineage", headers=ADMIN).json()
    assert early["version"]["version"] == "chat-v0000" and early["round"] is None
    assert early["snapshot"] is None and early["judge"] is None
    assert "identity adapter" in early["gap"]

    # The snapshot rewritten since the round (as a deletion of dialogs does): the recorded
    # hash stays what the round read; the file is reported changed.
    snapshot.write_bytes(snapshot.read_bytes() + b"\n")
    later = client.get(f"/admin/turns/{turn['turn_id']}/lineage", headers=ADMIN).json()
    assert later["snapshot"]["sha256"] == lineage["snapshot"]["sha256"]
    assert later["snapshot_now"] == "changed"


def test_lineage_of_an_unknown_turn_is_404_and_a_malformed_id_400(
    client: TestClient[Litestar],
) -> None:
    missing = client.get("/admin/turns/0123abcd/lineage", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "turn_id"
    assert missing.json()["error"]["code"] == "turn_not_found"
    malformed = client.get("/admin/turns/a%20b/lineage", headers=ADMIN)
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "turn_id"
    user = create_user(client)
    denied = client.get("/admin/turns/0123abcd/lineage", headers=user)
    assert denied.status_code == 403
    code, output = tuneshield("lineage", "0123abcd")
    assert code == 1 and "404" in output and len(output.strip().splitlines()) == 1


def create_user(client: TestClient[Litestar]) -> dict[str, str]:
    created = client.post("/admin/keys", json={"name": "user"}, headers=ADMIN).json()
    return {"Authorization": f"Bearer {created['key']}"}


def test_lineage_says_where_the_chain_ends(client: TestClient[Litestar], tmp_path: Path) -> None:
    """Each way a chain ends early is answered with what is known and why it ends: the
    base model, a version removed since, one registered by hand, one naming a round that
    registered another version (never trusted), a round from before lineage, a round
    without the defense (whose snapshot file is gone since)."""
    learner = client.app.state.learner
    chat(client, "seed")
    seed = learner.dialogs.get(logged_turn(client, "seed")["turn_id"])
    run = learner.runs.create("chat")
    learner.runs.update(run.run_id, status="succeeded", version="chat-v0005")
    snapshot = {"path": str(tmp_path / "gone.parquet"), "sha256": "0" * 64, "rows": 1,
                "conversations": 1, "watermark_from": None, "watermark_to": None}  # fmt: skip
    lineage = {"run_id": run.run_id, "recorded_at": "2026-01-01T10:00:00Z",
               "snapshot": snapshot, "judge": None}  # fmt: skip
    registered = {
        "chat-v0003": {},
        "chat-v0004": {"run_id": run.run_id, "lineage": lineage},
        "chat-v0005": {"run_id": run.run_id},
        "chat-v0006": {"run_id": run.run_id, "lineage": lineage},
    }
    for version, hyperparameters in registered.items():
        learner.registry.register(
            version, adapter_folder(tmp_path, version), hyperparameters=hyperparameters
        )
    # One run row serves each case in turn: the route trusts a run only for the version
    # the run row says it registered (the learner's own record), whatever a version says.
    learner.runs.update(run.run_id, version="chat-v0006")

    def gap(adapter: str | None) -> dict[str, Any]:
        turn_id = f"t-{adapter}"
        learner.dialogs.insert([dataclasses.replace(seed, turn_id=turn_id, adapter=adapter)])
        answer = client.get(f"/admin/turns/{turn_id}/lineage", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    base = gap(None)
    assert base["version"] is None and "base model" in base["gap"]
    removed = gap("chat-v0042")
    assert removed["version"]["registered"] is False and "no longer registered" in removed["gap"]
    assert "registered by hand" in gap("chat-v0003")["gap"]
    forged = gap("chat-v0004")
    assert forged["round"] is None and forged["judge"] is None
    assert "which registered chat-v0006, not it" in forged["gap"]
    learner.runs.update(run.run_id, version="chat-v0005")
    older = gap("chat-v0005")
    assert older["round"]["run_id"] == run.run_id and "ran before" in older["gap"]
    learner.runs.update(run.run_id, version="chat-v0006")
    undefended = gap("chat-v0006")
    assert undefended["snapshot"]["sha256"] == "0" * 64
    assert undefended["snapshot_now"] == "missing" and undefended["judge"] is None
    assert "without the defense" in undefended["gap"]
