"""Console sessions: a random cookie names a session held in this process's memory.

The browser holds only the session's random name (HttpOnly, SameSite=Strict, Secure over
HTTPS); the operator's admin key stays in the gateway process, which calls the admin API
with it, so a revoked key ends the session at its next call. Sessions are looked up by
the SHA-256 of their name (no timing leak through the lookup), end a fixed time after
sign-in and after a time without the operator's own requests, and are bounded in number.

Each session carries its CSRF token (a synchronizer token): every form that acts sends it
back, and the console refuses an action without it. The sign-in form, which has no
session yet, is protected by a double-submit token: the same random value in a short
cookie of its own and in the form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.console._admin_api import Caller
from gateway.settings import ConsoleConfig

# Random bytes in a session name and in a CSRF token (256 bits, as the API keys have).
TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh unguessable token (URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def tokens_match(expected: str, given: str | None) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class Session:
    """One signed-in operator."""

    key: str
    """The admin key the operator signed in with (kept in this process only)."""
    key_id: str
    """Its id, as the audit log names the operator."""
    csrf_token: str
    signed_in_at: float
    seen_at: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages for the next page (kind, text): what an action did, or why it failed."""

    def caller(self, client: str | None) -> Caller:
        """The operator as the admin API sees them, calling from ``client``."""
        return Caller(key=self.key, client=client)

    def take_flash(self) -> list[tuple[str, str]]:
        """The pending messages, once."""
        messages, self.flash = self.flash, []
        return messages


class Sessions:
    """The sessions of this process (``clock``: monotonic seconds, replaced in tests)."""

    def __init__(self, config: ConsoleConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, key: str, key_id: str) -> tuple[str, Session]:
        """A new session for an admin key: its cookie value (shown to no one else) and it.

        Always a new name (never one the browser brought), so a planted cookie cannot
        become a signed-in session."""
        now = self._clock()
        self._forget_expired(now)
        while len(self._sessions) >= self._config.max_sessions:
            oldest = min(self._sessions, key=lambda name: self._sessions[name].signed_in_at)
            del self._sessions[oldest]
        name = new_token()
        session = Session(
            key=key, key_id=key_id, csrf_token=new_token(), signed_in_at=now, seen_at=now
        )
        self._sessions[_digest(name)] = session
        return name, session

    def get(self, name: str | None, *, touch: bool = True) -> Session | None:
        """The live session a cookie names; ``touch`` counts this as the operator's activity
        (a page refreshing itself does not keep a session alive)."""
        if not name:
            return None
        digest = _digest(name)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[digest]
            return None
        if touch:
            session.seen_at = now
        return session

    def close(self, name: str | None) -> None:
        """End the session a cookie names (signing out; a key the API refused)."""
        if name:
            self._sessions.pop(_digest(name), None)

    def _expired(self, session: Session, now: float) -> bool:
        return (
            now - session.signed_in_at >= self._config.session_lifetime_s
            or now - session.seen_at >= self._config.idle_timeout_s
        )

    def _forget_expired(self, now: float) -> None:
        self._sessions = {
            digest: session
            for digest, session in self._sessions.items()
            if not self._expired(session, now)
        }
