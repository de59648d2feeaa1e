"""API keys: bearer authentication, roles and per-key rate limits.

A key is shown once when created; only its SHA-256 is stored (a fast hash is enough for
random 256-bit secrets, unlike passwords). ``$TUNESHIELD_ADMIN_KEY`` is an admin key that
lives only in the environment; it may call every route, ``/v1`` included.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from gateway.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from store import ApiKeyRecord, KeyStore, utcnow

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
KEY_PREFIX = "ts-"
ENV_ADMIN_KEY_ID = "env-admin"


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
) -> CreatedKey:
    """Make, store and return a new API key."""
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
    keys.add(record)
    return CreatedKey(key=key, record=record)


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal`` (no database hit)."""

    def __init__(self, keys: KeyStore, admin_key: str | None) -> None:
        self._keys = keys
        self._admin_key = admin_key

    def authenticate(self, authorization: str | None, *, admin: bool = False) -> Principal:
        """The caller behind a bearer header; ``admin`` requires the admin role."""
        principal = self._identify(authorization)
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
        if self._admin_key is not None and hmac.compare_digest(key, self._admin_key):
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


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once (or one second of the key's own
    rate, when that is more), refilled at a steady rate."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self._per_minute = per_minute
        self._burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, principal: Principal) -> None:
        """Take one token for this key or raise ``RateLimitError`` with Retry-After."""
        rate = (principal.rate_limit_per_minute or self._per_minute) / 60.0
        # A key allowed more per second than the policy's burst may send that second at once.
        capacity = max(self._burst, rate)
        now = time.monotonic()
        tokens, stamp = self._buckets.get(principal.key_id, (capacity, now))
        tokens = min(capacity, tokens + (now - stamp) * rate)
        if tokens < 1.0:
            self._buckets[principal.key_id] = (tokens, now)
            wait = (1.0 - tokens) / rate
            raise RateLimitError(
                f"rate limit exceeded for key {principal.key_id}; retry in {wait:.1f} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        self._buckets[principal.key_id] = (tokens - 1.0, now)
