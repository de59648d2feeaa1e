"""Limits that hold across gateway replicas, failed authentication throttled per client
address, and the admin routes' own rate limit."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_fakes import ADMIN, FakeEngine, chat_body
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.auth import FailedAuthThrottle, LocalTokenBuckets, SharedTokenBuckets, create_key
from gateway.settings import GatewaySettings
from store import BucketTake, KeyStore, RateBucketStore, open_database

# A small rate, so one key running as fast as it can is refused most of the time.
RATE_PER_MINUTE = 240.0
BURST = 3
WINDOW_S = 2.0
SENDERS = 4
LEASE_SHARE = 0.1
LEASE_S = 1.0
# How long a replica waits for the shared bucket before it fails open to its own: far above
# the policy's, so that a loaded CI machine tests the shared limit, not the fail-open path.
PATIENT_SHARED_TIMEOUT_S = 5.0
# A bucket big enough that a replica leases floor(0.1 * 40) = 4 tokens at a time.
LEASED_BURST = 40
OTHER_ADDRESS = ("198.51.100.7", 40000)


class CountedStore:
    """A ``RateBucketStore`` whose takes are counted, and slowed by ``delay_s``."""

    def __init__(self, store: RateBucketStore, delay_s: float = 0.0) -> None:
        self._store = store
        self._delay_s = delay_s
        self.calls = 0

    def take(self, bucket: str, **options: Any) -> BucketTake:
        self.calls += 1
        time.sleep(self._delay_s)
        return self._store.take(bucket, **options)

    def prune(self) -> int:
        return self._store.prune()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _limited(settings: GatewaySettings, **limits: Any) -> GatewaySettings:
    return dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limits))


def _replica(settings: GatewaySettings, database_url: str, data_dir: Path) -> GatewaySettings:
    """One gateway replica on the shared PostgreSQL database, with a data dir of its own."""
    return dataclasses.replace(
        settings, data_dir=data_dir, store=dataclasses.replace(settings.store, url=database_url)
    )


def _user_key(database_url: str) -> str:
    """A user key made before the replicas start, so both know it from their first request."""
    database = open_database(database_url)
    try:
        return create_key(KeyStore(database), "alice").key
    finally:
        database.close()


@asynccontextmanager
async def _clients(
    engine: FakeEngine, *settings: GatewaySettings
) -> AsyncIterator[list[AsyncTestClient[Litestar]]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                AsyncTestClient(app=create_app(each, transport=engine.transport()))
            )
            for each in settings
        ]


def _from_address(client: AsyncTestClient[Litestar], address: tuple[str, int]) -> httpx.AsyncClient:
    """Requests to the same running app, sent from another client address."""
    transport = httpx.ASGITransport(app=client.app, client=address)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver.local")


# -- per-key rate limits across replicas ------------------------------------------------


@pytest.mark.parametrize("burst", [BURST, LEASED_BURST])
async def test_two_replicas_on_postgresql_hold_one_keys_rate_together(
    settings: GatewaySettings,
    engine: FakeEngine,
    postgres_database_url: str,
    tmp_path: Path,
    burst: int,
) -> None:
    """One key sending as fast as it can through two gateways on one database gets one
    key's rate in total (within one burst), not one rate per gateway; also where each
    replica takes its tokens in leases of several (a bucket of LEASED_BURST)."""
    limited = _limited(
        settings,
        rate_limit_per_minute=RATE_PER_MINUTE,
        rate_limit_burst=burst,
        shared_lease_share=LEASE_SHARE,
        shared_lease_s=LEASE_S,
        shared_timeout_s=PATIENT_SHARED_TIMEOUT_S,
    )
    key = _user_key(postgres_database_url)
    replicas = [_replica(limited, postgres_database_url, tmp_path / name) for name in ("a", "b")]
    statuses: list[list[int]] = [[], []]
    async with _clients(engine, *replicas) as clients:
        start = time.monotonic()

        async def send(first: int) -> None:
            turn = first
            while time.monotonic() - start < WINDOW_S:
                reply = await clients[turn % 2].get("/v1/models", headers=bearer(key))
                statuses[turn % 2].append(reply.status_code)
                turn += 1

        await asyncio.gather(*(send(first) for first in range(SENDERS)))
        elapsed = time.monotonic() - start
    rate_per_s = RATE_PER_MINUTE / 60.0
    # The bucket holds the burst, or one second of the rate when that is more (RateLimiter).
    capacity = max(burst, rate_per_s)
    allowed = sum(codes.count(200) for codes in statuses)
    assert all(set(codes) == {200, 429} for codes in statuses), statuses
    # Each replica alone would allow a bucket plus the rate: twice that in total.
    assert rate_per_s * elapsed - 1 <= allowed <= capacity + rate_per_s * elapsed, (
        allowed,
        elapsed,
    )


async def test_the_shared_bucket_fails_open_to_the_replicas_own_buckets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database that fails (or hangs) leaves each replica limiting on its own, with one
    warning, and is tried again after shared_retry_s."""

    class BrokenStore:
        calls = 0

        def take(self, bucket: str, **_: float) -> BucketTake:
            self.calls += 1
            raise ConnectionError("server closed the connection unexpectedly")

    broken = BrokenStore()
    buckets = SharedTokenBuckets(
        broken, timeout_s=0.2, retry_s=0.1, lease_share=LEASE_SHARE, lease_s=LEASE_S
    )  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        takes = [await buckets.take("v1:key_a", 2, 1e-9) for _ in range(3)]
        await asyncio.sleep(0.15)
        await buckets.take("v1:key_b", 2, 1e-9)
    assert [take.allowed for take in takes] == [True, True, False]
    assert broken.calls == 2  # the first take, then once more after retry_s
    warnings = [r.message for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) == 1


