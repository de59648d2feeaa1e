"""Console sign-in, sessions and CSRF: who gets in, what a session cookie is, what an
action needs."""

from __future__ import annotations

import dataclasses

import pytest
from console_client import sign_in, signed_in_token
from console_stack import ADMIN_KEY, console_app
from learner_fakes import FakeVLLM
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.console._sessions import Sessions
from gateway.settings import ConsoleConfig, GatewaySettings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def serving(client: AsyncTestClient[Litestar]) -> str:
    aliases = (await client.get("/admin/aliases", headers=ADMIN)).json()
    return next(a["adapter"] for a in aliases if a["alias"] == "chat")


async def test_admin_key_signs_in_with_a_strict_http_only_cookie(
    client: AsyncTestClient[Litestar],
) -> None:
    """An admin key opens a session: a random HttpOnly, SameSite=Strict cookie scoped to
    /console (not Secure over plain HTTP), never the key itself; the overview then loads."""
    response = await sign_in(client)
    assert response.status_code == 303
    assert response.headers["location"] == "/console/"
    cookie = next(
        value
        for value in response.headers.get_list("set-cookie")
        if value.startswith("tuneshield_console=")
    )
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/console"} <= attributes
    assert "secure" not in attributes
    assert ADMIN_KEY not in cookie
    overview = await client.get("/console/")
    assert overview.status_code == 200
    assert "chat-v0000" in overview.text


async def test_cookie_is_secure_over_https(
    settings: GatewaySettings, engine: FakeVLLM, user_key: str
) -> None:
    """Reached over TLS, the session cookie is Secure as well."""
    app = console_app(settings, engine)
    async with AsyncTestClient(app=app, base_url="https://console.test") as client:
        response = await sign_in(client)
    assert response.status_code == 303
    cookie = next(
        value
        for value in response.headers.get_list("set-cookie")
        if value.startswith("tuneshield_console=")
    )
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}


async def test_user_key_cannot_sign_in(client: AsyncTestClient[Litestar], user_key: str) -> None:
    """A user key is refused with 403 and a sentence saying why; no session is opened."""
    response = await sign_in(client, user_key)
    assert response.status_code == 403
    assert "user key" in response.text
    assert not any(
        value.startswith("tuneshield_console=") for value in response.headers.get_list("set-cookie")
    )
    assert (await client.get("/console/", follow_redirects=False)).status_code == 303


async def test_unknown_keys_count_against_the_failed_auth_limit(
    client: AsyncTestClient[Litestar], settings: GatewaySettings
) -> None:
    """A wrong key is 401, and guessing is throttled as on the API (429 past the limit)."""
    statuses = [
        (await sign_in(client, f"ts-wrong-{attempt}")).status_code
        for attempt in range(settings.limits.auth_failures_per_window + 1)
    ]
    assert statuses[0] == 401
    assert statuses[-1] == 429


async def test_sign_in_needs_its_form_token(client: AsyncTestClient[Litestar]) -> None:
    """A sign-in post without the token of a form this console served is refused (login
    CSRF), before the key is even looked at."""
    await client.get("/console/sign-in")
    response = await client.post(
        "/console/sign-in", data={"key": ADMIN_KEY, "csrf_token": "forged"}
    )
    assert response.status_code == 403
    assert "Action refused" in response.text
    assert (await client.get("/console/", follow_redirects=False)).status_code == 303


