"""Gateway overhead on loopback: the same load against the engine, our gateway and LiteLLM.

    .venv/bin/python benchmarks/gateway.py [--seconds 20] [--clients 64] [--tokens 64]
        [--token-delay-ms 10] [--modes stream,json] [--targets upstream,gateway,litellm]
        [--no-pin] [--json results.json]
    .venv/bin/python benchmarks/gateway.py --replicas 2 [--seconds 10] [--out results.json]

Three servers, each its own process, in front of one fake OpenAI engine:

(a) ``upstream``: a fake OpenAI-compatible engine that paces tokens like a GPU vLLM: one
    scheduler step every ``--token-delay-ms`` emits the next token of every running
    request (64 tokens at 10 ms by default; ``--token-delay-ms 0`` answers at once).
(b) ``gateway``: ``tuneshield gateway`` (the real app, uvicorn, a DuckDB file in a temp
    dir, an admin key) in front of (a). Its CPU seconds come from /proc.
(c) ``litellm``: the LiteLLM proxy in front of (a), installed by this script into its own
    virtualenv under ~/.cache/tuneshield/bench/litellm-venv (never into ours).

The load generator is one asyncio process with 64 keep-alive connections speaking raw
HTTP/1.1 (a full HTTP client costs enough CPU on 2 cores to distort the figures; phase
(a) shows what the generator reaches with no proxy in between). Each phase runs for
``--seconds`` after a short warm-up; requests in flight at the deadline are completed,
so every started request is answered. After the gateway's phases, the gateway is stopped
(its log drains) and the turns in its DuckDB file are counted against the answers.

``--replicas N`` (about 3 minutes at the default 10 s per phase): one gateway vs N gateway
processes, each a ``tuneshield gateway`` on its own port, all on one PostgreSQL database
(a throwaway server started here, ``simulation.postgres.PostgresServer``), clients spread
over them round robin, in front of one fake engine that is switched between zero delay and
``--token-delay-ms`` between phases. In one run: the engine directly (paced, zero delay),
then for 1 and for N gateways the zero-delay phases (gateway CPU per request, summed over
the replicas, and PostgreSQL's) and the paced phases (throughput and added latency against
direct). Each configuration gets its own database; after its gateways stop, the rows of
``turns`` are counted against the answered requests, and the exit status is 1 if they
differ. The gateways and the PostgreSQL server share the proxy core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from simulation.loopback import free_port, stop, wait_until_ready
from simulation.sigterm import unwinds_on_sigterm
from store import DATABASE_URL_ENV, DUCKDB_FILENAME

REPO = Path(__file__).resolve().parents[1]
LITELLM_PIN = "1.100.5"
LITELLM_VENV = Path.home() / ".cache" / "tuneshield" / "bench" / "litellm-venv"
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
LITELLM_KEY = "sk-bench-0123456789abcdef"
ENGINE_MODEL = "bench-engine"
KEY_VISIBLE_TIMEOUT_S = 30.0
PROMPT = [{"role": "user", "content": "Tell me about your favourite city and why you like it."}]
CONTENT = re.compile(rb'"content":\s*"[^"]')
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 180.0


# -- (a) the fake engine ----------------------------------------------------------------


class _Job:
    __slots__ = ("include_usage", "model", "remaining", "stream", "transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        model: str,
        tokens: int,
        stream: bool,
        include_usage: bool,
    ) -> None:
        self.transport = transport
        self.model = model
        self.remaining = tokens
        self.stream = stream
        self.include_usage = include_usage


class FakeEngine:
    """All running requests advance one token per step, as in a continuous-batching engine."""

    def __init__(self, tokens: int, delay_s: float) -> None:
        self.tokens = tokens
        self.delay_s = delay_s
        self.jobs: list[_Job] = []
        self.ticking = False
        self.cache: dict[tuple[str, str, str | None, bool], bytes] = {}
        self.next_tick = 0.0

    def chunk(self, model: str, delta: str, finish: str | None, usage: bool = False) -> bytes:
        # Every request gets the same tokens: build each event once (the engine stays cheap).
        key = (model, delta, finish, usage)
        cached = self.cache.get(key)
        if cached is None:
            cached = self.cache[key] = self._chunk(model, delta, finish, usage)
        return cached

    def _chunk(self, model: str, delta: str, finish: str | None, usage: bool) -> bytes:
        payload: dict[str, Any] = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": []
            if usage
            else [{"index": 0, "delta": json.loads(delta), "finish_reason": finish}],
        }
        if usage:
            payload["usage"] = self.usage()
        event = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(event), event)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": 16,
            "completion_tokens": self.tokens,
            "total_tokens": 16 + self.tokens,
        }

    def start(self, job: _Job) -> None:
        if job.stream:
            job.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
        if self.delay_s == 0:
            while job.remaining:
                self.step(job)
            return
        self.jobs.append(job)
        if not self.ticking:
            self.ticking = True
            loop = asyncio.get_running_loop()
            self.next_tick = loop.time() + self.delay_s
            loop.call_at(self.next_tick, self.tick)

    def tick(self) -> None:
        loop = asyncio.get_running_loop()
        # A fixed cadence, as a GPU's steps: a late tick does not push the later ones back.
        self.next_tick = max(self.next_tick + self.delay_s, loop.time())
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            if job.transport.is_closing():
                continue
            self.step(job)
            if job.remaining:
                self.jobs.append(job)
        if self.jobs:
            loop.call_at(self.next_tick, self.tick)
        else:
            self.ticking = False

    def step(self, job: _Job) -> None:
        job.remaining -= 1
        index = self.tokens - job.remaining
        if not job.stream:
            if job.remaining == 0:
                text = "".join(f"tok{i} " for i in range(1, self.tokens + 1))
                body = json.dumps(
                    {
                        "id": "chatcmpl-bench",
                        "object": "chat.completion",
                        "created": 1,
                        "model": job.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "length",
                            }
                        ],
                        "usage": self.usage(),
                    }
                ).encode()
                job.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
            return
        out = []
        if index == 1:
            out.append(self.chunk(job.model, '{"role":"assistant","content":""}', None))
        out.append(self.chunk(job.model, f'{{"content":"tok{index} "}}', None))
        if job.remaining == 0:
            out.append(self.chunk(job.model, "{}", "length"))
            if job.include_usage:
                out.append(self.chunk(job.model, "{}", None, usage=True))
            out.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        job.transport.write(b"".join(out))


class EngineProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: chat completions, /health, /v1/models."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            method, path = head[0].split(" ")[:2]
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "POST" and path.endswith("/chat/completions"):
            request = json.loads(body)
            options = request.get("stream_options") or {}
            job = _Job(
                self.transport,
                str(request.get("model", ENGINE_MODEL)),
                self.engine.tokens,
                bool(request.get("stream")),
                bool(options.get("include_usage")),
            )
            self.engine.start(job)
            return
        if method == "POST" and path == "/bench/delay":
            # Between phases only: one engine process serves both the paced and the
            # zero-delay phases of the replicas mode.
            self.engine.delay_s = float(json.loads(body)["ms"]) / 1000.0
            reply = b"{}"
        elif path.startswith("/v1/models"):
            reply = json.dumps(
                {"object": "list", "data": [{"id": ENGINE_MODEL, "object": "model"}]}
            ).encode()
        elif path.startswith("/health"):
            reply = b"{}"
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(reply), reply)
        )


def run_engine(port: int, tokens: int, delay_s: float) -> None:
    """Serve the fake engine on 127.0.0.1:port until killed."""

    async def serve() -> None:
        engine = FakeEngine(tokens, delay_s)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: EngineProtocol(engine), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    _run(serve())


def _run(main: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


# -- the load generator -------------------------------------------------------------------


@dataclass
class PhaseResult:
    """One target under one mode."""

    target: str
    mode: str
    answered: int = 0
    warmup_answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    loadgen_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    engine_cpu_s: float = 0.0
    db_cpu_s: float | None = None

    @property
    def rps(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "mode": self.mode,
            "answered": self.answered,
            "errors": self.errors,
            "req_per_s": round(self.rps, 1),
            "ttft_p50_ms": _pct(self.ttft_ms, 50),
            "ttft_p99_ms": _pct(self.ttft_ms, 99),
            "latency_p50_ms": _pct(self.latency_ms, 50),
            "latency_p99_ms": _pct(self.latency_ms, 99),
            "server_cpu_ms_per_request": None
            if self.server_cpu_s is None or not self.answered
            else round(self.server_cpu_s * 1000 / self.answered, 3),
            "db_cpu_ms_per_request": None
            if self.db_cpu_s is None or not self.answered
            else round(self.db_cpu_s * 1000 / self.answered, 3),
            "loadgen_cpu_share": round(self.loadgen_cpu_s / self.seconds, 3)
            if self.seconds
            else None,
            "engine_cpu_share": round(self.engine_cpu_s / self.seconds, 3)
            if self.seconds
            else None,
        }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


class ClientProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the load generator (one callback per read)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.first: float | None = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.head: str | None = None
        self.chunked = False
        self.length = 0
        self.offset = 0
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed by the server"))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first = None
        self._reset()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        if self.first is None and CONTENT.search(data):
            self.first = time.perf_counter()
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buffer[:end]).decode("latin-1").lower()
            del self.buffer[: end + 4]
            self.chunked = "transfer-encoding: chunked" in self.head
            match = re.search(r"content-length:\s*(\d+)", self.head)
            self.length = int(match.group(1)) if match else 0
        if self.chunked:
            self._chunks()
        elif len(self.buffer) >= self.length:
            self.body += self.buffer[: self.length]
            del self.buffer[: self.length]
            self._finish()

    def _chunks(self) -> None:
        buffer, offset = self.buffer, self.offset
        while True:
            line_end = buffer.find(b"\r\n", offset)
            if line_end < 0:
                break
            size = int(bytes(buffer[offset:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(buffer) < line_end + 4:
                    break
                del buffer[: line_end + 4]
                self.offset = 0
                self._finish()
                return
            if len(buffer) < line_end + 2 + size + 2:
                break
            self.body += buffer[line_end + 2 : line_end + 2 + size]
            offset = line_end + 2 + size + 2
        del buffer[:offset]
        self.offset = 0

    def _finish(self) -> None:
        assert self.head is not None and self.done is not None
        status = int(self.head.split(" ", 2)[1])
        if not self.done.done():
            self.done.set_result((status, bytes(self.body), "connection: close" in self.head))


class Connection:
    """Sends one fixed request again and again over a keep-alive connection."""

    def __init__(self, port: int, request: bytes) -> None:
        self.port = port
        self.request = request
        self.protocol: ClientProtocol | None = None

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None

    async def exchange(self, stream: bool) -> tuple[float | None, float]:
        """Send once; (ms to the first content token, ms to the end). Raises on failure."""
        if self.protocol is None or self.protocol.lost:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(ClientProtocol, "127.0.0.1", self.port)
        protocol = self.protocol
        started = time.perf_counter()
        status, body, close = await protocol.send(self.request)
        total = (time.perf_counter() - started) * 1000.0
        first = None
        if stream and protocol.first is not None:
            first = (protocol.first - started) * 1000.0
        if close:
            await self.close()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        if stream and not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream did not end with [DONE]: {body[-200:]!r}")
        if not stream and not CONTENT.search(body):
            raise RuntimeError(f"no content in reply: {body[:200]!r}")
        return first, total


def build_request(path: str, model: str, key: str, stream: bool) -> bytes:
    body = json.dumps({"model": model, "messages": PROMPT, "stream": stream}).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def load(
    ports: Sequence[int],
    request: bytes,
    stream: bool,
    clients: int,
    seconds: float,
    result: PhaseResult,
) -> None:
    """``clients`` workers send back to back until the deadline; in-flight ones finish.

    With several ``ports`` (gateway replicas) the clients are spread round robin."""
    connections = [Connection(ports[i % len(ports)], request) for i in range(clients)]
    # Warm-up: connections opened and every server path taken once, not counted.
    warm_until = time.perf_counter() + min(2.0, seconds / 4)
    warm = PhaseResult(result.target, result.mode)
    await asyncio.gather(*(_worker(c, stream, warm_until, warm) for c in connections))
    result.warmup_answered = warm.answered
    result.errors += warm.errors
    started = time.perf_counter()
    await asyncio.gather(*(_worker(c, stream, started + seconds, result) for c in connections))
    result.seconds = time.perf_counter() - started
    for connection in connections:
        await connection.close()


async def _worker(
    connection: Connection, stream: bool, deadline: float, result: PhaseResult
) -> None:
    while time.perf_counter() < deadline:
        try:
            first, total = await connection.exchange(stream)
        except (OSError, RuntimeError, ValueError) as error:
            result.errors += 1
            if result.errors <= 3:
                print(f"  {result.target}/{result.mode}: {error}", file=sys.stderr)
            await connection.close()
            await asyncio.sleep(0.05)
            continue
        result.answered += 1
        result.latency_ms.append(total)
        if first is not None:
            result.ttft_ms.append(first)


# -- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (threads included), from /proc."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root``, its reaped children and its live direct children.

    A PostgreSQL server: the postmaster and its backends (which fork nothing further);
    a backend that exits between two samples moves into the postmaster's children time."""
    fields = _stat(root)
    total = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(child[1]) == root:
            total += int(child[11]) + int(child[12])
    return total / CLK_TCK


