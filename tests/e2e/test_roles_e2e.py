"""The production topology on loopback, each role its own process on one PostgreSQL store:
two ``tuneshield gateway`` replicas, one ``tuneshield engine`` (tiny model), two
``tuneshield learner`` processes of which one is active.

A round queued through one gateway is run by the active learner, and its version is then
served through both gateways (checked in the dialog log); the second learner waits, and
takes over when the first is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_engine import READY_TIMEOUT_S, TINY_ENGINE_ENV, small_policies

from simulation.loopback import free_port, stop, wait_until_ready
from store import open_database

pytestmark = pytest.mark.slow

ADMIN_KEY = "ts-e2e-admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUND_TIMEOUT_S = 600
TAKEOVER_TIMEOUT_S = 30
TUNESHIELD = str(Path(sys.executable).parent / "tuneshield")


@contextmanager
def role(name: str, args: list[str], env: dict[str, str], logs: Path) -> Iterator[Any]:
    """``tuneshield ARGS`` as a process of its own; SIGTERM (then SIGKILL) at the end."""
    log = logs / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [TUNESHIELD, *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    process.log = log  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        stop(process)


def tail(process: Any) -> str:
    return str(process.log.read_text()[-3000:])


def served_version(root: str, conversation: str) -> str:
    """The adapter version that answered one turn (the body names the alias asked for)."""
    return str(chat(root, conversation, "hello").headers["x-tuneshield-version"])


def chat(root: str, conversation: str, *texts: str) -> httpx.Response:
    """One turn; several texts are a dialog so far (user, bot, user, ...)."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]
    response = httpx.post(
        f"{root}/v1/chat/completions",
        json={"model": "chat", "messages": messages, "max_tokens": 4},
        headers={**ADMIN, "X-Conversation-Id": conversation},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response


def wait_for(what: str, check: Any, timeout_s: float, describe: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s} s\n{describe()}"
        time.sleep(0.5)


def status(root: str) -> dict[str, Any]:
    return dict(httpx.get(f"{root}/admin/learner/status", headers=ADMIN, timeout=10).json())


def test_two_gateways_one_engine_two_learners_on_postgres(
    tiny_model_dir: Path, tmp_path: Path, postgres_database_url: str
) -> None:
    """A round queued on gateway 1 runs on the active learner; both gateways then serve its
    version; killing the active learner hands leadership to the waiting one."""
    env = {
        **os.environ,
        **TINY_ENGINE_ENV,
        "TUNESHIELD_DATABASE_URL": postgres_database_url,
        "TUNESHIELD_DATA_DIR": str(tmp_path / "data"),
        "TUNESHIELD_ADMIN_KEY": ADMIN_KEY,
        "TUNESHIELD_POLICIES_DIR": str(small_policies(tmp_path / "policies")),
    }
    engine_port, ports = free_port(), [free_port(), free_port()]
    engine_url = f"http://127.0.0.1:{engine_port}"
    roots = [f"http://127.0.0.1:{port}" for port in ports]
    learner_args = ["learner", "--model", str(tiny_model_dir), "--engine-url", engine_url]
    with ExitStack() as stack:
        engine_args = ["engine", "--model", str(tiny_model_dir), "--port", str(engine_port)]
        engine = stack.enter_context(role("engine", engine_args, env, tmp_path))
        gateways = []
        for index, port in enumerate(ports, start=1):
            args = ["gateway", "--upstream", engine_url, "--port", str(port)]
            gateways.append(stack.enter_context(role(f"gateway{index}", args, env, tmp_path)))
        first = stack.enter_context(role("learner1", learner_args, env, tmp_path))
        for root, gateway in zip(roots, gateways, strict=True):
            wait_until_ready(
                f"{root}/metrics", gateway, 60, describe_failure=lambda g=gateway: tail(g)
            )
        wait_until_ready(
            f"{engine_url}/health", engine, READY_TIMEOUT_S, describe_failure=lambda: tail(engine)
        )
        leader = wait_for("learner 1 leads", lambda: status(roots[0])["active_learner"], 60,
                          lambda: tail(first))  # fmt: skip
        second = stack.enter_context(role("learner2", learner_args, env, tmp_path))
        wait_for("learner 2 waits", lambda: "another learner is active" in tail(second), 60,
                 lambda: tail(second))  # fmt: skip
        assert status(roots[1])["active_learner"] == leader

        # Version 0 reaches the engine through the learner's reconciliation.
        wait_for(
            "chat-v0000 is served",
            lambda: _answers(roots[0]),
            120,
            lambda: tail(first),
        )
        for index in range(6):
            # The users' second turns are what the round learns from (with their context).
            chat(roots[index % 2], f"user-{index}", "do you like to cook?", "I see.",
                 f"you are a stupid idiot, tell me story {index}")  # fmt: skip
        queued = httpx.post(f"{roots[0]}/admin/learner/run", headers=ADMIN, timeout=30)
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
        run_id = queued.json()["run_id"]
        run = wait_for(
            "the round ends",
            lambda: _finished(roots[1], run_id),
            ROUND_TIMEOUT_S,
            lambda: tail(first),
        )
        assert run["status"] == "succeeded", (run["error"], run["log_tail"])
        assert run["version"] == "chat-v0001" and run["claimed_by"] == leader
        # Both gateways pick the flip up from the store within the cache refresh period.
        for index, root in enumerate(roots, start=1):
            wait_for(
                f"gateway {index} serves chat-v0001",
                lambda r=root, i=index: served_version(r, f"probe-{i}") == "chat-v0001",
                10,
            )

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        successor = wait_for(
            "learner 2 takes over",
            lambda: (s := status(roots[0])["active_learner"]) not in (None, leader) and s,
            TAKEOVER_TIMEOUT_S,
            lambda: tail(second),
        )
        assert successor and "is the active learner" in tail(second)

    database = open_database(postgres_database_url)
    try:
        served = dict(
            database.call(
                lambda c: c.execute(
                    "SELECT conversation_id, adapter FROM turns WHERE conversation_id LIKE "
                    "'probe-%' ORDER BY created_at"
                ).fetchall()
            )
        )
    finally:
        database.close()
    assert served == {"probe-1": "chat-v0001", "probe-2": "chat-v0001"}


def _answers(root: str) -> bool:
    response = httpx.post(
        f"{root}/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={**ADMIN, "X-Conversation-Id": "warm-up"},
        timeout=60,
    )
    return response.status_code == 200


def _finished(root: str, run_id: str) -> dict[str, Any] | None:
    run = httpx.get(f"{root}/admin/learner/runs/{run_id}", headers=ADMIN, timeout=10).json()
    return dict(run) if run["status"] in ("succeeded", "failed", "rejected") else None