async def test_pages_need_a_session(client: AsyncTestClient[Litestar]) -> None:
    """Without a session a page redirects to the sign-in form; a live refresh asks htmx to
    load the sign-in page instead of swapping it in."""
    page = await client.get("/console/adapters", follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/console/sign-in")
    live = await client.get("/console/live/overview", headers={"HX-Request": "true"})
    assert live.headers["hx-redirect"] == "/console/sign-in"


async def test_action_without_csrf_token_is_refused(client: AsyncTestClient[Litestar]) -> None:
    """A promote without the session's token, with another one, or sent from another site
    (fetch metadata) is refused with 403 and changes nothing; with it, it promotes."""
    token = await signed_in_token(client)
    url = "/console/adapters/chat-v0001/promote"
    for data, headers in (
        ({}, {}),
        ({"csrf_token": "not-the-token"}, {}),
        ({"csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
    ):
        refused = await client.post(url, data=data, headers=headers, follow_redirects=False)
        assert refused.status_code == 403
        assert await serving(client) == "chat-v0000"
    done = await client.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303
    assert await serving(client) == "chat-v0001"


async def test_sign_out_ends_the_session(client: AsyncTestClient[Litestar]) -> None:
    """Signing out (a CSRF-checked post) ends the session on the server and clears the
    cookie; the old cookie opens nothing afterwards."""
    token = await signed_in_token(client)
    cookie = client.cookies.get("tuneshield_console")
    response = await client.post(
        "/console/sign-out", data={"csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303
    client.cookies.set("tuneshield_console", str(cookie), path="/console")
    assert (await client.get("/console/", follow_redirects=False)).status_code == 303


async def test_a_revoked_key_ends_its_session(client: AsyncTestClient[Litestar]) -> None:
    """The console calls the admin API with the operator's own key: once that key is
    revoked, the next page ends the session and says why."""
    created = await client.post(
        "/admin/keys", json={"name": "operator", "role": "admin"}, headers=ADMIN
    )
    key = created.json()
    assert (await sign_in(client, key["key"])).status_code == 303
    assert (await client.get("/console/keys")).status_code == 200
    await client.delete(f"/admin/keys/{key['key_id']}", headers=ADMIN)
    page = await client.get("/console/keys", follow_redirects=False)
    assert page.headers["location"] == "/console/sign-in?ended=1"
    again = await client.get("/console/sign-in?ended=1")
    assert "no longer accepts its key" in again.text
    assert (await client.get("/console/", follow_redirects=False)).status_code == 303


async def test_pages_carry_the_security_headers(client: AsyncTestClient[Litestar]) -> None:
    """Every page: a CSP allowing only this origin's scripts and styles and no framing, no
    caching, no referrer; the sign-in page included."""
    for response in (await client.get("/console/sign-in"), await client.get("/console/")):
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe" not in csp
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_sessions_expire_and_are_bounded() -> None:
    """A session ends after its lifetime or its idle time (a live refresh does not count
    as activity); past max_sessions the oldest one ends."""
    now = [0.0]
    config = ConsoleConfig(
        enabled=True,
        cookie_name="c",
        session_lifetime_s=100.0,
        idle_timeout_s=10.0,
        max_sessions=2,
        refresh_s=1.0,
        sample_period_s=1.0,
        history_points=1,
        audit_limit=1,
        runs_limit=1,
    )
    sessions = Sessions(config, clock=lambda: now[0])
    name, _ = sessions.open("k", "key_1")
    now[0] = 9.0
    assert sessions.get(name, touch=False) is not None
    now[0] = 10.0
    assert sessions.get(name, touch=False) is None  # refreshes kept nothing alive
    name, _ = sessions.open("k", "key_1")
    for now[0] in (19.0, 28.0, 37.0, 46.0, 55.0, 64.0, 73.0, 82.0, 91.0, 100.0):
        assert sessions.get(name) is not None  # activity keeps it, up to its lifetime
    now[0] = 110.0
    assert sessions.get(name) is None
    first, _ = sessions.open("k", "a")
    now[0] += 1
    sessions.open("k", "b")
    sessions.open("k", "c")
    assert len(sessions) == 2 and sessions.get(first) is None


def test_console_settings_come_from_the_policy(settings: GatewaySettings) -> None:
    """policies/gateway.yaml's console section reaches the settings; a cookie name that
    could not be a cookie's is refused."""
    assert settings.console.enabled
    assert settings.console.cookie_name == "tuneshield_console"
    with pytest.raises(ValueError, match="cookie_name"):
        dataclasses.replace(settings.console, cookie_name="bad name;")
