"""Waiting for a local server: ready, exited early, or too slow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulation.loopback import NotReady, free_port, wait_until_ready


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_returns_once_the_server_answers_200() -> None:
    port = free_port()
    server = _python(
        "import http.server as h\n"
        f"h.HTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()"
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/", server, 30.0, poll_s=0.1)
    finally:
        server.kill()
        server.wait()


def test_a_process_that_exits_is_reported_with_its_log() -> None:
    process = _python("raise SystemExit(3)")
    process.wait()
    with pytest.raises(NotReady, match=r"exited with 3[\s\S]*engine log tail"):
        wait_until_ready(
            f"http://127.0.0.1:{free_port()}/",
            process,
            30.0,
            describe_failure=lambda: "engine log tail",
        )


def test_a_server_that_never_answers_times_out() -> None:
    process = _python("import time; time.sleep(30)")
    try:
        with pytest.raises(NotReady, match="did not answer 200 within 0 s"):
            wait_until_ready(f"http://127.0.0.1:{free_port()}/", process, 0.3, poll_s=0.1)
    finally:
        process.kill()
        process.wait()
