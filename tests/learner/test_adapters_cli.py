"""``tuneshield adapters …`` against a faked gateway admin API."""

from __future__ import annotations

import socket

import httpx
import pytest
from typer.testing import CliRunner

from learner import adapters_cli
from learner.cli import app

KEY = "admin-test-key-0123456789"
SWAP = {
    "alias": "chat",
    "version": "chat-v0001",
    "previous": "chat-v0000",
    "unloaded": ["chat-v0002"],
    "load_s": 0.5,
}
ROW = {
    "version": "chat-v0001",
    "status": "candidate",
    "parent": "chat-v0000",
    "samples": 10,
    "flagged": 2,
    "created_at": "2026-01-01T10:00:00Z",
}
HISTORY = [
    {
        "version": "chat-v0000",
        "previous": "chat-v0001",
        "kind": "rollback",
        "actor": "key_oncall",
        "changed_at": "2026-01-02T09:30:15.123456Z",
        "active": True,
    },
    {
        "version": "chat-v0001",
        "previous": "chat-v0000",
        "kind": "promote",
        "actor": None,
        "changed_at": "2026-01-01T10:00:00Z",
        "active": False,
    },
]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Requests the CLI sent to a fake gateway that answers like the real routes."""
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path == "/admin/adapters/chat-v0002/promote":
            error = {"message": "chat-v0002 was rejected by the gates", "type": "x"}
            return httpx.Response(409, json={"error": error})
        if request.method == "POST":
            return httpx.Response(200, json=SWAP)
        if request.url.path == "/admin/adapters":
            return httpx.Response(200, json=[ROW])
        if request.url.path == "/admin/aliases/support/history":
            error = {"message": "no alias 'support'", "type": "not_found_error"}
            return httpx.Response(404, json={"error": error})
        if request.url.path.endswith("/history"):
            return httpx.Response(200, json=HISTORY)
        return httpx.Response(200, json=ROW)

    monkeypatch.setattr(adapters_cli, "transport", httpx.MockTransport(handle))
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", KEY)
    return requests


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["adapters", *args, "--url", "http://gw.test"])
    # Rich wraps long lines to the terminal width.
    return result.exit_code, " ".join(result.output.split())


def test_list_and_show_print_rows(seen: list[httpx.Request]) -> None:
    """list prints a table row per version; show prints the record; both send the key."""
    code, listed = run("list")
    shown_code, shown = run("show", "chat-v0001")
    assert (code, shown_code) == (0, 0)
    assert "chat-v0001" in listed and "candidate" in listed
    assert '"parent": "chat-v0000"' in shown
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)


def test_promote_and_rollback_send_the_right_requests(seen: list[httpx.Request]) -> None:
    """promote --force, rollback and rollback --to VERSION become the admin API's query
    parameters; the swap's unloaded versions are printed."""
    assert run("promote", "chat-v0001", "--force")[0] == 0
    code, output = run("rollback")
    assert code == 0 and "now serves" in output and "unloaded from the engine: chat-v0002" in output
    assert run("rollback", "--to", "chat-v0000", "--alias", "chat")[0] == 0
    assert [(r.url.path, dict(r.url.params)) for r in seen] == [
        ("/admin/adapters/chat-v0001/promote", {"force": "true"}),
        ("/admin/adapters/rollback", {}),
        ("/admin/adapters/rollback", {"alias": "chat", "version": "chat-v0000"}),
    ]


def test_history_prints_flips_newest_first_marking_the_active(
    seen: list[httpx.Request],
) -> None:
    """history asks for the alias's flips and prints them in the order answered (newest
    first), to the second, with kind and actor, the served version marked active."""
    code, output = run("history", "--alias", "chat")
    assert code == 0, output
    assert [(r.url.path, dict(r.url.params)) for r in seen] == [
        ("/admin/aliases/chat/history", {"limit": "20"}),
    ]
    rollback = "* │ 2026-01-02 09:30:15 │ rollback │ chat-v0000 │ key_oncall"
    assert rollback in output and "* served now" in output
    assert output.index("rollback │") < output.index("promote │")


def test_history_defaults_to_the_policy_alias_and_reports_unknown_ones(
    seen: list[httpx.Request],
) -> None:
    """Without --alias, history shows policies/gateway.yaml's default alias; an unknown
    alias is the gateway's 404 message."""
    assert run("history")[0] == 0
    code, output = run("history", "--alias", "support")
    assert code == 1 and "404: no alias 'support'" in output
    assert [r.url.path for r in seen] == [
        "/admin/aliases/chat/history",
        "/admin/aliases/support/history",
    ]


def test_refusal_is_a_message_not_a_trace(seen: list[httpx.Request]) -> None:
    """A 409 from the gateway prints its message and exits 1."""
    code, output = run("promote", "chat-v0002")
    assert code == 1
    assert "409: chat-v0002 was rejected" in output
    assert "Traceback" not in output


def test_gateway_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing listening, the CLI says so and how to start the gateway."""
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", KEY)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, ["adapters", "list", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "no gateway answers" in output and "`tuneshield gateway`" in output


def test_missing_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an admin key the CLI names the environment variable to set."""
    monkeypatch.delenv("TUNESHIELD_ADMIN_KEY", raising=False)
    code, output = run("list")
    assert code == 1 and "TUNESHIELD_ADMIN_KEY" in output
