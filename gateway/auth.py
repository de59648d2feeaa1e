"""API keys: bearer authentication, roles and rate limits.

A key is shown once when created; only its SHA-256 is stored (a fast hash is enough for
random 256-bit secrets, unlike passwords). ``$TUNESHIELD_ADMIN_KEY`` is an admin key that
lives only in the environment; it may call every route, ``/v1`` included.

Limits are token buckets: per key on ``/v1`` and on ``/admin``, and per client address
for failed authentications. On PostgreSQL the buckets live in the database, so a limit
holds across every gateway replica; on DuckDB (one process) they live in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, TypeVar

from gateway.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from gateway.settings import LimitsConfig
from store import ApiKeyRecord, BucketTake, Database, KeyStore, RateBucketStore, utcnow

logger = logging.getLogger(__name__)
V = TypeVar("V")

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
KEY_PREFIX = "ts-"
ENV_ADMIN_KEY_ID = "env-admin"
US_PER_MS = 1000
MS_PER_S = 1000
MS_PER_MINUTE = 60 * MS_PER_S
MS_PER_HOUR = 60 * MS_PER_MINUTE
SECONDS_PER_MINUTE = 60.0
# In-memory buckets and refusals are scanned for stale entries only past this many.
PRUNE_FLOOR = 1024
# OpenAI's names for a request rate limit's state.
LIMIT_HEADER = "x-ratelimit-limit-requests"
REMAINING_HEADER = "x-ratelimit-remaining-requests"
RESET_HEADER = "x-ratelimit-reset-requests"


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who sent a request."""

    key_id: str
    role: Role
    opt_out: bool
    rate_limit_per_minute: float | None = None

    @property
    def is_admin(self) -> bool:
        """Whether the key has the admin role."""
        return self.role == "admin"


@dataclass(frozen=True)
class CreatedKey:
    """A new key: the secret (shown once) and its stored record."""

    key: str
    record: ApiKeyRecord


def create_key(
    keys: KeyStore,
    name: str,
    *,
    role: Role = "user",
    opt_out: bool = False,
    rate_limit_per_minute: float | None = None,
    actor: str | None = None,
) -> CreatedKey:
    """Make, store and return a new API key; ``actor`` (an admin's key id, ``cli``) is
    recorded in the audit log with it (``KeyStore.add``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if rate_limit_per_minute is not None and rate_limit_per_minute <= 0:
        raise ValueError(f"rate_limit_per_minute must be > 0, got {rate_limit_per_minute!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id="key_" + secrets.token_hex(6),
        name=name,
        key_hash=hash_key(key),
        key_prefix=key[: len(KEY_PREFIX) + 6],
        role=role,
        opt_out=opt_out,
        rate_limit_per_minute=rate_limit_per_minute,
        created_at=utcnow(),
        revoked_at=None,
    )
    keys.add(record, actor=actor)
    return CreatedKey(key=key, record=record)


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal`` from the key cache (a good key
    costs no database hit), unless the client's address failed to authenticate too often
    (``FailedAuthThrottle``)."""

    def __init__(self, keys: KeyStore, admin_key: str | None, failures: FailedAuthThrottle) -> None:
        self._keys = keys
        self._admin_key = admin_key
        self._failures = failures

    async def authenticate(
        self, authorization: str | None, *, client: str | None, admin: bool = False
    ) -> Principal:
        """The caller behind a bearer header sent from ``client`` (its address); ``admin``
        requires the admin role. An address over its failure allowance gets 429 before
        its key is even looked up; each failure counts against that allowance."""
        self._failures.check(client)
        try:
            principal = self._identify(authorization)
        except AuthenticationError:
            await self._failures.record_failure(client)
            raise
        if admin and not principal.is_admin:
            raise PermissionDeniedError("this route needs an admin API key")
        return principal

    def _identify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key"
            )
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        if self._admin_key is not None and hmac.compare_digest(
            key.encode(), self._admin_key.encode()
        ):
            return Principal(key_id=ENV_ADMIN_KEY_ID, role="admin", opt_out=False)
        record = self._keys.by_hash(hash_key(key))
        if record is None or record.revoked:
            raise AuthenticationError("invalid or revoked API key", code="invalid_api_key")
        role: Role = "admin" if record.role == "admin" else "user"
        return Principal(
            key_id=record.key_id,
            role=role,
            opt_out=record.opt_out,
            rate_limit_per_minute=record.rate_limit_per_minute,
        )


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's format):
    ``0s``, ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to the millisecond, so a client that waits that long is not early (after
    rounding to the microsecond: float noise must not turn 70 ms into 71 ms).
    """
    us = max(0, round(seconds * MS_PER_S * US_PER_MS))
    ms = -(-us // US_PER_MS)
    if ms == 0:
        return "0s"
    if ms < MS_PER_S:
        return f"{ms}ms"
    hours, ms = divmod(ms, MS_PER_HOUR)
    minutes, ms = divmod(ms, MS_PER_MINUTE)
    whole, fraction = divmod(ms, MS_PER_S)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


@dataclass(frozen=True)
class RateLimitState:
    """A key's token bucket after a request, as OpenAI's ``x-ratelimit-*-requests`` say."""

    limit: int
    """Requests a full bucket allows at once (its capacity)."""
    remaining: int
    """Whole tokens left: requests that may follow at once."""
    reset_s: float
    """Seconds until the bucket is full again (OpenAI: back to its initial state)."""

    def headers(self) -> dict[str, str]:
        """The state as OpenAI's response headers."""
        return {
            LIMIT_HEADER: str(self.limit),
            REMAINING_HEADER: str(self.remaining),
            RESET_HEADER: openai_duration(self.reset_s),
        }


