"""Settings loading and the gateway CLI verbs (keys, dialogs) on a stopped gateway's file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from gateway_fakes import ADMIN, FakeEngine, chat_body
from litestar.testing import AsyncTestClient
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app as cli
from gateway.settings import GatewaySettings, load_settings
from store import TURN_COLUMNS, DialogStore, TurnRecord, open_database
from tuneshield import PolicyError, policies_dir


def test_settings_come_from_policy_and_environment(tmp_path: Path) -> None:
    """The policy gives limits and aliases; the environment gives key, data dir and upstream."""
    settings = load_settings(
        environ={
            "TUNESHIELD_ADMIN_KEY": "k" * 20,
            "TUNESHIELD_DATA_DIR": str(tmp_path),
            "TUNESHIELD_UPSTREAM_URL": "http://127.0.0.1:9999/v1/",
        }
    )
    assert settings.admin_key == "k" * 20
    assert settings.store_url == str(tmp_path / "gateway.duckdb")
    assert settings.upstream_url == "http://127.0.0.1:9999"
    assert settings.routing.seed_aliases[settings.routing.default_alias].endswith("v0000")
    assert settings.limits.max_body_bytes > 0


def test_policy_typo_is_an_error_naming_the_key(tmp_path: Path) -> None:
    """An unknown key in policies/gateway.yaml fails loudly, naming section and key."""
    shutil.copy(policies_dir() / "gateway.yaml", tmp_path / "gateway.yaml")
    text = (tmp_path / "gateway.yaml").read_text()
    (tmp_path / "gateway.yaml").write_text(text.replace("batch_size:", "batch_sise:"))
    with pytest.raises(PolicyError, match=r"dialog_log.*batch_sise"):
        load_settings(environ={}, policies_directory=tmp_path)


def test_short_admin_key_is_refused() -> None:
    """A guessable admin key is refused at start."""
    with pytest.raises(PolicyError, match="TUNESHIELD_ADMIN_KEY"):
        load_settings(environ={"TUNESHIELD_ADMIN_KEY": "short"})


def test_gateway_command_ends_with_one_line_naming_a_bad_setting(tmp_path: Path) -> None:
    """`tuneshield gateway` with a too-short admin key exits 1 with one line naming the
    variable, not a traceback."""
    result = CliRunner().invoke(
        cli,
        ["gateway", "--data-dir", str(tmp_path)],
        env={"TUNESHIELD_ADMIN_KEY": "short"},
    )
    assert result.exit_code == 1
    assert "TUNESHIELD_ADMIN_KEY" in result.output and "Traceback" not in result.output


def test_cli_keys_lifecycle(tmp_path: Path) -> None:
    """keys create prints a working key once; list shows it without secret; revoke marks it."""
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]
    created = runner.invoke(cli, ["keys", "create", "carol", "--role", "admin", *data])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("ts-")
    listed = runner.invoke(cli, ["keys", "list", *data])
    assert "carol" in listed.stdout and key not in listed.stdout
    key_id = created.stderr.split()[1]
    assert key_id in listed.stdout
    assert "active" in listed.stdout
    assert runner.invoke(cli, ["keys", "revoke", key_id, *data]).exit_code == 0
    assert "revoked" in runner.invoke(cli, ["keys", "list", *data]).stdout
    assert runner.invoke(cli, ["keys", "revoke", "key_nope", *data]).exit_code == 1
    assert runner.invoke(cli, ["keys", "create", "x", "--role", "root", *data]).exit_code != 0


def test_cli_refuses_while_the_database_is_held(tmp_path: Path) -> None:
    """With the file held by another process the CLI explains that the gateway must stop."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True);"
            " sys.stdin.read()",
            str(tmp_path / "gateway.duckdb"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = CliRunner().invoke(cli, ["keys", "list", "--data-dir", str(tmp_path)])
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert result.exit_code == 1
    assert "stop the server" in result.output


async def test_cli_dialogs_export_and_delete(settings: GatewaySettings, engine: FakeEngine) -> None:
    """dialogs export writes the logged turns to Parquet; dialogs delete removes them."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        for conversation in ("x1", "x2"):
            await client.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={**ADMIN, "X-Conversation-Id": conversation},
            )
    runner = CliRunner()
    data = ["--data-dir", str(settings.data_dir)]
    out = settings.data_dir / "out" / "turns.parquet"
    exported = runner.invoke(cli, ["dialogs", "export", str(out), *data])
    assert exported.exit_code == 0, exported.output
    assert sorted(pq.read_table(out).column("conversation_id").to_pylist()) == ["x1", "x2"]
    deleted = runner.invoke(cli, ["dialogs", "delete", "--conversation-id", "x1", *data])
    assert "deleted 1 turns" in deleted.stdout
    assert runner.invoke(cli, ["dialogs", "delete", *data]).exit_code != 0
    database = open_database(settings.store_url)
    try:
        left = database.call(lambda c: c.execute("SELECT conversation_id FROM turns").fetchall())
    finally:
        database.close()
    assert left == [("x2",)]


async def test_cli_dialogs_delete_of_a_conversation_id_two_keys_used(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A conversation id belongs to its key: deleting one that two keys used needs the key,
    said in one line, and then removes only that key's turns."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        await client.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={**ADMIN, "X-Conversation-Id": "shared"},
        )
    database = open_database(settings.store_url)
    try:
        dialogs = DialogStore(database)
        (mine,) = dialogs.export_table().to_pylist()
        other = {name: mine[name] for name in TURN_COLUMNS}
        dialogs.insert([TurnRecord(**{**other, "turn_id": "t-other", "key_id": "key_other"})])
    finally:
        database.close()
    runner = CliRunner()
    data = ["--data-dir", str(settings.data_dir)]
    refused = runner.invoke(cli, ["dialogs", "delete", "--conversation-id", "shared", *data])
    assert refused.exit_code == 2
    assert "--key-id" in refused.output and "Traceback" not in refused.output
    deleted = runner.invoke(
        cli, ["dialogs", "delete", "--conversation-id", "shared", "--key-id", "key_other", *data]
    )
    assert "deleted 1 turns" in deleted.stdout, deleted.output
    database = open_database(settings.store_url)
    try:
        left = database.call(lambda c: c.execute("SELECT key_id FROM turns").fetchall())
    finally:
        database.close()
    assert left == [(mine["key_id"],)]
