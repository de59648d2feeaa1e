"""``tuneshield gateway`` stopped by a signal ends with its last line: no leak report from
DuckDB's bindings or multiprocessing's resource tracker after it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TUNESHIELD = str(Path(sys.executable).parent / "tuneshield")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2
LAST_LINE = "Finished server process"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_stopped_gateway_prints_nothing_after_its_last_line(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM: the gateway shuts down and uvicorn's "Finished server process"
    is the last line it prints (its engine is unreachable; that changes nothing)."""
    port = free_port()
    command = [
        TUNESHIELD, "gateway", "--port", str(port), "--data-dir", str(tmp_path),
        "--upstream", f"http://127.0.0.1:{free_port()}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the gateway did not start"
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                time.sleep(POLL_S)
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in output.splitlines() if line.strip()]
    assert LAST_LINE in lines[-1], output
