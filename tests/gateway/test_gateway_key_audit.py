"""Key changes are audited: who created or revoked which key, when, and what it became;
never the key's secret nor its hash. Through the admin API (the admin's key id) and the
local CLI (``cli``)."""

from __future__ import annotations

from pathlib import Path

import duckdb
from gateway_fakes import ADMIN, FakeEngine
from litestar.testing import AsyncTestClient
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.auth import ENV_ADMIN_KEY_ID, hash_key
from gateway.settings import GatewaySettings
from learner.cli import app as cli
from store import KEY_CREATE, KEY_REVOKE, AuditLog, open_database


def audit_rows(settings: GatewaySettings) -> list[tuple[object, ...]]:
    """Every audit row as stored, oldest first (open only after the app shut down)."""
    with duckdb.connect(str(settings.store_url), read_only=True) as connection:
        return connection.execute(
            "SELECT actor, action, target, detail FROM audit_log ORDER BY recorded_at"
        ).fetchall()


async def test_admin_api_key_changes_name_the_admin_and_never_the_secret(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The env admin creates an admin key; that admin creates a user key with settings and
    revokes it: three entries, each naming the key that acted. Revoking again changes
    nothing and records nothing; an unknown key is a 404 and records nothing."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        made = await client.post(
            "/admin/keys", json={"name": "oncall", "role": "admin"}, headers=ADMIN
        )
        oncall = made.json()
        as_oncall = {"Authorization": f"Bearer {oncall['key']}"}
        body = {"name": "bob", "opt_out": True, "rate_limit_per_minute": 30}
        bob = (await client.post("/admin/keys", json=body, headers=as_oncall)).json()
        revoked = await client.delete(f"/admin/keys/{bob['key_id']}", headers=as_oncall)
        again = await client.delete(f"/admin/keys/{bob['key_id']}", headers=ADMIN)
        unknown = await client.delete("/admin/keys/key_nobody", headers=ADMIN)
    assert made.status_code == 201 and revoked.status_code == 200 and again.status_code == 200
    assert unknown.status_code == 404
    database = open_database(settings.store_url)
    try:
        entries = AuditLog(database).list()
    finally:
        database.close()
    assert [(e.actor, e.action, e.target) for e in reversed(entries)] == [
        (ENV_ADMIN_KEY_ID, KEY_CREATE, oncall["key_id"]),
        (oncall["key_id"], KEY_CREATE, bob["key_id"]),
        (oncall["key_id"], KEY_REVOKE, bob["key_id"]),
    ]
    created, revoke = entries[1], entries[0]
    assert created.detail == {
        "name": "bob",
        "role": "user",
        "opt_out": True,
        "rate_limit_per_minute": 30.0,
    }
    assert revoke.detail == {"name": "bob", "revoked": True}
    assert revoke.at >= created.at
    stored = repr(audit_rows(settings))
    for key in (oncall, bob):
        assert key["key"] not in stored and hash_key(key["key"]) not in stored
        # Not even the listed prefix: the audit names keys by id only.
        assert key["key_prefix"] not in stored


def test_cli_key_changes_are_audited_as_cli(settings: GatewaySettings, tmp_path: Path) -> None:
    """``tuneshield keys create`` and ``keys revoke`` (gateway stopped) record actor
    ``cli``; the printed secret is not in the audit log."""
    data_dir = ["--data-dir", str(settings.data_dir)]
    created = CliRunner().invoke(cli, ["keys", "create", "carol", "--opt-out", *data_dir])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    database = open_database(settings.store_url)
    try:
        (entry,) = AuditLog(database).list()
    finally:
        database.close()
    assert (entry.actor, entry.action, entry.detail["name"], entry.detail["opt_out"]) == (
        "cli",
        KEY_CREATE,
        "carol",
        True,
    )
    revoked = CliRunner().invoke(cli, ["keys", "revoke", entry.target or "", *data_dir])
    assert revoked.exit_code == 0, revoked.output
    rows = audit_rows(settings)
    assert [row[:3] for row in rows] == [
        ("cli", KEY_CREATE, entry.target),
        ("cli", KEY_REVOKE, entry.target),
    ]
    assert secret.startswith("ts-") and secret not in repr(rows)
    assert hash_key(secret) not in repr(rows)
