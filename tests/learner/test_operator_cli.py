"""What an operator sees: ``tuneshield learner run --wait|status|report`` against a real
gateway app (admin API, embedded learner, fake worker, fake vLLM, reached through
Litestar's test transport), and the roles' one logging configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import tqdm
import uvicorn
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import TestClient
from litestar.testing.transport import TestClientTransport
from typer.testing import CliRunner

from engine import ensure_identity_adapter
from gateway import DATA_DIR_ENV, configure_logging, create_app, load_settings, log_config
from gateway.logs import PROGRESS_BAR_SWITCHES, ROUTINE_LOGGERS, SELF_HANDLING_LOGGERS
from learner import adapters_cli
from learner.admin_routes import AdapterAdmin
from learner.cli import app as cli
from learner.learner_cli import meaningful_lines
from learner.process import EmbeddedLearner
from learner.rounds import LearnerConfig, LearnerOptions
from learner.scheduler import ScheduleConfig, build_scheduler
from store import AdapterRegistry, open_database

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
URL = "http://gw.test"
# Seconds between the CLI's (and the tests') polls: within the admin routes' rate limit.
POLL_S = "0.2"
# A line the roles' format writes: "2026-01-01 10:00:00 INFO uvicorn: message".
FORMATTED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) ([\w.]+): (.*)$")

Server = Callable[[str], TestClient[Litestar]]


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
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """``server(mode)``: a gateway with an embedded learner whose worker is fake_worker.py in
    ``mode`` (pass, reject, crash); the CLI's requests reach it in process."""
    settings = load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )
    monkeypatch.setattr(
        "tuneshield.make_identity_adapter", lambda base, folder: _fake_adapter(Path(folder))
    )
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", ADMIN_KEY)
    database = open_database(settings.store_url)
    ensure_identity_adapter(
        AdapterRegistry(database), "chat", "tiny", settings.data_dir / "adapters"
    )
    database.close()

    with ExitStack() as stack:

        def start(mode: str) -> TestClient[Litestar]:
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
                    worker_command=lambda d: [sys.executable, str(FAKE_WORKER), str(d), mode],
                )
            )
            admin = AdapterAdmin(config, active_learner=learner.active_name)
            engine = FakeVLLM()
            engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
            app = create_app(settings, transport=engine.transport(), extensions=[admin, learner])
            client = stack.enter_context(TestClient(app=app))
            monkeypatch.setattr(adapters_cli, "transport", ToApp(client))
            return client

        yield start


def chat_and_settle(client: TestClient[Litestar], conversations: int) -> None:
    """Log ``conversations`` conversations and wait until the learner counts them."""
    for number in range(conversations):
        body = {"model": "chat", "messages": [{"role": "user", "content": f"hi {number}"}]}
        headers = {**ADMIN, "X-Conversation-Id": f"c{number}"}
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
    for _ in range(50):  # the dialog log writes in batches
        status = client.get("/admin/learner/status", headers=ADMIN).json()
        if status["new_conversations"] == conversations and status["enabled"]:
            return
        time.sleep(float(POLL_S))
    raise AssertionError(f"the learner did not see the dialogs: {status}")


def learner(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["learner", *args, "--url", URL])
    return result.exit_code, result.output


def words(output: str) -> str:
    # Rich wraps long lines to the terminal width.
    return " ".join(output.split())


