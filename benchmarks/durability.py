"""Durable acknowledgement: SIGKILL the gateway under load, count acknowledged turns lost.

    .venv/bin/python benchmarks/durability.py [--quick] [--kills 3] [--baseline-kills 1]
        [--turns 2000] [--clients 32] [--latency-clients 16] [--seconds 6]
        [--backends duckdb,postgresql] [--no-pin] [--out figures.json]

A zero-delay fake engine (``benchmarks/gateway.py --engine-only``) and real
``tuneshield gateway`` processes on loopback:

1. Crash: concurrent clients send chat turns (JSON and streamed, alternately), each with
   its own ``X-Conversation-Id``. A turn counts as acknowledged when its JSON body, or
   its stream's final ``data: [DONE]``, arrived. Once ``--turns`` are acknowledged the
   gateway gets SIGKILL mid-load; what the store holds is counted, then a gateway is
   started again on the same data dir and store, as an operator's restart would (it
   inserts what its dialog journal holds), and stopped; the store is reopened and every
   acknowledged conversation id is looked up. ``--kills`` runs per backend with ``durable_ack`` on
   (lost must be 0) and ``--baseline-kills`` with it off (the loss it prevents).
2. Cost: the same gateway with ``durable_ack`` on and off (a copy of policies/ each,
   ``$TUNESHIELD_POLICIES_DIR``), ``--latency-clients`` clients for ``--seconds`` per
   mode: added p50/p99 latency of JSON turns, and time to first token of streams.

Backends: a DuckDB file in a temp folder, and PostgreSQL (``simulation.postgres``, a
throwaway server on loopback, reached through ``$TUNESHIELD_DATABASE_URL``); PostgreSQL
is skipped, and said so, where its server binaries are not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulation.scripts import run_from_repository

run_from_repository(__file__)
REPO = Path(__file__).resolve().parents[1]

from benchmarks import gateway as bench
from simulation.loopback import free_port
from simulation.sigterm import unwinds_on_sigterm
from store import DUCKDB_FILENAME, connect
from tuneshield._console import environment_set

POLICIES_ENV = "TUNESHIELD_POLICIES_DIR"
DURABLE_LINE = "  durable_ack: true\n"
DONE = b"data: [DONE]"
ERROR_EVENT = b'data: {"error"'
CONVERSATION_HEADER = "X-Conversation-Id"
REQUEST_TIMEOUT_S = 30.0
KILL_DEADLINE_S = 120.0
RECONNECT_PAUSE_S = 0.05


# -- one gateway process ----------------------------------------------------------------------


@dataclass
class Backend:
    """Where a gateway keeps its store: a DuckDB file, or a PostgreSQL database."""

    name: str
    new_database: Callable[[str], str] | None = None
    """PostgreSQL: a fresh database for one gateway run (the label names it), its URL."""


def write_policies(tmp: Path, durable: bool) -> Path:
    """A copy of policies/ whose ``dialog_log.durable_ack`` is ``durable``."""
    folder = tmp / f"policies-durable-{'on' if durable else 'off'}"
    if not folder.exists():
        shutil.copytree(REPO / "policies", folder)
        path = folder / "gateway.yaml"
        text = path.read_text()
        if text.count(DURABLE_LINE) != 1:
            raise SystemExit(f"expected one line {DURABLE_LINE.strip()!r} in policies/gateway.yaml")
        path.write_text(text.replace(DURABLE_LINE, f"  durable_ack: {str(durable).lower()}\n"))
    return folder


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    key: str
    store: str
    """The DuckDB file's path or the PostgreSQL URL, to reopen after the run."""
    database_url: str | None
    """The PostgreSQL URL (None: the DuckDB file of the data dir)."""


@contextmanager
def gateway(
    backend: Backend,
    durable: bool,
    engine_port: int,
    cores: set[int] | None,
    tmp: Path,
    label: str,
) -> Iterator[Gateway]:
    """One ``tuneshield gateway`` (benchmarks/gateway.py's ``started_gateways``) on a fresh
    store, reading the policies with ``durable_ack`` set; SIGTERM on the way out if alive."""
    url = backend.new_database(label) if backend.new_database is not None else None
    with (
        policies(tmp, durable),
        bench.started_gateways(1, engine_port, cores, tmp, label, url) as (replica,),
    ):
        store = url or str(replica.data_dir / DUCKDB_FILENAME)
        key = bench.create_bench_key(replica.port)
        yield Gateway(replica.process, replica.port, key, store, url)