class TokenBuckets(ABC):
    """Named token buckets. One interface, two implementations chosen at startup: in this
    process's memory (``LocalTokenBuckets``), or in the database, shared by every gateway
    replica (``SharedTokenBuckets``)."""

    @abstractmethod
    async def take(self, bucket: str, capacity: float, rate_per_s: float) -> BucketTake:
        """Refill ``bucket`` (full when new) at ``rate_per_s`` up to ``capacity``, then take
        one token if a whole one is there."""

    @abstractmethod
    async def prune(self) -> None:
        """Forget the buckets that are full again (they behave like absent ones)."""


class _ForgetfulDict(Generic[V]):
    """Entries by name that drop the stale ones (``stale(value, now)``) whenever they have
    doubled since the last scan: many clients seen once each must not grow memory without
    bound, and scanning only after doubling keeps the cost per insert constant."""

    def __init__(self, stale: Callable[[V, float], bool]) -> None:
        self._entries: dict[str, V] = {}
        self._stale = stale
        self._scan_above = PRUNE_FLOOR

    def get(self, name: str) -> V | None:
        return self._entries.get(name)

    def put(self, name: str, value: V, now: float) -> None:
        self._entries[name] = value
        if len(self._entries) > self._scan_above:
            self.forget_stale(now)
            self._scan_above = max(PRUNE_FLOOR, 2 * len(self._entries))

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)

    def forget_stale(self, now: float) -> None:
        self._entries = {
            name: value for name, value in self._entries.items() if not self._stale(value, now)
        }


class _LocalBucket(NamedTuple):
    tokens: float
    stamp: float
    capacity: float
    rate_per_s: float

    def tokens_at(self, now: float) -> float:
        return min(self.capacity, self.tokens + (now - self.stamp) * self.rate_per_s)

    def full_at(self, now: float) -> bool:
        return self.tokens_at(now) >= self.capacity

    def has_token_at(self, now: float) -> bool:
        return self.tokens_at(now) >= 1.0