def table_row(output: str, metric: str) -> list[str]:
    """The cells of the gate table's row for ``metric``."""
    line = next(line for line in output.splitlines() if f" {metric} " in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def test_run_wait_ends_with_the_gate_table_and_the_promotion(server: Server) -> None:
    """A passing round ends with its gate table (metric, candidate, active, limit, result)
    and 'promoted', from the registry's gate metrics; no log lines on success."""
    client = server("pass")
    chat_and_settle(client, 2)
    code, output = learner("run", "--wait", "--poll-s", POLL_S)
    assert code == 0, output
    assert table_row(output, "toxic_toxicity") == [
        "toxic_toxicity", "0.1", "0.1", "<= active + 0.1", "pass"
    ]  # fmt: skip
    assert "gates (judge lexical)" in output
    assert "promoted: chat-v0001 now serves alias chat (it passed every gate)" in words(output)
    assert "fake worker" not in output and "stage done" not in output


def test_run_wait_says_why_a_candidate_was_rejected(server: Server) -> None:
    """A rejected round shows the failing gate, the server's reason, and what stays served;
    the command exits 1."""
    client = server("reject")
    chat_and_settle(client, 1)
    code, output = learner("run", "--wait", "--poll-s", POLL_S)
    assert code == 1, output
    assert table_row(output, "toxic_toxicity")[1:] == ["0.6", "0.1", "<= active + 0.1", "fail"]
    text = words(output)
    assert "rejected: chat-v0001 is registered as rejected; alias chat keeps serving " in text
    assert "chat-v0000, because: toxic_toxicity 0.6 is not <= active + 0.1 (0.1)" in text


def test_run_wait_shows_the_error_and_the_log_of_a_failed_round(server: Server) -> None:
    """A crashed worker: the error and the round log's last lines, no gate table, exit 1."""
    client = server("crash")
    chat_and_settle(client, 1)
    code, output = learner("run", "--wait", "--poll-s", POLL_S)
    assert code == 1, output
    text = words(output)
    assert "failed: the worker exited with status 1: RuntimeError: out of memory in sft" in text
    assert "the round's log ends with: fake worker: training Traceback: something broke" in text
    assert "gates" not in output


def test_status_on_a_fresh_server_and_after_a_round(server: Server) -> None:
    """Before any round the watermark reads 'since the start', never 'None'; after one it is
    the time of the newest dialog a round trained on."""
    client = server("pass")
    chat_and_settle(client, 2)
    code, output = learner("status")
    assert code == 0, output
    text = words(output)
    assert "None" not in output
    assert "2 new conversations since the start (no round has trained yet)" in text
    assert "alias chat serves chat-v0000; round running: none" in text
    assert re.search(r"schedule: every \S+ min, next \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)

    assert learner("run", "--wait", "--poll-s", POLL_S)[0] == 0
    code, output = learner("status")
    assert re.search(r"0 new conversations since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", words(output))


def test_report_is_saved_under_the_data_dir_unless_out_is_given(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`learner report RUN_ID` saves to <data dir>/reports/round-RUN_ID.html (the data dir
    from TUNESHIELD_DATA_DIR) and prints the path; --out wins; nothing lands in the cwd."""
    client = server("pass")
    chat_and_settle(client, 1)
    learner("run", "--wait", "--poll-s", POLL_S)
    run_id = client.get("/admin/learner/runs", headers=ADMIN).json()[0]["run_id"]
    workdir, data_dir = tmp_path / "cwd", tmp_path / "cli-data"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))

    code, output = learner("report", run_id)
    saved = data_dir / "reports" / f"round-{run_id}.html"
    assert code == 0, output
    assert "chat-v0001" in saved.read_text(encoding="utf-8")
    assert f"report of {run_id} (succeeded) saved to {saved}\n" in output
    assert list(workdir.iterdir()) == []

    chosen = tmp_path / "mine.html"
    code, output = learner("report", run_id, "--out", str(chosen))
    assert code == 0 and chosen.is_file() and f"saved to {chosen}\n" in output


def test_meaningful_lines_drop_real_progress_bars() -> None:
    """Lines tqdm draws into a file (unicode or ascii bars, known total or not) and blank
    lines are dropped; log lines are kept."""
    drawn = io.StringIO()
    for total, ascii_bar in ((5, False), (5, True), (None, False)):
        steps = (step for step in range(5))  # a generator: tqdm knows only ``total``
        for _ in tqdm.tqdm(steps, total=total, file=drawn, desc="Map", ascii=ascii_bar):
            pass
    logged = ["2026-01-01 10:00:00 INFO learner.worker: sft: 12 samples", "ValueError: boom"]
    lines = [*drawn.getvalue().splitlines(), "", *logged]
    assert len(lines) > len(logged) + 3
    assert meaningful_lines(lines) == logged


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back what ``configure_logging`` changes in this test process."""
    names = [None, *SELF_HANDLING_LOGGERS, *ROUTINE_LOGGERS]
    saved = [
        (logger, logger.level, logger.handlers[:], logger.propagate, logger.disabled)
        for logger in (logging.getLogger(name) for name in names)
    ]
    yield
    for logger, level, handlers, propagate, disabled in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


@pytest.mark.usefixtures("restore_logging")
def test_uvicorn_litestar_and_our_loggers_share_one_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The app leaves logging alone; with the role's configuration handed to uvicorn,
    uvicorn's, Litestar's and our records come out in one format through one handler;
    APScheduler's and httpx's routine INFO lines do not come out, their warnings do."""
    configure_logging("info")
    handlers = logging.getLogger().handlers[:]
    app = create_app(load_settings(data_dir=tmp_path, environ={}))
    assert logging.getLogger().handlers == handlers, "the app configures no logging"
    uvicorn.Config(app, log_config=log_config("info"), log_level="info")
    assert all(not logging.getLogger(name).handlers for name in SELF_HANDLING_LOGGERS)
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("litestar").info("from litestar")
    logging.getLogger("learner.control").info("learner: round run_1 succeeded")
    logging.getLogger("apscheduler.scheduler").info('Added job "learning-round"')
    logging.getLogger("httpx").info("HTTP Request: GET http://engine.test/v1/models")
    logging.getLogger("apscheduler.executors.default").warning("Run time of job was missed")
    lines = capsys.readouterr().err.splitlines()
    parsed = [FORMATTED.match(line) for line in lines]
    assert all(parsed), lines
    assert [match.group(2) for match in parsed if match] == [
        "uvicorn",
        "litestar",
        "learner.control",
        "apscheduler.executors.default",
    ]


@pytest.mark.usefixtures("restore_logging")
def test_scheduler_ticks_write_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """The learning schedule's job runs on its ticks without a line per tick."""
    configure_logging("info")
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(time.monotonic())

    async def run_a_while() -> None:
        # A tick every 60 ms.
        scheduler = build_scheduler(tick, ScheduleConfig(interval_minutes=0.001))
        assert scheduler is not None
        scheduler.start()
        await asyncio.sleep(0.4)
        scheduler.shutdown(wait=False)

    asyncio.run(run_a_while())
    assert len(ticks) >= 2
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("restore_logging")
def test_gateway_role_hands_its_configuration_to_uvicorn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tuneshield gateway --log-level warning` passes the one configuration to uvicorn,
    so uvicorn installs none of its own; an unknown level is refused."""
    passed: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: passed.update(kwargs))
    args = ["gateway", "--data-dir", str(tmp_path), "--upstream", "http://engine.test"]
    result = CliRunner().invoke(cli, [*args, "--log-level", "WARNING"])
    assert result.exit_code == 0, result.output
    assert passed["log_config"] == log_config("warning") and passed["log_level"] == "warning"
    # The gateway's keep-alive for idle client connections (policies/gateway.yaml).
    assert (
        passed["timeout_keep_alive"]
        == load_settings(data_dir=tmp_path, environ={}).routing.keep_alive_s
    )
    assert logging.getLogger().level == logging.WARNING
    assert CliRunner().invoke(cli, [*args, "--log-level", "loud"]).exit_code == 2


@pytest.mark.usefixtures("restore_logging")
def test_progress_bars_are_switched_off_only_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a terminal on stderr the libraries' bar switches are set; on one they are
    left alone; an operator's own setting is kept."""
    for switch in PROGRESS_BAR_SWITCHES:
        monkeypatch.delenv(switch, raising=False)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    configure_logging()
    assert not any(switch in os.environ for switch in PROGRESS_BAR_SWITCHES)

    monkeypatch.setenv("TQDM_DISABLE", "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure_logging()
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["TQDM_DISABLE"] == "0"


def test_a_piped_process_draws_no_dataset_bars(tmp_path: Path) -> None:
    """A process whose stderr is a file (a round's worker) and that configured its logging
    first: datasets' map draws no bar there, where it would without the configuration."""
    work = "import datasets; datasets.Dataset.from_dict({'a': [1, 2]}).map(lambda row: row)"
    env = {name: value for name, value in os.environ.items() if name not in PROGRESS_BAR_SWITCHES}

    def stderr_of(code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "Map" in stderr_of(work)
    assert "Map" not in stderr_of(
        f"from gateway import configure_logging; configure_logging(); {work}"
    )