@contextmanager
def started(
    command: list[str],
    port: int,
    path: str,
    cores: set[int] | None,
    env: Mapping[str, str | None],
    log: Path,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, pinned to ``cores``; yield it once ``path`` answers 200; stop it
    (SIGTERM, then wait) on the way out. ``env`` entries of None are unset."""
    merged = {**os.environ, **env}
    environment = {name: value for name, value in merged.items() if value is not None}
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
    try:
        if cores:
            os.sched_setaffinity(process.pid, cores)
        wait_until_ready(f"http://127.0.0.1:{port}{path}", process, READY_TIMEOUT_S, poll_s=0.3)
        yield process
    finally:
        stop(process)


def ensure_litellm() -> Path:
    """The LiteLLM virtualenv's python, installing ``litellm[proxy]`` there if needed."""
    python = LITELLM_VENV / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip() == LITELLM_PIN:
            return python
    print(f"installing litellm[proxy]=={LITELLM_PIN} into {LITELLM_VENV} (once) ...", flush=True)
    shutil.rmtree(LITELLM_VENV, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_PIN}"], check=True
    )
    return python


def litellm_config(directory: Path, engine_port: int) -> Path:
    config = directory / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "chat",
                        "litellm_params": {
                            "model": f"openai/{ENGINE_MODEL}",
                            "api_base": f"http://127.0.0.1:{engine_port}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "general_settings": {"master_key": LITELLM_KEY},
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }
        )
    )
    return config


