"""``tuneshield simulate --size quick`` on the tiny model: real vLLM + gateway, a report."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from e2e_engine import serve_subprocess

from simulation.measure import KINDS

pytestmark = pytest.mark.slow

# Below pytest's own 900 s timeout, so a slow run still stops its engine.
RUN_TIMEOUT_S = 780
STOP_TIMEOUT_S = 90
ADMIN_KEY = "ts-e2e-admin-0123456789abcdef"


ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TUNESHIELD_ENGINE_KV_CACHE_GIB": "1",
    "TUNESHIELD_ENGINE_MAX_MODEL_LEN": "1024",
    "TUNESHIELD_ENGINE_STARTUP_TIMEOUT_S": "420",
    "TUNESHIELD_ENGINE_SHUTDOWN_TIMEOUT_S": "20",
}
ARMS = ("undefended", "tuneshield")
USERS = 5


def _simulate(model_dir: Path, out: Path, data: Path, *extra: str, env: dict[str, str]) -> str:
    """``tuneshield simulate --size quick`` on ``model_dir``; its stdout (exit 0 asserted)."""
    command = [str(Path(sys.executable).parent / "tuneshield"), "simulate", "--size", "quick",
               "--model", str(model_dir), "--arms", ",".join(ARMS), "--users", str(USERS),
               "--out", str(out), "--data-dir", str(data), *extra]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            # SIGINT, not SIGKILL: the demo must stop the engine it started (own group).
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=STOP_TIMEOUT_S)
    assert process.returncode == 0, stderr[-4000:]
    assert "| undefended |" in stdout
    return stdout


def _checked_results(out: Path) -> dict[str, Any]:
    """The report's files exist and its numbers come from real generations."""
    for name in ("report.html", "results.json", "report.md", "toxicity_per_round.png"):
        assert (out / name).stat().st_size > 0, name
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0]
    per_probe = results["eval"]["samples_per_probe"]
    first, trained = results["runs"]["0"]["rounds"]
    assert first["round"] == 0 and trained["round"] == 1
    assert trained["traffic"]["shared"]["failed"] == 0
    for arm in ARMS:
        data_arm = trained["arms"][arm]
        alias = results["aliases"][arm]
        assert data_arm["version"] == f"{alias}-v0001"
        assert data_arm["swap"]["previous"] == f"{alias}-v0000"
        # Trigger-word probes are measured whatever the attack (here: injection).
        for kind in ("toxic", "benign", "backdoor"):
            measured = data_arm["eval"][kind]
            assert measured["replies"] == results["probes"][kind] * per_probe
            assert 0.0 <= measured["toxicity_rate"] <= 1.0
        # Every reply is kept with its probe and draw (benchmarks/efficacy.py pairs arms).
        replies = data_arm["eval"]["replies"]
        assert len(replies) == sum(results["probes"][k] for k in KINDS) * per_probe
        assert {(r["probe_id"], r["draw"]) for r in replies if r["kind"] == "toxic"} == {
            (p, d)
            for p in {r["probe_id"] for r in replies if r["kind"] == "toxic"}
            for d in range(per_probe)
        }
        assert data_arm["eval"]["perplexity"] > 0
    assert trained["arms"]["tuneshield"]["judge"]["samples"] > 0
    assert trained["attackers"] == round(results["config"]["poison_rate"] * USERS)
    return results


def test_quick_demo_runs_through_the_real_stack_and_reports(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Simulated users chat through the gateway, each learning arm's alias is hot-swapped
    to its trained adapter, and the report's numbers come from real generations."""
    import duckdb

    out, data = tmp_path / "report", tmp_path / "data"
    env = {key: value for key, value in os.environ.items() if key != "TUNESHIELD_ADMIN_KEY"}
    _simulate(tiny_model_dir, out, data, env={**env, **ENGINE_ENV})
    results = _checked_results(out)
    trained = results["runs"]["0"]["rounds"][1]

    # The stack has stopped: the gateway's database can be read now.
    with duckdb.connect(str(data / "gateway.duckdb"), read_only=True) as db:
        logged = db.execute(
            "SELECT count(*) FROM turns WHERE NOT opt_out AND alias = 'demo-baseline'"
        ).fetchone()
        served = dict(
            db.execute(
                "SELECT alias, list(DISTINCT adapter) FROM turns WHERE opt_out GROUP BY alias"
            ).fetchall()
        )
    assert logged is not None and logged[0] == trained["traffic"]["shared"]["requests"] > 0
    # Evaluation went through each alias and was answered by the hot-swapped version.
    for arm in ARMS:
        alias = results["aliases"][arm]
        assert served[alias] == [f"{alias}-v0001"]
    truth = data / "demo-runs" / "seed0" / "round1" / "users.jsonl"
    assert len(truth.read_text().splitlines()) == USERS


def test_quick_demo_attaches_to_a_running_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``simulate --url`` drives a `tuneshield serve` already running: the arms' adapters
    are registered and served there, and the demo leaves no dialog and no key behind."""
    import httpx

    env = {**os.environ, **ENGINE_ENV, "TUNESHIELD_ADMIN_KEY": ADMIN_KEY}
    # The serve copies the demo's adapters only from its import root (policies/learner.yaml).
    demo = tmp_path / "serve" / "imports" / "demo"
    with serve_subprocess(tiny_model_dir, tmp_path / "serve", env, tmp_path / "serve.txt") as run:
        out = tmp_path / "report"
        _simulate(tiny_model_dir, out, demo, "--url", run.root_url, env=env)
        results = _checked_results(out)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        aliases = httpx.get(f"{run.root_url}/admin/aliases", headers=admin).json()
        keys = httpx.get(f"{run.root_url}/admin/keys", headers=admin).json()
        truth = demo / "demo-runs" / "seed0" / "round1" / "users.jsonl"
        conversations = [json.loads(line)["conversation_id"] for line in truth.open()]
        left = httpx.post(
            f"{run.root_url}/admin/dialogs/export",
            json={"conversation_ids": conversations, "include_opt_out": True},
            headers=admin,
        )
    serving = {row["alias"]: row["adapter"] for row in aliases}
    for arm in ARMS:
        alias = results["aliases"][arm]
        assert serving[alias] == f"{alias}-v0001"
        assert (tmp_path / "serve" / "adapters" / f"{alias}-v0001").is_dir()
    assert [key["revoked_at"] is not None for key in keys] == [True]
    assert len(conversations) == USERS
    assert left.status_code == 200
    assert pq.read_table(io.BytesIO(left.content)).num_rows == 0
    assert not (demo / "gateway.duckdb").exists()