HANG_S = 1.0


async def test_a_hanging_database_costs_a_request_at_most_shared_timeout_s() -> None:
    """A store that does not answer is given up after timeout_s; the request is limited by
    the replica's own bucket instead of waiting."""

    class HangingStore:
        def take(self, bucket: str, **_: float) -> BucketTake:
            time.sleep(HANG_S)
            return BucketTake(taken=1, tokens=0.0)

    buckets = SharedTokenBuckets(
        HangingStore(), timeout_s=0.1, retry_s=10.0, lease_share=LEASE_SHARE, lease_s=LEASE_S
    )  # type: ignore[arg-type]
    start = time.monotonic()
    taken = await buckets.take("v1:key_a", 2, 1e-9)
    # Anything short of the hang shows it was given up; a loaded machine may be slow.
    assert taken.allowed and time.monotonic() - start < HANG_S * 0.9


async def test_an_empty_shared_bucket_is_refused_without_a_round_trip(
    postgres_database_url: str,
) -> None:
    """Once the database said a key's bucket is empty, that key is refused from memory
    until its next token is due: a flood costs the database nothing more."""
    database = open_database(postgres_database_url)
    try:
        store = CountedStore(RateBucketStore(database))
        buckets = SharedTokenBuckets(
            store,  # type: ignore[arg-type]
            timeout_s=5.0,
            retry_s=5.0,
            lease_share=LEASE_SHARE,
            lease_s=LEASE_S,
        )
        takes = [await buckets.take("v1:key_a", 1, 20.0) for _ in range(50)]
        await asyncio.sleep(0.1)  # two tokens' time at 20/s
        later = await buckets.take("v1:key_a", 1, 20.0)
    finally:
        database.close()
    assert [take.allowed for take in takes[:2]] == [True, False]
    assert not any(take.allowed for take in takes[1:])
    assert store.calls == 3 and later.allowed


async def test_concurrent_requests_share_one_lease_per_replica(
    postgres_database_url: str,
) -> None:
    """Requests of one key that arrive while the replica's take is in flight wait for it
    and spend its lease: one statement per lease (capacity 100 x 0.1 = 10 tokens), none
    refused, and the database's bucket is down by exactly what was admitted."""
    database = open_database(postgres_database_url)
    try:
        real = RateBucketStore(database)
        # A slow round trip: every other request arrives while the first take is out.
        store = CountedStore(real, delay_s=0.02)
        buckets = SharedTokenBuckets(
            store,  # type: ignore[arg-type]
            timeout_s=5.0,
            retry_s=5.0,
            lease_share=LEASE_SHARE,
            lease_s=LEASE_S,
        )
        takes = await asyncio.gather(*(buckets.take("v1:key_a", 100, 1e-9) for _ in range(30)))
        left = real.take("v1:key_a", capacity=100, rate_per_s=1e-9)
    finally:
        database.close()
    assert all(taken.allowed for taken in takes)
    assert store.calls == 3
    assert round(left.tokens) == 100 - 30 - 1


# -- failed authentication, per client address ----------------------------------------


