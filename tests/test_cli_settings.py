"""Bad settings given to the role commands (``gateway``, ``learner``, ``engine``) end the
command at once with one line naming the setting: no traceback, nothing started."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner, Result

import learner.process
from engine._supervisor import EngineSupervisor
from learner.cli import app as cli
from tuneshield import policies_dir

ADMIN_KEY = "admin-test-key-0123456789"


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What would have started (a server, the learner's loop, vLLM) is recorded, not run."""
    started: list[str] = []

    def record(name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> None:
            started.append(name)

        return run

    async def learner_loop(*args: Any, **kwargs: Any) -> None:
        started.append("learner")

    monkeypatch.setattr(uvicorn, "run", record("uvicorn"))
    monkeypatch.setattr(learner.process, "run_learner", learner_loop)
    monkeypatch.setattr(EngineSupervisor, "__enter__", record("vllm"))
    # `tuneshield engine` takes SIGTERM over for its own stop; not the test session's.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    return started


def invoke(args: list[str], tmp_path: Path, **env: str) -> Result:
    environment = {"TUNESHIELD_DATA_DIR": str(tmp_path / "data"), **env}
    return CliRunner().invoke(cli, args, env=environment)


def assert_one_line_naming(result: Result, setting: str) -> None:
    """The command failed with its message on one line that names ``setting``."""
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output, result.output
    # Typer's exits only: an exception raised out of the command would be a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if setting in line]
    assert lines, result.output
    if result.exit_code == 1:
        # Our own message: one line in all (typer's usage errors come in a box).
        assert len(result.output.strip().splitlines()) == 1, result.output


def policies_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of the policies with one line of ``name``.yaml changed."""
    folder = tmp_path / "policies"
    if not folder.exists():
        shutil.copytree(policies_dir(), folder)
    path = folder / f"{name}.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return folder


@pytest.mark.parametrize("port", ["abc", "70000", "0", "-5"])
def test_gateway_port_out_of_range_names_the_option(
    tmp_path: Path, nothing_starts: list[str], port: str
) -> None:
    """--port 70000 (uvicorn took it modulo 65536), 0 (read as unset), -5 and abc: a usage
    error naming --port; no server starts."""
    assert_one_line_naming(invoke(["gateway", "--port", port], tmp_path), "--port")
    assert nothing_starts == []


@pytest.mark.parametrize("url", ["notaurl", "postgresql:/host/db", "mysql://host/db"])
def test_gateway_database_url_that_is_no_postgresql_url_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_starts: list[str], url: str
) -> None:
    """A TUNESHIELD_DATABASE_URL without a postgresql:// scheme was taken for a DuckDB file
    name: a gateway silently on an empty store of its own. Now one line naming it."""
    monkeypatch.chdir(tmp_path)
    result = invoke(["gateway"], tmp_path, TUNESHIELD_DATABASE_URL=url)
    assert_one_line_naming(result, "TUNESHIELD_DATABASE_URL")
    assert nothing_starts == [] and not (tmp_path / url).exists()


def test_gateway_unreachable_database_is_one_line_not_a_startup_traceback(
    tmp_path: Path, nothing_starts: list[str]
) -> None:
    """A PostgreSQL URL where no server listens: the command opens the store before it
    serves and ends with one line naming the variable (it was the server's startup
    traceback). The store's connect timeout is cut to keep the test short."""
    policies = policies_with(tmp_path, "store", "connect_timeout_s: 30.0", "connect_timeout_s: 1.0")
    result = invoke(
        ["gateway"],
        tmp_path,
        TUNESHIELD_DATABASE_URL="postgresql://user@127.0.0.1:1/db",
        TUNESHIELD_POLICIES_DIR=str(policies),
    )
    assert result.exit_code == 1, result.output
    assert "TUNESHIELD_DATABASE_URL" in result.output.strip().splitlines()[-1]
    assert "Traceback" not in result.output and nothing_starts == []


@pytest.mark.parametrize(
    ("policy", "old", "new", "named"),
    [
        ("gateway", "durable_ack: true", "durable_ack: maybe", "[dialog_log]: durable_ack"),
        ("gateway", "port: 8080", "port: abc", "[routing]: port"),
        ("gateway", "max_body_bytes: 1048576", 'max_body_bytes: "1MB"', "max_body_bytes"),
        ("gateway", "chat: chat-v0000", '"..": chat-v0000', "seed_aliases"),
        ("learner", "alias: chat", "alias: [chat]", "learner.yaml: alias"),
        ("learner", "import_root: imports", 'import_root: ""', "import_root"),
        ("store", "connect_timeout_s: 30.0", "connect_timeout_s: soon", "connect_timeout_s"),
    ],
)
def test_gateway_policy_with_a_wrong_type_names_file_section_and_key(
    tmp_path: Path, nothing_starts: list[str], policy: str, old: str, new: str, named: str
) -> None:
    """A policy value of the wrong type was accepted ("maybe" as true) or failed with
    Python's own words ("'<' not supported between 'int' and 'str'") and its section lost
    to console markup; now one line naming file, section and key."""
    policies = policies_with(tmp_path, policy, old, new)
    result = invoke(["gateway"], tmp_path, TUNESHIELD_POLICIES_DIR=str(policies))
    assert_one_line_naming(result, named)
    assert nothing_starts == []


def test_gateway_missing_policies_folder_names_the_file(
    tmp_path: Path, nothing_starts: list[str]
) -> None:
    """TUNESHIELD_POLICIES_DIR pointing nowhere: one line naming the policy file."""
    result = invoke(["gateway"], tmp_path, TUNESHIELD_POLICIES_DIR=str(tmp_path / "nope"))
    assert_one_line_naming(result, "gateway.yaml")
    assert nothing_starts == []


@pytest.mark.parametrize("key", ["short", "admin-key-é-0123456789", "admin key 0123456789"])
def test_gateway_admin_key_that_no_header_can_carry_names_the_variable(
    tmp_path: Path, nothing_starts: list[str], key: str
) -> None:
    """An admin key too short, or with characters an Authorization header cannot carry as
    they are (it could never be matched): one line naming TUNESHIELD_ADMIN_KEY."""
    result = invoke(["gateway"], tmp_path, TUNESHIELD_ADMIN_KEY=key)
    assert_one_line_naming(result, "TUNESHIELD_ADMIN_KEY")
    assert nothing_starts == []


def test_gateway_with_good_settings_still_serves(tmp_path: Path, nothing_starts: list[str]) -> None:
    """The checks above refuse nothing valid: the gateway gets to serving."""
    result = invoke(["gateway", "--port", "8123"], tmp_path, TUNESHIELD_ADMIN_KEY=ADMIN_KEY)
    assert result.exit_code == 0, result.output
    assert nothing_starts == ["uvicorn"]


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8000", "ftp://engine", "http://"])
def test_learner_engine_url_that_is_no_http_url_names_the_option(
    tmp_path: Path, nothing_starts: list[str], url: str
) -> None:
    """--engine-url notaurl started the learner, which then warned about it forever; now
    one line naming the option, before anything is prepared or started."""
    result = invoke(["learner", "--engine-url", url], tmp_path)
    assert_one_line_naming(result, "--engine-url")
    assert nothing_starts == []


def test_learner_policy_with_a_wrong_type_names_the_key(
    tmp_path: Path, nothing_starts: list[str]
) -> None:
    """The learner's policy is checked the same way: one line naming file and key."""
    policies = policies_with(tmp_path, "learner", "  poll_s: 2.0", "  poll_s: fast")
    result = invoke(
        ["learner", "--engine-url", "http://127.0.0.1:8000"],
        tmp_path,
        TUNESHIELD_POLICIES_DIR=str(policies),
    )
    assert_one_line_naming(result, "[worker]: poll_s")
    assert nothing_starts == []


@pytest.mark.parametrize(
    ("model", "says"),
    [("nosuchmodel", "local hub cache"), ("/nope/model", "neither"), ("a//b", "neither")],
)
def test_engine_unknown_model_names_it_before_vllm_starts(
    tmp_path: Path, nothing_starts: list[str], model: str, says: str
) -> None:
    """--model naming no folder and no cached hub model (downloads are off here) started
    vLLM, which died with a 40-line hub traceback; now one line naming the model."""
    result = invoke(["engine", "--model", model], tmp_path)
    assert_one_line_naming(result, model)
    assert says in result.output and nothing_starts == []


@pytest.mark.parametrize("port", ["70000", "0"])
def test_engine_port_out_of_range_names_it(
    tmp_path: Path, nothing_starts: list[str], port: str
) -> None:
    """The engine's port is checked by its policy's typed settings: one line naming it."""
    result = invoke(["engine", "--port", port], tmp_path)
    assert_one_line_naming(result, "port")
    assert nothing_starts == []