class LocalTokenBuckets(TokenBuckets):
    """Buckets in this process's memory: the limits of the one process on a DuckDB file,
    and the fallback of a replica that cannot reach its database."""

    def __init__(self) -> None:
        self._buckets = _ForgetfulDict[_LocalBucket](_LocalBucket.full_at)

    def take_now(self, bucket: str, capacity: float, rate_per_s: float) -> BucketTake:
        """``take`` without awaiting: it never blocks."""
        now = time.monotonic()
        held = self._buckets.get(bucket)
        tokens = capacity
        if held is not None:
            tokens = min(capacity, held.tokens + (now - held.stamp) * rate_per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets.put(bucket, _LocalBucket(tokens, now, capacity, rate_per_s), now)
        return BucketTake(taken=int(allowed), tokens=tokens)

    async def take(self, bucket: str, capacity: float, rate_per_s: float) -> BucketTake:
        return self.take_now(bucket, capacity, rate_per_s)

    async def prune(self) -> None:
        self._buckets.forget_stale(time.monotonic())


class _Lease(NamedTuple):
    tokens: int
    """Tokens taken from the shared bucket and not yet spent."""
    bucket_tokens: float
    """What the shared bucket held right after they were taken."""
    expires_at: float
    """Monotonic time after which the rest goes back to the bucket (with the next take)."""


class SharedTokenBuckets(TokenBuckets):
    """Buckets in the database (``RateBucketStore``, PostgreSQL), so a limit holds across
    every gateway replica: one statement per request, in a worker thread (it blocks).

    A bucket the database found empty is refused here, without a round trip, until its
    next token is due: other replicas can only take tokens, never add one, so nothing is
    refused that the database would allow, and a key flooding the gateway costs the
    database one statement per token rather than one per request.

    A busy key does not cost a statement per request either: a take asks for a lease of
    up to ``lease_share`` of the bucket's capacity, and the tokens beyond the first are
    spent from this replica's memory for up to ``lease_s``; what is left then is given
    back with the next take. Every admitted request still spends a token taken out of the
    shared bucket, so the replicas together never admit more than it holds; a lease only
    keeps its tokens from the other replicas for a moment.

    When the database fails or is slower than ``timeout_s`` the replica fails open to its
    own in-memory buckets, logs one warning, and tries the database again ``retry_s``
    later: limits then hold per replica rather than in total, which beats refusing every
    request or making each one wait for a dead server.
    """

    def __init__(
        self,
        store: RateBucketStore,
        *,
        timeout_s: float,
        retry_s: float,
        lease_share: float,
        lease_s: float,
    ) -> None:
        self._store = store
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._lease_share = lease_share
        self._lease_s = lease_s
        self._leases: dict[str, _Lease] = {}
        """Tokens this replica took from a shared bucket and has not spent yet."""
        self._asking: dict[str, asyncio.Future[None]] = {}
        """Buckets whose database take is in flight: other takes of the same bucket wait
        for it and spend its lease, instead of each taking a lease of their own."""
        self._fallback = LocalTokenBuckets()
        self._empty = _ForgetfulDict[_LocalBucket](_LocalBucket.has_token_at)
        """Buckets as the database left them when it refused, stamped just before it was
        asked (so never later than its own clock's reading)."""
        self._local_until = 0.0
        """Monotonic time before which the database is not tried (it just failed)."""
        self._failing = False

    async def take(self, bucket: str, capacity: float, rate_per_s: float) -> BucketTake:
        now = time.monotonic()
        while True:
            empty = self._empty.get(bucket)
            if empty is not None:
                if not empty.has_token_at(now):
                    return BucketTake(taken=0, tokens=empty.tokens_at(now))
                self._empty.forget(bucket)
            if now < self._local_until:
                return self._fallback.take_now(bucket, capacity, rate_per_s)
            lease = self._leases.pop(bucket, None)
            if lease is not None and now < lease.expires_at:
                # Spend the lease's next token; the bucket holds what it held then, or less.
                if lease.tokens > 1:
                    self._leases[bucket] = lease._replace(tokens=lease.tokens - 1)
                return BucketTake(taken=1, tokens=lease.bucket_tokens + lease.tokens - 1)
            if lease is not None:
                self._leases[bucket] = lease  # expired: given back by the next take
            asking = self._asking.get(bucket)
            if asking is None:
                break
            await asyncio.shield(asking)
            now = time.monotonic()
        self._asking[bucket] = asyncio.get_running_loop().create_future()
        try:
            return await self._take_from_database(bucket, capacity, rate_per_s, now)
        finally:
            self._asking.pop(bucket).set_result(None)

    async def _take_from_database(
        self, bucket: str, capacity: float, rate_per_s: float, now: float
    ) -> BucketTake:
        lease = self._leases.pop(bucket, None)
        give_back = float(lease.tokens) if lease is not None else 0.0
        want = max(1, math.floor(capacity * self._lease_share))
        try:
            async with asyncio.timeout(self._timeout_s):
                taken = await asyncio.to_thread(
                    self._store.take,
                    bucket,
                    capacity=capacity,
                    rate_per_s=rate_per_s,
                    want=want,
                    give_back=give_back,
                )
        except Exception as error:  # unreachable, failing or too slow: fail open
            self._fail_open(error)
            return self._fallback.take_now(bucket, capacity, rate_per_s)
        if self._failing:
            self._failing = False
            logger.warning("rate limits: the database answers again; limits hold across replicas")
        if not taken.allowed:
            self._empty.put(bucket, _LocalBucket(taken.tokens, now, capacity, rate_per_s), now)
            return taken
        if taken.taken > 1:
            self._leases[bucket] = _Lease(taken.taken - 1, taken.tokens, now + self._lease_s)
        return BucketTake(taken=1, tokens=taken.tokens + taken.taken - 1)

    async def prune(self) -> None:
        now = time.monotonic()
        self._empty.forget_stale(now)
        await self._fallback.prune()
        if now < self._local_until:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await asyncio.to_thread(self._store.prune)
        except Exception as error:  # the next prune deletes them; takes report outages
            logger.info("rate limits: pruning the shared buckets failed: %r", error)

    def _fail_open(self, error: Exception) -> None:
        self._local_until = time.monotonic() + self._retry_s
        if not self._failing:
            self._failing = True
            logger.warning(
                "rate limits: the database failed (%r); each replica limits on its own "
                "(failing open) and retries the database every %.1f s",
                error,
                self._retry_s,
            )


def _retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, rounded up so a client that waits is not early."""
    return str(max(1, math.ceil(wait_s)))


class RateLimiter:
    """A token bucket per key on one kind of route (``scope``): ``burst`` requests at once
    (or one second of the rate, when that is more), refilled at a steady rate."""

    def __init__(
        self,
        buckets: TokenBuckets,
        scope: str,
        per_minute: float,
        burst: int,
        *,
        key_rate_applies: bool,
    ) -> None:
        self._buckets = buckets
        self._scope = scope
        self._per_minute = per_minute
        self._burst = float(burst)
        self._key_rate_applies = key_rate_applies
        """Whether a key's own ``rate_limit_per_minute`` replaces the policy's rate here."""

    async def acquire(self, principal: Principal) -> RateLimitState:
        """Take one token for this key and return the bucket's state, or raise
        ``RateLimitError`` with Retry-After and that state's headers."""
        own = principal.rate_limit_per_minute if self._key_rate_applies else None
        rate = (own or self._per_minute) / SECONDS_PER_MINUTE
        # A key allowed more per second than the policy's burst may send that second at once.
        capacity = max(self._burst, rate)
        taken = await self._buckets.take(f"{self._scope}:{principal.key_id}", capacity, rate)
        state = RateLimitState(
            limit=math.floor(capacity),
            remaining=math.floor(taken.tokens),
            reset_s=(capacity - taken.tokens) / rate,
        )
        if not taken.allowed:
            wait = (1.0 - taken.tokens) / rate
            raise RateLimitError(
                f"rate limit exceeded for key {principal.key_id}; retry in {wait:.1f} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": _retry_after(wait), **state.headers()},
            )
        return state


