"""A round's stage times and training samples, and flagged samples per key, through the
admin API (``GET /admin/learner/runs/{id}``, ``.../samples``, ``/admin/keys/flagged``) on
a store seeded with round folders as the learner leaves them; and the CLI verbs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import AsyncTestClient, TestClient
from litestar.testing.transport import TestClientTransport
from round_fakes import LEARNER_STAGES, WORKER_STAGES, finished_round, sample, samples_for
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner import adapters_cli
from learner.admin_routes import AdapterAdmin
from learner.cli import app as cli
from learner.round_report import render_round_report, stage_times
from learner.round_samples import SAMPLES_POLICY, SampleCounts, SamplesConfig
from store import RunStore, open_database
from tuneshield import ANSWER_MODE

ADMIN_KEY = "admin-test-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PAGE_MAX = 3


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )


@pytest.fixture
def runs(settings: GatewaySettings, tmp_path: Path) -> dict[str, str]:
    """Run ids by name: ``done`` (six samples, key_a's and key_b's), ``older`` (two of
    key_a, one flagged), ``failed`` (ended before training), ``running`` (no folder yet)."""
    folders = tmp_path / "rounds"
    database = open_database(settings.store_url)
    try:
        store = RunStore(database)
        older = finished_round(
            store,
            folders,
            [sample(1, "key_a", 0.8, "go away", "please go"), sample(2, "key_a", 0.1, "ok")],
        )
        done = finished_round(store, folders, samples_for("key_a", "key_b"))
        failed = finished_round(store, folders, None, status="failed", version=None)
        running = store.create("chat")
        store.update(running.run_id, status="running", stage="classify", progress=0.1)
    finally:
        database.close()
    return {"done": done.run_id, "older": older.run_id, "failed": failed.run_id,
            "running": running.run_id}  # fmt: skip


def app(settings: GatewaySettings) -> Litestar:
    admin = AdapterAdmin(samples=SamplesConfig(page_max=PAGE_MAX, key_rounds=10))
    return create_app(settings, transport=FakeVLLM().transport(), extensions=[admin])


@pytest.fixture
async def client(
    settings: GatewaySettings, runs: dict[str, str]
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app(settings)) as test:
        yield test


def test_stage_times_put_the_workers_stages_in_its_place() -> None:
    """The learner's stages in order, the worker's (with peak RSS) where the worker ran;
    the report's table shows the same rows; a worker without a result keeps its total."""
    from round_fakes import summary

    stages = stage_times(summary("run_x"))
    assert [s.stage for s in stages] == [
        "snapshot", "classify", "heal", "train", "gates", "register", "hotswap"
    ]  # fmt: skip
    assert [s.seconds for s in stages if s.worker] == [w[1] for w in WORKER_STAGES]
    assert stages[0].peak_rss_gib is None and stages[1].peak_rss_gib == WORKER_STAGES[0][2]
    report = render_round_report(summary("run_x"))
    assert "<td>heal</td><td>21.5</td><td>2.40</td>" in report
    assert "<td>snapshot</td><td>0.4</td><td>n/a</td>" in report
    failed = {
        "stages": [{"stage": "snapshot", "seconds": 1.0}, {"stage": "worker", "seconds": 2.0}]
    }
    assert [s.stage for s in stage_times(failed)] == ["snapshot", "worker"]


async def test_run_shows_stage_times_and_whether_samples_exist(
    client: AsyncTestClient[Litestar], runs: dict[str, str]
) -> None:
    """``GET /admin/learner/runs/{id}`` carries the round's stage times (as its report) and
    says whether its samples are on disk; a round still running has neither yet."""
    done = (await client.get(f"/admin/learner/runs/{runs['done']}", headers=ADMIN)).json()
    assert [s["stage"] for s in done["stages"]][:3] == ["snapshot", "classify", "heal"]
    assert done["stages"][2] == {
        "stage": "heal", "seconds": 21.5, "peak_rss_gib": 2.4, "worker": True
    }  # fmt: skip
    assert done["samples"] is True
    assert sum(s["seconds"] for s in done["stages"]) == pytest.approx(
        sum(seconds for name, seconds in LEARNER_STAGES if name != "worker")
        + sum(w[1] for w in WORKER_STAGES)
    )
    running = (await client.get(f"/admin/learner/runs/{runs['running']}", headers=ADMIN)).json()
    assert running["stages"] == [] and running["samples"] is False