def restart(
    killed: Gateway,
    durable: bool,
    engine_port: int,
    cores: set[int] | None,
    tmp: Path,
    label: str,
) -> None:
    """Start a gateway on the killed one's data dir and store (``label`` names the same
    data dir), wait until it serves, stop it: what a restart recovers."""
    with (
        policies(tmp, durable),
        bench.started_gateways(1, engine_port, cores, tmp, label, killed.database_url),
    ):
        pass


@contextmanager
def policies(tmp: Path, durable: bool) -> Iterator[None]:
    """``$TUNESHIELD_POLICIES_DIR`` at the copy with ``durable_ack`` set, meanwhile
    (started_gateways passes this process's environment on to the gateway)."""
    with environment_set(POLICIES_ENV, str(write_policies(tmp, durable))):
        yield


def logged_conversations(store: str) -> set[str]:
    """Conversation ids in the store's ``turns`` (reopened after the crash)."""
    database = connect(store)
    try:
        rows = database.call(lambda c: c.execute("SELECT conversation_id FROM turns").fetchall())
    finally:
        database.close()
    return {str(row[0]) for row in rows}


# -- clients ------------------------------------------------------------------------------


class AckProtocol(bench.ClientProtocol):
    """The benchmark's HTTP/1.1 client; a stream whose ``[DONE]`` arrived before the
    connection broke still counts as answered."""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done() and self.head is not None:
            received = bytes(self.body) + bytes(self.buffer)
            if DONE in received:
                status = int(self.head.split(" ", 2)[1])
                self.done.set_result((status, received, True))
        super().connection_lost(exc)


def chat_request(key: str, conversation: str, stream: bool) -> bytes:
    body = json.dumps({"model": "chat", "messages": bench.PROMPT, "stream": stream}).encode()
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\nauthorization: Bearer {key}\r\n"
        f"{CONVERSATION_HEADER}: {conversation}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def acknowledged(status: int, body: bytes, stream: bool) -> bool:
    """Whether the client got the turn's acknowledgement (not an error)."""
    if status != 200:
        return False
    if stream:
        return body.rstrip().endswith(DONE) and ERROR_EVENT not in body
    return bench.CONTENT.search(body) is not None


@dataclass
class KillRun:
    """One crash: what the clients were told, and what the store kept."""

    backend: str
    durable: bool
    acked: set[str] = field(default_factory=set)
    failed: int = 0
    seconds: float = 0.0
    stored_at_kill: int = 0
    """Acknowledged turns in the store right after the kill, before the restart."""
    logged: int = 0
    missing: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "durable_ack": self.durable,
            "acknowledged": len(self.acked),
            "failed_or_cut": self.failed,
            "seconds": round(self.seconds, 2),
            "acknowledged_stored_at_kill": self.stored_at_kill,
            "logged": self.logged,
            "acknowledged_missing": self.missing,
        }


async def load_until_kill(
    port: int, key: str, process: subprocess.Popen[bytes], clients: int, turns: int, run: KillRun
) -> None:
    """Clients send back to back; SIGKILL once ``turns`` are acknowledged; then they stop."""
    loop = asyncio.get_running_loop()
    killed = asyncio.Event()
    deadline = time.perf_counter() + KILL_DEADLINE_S
    prefix = f"{run.backend}-{'on' if run.durable else 'off'}-{os.getpid()}-{time.time_ns()}"

    async def worker(index: int) -> None:
        protocol: AckProtocol | None = None
        sent = 0
        while not killed.is_set() and time.perf_counter() < deadline:
            stream = sent % 2 == 0
            conversation = f"{prefix}-{index}-{sent}"
            sent += 1
            try:
                if protocol is None or protocol.lost:
                    _, protocol = await loop.create_connection(AckProtocol, "127.0.0.1", port)
                reply = protocol.send(chat_request(key, conversation, stream))
                status, body, close = await asyncio.wait_for(reply, REQUEST_TIMEOUT_S)
            except (OSError, TimeoutError):
                run.failed += 1
                protocol = None
                if not killed.is_set():
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            if close and protocol.transport is not None:
                protocol.transport.close()
            if not acknowledged(status, body, stream):
                run.failed += 1
                continue
            run.acked.add(conversation)
            if len(run.acked) >= turns and not killed.is_set():
                process.send_signal(signal.SIGKILL)  # mid-load: the others are in flight
                killed.set()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(clients)))
    run.seconds = time.perf_counter() - started
    if not killed.is_set():
        raise SystemExit(f"only {len(run.acked)} turns acknowledged in {KILL_DEADLINE_S:.0f} s")


