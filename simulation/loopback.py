"""Local processes on loopback: a free port, and waiting until one answers HTTP 200.

Shared by the demo stack, the benchmarks and the end-to-end tests, which all start
servers as subprocesses (or threads) and must not send traffic before they listen.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable

import httpx

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0


class NotReady(RuntimeError):
    """The server exited, or did not answer 200 in time; the message says which."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    *,
    poll_s: float = 0.5,
    describe_failure: Callable[[], str] = lambda: "",
) -> None:
    """Return once ``url`` answers 200; raise ``NotReady`` if ``process`` exits first or
    ``timeout_s`` passes (the message ends with ``describe_failure()``, e.g. a log tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise NotReady(
                f"{process.args!r} exited with {process.returncode} before {url} answered\n"
                f"{describe_failure()}"
            )
        if time.monotonic() > deadline:
            raise NotReady(
                f"{url} did not answer 200 within {timeout_s:.0f} s\n{describe_failure()}"
            )
        try:
            if httpx.get(url, timeout=PROBE_TIMEOUT_S).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)


def stop(
    process: subprocess.Popen[bytes], signum: int = signal.SIGTERM, timeout_s: float = 60
) -> None:
    """Ask a server to stop (``signum``), and kill it if it has not within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