async def test_samples_page_through_a_round(
    client: AsyncTestClient[Litestar], runs: dict[str, str]
) -> None:
    """A round's samples, flagged ones only with ``flagged=true``: judge score, the reply
    as sent and as healed, the key; paged by ``offset``/``limit`` in file order."""
    url = f"/admin/learner/runs/{runs['done']}/samples"
    flagged = (await client.get(url, params={"flagged": "true"}, headers=ADMIN)).json()
    assert (flagged["samples"], flagged["flagged"], flagged["total"]) == (6, 3, 3)
    assert flagged["limit"] == PAGE_MAX and flagged["offset"] == 0
    first = flagged["data"][0]
    assert first["index"] == 1 and first["key_id"] == "key_a" and first["flagged"] is True
    assert first["judge"] == "lexical" and first["judge_score"] == 0.91
    assert first["original_reply"] == "you are a useless idiot"
    assert first["healed_reply"] == "you are not much help today"
    assert first["heal_mode"] == "contextual" and first["context"][0]["role"] == "user"
    assert [s["index"] for s in flagged["data"]] == [1, 3, 4]
    page = (await client.get(url, params={"limit": 2, "offset": 2}, headers=ADMIN)).json()
    assert [s["index"] for s in page["data"]] == [2, 3] and page["total"] == 6
    assert page["data"][0]["healed_reply"] is None
    assert page["data"][0]["original_reply"] == "what is the weather like"
    clean = (await client.get(url, params={"flagged": "false"}, headers=ADMIN)).json()
    assert [s["index"] for s in clean["data"]] == [0, 2, 5]
    past = (await client.get(url, params={"offset": 99}, headers=ADMIN)).json()
    assert past["data"] == [] and past["total"] == 6


async def test_samples_errors_say_what_is_wrong(
    client: AsyncTestClient[Litestar], runs: dict[str, str]
) -> None:
    """404 for an unknown run, 409 for a round without samples (yet), 400 naming the
    setting for a page larger than the policy allows, 401 without a key."""
    missing = await client.get("/admin/learner/runs/run_nope/samples", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    for name, words in (("running", "no samples yet"), ("failed", "before its training")):
        answer = await client.get(f"/admin/learner/runs/{runs[name]}/samples", headers=ADMIN)
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "samples_not_ready"
        assert words in answer.json()["error"]["message"]
    url = f"/admin/learner/runs/{runs['done']}/samples"
    big = await client.get(url, params={"limit": PAGE_MAX + 1}, headers=ADMIN)
    assert big.status_code == 400 and big.json()["error"]["param"] == "limit"
    assert f"page_max in {SAMPLES_POLICY}" in big.json()["error"]["message"]
    assert (await client.get(url, params={"limit": 0}, headers=ADMIN)).status_code == 400
    assert (await client.get(url)).status_code == 401
    schema = (await client.get("/schema/openapi.json")).json()
    parameters = schema["paths"]["/admin/learner/runs/{run_id}/samples"]["get"]["parameters"]
    limit = next(p for p in parameters if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, PAGE_MAX)


async def test_flagged_per_key_sums_the_rounds_on_disk(
    client: AsyncTestClient[Litestar], runs: dict[str, str]
) -> None:
    """Per key: samples and flagged summed over the rounds with samples, and per round,
    most flagged first; rounds without samples are not counted."""
    answer = (await client.get("/admin/keys/flagged", headers=ADMIN)).json()
    assert answer["rounds"] == [runs["done"], runs["older"]]
    by_key = {key["key_id"]: key for key in answer["keys"]}
    assert [key["key_id"] for key in answer["keys"]] == ["key_a", "key_b"]
    assert (by_key["key_a"]["samples"], by_key["key_a"]["flagged"]) == (6, 3)
    assert by_key["key_a"]["flagged_rate"] == 0.5
    assert by_key["key_a"]["rounds"] == [
        {"run_id": runs["done"], "samples": 4, "flagged": 2},
        {"run_id": runs["older"], "samples": 2, "flagged": 1},
    ]
    assert (by_key["key_b"]["samples"], by_key["key_b"]["flagged"]) == (2, 1)


def test_sample_counts_read_a_file_once(tmp_path: Path) -> None:
    """Counts per file are kept while the file is unchanged, read again when it changes."""
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(sample(1, "k", 0.9, "x", "y")) + "\n")
    counts = SampleCounts(rounds=2)
    assert counts.of(path) == {"k": (1, 1)}
    path.write_text(
        json.dumps(sample(1, "k", 0.9, "x", "y"))
        + "\n"
        + json.dumps(sample(2, "k", 0.0, "z"))
        + "\n"
    )
    assert counts.of(path) == {"k": (2, 1)}
    assert counts.of(tmp_path / "none.jsonl") is None


