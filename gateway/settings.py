"""Gateway settings: ``policies/gateway.yaml`` plus the environment, read once at start.

Nothing below ``create_app`` reads the environment or a policy file; everything it needs
arrives in one :class:`GatewaySettings` built by :func:`load_settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.protocol import ALIAS_NAME
from store import StoreSettings, load_store_settings
from tuneshield import PolicyError, build_config, read_policy

ADMIN_KEY_ENV = "TUNESHIELD_ADMIN_KEY"
DATA_DIR_ENV = "TUNESHIELD_DATA_DIR"
UPSTREAM_URL_ENV = "TUNESHIELD_UPSTREAM_URL"
UPSTREAM_KEY_ENV = "TUNESHIELD_UPSTREAM_API_KEY"
DEFAULT_DATA_DIR = Path(".data")
DEFAULT_UPSTREAM_URL = "http://127.0.0.1:8000"
POLICY_NAME = "gateway"
ADMIN_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")

IPV6_BITS = 128
GuardAction = Literal["log", "flag", "block"]
GUARD_ACTIONS: tuple[GuardAction, ...] = ("log", "flag", "block")


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class RoutingConfig:
    """How public model names and request headers map onto the engine and the log."""

    default_alias: str
    """Public model name clients use by default (shown by ``/v1/models``)."""
    seed_aliases: dict[str, str]
    """Aliases created at start when absent: public name → adapter name (never the base)."""
    conversation_header: str
    """Request/response header carrying the conversation id."""
    opt_out_header: str
    """Request header whose truthy value keeps the turn out of training."""
    host: str
    """Interface the ``tuneshield gateway`` command binds by default."""
    port: int
    """Port the ``tuneshield gateway`` command listens on by default."""
    keep_alive_s: int
    """Seconds the gateway keeps an idle client connection open (uvicorn's
    ``timeout_keep_alive``)."""

    def __post_init__(self) -> None:
        if self.keep_alive_s <= 0:
            raise ValueError(f"keep_alive_s must be > 0, got {self.keep_alive_s!r}")
        misspelt = [alias for alias in self.seed_aliases if not re.search(ALIAS_NAME, alias)]
        if misspelt:
            raise ValueError(
                f"seed_aliases {misspelt} must be 1-64 letters, digits and . _ -, starting "
                "with a letter or digit"
            )
        if self.default_alias not in self.seed_aliases:
            raise ValueError(
                f"default_alias {self.default_alias!r} must be one of seed_aliases "
                f"{sorted(self.seed_aliases)}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")


@dataclass(frozen=True)
class UpstreamConfig:
    """The HTTP clients towards the OpenAI-compatible engines (one per engine)."""

    connect_timeout_s: float
    """Seconds to open a TCP connection to the engine."""
    read_timeout_s: float
    """Seconds allowed between two reads of a reply (streams included)."""
    write_timeout_s: float
    """Seconds to send a request body."""
    pool_timeout_s: float
    """Seconds to wait for a free pooled connection before answering 503."""
    max_connections: int
    """Upper bound of concurrent connections to the engine."""
    max_keepalive_connections: int
    """Idle connections kept open for reuse."""
    keepalive_expiry_s: float
    """Seconds an idle connection stays in the pool."""
    health_timeout_s: float
    """Timeout of the engine probe done by ``/healthz``."""
    health_probe_s: float
    """Period of the engine pool's listing of every engine (up or not, adapters held)."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "connect_timeout_s",
            "read_timeout_s",
            "write_timeout_s",
            "pool_timeout_s",
            "max_connections",
            "keepalive_expiry_s",
            "health_timeout_s",
            "health_probe_s",
        )
        if not 0 <= self.max_keepalive_connections <= self.max_connections:
            raise ValueError(
                f"max_keepalive_connections ({self.max_keepalive_connections}) must be in "
                f"0..max_connections ({self.max_connections})"
            )