def kill_run(
    backend: Backend,
    durable: bool,
    index: int,
    args: argparse.Namespace,
    engine_port: int,
    cores: set[int] | None,
    tmp: Path,
) -> KillRun:
    label = f"kill-{backend.name}-{'on' if durable else 'off'}-{index}"
    run = KillRun(backend.name, durable)
    with gateway(backend, durable, engine_port, cores, tmp, label) as served:
        bench._run(
            load_until_kill(served.port, served.key, served.process, args.clients, args.turns, run)
        )
        served.process.wait()
    run.stored_at_kill = len(run.acked & logged_conversations(served.store))
    restart(served, durable, engine_port, cores, tmp, label)
    logged = logged_conversations(served.store)
    run.logged = len(logged)
    run.missing = len(run.acked - logged)
    print(
        f"  kill {backend.name:10} durable_ack {'on ' if durable else 'off'}  "
        f"{len(run.acked):5} acknowledged in {run.seconds:5.1f} s, "
        f"{run.stored_at_kill:5} of them stored at the kill, {run.logged:5} logged after "
        f"the restart, {run.missing:3} acknowledged turns missing",
        flush=True,
    )
    return run


# -- latency ------------------------------------------------------------------------------


def latency_phases(
    backend: Backend,
    durable: bool,
    args: argparse.Namespace,
    engine_port: int,
    cores: set[int] | None,
    tmp: Path,
) -> dict[str, bench.PhaseResult]:
    """JSON and streamed phases against one gateway; clean shutdown afterwards."""
    label = f"latency-{backend.name}-{'on' if durable else 'off'}"
    results: dict[str, bench.PhaseResult] = {}
    with gateway(backend, durable, engine_port, cores, tmp, label) as gw:
        for mode in ("json", "stream"):
            stream = mode == "stream"
            result = bench.PhaseResult(label, mode)
            request = bench.build_request("/v1/chat/completions", "chat", gw.key, stream)
            bench._run(
                bench.load([gw.port], request, stream, args.latency_clients, args.seconds, result)
            )
            summary = result.summary()
            print(
                f"  {backend.name:10} durable_ack {'on ' if durable else 'off'} {mode:6} "
                f"{summary['req_per_s']:7.1f} req/s  latency p50/p99 "
                f"{summary['latency_p50_ms']}/{summary['latency_p99_ms']} ms  ttft p50/p99 "
                f"{summary['ttft_p50_ms']}/{summary['ttft_p99_ms']} ms  errors {result.errors}",
                flush=True,
            )
            results[mode] = result
    return results


def compare(on: dict[str, bench.PhaseResult], off: dict[str, bench.PhaseResult]) -> dict[str, Any]:
    """What durable acknowledgement adds, per mode (on minus off; on / off)."""
    out: dict[str, Any] = {}
    for mode in on:
        a, b = on[mode], off[mode]
        figures: dict[str, Any] = {"throughput_ratio": round(a.rps / b.rps, 3) if b.rps else None}
        for name, values_a, values_b in (
            ("latency", a.latency_ms, b.latency_ms),
            ("ttft", a.ttft_ms, b.ttft_ms),
        ):
            for q in (50, 99):
                x, y = bench._pct(values_a, q), bench._pct(values_b, q)
                if x is None or y is None:
                    continue
                figures[f"added_{name}_p{q}_ms"] = round(x - y, 2)
                figures[f"{name}_p{q}_ratio"] = round(x / y, 3) if y else None
        out[mode] = figures
    return out


# -- main ---------------------------------------------------------------------------------


