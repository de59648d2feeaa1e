"""Console pages and actions over the admin API, in process (the browser tests drive the
same through Chromium)."""

from __future__ import annotations

import dataclasses
import math

from console_client import csrf_token, signed_in_token
from console_stack import ADMIN_KEY, REPORT_TITLE, console_app
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.console._live import Reading, bucket_quantile, read, window
from gateway.settings import GatewaySettings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_overview_shows_aliases_and_traffic(
    client: AsyncTestClient[Litestar], user_key: str
) -> None:
    """The overview names each alias and the version it serves, and charts this gateway's
    traffic; its live part reloads on its own (htmx) from /console/live/overview."""
    await signed_in_token(client)
    await client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user_key}"}
    )
    page = await client.get("/console/")
    assert "chat-v0000" in page.text
    assert 'hx-get="/console/live/overview"' in page.text
    assert "Requests per second" in page.text and "<svg" in page.text
    live = await client.get("/console/live/overview")
    assert live.text.startswith('<div id="overview-live"')


async def test_adapters_page_shows_lineage_gates_and_data(
    client: AsyncTestClient[Litestar],
) -> None:
    """Each version follows its parent, with its training data, its gate verdict and the
    gate figures beside its parent's and version 0's; the buttons fit each status."""
    await signed_in_token(client)
    page = (await client.get("/console/adapters")).text
    assert (
        page.index('id="chat-v0000"')
        < page.index('id="chat-v0001"')
        < page.index('id="chat-v0002"')
    )
    assert "240 samples · 31 flagged · 29 healed" in page
    assert "passed the gates" in page and "rejected by the gates" in page
    assert "chat-v0000 (v0)" in page and "chat-v0001 (parent)" in page
    assert "/console/adapters/chat-v0001/promote" in page
    assert "Promote anyway" in page  # the rejected version, forced
    assert "/console/adapters/chat-v0000/promote" not in page  # it serves


async def test_promote_and_rollback_through_the_console(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, user_key: str
) -> None:
    """Promote and roll back through the console: the confirmations name the versions,
    /v1 is answered by the version served, and the audit log names the operator."""
    token = await signed_in_token(client)
    confirm = await client.get("/console/adapters/chat-v0001/promote")
    assert "serves <code>chat-v0000</code> now" in confirm.text
    done = await client.post("/console/adapters/chat-v0001/promote", data={"csrf_token": token})
    assert "chat now serves chat-v0001 (was chat-v0000" in done.text
    user = {"Authorization": f"Bearer {user_key}"}
    reply = await client.post("/v1/chat/completions", json=CHAT, headers=user)
    assert reply.json()["choices"][0]["message"]["content"] == "from chat-v0001"
    rollback = await client.get("/console/aliases/chat/rollback")
    assert "it serves\n    <code>chat-v0000</code> again" in rollback.text
    await client.post(
        "/console/aliases/chat/rollback", data={"csrf_token": token, "version": "chat-v0000"}
    )
    reply = await client.post("/v1/chat/completions", json=CHAT, headers=user)
    assert reply.json()["choices"][0]["message"]["content"] == "from chat-v0000"
    entries = (await client.get("/console/audit")).text.split("<tbody>")[1]
    assert entries.index("<code>rollback</code>") < entries.index("<code>promote</code>")
    assert entries.count("<code>env-admin</code>") == 2
    promotes = (await client.get("/console/audit", params={"action": "promote"})).text
    promotes = promotes.split("<tbody>")[1]
    assert "<code>promote</code>" in promotes and "<code>rollback</code>" not in promotes
    nobody = (await client.get("/console/audit", params={"actor": "key_nobody"})).text
    assert "No entries match these filters" in nobody


async def test_stale_rollback_is_refused_and_said(client: AsyncTestClient[Litestar]) -> None:
    """A rollback confirmed for a version that is no longer the step back changes nothing
    and the page says why (the admin API's 409)."""
    token = await signed_in_token(client)
    response = await client.post(
        "/console/aliases/chat/rollback", data={"csrf_token": token, "version": "chat-v0001"}
    )
    assert "Rollback of chat refused" in response.text
    assert "chat-v0000" in (await client.get("/admin/aliases", headers=ADMIN)).text