# -- main -----------------------------------------------------------------------------------


def count_logged_turns(db_path: Path) -> int:
    import duckdb

    with duckdb.connect(str(db_path), read_only=True) as connection:
        row = connection.execute("SELECT count(*) FROM turns").fetchone()
    return int(row[0]) if row else 0


def run_phase(
    target: str,
    mode: str,
    ports: Sequence[int],
    path: str,
    model: str,
    key: str,
    args: argparse.Namespace,
    server_pids: Sequence[int],
    engine_pid: int,
    db_cpu: Callable[[], float] | None = None,
) -> PhaseResult:
    """One phase: ``args.clients`` clients spread over ``ports``. Server CPU is summed over
    ``server_pids`` (none: the engine itself is the target); ``db_cpu`` samples the
    database server's CPU seconds, if there is one."""
    stream = mode == "stream"
    result = PhaseResult(target, mode)
    request = build_request(path, model, key, stream)

    def server_cpu() -> float:
        return sum(cpu_seconds(pid) for pid in server_pids)

    cpu0 = server_cpu()
    db0 = db_cpu() if db_cpu is not None else 0.0
    engine0 = cpu_seconds(engine_pid)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    _run(load(ports, request, stream, args.clients, args.seconds, result))
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU of the warm-up is in the deltas too; it is added to the request count below.
    warm = result.warmup_answered
    scale = result.answered / (result.answered + warm) if result.answered + warm else 1.0
    if server_pids:
        result.server_cpu_s = (server_cpu() - cpu0) * scale
    if db_cpu is not None:
        result.db_cpu_s = (db_cpu() - db0) * scale
    result.engine_cpu_s = (cpu_seconds(engine_pid) - engine0) * scale
    result.loadgen_cpu_s = (
        self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    ) * scale
    summary = result.summary()
    print(
        f"  {target:12} {mode:6} {summary['req_per_s']:7.1f} req/s  "
        f"ttft p50/p99 {summary['ttft_p50_ms']}/{summary['ttft_p99_ms']} ms  "
        f"latency p50/p99 {summary['latency_p50_ms']}/{summary['latency_p99_ms']} ms  "
        f"server CPU/req {summary['server_cpu_ms_per_request']} ms  "
        + (
            f"database CPU/req {summary['db_cpu_ms_per_request']} ms  "
            if db_cpu is not None
            else ""
        )
        + f"errors {result.errors}",
        flush=True,
    )
    return result


