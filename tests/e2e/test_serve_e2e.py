"""``tuneshield serve`` on the tiny model: engine + gateway, answered through the openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from e2e_engine import free_port

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 360
STOP_TIMEOUT_S = 60


def test_serve_answers_chat_alias_and_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One command serves alias chat (identity adapter) behind a printed admin key; SIGINT
    stops the gateway and the engine."""
    from openai import OpenAI

    port, engine_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "TUNESHIELD_ADMIN_KEY"}
    env.update(
        TUNESHIELD_ENGINE_KV_CACHE_GIB="1",
        TUNESHIELD_ENGINE_MAX_MODEL_LEN="512",
        TUNESHIELD_ENGINE_MAX_LORAS="2",
        TUNESHIELD_ENGINE_STARTUP_TIMEOUT_S=str(READY_TIMEOUT_S),
        TUNESHIELD_ENGINE_SHUTDOWN_TIMEOUT_S="20",
    )
    stdout = (tmp_path / "stdout.txt").open("w+")
    stderr = tmp_path / "stderr.txt"
    command = [str(Path(sys.executable).parent / "tuneshield"), "serve",
               "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"),
               "--port", str(port), "--engine-port", str(engine_port)]  # fmt: skip
    with stderr.open("w") as errors:
        process = subprocess.Popen(command, stdout=stdout, stderr=errors, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, stderr.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        stdout.seek(0)
        keys = [line for line in stdout.read().splitlines() if line.startswith("ts-")]
        assert len(keys) == 1, "the admin key is printed exactly once"
        key = keys[0]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        reply = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, stderr.read_text()[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
    finally:
        # SIGINT, not SIGKILL: serve must stop the engine it started (own process group).
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