async def test_keys_are_created_shown_once_and_revoked(
    client: AsyncTestClient[Litestar],
) -> None:
    """A new key appears on the answer to its creation only (and works on /v1); revoking
    it (confirmed) makes /v1 refuse it."""
    token = await signed_in_token(client)
    created = await client.post(
        "/console/keys", data={"csrf_token": token, "name": "robot", "role": "user"}
    )
    key = created.text.split('id="new-key" class="secret" type="text" readonly value="')[1]
    key = key.split('"')[0]
    assert key.startswith("ts-")
    assert key not in (await client.get("/console/keys")).text
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    ).status_code == 200
    listed = (await client.get("/admin/keys", headers=ADMIN)).json()
    key_id = next(item["key_id"] for item in listed if item["name"] == "robot")
    confirm = await client.get(f"/console/keys/{key_id}/revoke")
    assert "stops working" in confirm.text
    await client.post(f"/console/keys/{key_id}/revoke", data={"csrf_token": token})
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    ).status_code == 401


async def test_rounds_page_queues_a_round_and_serves_reports(
    client: AsyncTestClient[Litestar],
) -> None:
    """The rounds page lists past rounds with their report (sandboxed); 'run a round now'
    queues one through the admin API, and a second is refused while it waits."""
    token = await signed_in_token(client)
    page = await client.get("/console/rounds")
    run_id = page.text.split('href="/console/rounds/run_')[1].split('"')[0]
    report = await client.get(f"/console/rounds/run_{run_id}/report")
    assert REPORT_TITLE in report.text
    assert "sandbox" in report.headers["content-security-policy"]
    assert "Queue the round" in (await client.get("/console/rounds/run")).text
    first = await client.post("/console/rounds/run", data={"csrf_token": token})
    assert "queued for chat" in first.text
    second = await client.post("/console/rounds/run", data={"csrf_token": token})
    assert "No round queued" in second.text
    assert csrf_token(second) == token


async def test_console_can_be_turned_off(
    settings: GatewaySettings, engine: FakeVLLM, user_key: str
) -> None:
    """console.enabled false: no /console routes at all."""
    off = dataclasses.replace(
        settings, console=dataclasses.replace(settings.console, enabled=False)
    )
    async with AsyncTestClient(app=console_app(off, engine)) as client:
        assert (await client.get("/console/sign-in")).status_code == 404


def test_console_adds_nothing_to_the_chat_route(settings: GatewaySettings) -> None:
    """The chat route has the same middleware, dependencies and guards with the console
    as without it, and the console is not in the OpenAPI document."""
    off = dataclasses.replace(
        settings, console=dataclasses.replace(settings.console, enabled=False)
    )

    def chat_handler(app: Litestar) -> object:
        return next(
            handler
            for route in app.routes
            if route.path == "/v1/chat/completions"
            for handler in route.route_handlers
        )

    with_console, without = create_app(settings), create_app(off)
    for app_ in (with_console, without):
        assert all("/console" not in path for path in app_.openapi_schema.paths or {})
    on_handler, off_handler = chat_handler(with_console), chat_handler(without)
    assert len(on_handler.resolve_middleware()) == len(off_handler.resolve_middleware())
    assert on_handler.resolve_dependencies().keys() == off_handler.resolve_dependencies().keys()
    assert on_handler.resolve_guards() == off_handler.resolve_guards()


def reading(at: float, requests: float, errors: float, buckets: dict[float, float]) -> Reading:
    return Reading(
        at=at,
        requests=requests,
        server_errors=errors,
        latency=tuple(buckets.items()),
        toxicity_sum=0.0,
        toxicity_count=0.0,
        guard_actions=0.0,
    )


def test_windows_and_quantiles_follow_prometheus() -> None:
    """Rates come from the difference of two readings; quantiles interpolate within a
    histogram bucket as histogram_quantile does; nothing observed is None, not zero."""
    assert bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert bucket_quantile(0.5, [(0.1, 10.0), (0.2, 20.0), (math.inf, 20.0)]) == 0.1
    assert bucket_quantile(0.99, [(0.1, 0.0), (math.inf, 5.0)]) == 0.1
    before = reading(0.0, 10.0, 1.0, {0.1: 10.0, 0.2: 10.0, math.inf: 10.0})
    after = reading(5.0, 30.0, 2.0, {0.1: 20.0, 0.2: 30.0, math.inf: 30.0})
    figures = window(before, after)
    assert figures.requests_per_s == 4.0
    assert figures.error_rate == 0.05
    assert figures.p50_s == 0.1
    assert figures.toxicity is None
    assert window(before, before).error_rate is None