def ratios(
    results: dict[tuple[str, str], PhaseResult], mode: str, other: str, ours_name: str = "gateway"
) -> dict[str, Any]:
    ours, theirs = results.get((ours_name, mode)), results.get((other, mode))
    if ours is None or theirs is None or not theirs.rps:
        return {}
    out: dict[str, Any] = {"throughput_ratio": round(ours.rps / theirs.rps, 3)}
    for name, values_a, values_b in (
        ("ttft", ours.ttft_ms, theirs.ttft_ms),
        ("latency", ours.latency_ms, theirs.latency_ms),
    ):
        for q in (50, 99):
            a, b = _pct(values_a, q), _pct(values_b, q)
            if a is not None and b is not None:
                out[f"added_{name}_p{q}_ms"] = round(a - b, 2)
    return out


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        help="Measured seconds per phase (default 20; 10 with --replicas).",
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-delay-ms", type=float, default=10.0)
    parser.add_argument("--modes", default="stream,json")
    parser.add_argument("--targets", default="upstream,gateway,litellm")
    parser.add_argument("--no-pin", action="store_true", help="Do not pin processes to cores.")
    parser.add_argument(
        "--json", "--out", dest="json", type=Path, help="Also write the figures to this file."
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="N",
        help="Replicas mode: 1 vs N `tuneshield gateway` processes on one PostgreSQL "
        "database (started here), against the engine directly (ignores --targets).",
    )
    parser.add_argument("--engine-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_only:
        run_engine(args.engine_only, args.tokens, args.token_delay_ms / 1000.0)
        return
    if args.seconds is None:
        args.seconds = 10.0 if args.replicas else 20.0
    if args.replicas == 1 or args.replicas < 0:
        parser.error("--replicas N compares 1 with N gateway processes: N must be 2 or more")
    modes = [m for m in args.modes.split(",") if m]
    targets = [t for t in args.targets.split(",") if t]
    cores = sorted(os.sched_getaffinity(0))
    # 2 cores: load generator + fake engine share the first, the proxy gets the other.
    pin = not args.no_pin and len(cores) >= 2
    client_cores = {cores[0]} if pin else None
    proxy_cores = set(cores[1:]) if pin else None
    print(
        f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; the load "
        "generator, the fake engine and the proxy all compete for them"
        + (
            f" (pinned: generator+engine on {sorted(client_cores or [])}, "
            f"proxy on {sorted(proxy_cores or [])})"
            if pin
            else " (not pinned)"
        ),
        flush=True,
    )
    print(
        f"load: {args.clients} clients, {args.tokens} tokens at {args.token_delay_ms} ms, "
        f"{args.seconds:g} s per phase, modes {modes}",
        flush=True,
    )
    if args.replicas:
        sys.exit(main_replicas(args, modes, pin, client_cores, proxy_cores))
    if client_cores:
        os.sched_setaffinity(0, client_cores)
    results: dict[tuple[str, str], PhaseResult] = {}
    logged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tuneshield-bench-") as scratch:
        tmp = Path(scratch)
        engine_port = free_port()
        with started_engine(args, engine_port, client_cores, tmp) as e:
            if "upstream" in targets:
                for mode in modes:
                    results["upstream", mode] = run_phase(
                        "upstream",
                        mode,
                        [engine_port],
                        "/v1/chat/completions",
                        ENGINE_MODEL,
                        "unused",
                        args,
                        [],
                        e.pid,
                    )
            if "gateway" in targets:
                logged = bench_gateway(args, modes, engine_port, e.pid, proxy_cores, tmp, results)
            if "litellm" in targets:
                python = ensure_litellm()
                port = free_port()
                command = [
                    str(python),
                    "-m",
                    "litellm.proxy.proxy_cli",
                    "--config",
                    str(litellm_config(tmp, engine_port)),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ]
                env = {"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "NO_DOCS": "True"}
                with started(
                    command, port, "/health/liveliness", proxy_cores, env, tmp / "litellm.log"
                ) as proxy:
                    for mode in modes:
                        results["litellm", mode] = run_phase(
                            "litellm",
                            mode,
                            [port],
                            "/v1/chat/completions",
                            "chat",
                            LITELLM_KEY,
                            args,
                            [proxy.pid],
                            e.pid,
                        )
    report = {
        "machine": {"cpu_cores": os.cpu_count(), "pinned": pin, "litellm": LITELLM_PIN},
        "load": {
            "clients": args.clients,
            "tokens": args.tokens,
            "token_delay_ms": args.token_delay_ms,
            "seconds": args.seconds,
        },
        "phases": [r.summary() for r in results.values()],
        "gateway_vs_upstream": {m: ratios(results, m, "upstream") for m in modes},
        "gateway_vs_litellm": {m: ratios(results, m, "litellm") for m in modes},
        "gateway_log": logged,
    }
    print(json.dumps({k: report[k] for k in report if k != "phases"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if logged and not logged["equal"]:
        sys.exit("logged turns differ from answered turns")


@contextmanager
def started_engine(
    args: argparse.Namespace, port: int, cores: set[int] | None, tmp: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The fake engine (this script with ``--engine-only``) on ``port``."""
    command = [
        sys.executable,
        __file__,
        "--engine-only",
        str(port),
        "--tokens",
        str(args.tokens),
        "--token-delay-ms",
        str(args.token_delay_ms),
    ]
    with started(command, port, "/health", cores, {}, tmp / "engine.log") as engine:
        yield engine


def create_bench_key(port: int) -> str:
    """A user key whose rate limit the load cannot reach (the policy's 600/min would)."""
    import httpx

    response = httpx.post(
        f"http://127.0.0.1:{port}/admin/keys",
        json={"name": "bench", "rate_limit_per_minute": 1e9},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    response.raise_for_status()
    return str(response.json()["key"])


def bench_gateway(
    args: argparse.Namespace,
    modes: list[str],
    engine_port: int,
    engine_pid: int,
    cores: set[int] | None,
    tmp: Path,
    results: dict[tuple[str, str], PhaseResult],
) -> dict[str, Any]:
    """Phases against ``tuneshield gateway``; then stop it and count the logged turns."""
    answered = 0
    with started_gateways(1, engine_port, cores, tmp, "gateway", None) as replicas:
        (gateway,) = replicas
        key = bench_key([gateway.port])
        for mode in modes:
            result = run_phase(
                "gateway",
                mode,
                [gateway.port],
                "/v1/chat/completions",
                "chat",
                key,
                args,
                [gateway.process.pid],
                engine_pid,
            )
            results["gateway", mode] = result
            answered += result.answered + result.warmup_answered
    # The context manager stopped the gateway (SIGTERM): its log queue has drained.
    logged = count_logged_turns(gateway.data_dir / DUCKDB_FILENAME)
    print(f"  gateway log: {logged} turns logged, {answered} answered", flush=True)
    return {"answered": answered, "logged": logged, "equal": answered == logged}


# -- gateway processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One ``tuneshield gateway`` process."""

    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path


@contextmanager
def started_gateways(
    count: int,
    engine_port: int,
    cores: set[int] | None,
    tmp: Path,
    name: str,
    database_url: str | None,
) -> Iterator[list[Replica]]:
    """``count`` gateways in front of the engine, each on its own port and data dir, on
    the DuckDB file of its data dir (``database_url`` None) or on one PostgreSQL database.
    One after another: the first creates (migrates) the database before the next opens it.
    On the way out each is stopped with SIGTERM, which drains its dialog log."""
    env: dict[str, str | None] = {
        "TUNESHIELD_ADMIN_KEY": ADMIN_KEY,
        "HF_HUB_OFFLINE": "1",
        DATABASE_URL_ENV: database_url,
    }
    with ExitStack() as stack:
        replicas = []
        for index in range(count):
            port = free_port()
            data_dir = tmp / f"{name}-{index}-data"
            command = [
                str(Path(sys.executable).with_name("tuneshield")),
                "gateway",
                "--upstream",
                f"http://127.0.0.1:{engine_port}",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
            ]
            log = tmp / f"{name}-{index}.log"
            process = stack.enter_context(started(command, port, "/healthz", cores, env, log))
            replicas.append(Replica(port, process, data_dir))
        yield replicas


def bench_key(ports: Sequence[int]) -> str:
    """A bench key made on the first gateway, once every gateway accepts it (the others
    see it after their key cache refresh)."""
    import httpx

    key = create_bench_key(ports[0])
    deadline = time.monotonic() + KEY_VISIBLE_TIMEOUT_S
    for port in ports[1:]:
        while True:
            response = httpx.get(
                f"http://127.0.0.1:{port}/v1/models",
                headers={"authorization": f"Bearer {key}"},
            )
            if response.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway on port {port} does not accept the bench key")
            time.sleep(0.1)
    return key


def set_engine_delay(engine_port: int, delay_ms: float) -> None:
    """Switch the fake engine between paced and zero-delay (between phases)."""
    import httpx

    response = httpx.post(f"http://127.0.0.1:{engine_port}/bench/delay", json={"ms": delay_ms})
    response.raise_for_status()


def count_postgres_turns(url: str) -> int:
    """Rows in the ``turns`` table, through the store package."""
    from store import DialogStore, open_database

    database = open_database(url)
    try:
        return DialogStore(database).count()
    finally:
        database.close()


def postmaster_pid(data_dir: Path) -> int:
    """The PostgreSQL server's main process (first line of postmaster.pid)."""
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


# -- replicas mode ---------------------------------------------------------------------------


def main_replicas(
    args: argparse.Namespace,
    modes: list[str],
    pin: bool,
    client_cores: set[int] | None,
    proxy_cores: set[int] | None,
) -> int:
    """1 gateway vs ``args.replicas`` gateways on one PostgreSQL database; exit status 1
    when logged turns differ from answered turns in either configuration."""
    from simulation.postgres import PostgresServer

    paced_ms = args.token_delay_ms
    counts = [1, args.replicas]
    results: dict[tuple[str, str], PhaseResult] = {}
    turns: dict[str, dict[str, Any]] = {}
    started_at = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)
    path = "/v1/chat/completions"
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tuneshield-bench-")))
        # The server inherits this process's cores: the gateways' side of the machine, so
        # the load generator's core stays as in the single-gateway mode.
        if proxy_cores:
            os.sched_setaffinity(0, proxy_cores)
        server = stack.enter_context(PostgresServer(tmp / "postgres"))
        pg_pid = postmaster_pid(server.data_dir)
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        print(f"PostgreSQL on 127.0.0.1:{server.port} (postmaster {pg_pid})", flush=True)

        def db_cpu() -> float:
            return tree_cpu_seconds(pg_pid)

        engine_port = free_port()
        engine = stack.enter_context(started_engine(args, engine_port, client_cores, tmp))
        for delay in (paced_ms, 0.0):
            set_engine_delay(engine_port, delay)
            target = "upstream" if delay else "upstream@0ms"
            for mode in modes:
                results[target, mode] = run_phase(
                    target, mode, [engine_port], path, ENGINE_MODEL, "unused", args, [],
                    engine.pid,
                )  # fmt: skip
        for count in counts:
            url = server.create_database(f"bench_replicas_{count}")
            answered = errors = 0
            name = f"r{count}"
            with started_gateways(count, engine_port, proxy_cores, tmp, name, url) as replicas:
                ports = [replica.port for replica in replicas]
                pids = [replica.process.pid for replica in replicas]
                key = bench_key(ports)
                # Zero delay first (CPU per request), then paced (against direct).
                for delay in (0.0, paced_ms):
                    set_engine_delay(engine_port, delay)
                    target = f"gateway-x{count}" + ("" if delay else "@0ms")
                    for mode in modes:
                        result = run_phase(
                            target, mode, ports, path, "chat", key, args, pids, engine.pid,
                            db_cpu,
                        )  # fmt: skip
                        results[target, mode] = result
                        answered += result.answered + result.warmup_answered
                        errors += result.errors
            # Every gateway stopped (SIGTERM drains its dialog log): count the rows.
            logged = count_postgres_turns(url)
            turns[str(count)] = {
                "answered": answered,
                "logged": logged,
                "equal": answered == logged,
                "errors": errors,
            }
            print(
                f"  {count} gateway(s): {logged} turns logged, {answered} answered, "
                f"{errors} errors",
                flush=True,
            )
    report = replicas_report(args, modes, pin, counts, results, turns)
    report["wall_s"] = round(time.monotonic() - started_at, 1)
    report["machine"]["load_average_1m_at_start"] = load_at_start
    print_replicas_table(report, modes, counts)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not all(entry["equal"] for entry in turns.values()):
        print("FAIL: logged turns differ from answered turns", file=sys.stderr)
        return 1
    return 0


def _per_request_ms(result: PhaseResult | None, cpu_s: float | None) -> float | None:
    if result is None or cpu_s is None or not result.answered:
        return None
    return round(cpu_s * 1000 / result.answered, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(b / a, 3) if a and b else None


def replicas_report(
    args: argparse.Namespace,
    modes: list[str],
    pin: bool,
    counts: list[int],
    results: dict[tuple[str, str], PhaseResult],
    turns: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The replicas mode's figures: CPU per request at zero delay, paced vs direct."""
    one, many = counts
    cpu_per_request: dict[str, Any] = {}
    for mode in modes:
        direct = results.get(("upstream@0ms", mode))
        entry: dict[str, Any] = {
            "req_per_s_direct": None if direct is None else round(direct.rps, 1)
        }
        for count in counts:
            result = results.get((f"gateway-x{count}@0ms", mode))
            entry[f"req_per_s_{count}"] = None if result is None else round(result.rps, 1)
            entry[f"gateway_ms_{count}"] = _per_request_ms(
                result, None if result is None else result.server_cpu_s
            )
            entry[f"database_ms_{count}"] = _per_request_ms(
                result, None if result is None else result.db_cpu_s
            )
        entry["gateway_ratio"] = _ratio(entry[f"gateway_ms_{one}"], entry[f"gateway_ms_{many}"])
        entry["database_ratio"] = _ratio(entry[f"database_ms_{one}"], entry[f"database_ms_{many}"])
        cpu_per_request[mode] = entry
    return {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "pinned": pin,
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "load": {
            "clients": args.clients,
            "tokens": args.tokens,
            "token_delay_ms": args.token_delay_ms,
            "seconds": args.seconds,
            "replicas": counts,
            "store": "postgresql",
        },
        "phases": [r.summary() for r in results.values()],
        "cpu_per_request_zero_delay": cpu_per_request,
        "paced_vs_direct": {
            str(count): {m: ratios(results, m, "upstream", f"gateway-x{count}") for m in modes}
            for count in counts
        },
        "turns": turns,
    }


def print_replicas_table(report: dict[str, Any], modes: list[str], counts: list[int]) -> None:
    """The figures and ratios, one row each, a column per mode."""
    one, many = counts
    cpu = report["cpu_per_request_zero_delay"]
    paced = report["paced_vs_direct"]

    def fmt(value: Any, unit: str = "") -> str:
        return "-" if value is None else f"{value:g}{unit}"

    def row(label: str, key: str, unit: str = "") -> tuple[str, list[str]]:
        return label, [fmt(cpu[m][key], unit) for m in modes]

    rows = [row("zero-delay engine: req/s, direct", "req_per_s_direct")]
    rows += [row(f"  req/s, {n} gateway(s)", f"req_per_s_{n}") for n in counts]
    rows += [row(f"  gateway CPU ms/request, {n} gateway(s)", f"gateway_ms_{n}") for n in counts]
    rows.append(row(f"  gateway CPU per request, {many} vs {one}", "gateway_ratio", "x"))
    rows += [
        row(f"  PostgreSQL CPU ms/request, {n} gateway(s)", f"database_ms_{n}") for n in counts
    ]
    rows.append(row(f"  PostgreSQL CPU per request, {many} vs {one}", "database_ratio", "x"))
    for n in counts:
        figures = paced[str(n)]
        rows.append(
            (
                f"paced engine, {n} gateway(s): throughput / direct",
                [fmt(figures[m].get("throughput_ratio")) for m in modes],
            )
        )
        for name in ("ttft", "latency"):
            rows.append(
                (
                    f"  added {name} p50 / p99 ms",
                    [
                        f"{fmt(figures[m].get(f'added_{name}_p50_ms'))} / "
                        f"{fmt(figures[m].get(f'added_{name}_p99_ms'))}"
                        for m in modes
                    ],
                )
            )
    width = max(len(label) for label, _ in rows) + 2
    print("\n" + "".ljust(width) + "".join(f"{m:>18}" for m in modes))
    for label, values in rows:
        print(label.ljust(width) + "".join(f"{v:>18}" for v in values))
    for n in counts:
        entry = report["turns"][str(n)]
        verdict = "equal" if entry["equal"] else "DIFFER"
        print(
            f"turns, {n} gateway(s): {entry['logged']} logged, {entry['answered']} answered "
            f"({verdict}), {entry['errors']} errors"
        )
    print(f"wall time {report.get('wall_s')} s", flush=True)


if __name__ == "__main__":
    main()