def test_answers_healing_added_are_not_counted_as_a_keys_samples(tmp_path: Path) -> None:
    """An answer to a flagged turn (``heal_mode`` "answer") is a line of the samples file
    but not a sample the key sent: counting it would halve an attacker's flagged rate."""
    flagged = sample(1, "k", 0.9, "x", "y")
    answer = {**flagged, "toxic": False, "heal_mode": ANSWER_MODE, "original_response": "x"}
    del answer["toxic_score"]
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(flagged) + "\n" + json.dumps(answer) + "\n")
    assert SampleCounts(rounds=1).of(path) == {"k": (1, 1)}


class ToApp(httpx.BaseTransport):
    """The CLI's requests, answered in process by the app under test."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.app = TestClientTransport(client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.app.handle_request(request)


@pytest.fixture
def cli_app(
    settings: GatewaySettings, runs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The CLI's requests answered in process by the seeded app."""
    monkeypatch.setenv("TUNESHIELD_ADMIN_KEY", ADMIN_KEY)
    with TestClient(app=app(settings)) as client:
        monkeypatch.setattr(adapters_cli, "transport", ToApp(client))
        yield


def test_cli_lists_flagged_samples_and_keys(cli_app: None, runs: dict[str, str]) -> None:
    """``learner samples RUN --flagged`` prints the flagged samples (score, key, original
    and healed reply); ``learner keys`` the per-key counts; a page past the policy's bound
    is one error line naming the setting."""
    runner = CliRunner()
    shown = runner.invoke(
        cli, ["learner", "samples", runs["done"], "--flagged", "--url", "http://gw.test"]
    )
    assert shown.exit_code == 0, shown.output
    assert "you are a useless idiot" in shown.output and "you are not much help" in shown.output
    assert "0.91" in shown.output and "key_a" in shown.output
    assert "3 of 6 samples flagged" in shown.output
    keys = runner.invoke(cli, ["learner", "keys", "--url", "http://gw.test"])
    assert keys.exit_code == 0, keys.output
    assert "key_a" in keys.output and "50.0%" in keys.output
    big = runner.invoke(
        cli,
        [
            "learner",
            "samples",
            runs["done"],
            "--limit",
            str(PAGE_MAX + 1),
            "--url",
            "http://gw.test",
        ],
    )
    assert big.exit_code == 1
    lines = [line for line in big.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "page_max" in lines[0], big.output
    early = runner.invoke(cli, ["learner", "samples", runs["running"], "--url", "http://gw.test"])
    assert early.exit_code == 1 and "no samples yet" in early.output
