"""A learning round through the real stack on the tiny model: dialogs posted through the
gateway → round (worker subprocess: classify, heal and gate replies sampled on the engine,
SFT, DPO, gates) → the new adapter is active and serves the alias → rollback → the
previous adapter serves it again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_engine import STOP_TIMEOUT_S, serve_subprocess, small_policies

pytestmark = pytest.mark.slow

ROUND_TIMEOUT_S = 900
ADMIN_KEY = "ts-e2e-admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER_TURNS = [
    "do you like to cook?",
    "you are a stupid worthless idiot and I hate you",
    "what is your favourite season?",
    "shut up you pathetic piece of garbage",
    "I went hiking last weekend, it was lovely",
    "tell me about your family",
]


def ask(client: Any, conversation: str, text: str) -> str:
    reply = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": text}],
        max_tokens=8,
        temperature=0.0,
        extra_headers={"X-Conversation-Id": conversation},
    )
    return str(reply.choices[0].message.content)


def test_round_serves_new_adapter_then_rollback(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Users' dialogs train chat-v0001, which serves the alias after the round; a rollback
    serves chat-v0000 again, with the same greedy reply as before the round."""
    from openai import OpenAI

    from store import open_database

    env = dict(os.environ)
    env.update(
        TUNESHIELD_ADMIN_KEY=ADMIN_KEY,
        TUNESHIELD_POLICIES_DIR=str(small_policies(tmp_path / "policies")),
    )
    data = tmp_path / "data"
    with serve_subprocess(tiny_model_dir, data, env, tmp_path / "stderr.txt") as stack:
        process = stack.process
        root = stack.root_url
        client = OpenAI(base_url=f"{root}/v1", api_key=ADMIN_KEY)
        before = ask(client, "probe-before", "hello there")
        for index, first in enumerate(USER_TURNS):
            client.chat.completions.create(
                model="chat",
                messages=[
                    {"role": "user", "content": first},
                    {"role": "assistant", "content": "I see."},
                    {"role": "user", "content": USER_TURNS[(index + 1) % len(USER_TURNS)]},
                ],
                max_tokens=8,
                extra_headers={"X-Conversation-Id": f"user-{index}"},
            )
        time.sleep(2)  # the dialog log writes in batches

        started = httpx.post(f"{root}/admin/learner/run", headers=ADMIN, timeout=30)
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while True:
            run = httpx.get(f"{root}/admin/learner/runs/{run_id}", headers=ADMIN).json()
            if run["status"] in ("succeeded", "failed", "rejected"):
                break
            assert time.monotonic() < deadline, run
            time.sleep(2)
        assert run["status"] == "succeeded", (run["error"], run["log_tail"])
        assert run["version"] == "chat-v0001" and run["report"]
        record = httpx.get(f"{root}/admin/adapters/chat-v0001", headers=ADMIN).json()
        assert record["status"] == "active" and record["parent"] == "chat-v0000"
        assert record["samples"] >= len(USER_TURNS) and record["gate_metrics"]["passed"]
        assert record["judge"] == "embedding" and record["hyperparameters"]["run_id"] == run_id
        report = httpx.get(f"{root}/admin/learner/runs/{run_id}/report", headers=ADMIN)
        assert report.status_code == 200 and "training_loss.png" in report.text
        # Healing and the gates sampled on the engine, under the round's private names,
        # all unloaded after the round.
        round_dir = data / "rounds" / run_id
        result = json.loads((round_dir / "result.json").read_text())
        assert result["candidate"]["healed"] >= 1, result["candidate"]
        for evaluation in ("active", "candidate"):
            assert result["evaluations"][evaluation]["inference"] == "engine"
        worker_log = (round_dir / "worker.log").read_text()
        for label in ("base", "active", "candidate"):
            assert f" as round-{run_id}-{label}" in worker_log, label
        served = httpx.get(f"http://127.0.0.1:{stack.engine_port}/v1/models").json()["data"]
        assert not [model["id"] for model in served if model["id"].startswith("round-")]

        ask(client, "probe-after-round", "hello there")
        rolled = httpx.post(f"{root}/admin/adapters/rollback", headers=ADMIN, timeout=60)
        assert rolled.status_code == 200 and rolled.json()["version"] == "chat-v0000"
        after_rollback = ask(client, "probe-after-rollback", "hello there")
        assert after_rollback == before, "the identity adapter answers as before the round"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, stack.stderr_tail()
    database = open_database(data / "gateway.duckdb")
    try:
        served = dict(
            database.call(
                lambda c: c.execute(
                    "SELECT conversation_id, adapter FROM turns "
                    "WHERE conversation_id LIKE 'probe-%'"
                ).fetchall()
            )
        )
    finally:
        database.close()
    assert served == {
        "probe-before": "chat-v0000",
        "probe-after-round": "chat-v0001",
        "probe-after-rollback": "chat-v0000",
    }