def backends(names: list[str], tmp: Path, stack: ExitStack) -> tuple[list[Backend], list[str]]:
    """The backends to measure, and a note for each one skipped."""
    found: list[Backend] = []
    notes: list[str] = []
    for name in names:
        if name == "duckdb":
            found.append(Backend(name))
        elif name == "postgresql":
            try:
                from simulation.postgres import PostgresServer, PostgresUnavailable
            except ImportError as error:
                notes.append(f"postgresql skipped: {error}")
                continue
            try:
                server = stack.enter_context(PostgresServer(tmp / "postgres"))
            except PostgresUnavailable as error:
                notes.append(f"postgresql skipped: {error}")
                continue

            def new_database(label: str, server: Any = server) -> str:
                return str(server.create_database(label.replace("-", "_")))

            found.append(Backend(name, new_database))
        else:
            raise SystemExit(f"unknown backend {name!r} (duckdb, postgresql)")
    return found, notes


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One kill per backend, short phases.")
    parser.add_argument("--kills", type=int, help="Kills per backend, durable_ack on (3).")
    parser.add_argument("--baseline-kills", type=int, help="Kills per backend, off (1).")
    parser.add_argument("--turns", type=int, help="Acknowledged turns before a kill (2000).")
    parser.add_argument("--clients", type=int, default=32, help="Clients during a kill run.")
    parser.add_argument("--latency-clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, help="Seconds per latency phase (6).")
    parser.add_argument("--backends", default="duckdb,postgresql")
    parser.add_argument("--no-pin", action="store_true", help="Do not pin processes to cores.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    args = parser.parse_args()
    quick = {"kills": 1, "baseline_kills": 0, "turns": 500, "seconds": 2.0}
    full = {"kills": 3, "baseline_kills": 1, "turns": 2000, "seconds": 6.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    cores = sorted(os.sched_getaffinity(0))
    # As benchmarks/gateway.py: clients + engine on the first core, the gateway on the rest.
    pin = not args.no_pin and len(cores) >= 2
    client_cores = {cores[0]} if pin else None
    gateway_cores = set(cores[1:]) if pin else None
    print(
        f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}"
        + (" (pinned: clients+engine on one core, gateway on the rest)" if pin else ""),
        flush=True,
    )
    started = time.perf_counter()
    kills: list[KillRun] = []
    latency: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tuneshield-durability-") as scratch,
        ExitStack() as stack,
    ):
        tmp = Path(scratch)
        chosen, notes = backends([b for b in args.backends.split(",") if b], tmp, stack)
        for note in notes:
            print(note, flush=True)
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        engine_port = free_port()
        engine_args = argparse.Namespace(tokens=16, token_delay_ms=0.0)
        with bench.started_engine(engine_args, engine_port, client_cores, tmp):
            print(
                f"crash: SIGKILL after {args.turns} acknowledged turns, {args.clients} clients",
                flush=True,
            )
            for backend in chosen:
                for durable, count in ((True, args.kills), (False, args.baseline_kills)):
                    for index in range(count):
                        kills.append(
                            kill_run(backend, durable, index, args, engine_port, gateway_cores, tmp)
                        )
            print(f"cost: {args.latency_clients} clients, {args.seconds:g} s per phase", flush=True)
            for backend in chosen:
                off = latency_phases(backend, False, args, engine_port, gateway_cores, tmp)
                on = latency_phases(backend, True, args, engine_port, gateway_cores, tmp)
                latency[backend.name] = {
                    "durable_on": {m: r.summary() for m, r in on.items()},
                    "durable_off": {m: r.summary() for m, r in off.items()},
                    "durable_vs_off": compare(on, off),
                }
    report = {
        "machine": {"cpu_cores": os.cpu_count(), "pinned": pin},
        "settings": {
            "turns_before_kill": args.turns,
            "kill_clients": args.clients,
            "latency_clients": args.latency_clients,
            "seconds_per_phase": args.seconds,
        },
        "skipped": notes,
        "kills": [run.summary() for run in kills],
        "lost_with_durable_ack": sum(run.missing for run in kills if run.durable),
        "latency": latency,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if report["lost_with_durable_ack"]:
        sys.exit("acknowledged turns were lost with durable_ack on")


def print_table(report: dict[str, Any]) -> None:
    print("\nacknowledged turns missing after SIGKILL")
    print(
        f"  {'backend':10} {'durable_ack':11} {'acked':>6} {'stored at kill':>14} "
        f"{'logged after restart':>20} {'missing':>7}"
    )
    for run in report["kills"]:
        print(
            f"  {run['backend']:10} {'on' if run['durable_ack'] else 'off':11} "
            f"{run['acknowledged']:6} {run['acknowledged_stored_at_kill']:14} "
            f"{run['logged']:20} {run['acknowledged_missing']:7}"
        )
    print("\ncost of durable acknowledgement (on vs off, same gateway)")
    print(
        f"  {'backend':10} {'mode':6} {'p50 on/off ms':>15} {'p99 on/off ms':>15} "
        f"{'added p50/p99':>14} {'ttft p50 on/off':>16} {'req/s ratio':>11}"
    )
    for name, figures in report["latency"].items():
        for mode, ratios in figures["durable_vs_off"].items():
            on, off = figures["durable_on"][mode], figures["durable_off"][mode]
            ttft = "-"
            if on["ttft_p50_ms"] is not None:
                ttft = f"{on['ttft_p50_ms']}/{off['ttft_p50_ms']}"
            added = f"{ratios.get('added_latency_p50_ms')}/{ratios.get('added_latency_p99_ms')}"
            print(
                f"  {name:10} {mode:6} "
                f"{on['latency_p50_ms']:>7}/{off['latency_p50_ms']:<7} "
                f"{on['latency_p99_ms']:>7}/{off['latency_p99_ms']:<7} "
                f"{added:>14} "
                f"{ttft:>16} {ratios['throughput_ratio']!s:>11}"
            )
    print(f"\nwall time {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
