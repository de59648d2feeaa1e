"""``tuneshield demo --url``: the demo's stack calls against a gateway already running
(the real app on loopback with the adapter admin, the engine faked)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from learner_fakes import FakeVLLM
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.settings import load_settings
from learner.admin_routes import AdapterAdmin
from learner.cli import app as cli
from learner.rounds import LearnerConfig
from simulation.remote import RemoteStack
from simulation.stack import StackError
from store import REQUIRED_FILES
from tuneshield import GenerationConfig

ADMIN_KEY = "admin-test-key-0123456789"
ALIASES = ["demo-baseline", "demo-undefended"]
START_TIMEOUT_S = 30.0


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, FakeVLLM]]:
    """The gateway app with ``AdapterAdmin`` served by uvicorn in a thread; its root URL."""
    settings = load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "gateway",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    engine = FakeVLLM()
    # The demo's folders (its data dirs, the adapters it builds) lie in tmp_path: the
    # operator names that folder as the import root, as the README asks for `demo --url`.
    config = dataclasses.replace(LearnerConfig.from_policy(), import_root=tmp_path)
    app = create_app(settings, transport=engine.transport(), extensions=[AdapterAdmin(config)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        sock.close()


def _chat(url: str, key: str, alias: str, conversation: str) -> str:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}", "X-Conversation-Id": conversation}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_remote_stack_drives_a_running_gateway_and_cleans_up(
    gateway: tuple[str, FakeVLLM], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """start() registers and serves identity adapters under a key of its own (opted out);
    chats are exported by conversation; an installed adapter is served after activate;
    the healer goes through the gateway opted out; stop() deletes the dialogs and the key."""
    url, engine = gateway
    stack = RemoteStack(url, ADMIN_KEY, str(tiny_model_dir), tmp_path / "demo", ALIASES)
    stack.start()
    try:
        key = stack.api_key
        assert [stack.active_version(alias) for alias in ALIASES] == [
            f"{alias}-v0000" for alias in ALIASES
        ]
        assert _chat(url, key, "demo-baseline", "conv-1") == "from demo-baseline-v0000"
        table = stack.export_turns("round1", ["conv-1", "conv-none"], expected=1)
        assert table.column("conversation_id").to_pylist() == ["conv-1"]
        assert table.column("opt_out").to_pylist() == [True]  # the demo key opts out
        assert (tmp_path / "demo" / "snapshots" / "round1.parquet").is_file()

        built = tmp_path / "built"
        built.mkdir()
        for name in REQUIRED_FILES:
            (built / name).write_text("{}")
        version = stack.install("demo-undefended", built, parent="demo-undefended-v0000")
        assert version == "demo-undefended-v0001"
        swap = stack.activate(version)
        assert swap["previous"] == "demo-undefended-v0000"
        assert stack.adapter_path(version) == Path(engine.loaded[version])
        assert _chat(url, key, "demo-undefended", "conv-2") == f"from {version}"

        healer = stack.healer(concurrency=3)
        assert healer.concurrency == 3
        try:
            replies = healer.generate([[{"role": "user", "content": "hey"}]], GenerationConfig())
        finally:
            healer.close()
        assert replies == ["from demo-baseline-v0000"]
    finally:
        stack.stop()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    left = httpx.post(
        f"{url}/admin/dialogs/export",
        json={"conversation_ids": ["conv-1", "conv-2"], "include_opt_out": True},
        headers=admin,
    )
    assert left.status_code == 200 and b"conv-1" not in left.content
    after = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert after.status_code == 401

    again = RemoteStack(url, ADMIN_KEY, str(tiny_model_dir), tmp_path / "demo2", ALIASES)
    with again:  # a second run finds the identity adapters and registers nothing new
        versions = httpx.get(f"{url}/admin/adapters", headers=admin).json()
    assert sorted(row["version"] for row in versions) == [
        "demo-baseline-v0000",
        "demo-undefended-v0000",
        "demo-undefended-v0001",
    ]


def test_remote_stack_names_what_is_wrong(
    gateway: tuple[str, FakeVLLM], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A refused admin key and a URL where nothing listens are StackErrors that say so."""
    url, _ = gateway
    with pytest.raises(StackError, match="401"):
        RemoteStack(url, "not-the-key-0123456789", str(tiny_model_dir), tmp_path, ALIASES).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(StackError, match="no gateway answers"):
        RemoteStack(closed, ADMIN_KEY, str(tiny_model_dir), tmp_path, ALIASES).start()


def test_demo_url_without_an_admin_key_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """``demo --url`` with no admin key exits 2 before anything starts, naming --admin-key."""
    monkeypatch.delenv("TUNESHIELD_ADMIN_KEY", raising=False)
    result = CliRunner().invoke(cli, ["demo", "--size", "quick", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--admin-key" in result.output


def test_a_failed_demo_keeps_its_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A demo that fails keeps its temporary data dir (the engine's and the gateway's logs)
    and says where it is."""
    monkeypatch.setenv("TUNESHIELD_DATA_DIR", str(tmp_path / "data"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--size",
            "quick",
            "--url",
            closed,
            "--admin-key",
            ADMIN_KEY,
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 2, result.output
    kept = [path for path in (tmp_path / "data").rglob("tuneshield-demo-*") if path.is_dir()]
    assert len(kept) == 1
    assert "data dir kept" in result.output


def test_a_demo_whose_stack_goes_away_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A connection error mid-run (the engine killed) ends the demo with exit 2 and one
    line naming the logs' folder, not a trace, and keeps that folder."""

    def engine_gone(*args: object, **kwargs: object) -> None:
        raise httpx.ReadError("[Errno 9] Bad file descriptor")

    monkeypatch.setattr("simulation.runner.run_demo", engine_gone)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    result = CliRunner().invoke(cli, ["demo", "--size", "quick", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "stopped answering (ReadError" in result.output
    assert "engine.log" in result.output
    assert "Traceback" not in result.output
    kept = [path for path in tmp_path.glob("tuneshield-demo-*") if path.is_dir()]
    assert len(kept) == 1
