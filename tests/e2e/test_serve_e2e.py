"""``tuneshield serve`` on the tiny model: engine + gateway, answered through the openai client."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from e2e_engine import STOP_TIMEOUT_S, serve_subprocess

pytestmark = pytest.mark.slow


def test_serve_answers_chat_alias_and_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One command serves alias chat (identity adapter) behind a printed admin key; SIGINT
    stops the gateway and the engine."""
    from openai import OpenAI

    env = {key: value for key, value in os.environ.items() if key != "TUNESHIELD_ADMIN_KEY"}
    stdout = (tmp_path / "stdout.txt").open("w+")
    stderr = tmp_path / "stderr.txt"
    with serve_subprocess(tiny_model_dir, tmp_path / "data", env, stderr, stdout) as run:
        process = run.process
        stdout.seek(0)
        keys = [line for line in stdout.read().splitlines() if line.startswith("ts-")]
        assert len(keys) == 1, "the admin key is printed exactly once"
        key = keys[0]
        client = OpenAI(base_url=f"{run.root_url}/v1", api_key=key)
        reply = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, run.stderr_tail()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{run.engine_port}/health", timeout=2)