@dataclass(frozen=True)
class LimitsConfig:
    """Request size and rate limits."""

    max_body_bytes: int
    """Largest accepted request body; larger ones get 413."""
    max_messages: int
    """Most messages one chat request may carry."""
    rate_limit_per_minute: float
    """Requests per minute per API key (token bucket refill rate)."""
    rate_limit_burst: int
    """Requests a key may send at once (token bucket size); a key whose own rate allows more
    per second may send that second's worth at once."""
    admin_rate_limit_per_minute: float
    """Requests per minute per API key on ``/admin`` routes (a key's own rate is for ``/v1``)."""
    admin_rate_limit_burst: int
    """Requests a key may send at once to ``/admin`` routes."""
    auth_failures_per_window: int
    """Failed authentications (missing, malformed or unknown key) one client address may
    make per window; past that it gets 429 before any key is looked up, until the window
    has refilled."""
    auth_failure_window_s: float
    """The window, in seconds, over which an address's allowance of failures refills."""
    auth_failure_ipv6_prefix: int
    """IPv6 clients are counted per network of this prefix length (one subscriber usually
    holds a whole /64, so counting single addresses would not throttle anyone)."""
    shared_timeout_s: float
    """On PostgreSQL: longest a request waits for its shared bucket before it is limited by
    this replica's own in-memory buckets instead (failing open, with a logged warning)."""
    shared_retry_s: float
    """After the shared buckets failed, seconds this replica limits on its own before it
    tries the database again."""
    shared_lease_share: float
    """Share of a key's bucket capacity a replica takes from the shared bucket at once and
    spends from memory (at least one token)."""
    shared_lease_s: float
    """How long a replica may spend a lease before the rest goes back to the bucket."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_body_bytes",
            "max_messages",
            "rate_limit_per_minute",
            "rate_limit_burst",
            "admin_rate_limit_per_minute",
            "admin_rate_limit_burst",
            "auth_failures_per_window",
            "auth_failure_window_s",
            "shared_timeout_s",
            "shared_retry_s",
            "shared_lease_s",
        )
        if not 0 < self.shared_lease_share <= 1:
            raise ValueError(
                f"shared_lease_share must be in (0, 1], got {self.shared_lease_share!r}"
            )
        if not 1 <= self.auth_failure_ipv6_prefix <= IPV6_BITS:
            raise ValueError(
                f"auth_failure_ipv6_prefix must be in 1..{IPV6_BITS}, "
                f"got {self.auth_failure_ipv6_prefix!r}"
            )


@dataclass(frozen=True)
class DialogLogConfig:
    """How answered turns reach the store: one writer task, one transaction per batch."""

    durable_ack: bool
    """Acknowledge a turn (the JSON body, a stream's final ``[DONE]``) only after its row
    is committed, so a crash loses no answered turn. Off: turns are queued in memory and
    written up to ``flush_interval_s`` later (a crash loses that queue)."""
    journal: bool
    """With ``durable_ack``: a turn is acknowledged once appended (and ``fdatasync``-ed)
    to the gateway's journal under its data dir; the store then gets it in batches, as
    without ``durable_ack``, and a gateway that starts inserts what its journal holds.
    Off: each acknowledgement waits for a store commit (``commit_interval_s``)."""
    journal_segment_bytes: int
    """A journal segment is closed past this size, and deleted once the store has all
    of its turns."""
    gil_switch_interval_s: float
    """``sys.setswitchinterval`` of the gateway process: how long a writer thread that is
    ready waits for the event loop to hand over the GIL."""
    commit_interval_s: float
    """With ``durable_ack`` and no ``journal``: shortest time between two commits' starts. The turns
    finished meanwhile are committed together (group commit); an idle writer commits a
    lone turn at once."""
    flush_interval_s: float
    """Without ``durable_ack``: longest a queued turn waits before its batch is written."""
    batch_size: int
    """Most turns written in one transaction; a full batch is written at once."""
    write_attempts: int
    """Tries per batch before its turns are counted as lost (and, with ``durable_ack``,
    answered with 503 ``dialog_log_unavailable``)."""
    retry_delay_s: float
    """Pause before the second try of a batch; each further try waits that much longer."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "journal_segment_bytes",
            "gil_switch_interval_s",
            "commit_interval_s",
            "flush_interval_s",
            "batch_size",
            "write_attempts",
            "retry_delay_s",
        )


