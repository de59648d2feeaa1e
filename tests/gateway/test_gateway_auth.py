"""API keys, roles and rate limits."""

from __future__ import annotations

import dataclasses
import hashlib

import duckdb
from gateway_fakes import ADMIN, FakeEngine, chat_body
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings


async def _new_key(client: AsyncTestClient[Litestar], **fields: object) -> dict[str, object]:
    response = await client.post("/admin/keys", json={"name": "alice", **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return dict(response.json())


def bearer(key: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _statuses(
    client: AsyncTestClient[Litestar], key: dict[str, object], count: int
) -> list[int]:
    """The statuses of ``count`` requests in a row with ``key``."""
    return [
        (await client.get("/v1/models", headers=bearer(key["key"]))).status_code
        for _ in range(count)
    ]


async def test_missing_or_unknown_key_is_401(client: AsyncTestClient[Litestar]) -> None:
    """No header, a non-bearer header and an unknown key are all 401 authentication_error."""
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("ts-not-a-key")):
        response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


async def test_created_user_key_chats_but_cannot_administer(
    client: AsyncTestClient[Litestar],
) -> None:
    """A user key works on /v1 and gets 403 on /admin."""
    created = await _new_key(client)
    key = created["key"]
    ok = await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
    assert ok.status_code == 200
    denied = await client.get("/admin/keys", headers=bearer(key))
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"


async def test_admin_role_key_can_administer(client: AsyncTestClient[Litestar]) -> None:
    """A stored key with role admin reaches the admin routes."""
    created = await _new_key(client, role="admin")
    assert (await client.get("/admin/keys", headers=bearer(created["key"]))).status_code == 200


async def test_key_is_shown_once_and_stored_as_hash(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """Listing never shows the secret; the database holds only its SHA-256."""
    async with AsyncTestClient(app=create_app(settings, transport=engine.transport())) as client:
        created = await _new_key(client)
        listed = (await client.get("/admin/keys", headers=ADMIN)).text
    key = str(created["key"])
    assert key not in listed
    assert str(created["key_id"]) in listed
    with duckdb.connect(str(settings.store_url), read_only=True) as connection:
        dump = str(connection.execute("SELECT * FROM api_keys").fetchall())
    assert key not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump


async def test_revoked_key_is_refused_at_once(client: AsyncTestClient[Litestar]) -> None:
    """After DELETE /admin/keys/{id} the key gets 401; unknown ids get 404."""
    created = await _new_key(client)
    revoked = await client.delete(f"/admin/keys/{created['key_id']}", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    response = await client.post(
        "/v1/chat/completions", json=chat_body(), headers=bearer(created["key"])
    )
    assert response.status_code == 401
    assert (await client.delete("/admin/keys/key_nope", headers=ADMIN)).status_code == 404


async def test_rate_limit_is_429_with_retry_after(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A key over its burst gets 429 rate_limit_error and Retry-After; other keys are unaffected."""
    limits = dataclasses.replace(settings.limits, rate_limit_burst=2, rate_limit_per_minute=1.0)
    app = create_app(dataclasses.replace(settings, limits=limits), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        created = await _new_key(client)
        statuses = [
            (
                await client.post(
                    "/v1/chat/completions", json=chat_body(), headers=bearer(created["key"])
                )
            )
            for _ in range(3)
        ]
        other = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert [response.status_code for response in statuses] == [200, 200, 429]
    assert statuses[2].json()["error"]["type"] == "rate_limit_error"
    assert int(statuses[2].headers["retry-after"]) >= 1
    assert other.status_code == 200


async def test_per_key_rate_limit_overrides_policy(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A key created with its own (slow) rate runs dry where the policy's fast rate would not."""
    limits = dataclasses.replace(settings.limits, rate_limit_burst=2, rate_limit_per_minute=1e6)
    app = create_app(dataclasses.replace(settings, limits=limits), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        slow = await _new_key(client, rate_limit_per_minute=0.001)
        fast = await _new_key(client)
        codes = {"slow": await _statuses(client, slow, 4), "fast": await _statuses(client, fast, 4)}
    assert codes == {"slow": [200, 200, 429, 429], "fast": [200, 200, 200, 200]}


async def test_a_key_faster_than_the_burst_may_send_one_second_of_its_rate_at_once(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """A key whose own rate is 100/s sends 50 requests at once; a policy key (burst 2) cannot."""
    limits = dataclasses.replace(settings.limits, rate_limit_burst=2, rate_limit_per_minute=1.0)
    app = create_app(dataclasses.replace(settings, limits=limits), transport=engine.transport())
    async with AsyncTestClient(app=app) as client:
        fast = await _new_key(client, rate_limit_per_minute=6000.0)
        policy = await _new_key(client)
        fast_codes, policy_codes = (
            await _statuses(client, fast, 50),
            await _statuses(client, policy, 3),
        )
    assert fast_codes == [200] * 50
    assert policy_codes == [200, 200, 429]