class FailedAuthThrottle:
    """Failed authentications per client address: ``limit`` per ``window_s`` (a token
    bucket of that size that refills over the window). An address past it gets 429 until
    its bucket is full again, decided from memory before any key is looked up.

    On shared buckets the count is shared; each replica learns that an address is over at
    that address's next failure there, so all replicas together allow at most about one
    failure more each per window.
    """

    def __init__(
        self, buckets: TokenBuckets, limit: int, window_s: float, ipv6_prefix: int
    ) -> None:
        self._buckets = buckets
        self._capacity = float(limit)
        self._rate_per_s = limit / window_s
        self._window_s = window_s
        self._ipv6_prefix = ipv6_prefix
        self._refused_until = _ForgetfulDict[float](lambda until, now: until <= now)
        self._next_prune = 0.0

    def source(self, client: str | None) -> str:
        """What is counted: the client's IPv4 address, or its IPv6 network."""
        if not client:
            return "unknown"
        try:
            address = ipaddress.ip_address(client)
        except ValueError:  # not an IP address (a Unix socket, a test client)
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network((address, self._ipv6_prefix), strict=False))
        return str(address)

    def check(self, client: str | None) -> None:
        """Refuse (429) an address that is over its allowance; memory only, no await."""
        source = self.source(client)
        until = self._refused_until.get(source)
        if until is None:
            return
        wait = until - time.monotonic()
        if wait <= 0:
            self._refused_until.forget(source)
            return
        raise self._refusal(wait)

    async def record_failure(self, client: str | None) -> None:
        """Count one failed authentication; the one past the allowance is refused (429)
        rather than answered 401, and so is the address until its bucket is full."""
        source = self.source(client)
        taken = await self._buckets.take(f"auth:{source}", self._capacity, self._rate_per_s)
        now = time.monotonic()
        if now >= self._next_prune:
            # Addresses that failed once are forgotten once their allowance is whole again.
            self._next_prune = now + self._window_s
            await self._buckets.prune()
        if taken.allowed:
            return
        wait = (self._capacity - taken.tokens) / self._rate_per_s
        self._refused_until.put(source, now + wait, now)
        raise self._refusal(wait)

    @staticmethod
    def _refusal(wait_s: float) -> RateLimitError:
        return RateLimitError(
            f"too many failed authentications from this address; retry in {_retry_after(wait_s)} s",
            code="too_many_failed_authentications",
            headers={"Retry-After": _retry_after(wait_s)},
        )