@dataclass(frozen=True)
class GuardConfig:
    """Live guard: a tuneshield judge scores turns in [0, 1]; an action applies above threshold."""

    enabled: bool
    """Score turns at all (off: no judge is loaded and no request pays anything)."""
    judge: str
    """Judge name in ``policies/judges.yaml`` (``lexical``: alt-profanity-check)."""
    score_request: bool
    """Score the request's last user turn before the engine is called."""
    score_reply: bool
    """Score the engine's reply (streamed replies too)."""
    action: GuardAction
    """``log`` (store score), ``flag`` (also flag the turn) or ``block`` (refuse)."""
    threshold: float
    """Score at or above which the action applies."""
    stream_window_chars: int
    """With ``block`` on replies: a stream is relayed in windows of this many characters,
    each scored (with the reply so far) before it is released."""
    refusal: str
    """Canned reply sent instead of the engine's when the action is ``block``."""

    def __post_init__(self) -> None:
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"action must be one of {GUARD_ACTIONS}, got {self.action!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        _positive(self, "stream_window_chars")
        if not self.refusal.strip():
            raise ValueError("refusal must not be empty")
        if self.enabled and not (self.score_request or self.score_reply):
            raise ValueError("enabled guard needs score_request or score_reply (or both) true")


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator console at ``/console`` (``gateway.console``): sessions and refresh."""

    enabled: bool
    """Serve the console (off: no ``/console`` routes, no sampler task)."""
    cookie_name: str
    """Name of the session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS)."""
    session_lifetime_s: float
    """A session ends this long after sign-in, however active."""
    idle_timeout_s: float
    """A session ends after this long without an operator request (live refreshes do not
    count); also how long a sign-in form stays valid."""
    max_sessions: int
    """Sessions held at once in this process; signing in past it ends the oldest."""
    refresh_s: float
    """How often open pages refresh their live parts (overview, running round)."""
    sample_period_s: float
    """How often the console reads this process's request metrics for its charts."""
    history_points: int
    """Readings kept for the charts (the window they show: this times the period)."""
    audit_limit: int
    """Newest audit entries the audit page reads from the admin API."""
    runs_limit: int
    """Newest learning rounds the rounds page reads from the admin API."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "session_lifetime_s",
            "idle_timeout_s",
            "max_sessions",
            "refresh_s",
            "sample_period_s",
            "history_points",
            "audit_limit",
            "runs_limit",
        )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.cookie_name):
            raise ValueError(
                f"cookie_name must be letters, digits, _ and -, got {self.cookie_name!r}"
            )


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs, passed once to ``create_app``."""

    upstream_urls: tuple[str, ...]
    """Root URLs of the OpenAI-compatible engines (a trailing ``/v1`` is accepted): the
    gateway's engine pool, in order."""
    data_dir: Path
    """Folder holding the DuckDB file."""
    admin_key: str | None
    """Admin API key from ``$TUNESHIELD_ADMIN_KEY``; also valid on ``/v1`` routes."""
    upstream_api_key: str | None
    """Bearer key sent to the engine, if it wants one."""
    routing: RoutingConfig
    upstream: UpstreamConfig
    limits: LimitsConfig
    dialog_log: DialogLogConfig
    guard: GuardConfig
    console: ConsoleConfig
    store: StoreSettings
    """The store: ``$TUNESHIELD_DATABASE_URL`` (PostgreSQL) or the DuckDB file in data_dir."""

    def __post_init__(self) -> None:
        if not self.upstream_urls:
            raise ValueError("the gateway needs at least one engine (upstream) URL")
        roots = []
        for url in self.upstream_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream URL must be an http(s) URL, got {url!r}")
            roots.append(url.rstrip("/").removesuffix("/v1"))
        if len(set(roots)) != len(roots):
            raise ValueError(f"upstream URLs name one engine twice: {roots}")
        object.__setattr__(self, "upstream_urls", tuple(roots))
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise ValueError(f"{ADMIN_KEY_ENV} must be at least 16 characters long")
        if self.admin_key is not None and not ADMIN_KEY_CHARACTERS.fullmatch(self.admin_key):
            # An HTTP header carries it: any other character can never be sent as is.
            raise ValueError(
                f"{ADMIN_KEY_ENV} must be printable ASCII without spaces (it travels in "
                "the Authorization header)"
            )

    @property
    def upstream_url(self) -> str:
        """The first engine's root URL (where a role talks to one engine)."""
        return self.upstream_urls[0]

    @property
    def store_url(self) -> str:
        """The store's URL: PostgreSQL's, or the DuckDB file's path."""
        return self.store.url


_SECTIONS: dict[str, type] = {
    "routing": RoutingConfig,
    "upstream": UpstreamConfig,
    "limits": LimitsConfig,
    "dialog_log": DialogLogConfig,
    "guard": GuardConfig,
    "console": ConsoleConfig,
}


def resolve_data_dir(
    data_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The data dir: ``data_dir`` if given, else ``$TUNESHIELD_DATA_DIR``, else ``.data``."""
    env = os.environ if environ is None else environ
    return Path(data_dir or env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def load_settings(
    *,
    upstream_url: str | Sequence[str] | None = None,
    data_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    policies_directory: Path | None = None,
) -> GatewaySettings:
    """Settings from ``policies/gateway.yaml`` and the environment; arguments win over both.

    ``upstream_url``: one engine's URL or several (the engine pool); else
    ``$TUNESHIELD_UPSTREAM_URL`` (URLs separated by spaces or commas); else the default.
    """
    env = os.environ if environ is None else environ
    data = read_policy(POLICY_NAME, policies_directory)
    where = f"policies/{POLICY_NAME}.yaml"
    unknown = sorted(set(data) - set(_SECTIONS))
    missing = sorted(set(_SECTIONS) - set(data))
    if unknown or missing:
        raise PolicyError(f"{where}: unknown section(s) {unknown}, missing section(s) {missing}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if not isinstance(data[name], dict):
            raise PolicyError(f"{where} [{name}]: must be a mapping")
        sections[name] = build_config(cls, data[name], f"{where} [{name}]")
    folder = resolve_data_dir(data_dir, env)
    store = load_store_settings(folder, environ=env, policies_directory=policies_directory)
    try:
        return GatewaySettings(
            upstream_urls=_upstream_urls(upstream_url, env.get(UPSTREAM_URL_ENV)),
            data_dir=folder,
            store=store,
            admin_key=env.get(ADMIN_KEY_ENV) or None,
            upstream_api_key=env.get(UPSTREAM_KEY_ENV) or None,
            **sections,
        )
    except ValueError as error:
        raise PolicyError(f"gateway settings: {error}") from None


def _upstream_urls(given: str | Sequence[str] | None, environment: str | None) -> tuple[str, ...]:
    if isinstance(given, str):
        return (given,)
    if given:
        return tuple(given)
    if environment and environment.strip():
        return tuple(environment.replace(",", " ").split())
    return (DEFAULT_UPSTREAM_URL,)