class ConstantJudge:
    """A guard judge that gives every text the same score."""

    name = "constant"
    threshold = 0.5

    def __init__(self, score: float) -> None:
        self.value = score

    def score(self, samples: list[object]) -> list[float]:
        return [self.value] * len(samples)


async def test_guard_scores_reach_the_metrics_and_the_overview(
    settings: GatewaySettings, engine: FakeVLLM, user_key: str
) -> None:
    """Every score the live guard computes lands in gateway_guard_score (by what it
    scored), and the overview's toxicity chart reads the replies' mean from it."""
    guarded = dataclasses.replace(settings, guard=dataclasses.replace(settings.guard, enabled=True))
    app = console_app(guarded, engine, judge=ConstantJudge(0.25))
    async with AsyncTestClient(app=app) as client:
        user = {"Authorization": f"Bearer {user_key}"}
        await client.post("/v1/chat/completions", json=CHAT, headers=user)
        metrics = (await client.get("/metrics")).text
        assert 'gateway_guard_score_count{scored="reply"} 1.0' in metrics
        assert 'gateway_guard_score_sum{scored="user turn"} 0.25' in metrics
        now = read(app.state.resources.metrics)
        assert window(reading(0.0, 0.0, 0.0, {}), now).toxicity == 0.25
        await signed_in_token(client)
        assert "Live toxicity of replies" in (await client.get("/console/")).text


async def test_rounds_page_shows_stage_times_of_past_rounds(
    client: AsyncTestClient[Litestar],
) -> None:
    """Past rounds' stage times, as their reports record them: the learner's stages with
    the worker's in their place, and the total; each round links to its flagged samples."""
    await signed_in_token(client)
    page = (await client.get("/console/rounds")).text
    stages = page.split('id="stages-title"')[1]
    for stage in ("snapshot", "classify", "heal", "train", "gates", "register", "hotswap"):
        assert f'<th scope="col">{stage}</th>' in stages
    assert '<td data-label="heal">22 s</td>' in stages
    assert '<td data-label="train">1 min</td>' in stages
    assert "flagged samples<span" in page and "#flagged-title" in page


async def test_round_page_shows_its_flagged_samples(client: AsyncTestClient[Litestar]) -> None:
    """A round's page: its stage times, and each flagged sample with the key it came from,
    the judge's score, and the reply as sent beside the one it was healed into; pages of
    samples link to each other."""
    await signed_in_token(client)
    rounds = (await client.get("/console/rounds")).text
    run_id = "run_" + rounds.split('href="/console/rounds/run_')[1].split('"')[0]
    page = (await client.get(f"/console/rounds/{run_id}")).text
    assert "flagged <strong>3</strong> of the round's 6 samples (50.0 %)" in page
    flagged = page.split('id="flagged-title"')[1]
    assert flagged.count('class="sample"') == 3
    assert "you are a useless idiot" in flagged and "you are not much help today" in flagged
    assert "0.91" in flagged and "<code>env-admin</code>" in flagged
    assert "tell me about cats" not in flagged  # not flagged
    assert '<td data-label="Peak memory">2.40 GiB</td>' in page
    second = (await client.get(f"/console/rounds/{run_id}", params={"offset": 2})).text
    assert second.split('id="flagged-title"')[1].count('class="sample"') == 1
    assert f"/console/rounds/{run_id}?offset=0#flagged-title" in second


async def test_keys_page_shows_flagged_rate_per_key(
    client: AsyncTestClient[Litestar],
) -> None:
    """Each key's samples, flagged samples and flagged rate over the rounds on disk (the
    admin API's per-key counts); keys the listing lacks (the env admin key) below it."""
    await signed_in_token(client)
    page = (await client.get("/console/keys")).text
    listed = (await client.get("/admin/keys", headers=ADMIN)).json()
    user = next(key["key_id"] for key in listed if key["name"] == "support-bot")
    row = page.split(f"<code>{user}</code>")[1].split("</tr>")[0]
    assert '<td data-label="Samples">4</td>' in row
    assert '<td data-label="Flagged">2</td>' in row
    assert '<td data-label="Flagged rate">50.0 %</td>' in row
    others = page.split('id="other-samples-title"')[1]
    assert "<code>env-admin</code>" in others and "50.0 %" in others