@dataclass(frozen=True)
class RequestLimits:
    """The gateway's limits, all on one set of token buckets."""

    requests: RateLimiter
    """Per key on ``/v1`` (a key's own rate applies)."""
    admin: RateLimiter
    """Per key on ``/admin`` routes."""
    failed_auth: FailedAuthThrottle
    """Per client address, on every authenticated route."""


def open_limits(config: LimitsConfig, database: Database) -> RequestLimits:
    """The limits on buckets in the database when several processes share it (PostgreSQL:
    they then hold across replicas), else in this process's memory (DuckDB: one process)."""
    buckets: TokenBuckets
    if database.multi_process:
        buckets = SharedTokenBuckets(
            RateBucketStore(database),
            timeout_s=config.shared_timeout_s,
            retry_s=config.shared_retry_s,
            lease_share=config.shared_lease_share,
            lease_s=config.shared_lease_s,
        )
    else:
        buckets = LocalTokenBuckets()
    return RequestLimits(
        requests=RateLimiter(
            buckets,
            "v1",
            config.rate_limit_per_minute,
            config.rate_limit_burst,
            key_rate_applies=True,
        ),
        admin=RateLimiter(
            buckets,
            "admin",
            config.admin_rate_limit_per_minute,
            config.admin_rate_limit_burst,
            key_rate_applies=False,
        ),
        failed_auth=FailedAuthThrottle(
            buckets,
            config.auth_failures_per_window,
            config.auth_failure_window_s,
            config.auth_failure_ipv6_prefix,
        ),
    )