async def test_failed_authentication_is_throttled_per_client_address(
    settings: GatewaySettings, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After auth_failures_per_window bad or missing keys an address gets 429 (OpenAI's
    error shape, Retry-After) even with a good key, before the key is looked up; another
    address is unaffected."""
    limited = _limited(settings, auth_failures_per_window=3, auth_failure_window_s=60.0)
    async with _clients(engine, limited) as (client,):
        keys = client.app.state.resources.keys
        created = await asyncio.to_thread(create_key, keys, "alice")
        failures = [
            await client.get("/v1/models", headers=headers)
            for headers in ({}, bearer("ts-wrong"), {"Authorization": "Basic abc"}, bearer("x"))
        ]
        lookups = 0
        by_hash = keys.by_hash

        def counting_by_hash(key_hash: str) -> Any:
            nonlocal lookups
            lookups += 1
            return by_hash(key_hash)

        monkeypatch.setattr(keys, "by_hash", counting_by_hash)
        good_here = await client.post(
            "/v1/chat/completions", json=chat_body(), headers=bearer(created.key)
        )
        admin_here = await client.get("/admin/keys", headers=ADMIN)
        async with _from_address(client, OTHER_ADDRESS) as other:
            good_there = await other.get("/v1/models", headers=bearer(created.key))
            bad_there = await other.get("/v1/models", headers=bearer("ts-wrong"))
    assert [reply.status_code for reply in failures] == [401, 401, 401, 429]
    for refused in (failures[3], good_here, admin_here):
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == (
            "rate_limit_error",
            "too_many_failed_authentications",
        )
        assert set(error) == {"message", "type", "param", "code"}
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert lookups == 2  # only the other address's two requests reached the key cache
    assert (good_there.status_code, bad_there.status_code) == (200, 401)


async def test_an_address_is_let_in_again_once_its_window_has_refilled(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """The refusal lasts until the address's failure allowance is whole again."""
    limited = _limited(settings, auth_failures_per_window=2, auth_failure_window_s=0.3)
    async with _clients(engine, limited) as (client,):
        codes = [(await client.get("/v1/models", headers=bearer("x"))).status_code for _ in "abc"]
        await asyncio.sleep(0.35)
        after = await client.get("/v1/models", headers=ADMIN)
    assert codes == [401, 401, 429]
    assert after.status_code == 200


async def test_failures_count_across_replicas_on_postgresql(
    settings: GatewaySettings, engine: FakeEngine, postgres_database_url: str, tmp_path: Path
) -> None:
    """Failures through either gateway count against one allowance per address."""
    limited = _limited(settings, auth_failures_per_window=3, auth_failure_window_s=60.0)
    replicas = [_replica(limited, postgres_database_url, tmp_path / name) for name in ("a", "b")]
    async with _clients(engine, *replicas) as clients:
        codes = [
            (await clients[turn % 2].get("/v1/models", headers=bearer("x"))).status_code
            for turn in range(5)
        ]
    assert codes == [401, 401, 401, 429, 429]


def test_ipv6_clients_are_counted_per_network() -> None:
    """Addresses of one IPv6 /64 share an allowance; IPv4-mapped ones count as IPv4."""
    throttle = FailedAuthThrottle(LocalTokenBuckets(), 3, 60.0, 64)
    assert throttle.source("2001:db8:1:2::1") == throttle.source("2001:db8:1:2:ffff::9")
    assert throttle.source("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert throttle.source("2001:db8:1:3::1") != throttle.source("2001:db8:1:2::1")
    assert throttle.source("::ffff:192.0.2.1") == throttle.source("192.0.2.1") == "192.0.2.1"
    assert throttle.source(None) == "unknown"


async def test_a_non_ascii_key_is_a_failed_authentication_not_a_500(
    client: AsyncTestClient[Litestar],
) -> None:
    """A byte outside ASCII in Authorization is a wrong key (401), never a crash."""
    reply = await client.get("/v1/models", headers={"Authorization": b"Bearer cl\xe9"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"


# -- admin routes --------------------------------------------------------------------


async def test_admin_routes_have_their_own_rate_limit(
    settings: GatewaySettings, engine: FakeEngine
) -> None:
    """An admin key over admin_rate_limit_burst gets 429 with Retry-After on /admin, while
    its /v1 bucket is untouched; a user key on /admin is a 403 and takes no admin token."""
    limited = _limited(settings, admin_rate_limit_per_minute=1.0, admin_rate_limit_burst=2)
    async with _clients(engine, limited) as (client,):
        keys = client.app.state.resources.keys
        user = await asyncio.to_thread(create_key, keys, "alice")
        denied = await client.get("/admin/keys", headers=bearer(user.key))
        admin = [await client.get("/admin/keys", headers=ADMIN) for _ in range(3)]
        chat = await client.post("/v1/chat/completions", json=chat_body(), headers=ADMIN)
    assert denied.status_code == 403
    assert [reply.status_code for reply in admin] == [200, 200, 429]
    error = admin[2].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(admin[2].headers["retry-after"]) >= 1
    assert chat.status_code == 200
