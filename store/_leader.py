"""The learner's leader lock: exactly one active learner per store.

On PostgreSQL it is a session-level advisory lock held on a connection of its own: when
the holder dies, its connection closes and the server releases the lock, so a waiting
learner takes over without any lease to expire. On DuckDB only one process can open the
file at all, so the process that holds the file holds the lock.
"""

from __future__ import annotations

import logging
from typing import Any

from store._database import Database, PostgresDatabase

logger = logging.getLogger(__name__)

# Any constant every learner agrees on: the advisory lock's key.
LEARNER_LOCK_KEY = 7_302_114_002
# The lock connection's application_name: how gateways tell who the active learner is.
APPLICATION_PREFIX = "tuneshield-learner "


class LeaderLock:
    """Try to become the active learner; keep checking that leadership still holds."""

    def __init__(
        self, database: Database, name: str = "learner", key: int = LEARNER_LOCK_KEY
    ) -> None:
        self._database = database
        self._name = name
        self._key = key
        self._connection: Any = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this process is the active learner (as of the last check)."""
        return self._held

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process holds it now."""
        if self._held:
            return self.check()
        if not isinstance(self._database, PostgresDatabase):
            self._held = True
            return True
        try:
            if self._connection is None:
                self._connection = self._database.connect_dedicated(
                    application_name=(APPLICATION_PREFIX + self._name)[:63]
                )
            query = "SELECT pg_try_advisory_lock(%s)"
            row = self._connection.execute(query, [self._key]).fetchone()
        except Exception as error:  # the server is briefly away: not leader, try again later
            logger.warning("learner: cannot try the leader lock: %s", error)
            self._drop()
            return False
        self._held = bool(row and row[0])
        return self._held

    def check(self) -> bool:
        """Whether the lock still holds (its connection may have been lost)."""
        if not self._held or self._connection is None:
            return self._held
        try:
            self._connection.execute("SELECT 1").fetchone()
        except Exception as error:
            logger.error("learner: lost the leader lock's connection: %s", error)
            self._drop()
        return self._held

    def release(self) -> None:
        """Give the lock up (closing its connection releases it on the server)."""
        self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._held = False
        if connection is not None:
            try:
                connection.close()
            except Exception as error:  # already broken: nothing more to release
                logger.debug("closing the leader lock's connection: %s", error)


def leader(database: Database, key: int = LEARNER_LOCK_KEY) -> str | None:
    """The name of the learner holding the lock on PostgreSQL (None: none, or DuckDB, where
    only the process that owns the file can run one)."""
    if not isinstance(database, PostgresDatabase):
        return None
    # A bigint advisory key is stored as two 32-bit halves: classid (high), objid (low).
    high, low = key >> 32, key & 0xFFFFFFFF
    row = database.call(
        lambda c: c.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = ? "
            "AND l.objid::bigint = ? LIMIT 1",
            [high, low],
        ).fetchone()
    )
    if row is None:
        return None
    return str(row[0]).removeprefix(APPLICATION_PREFIX) or "learner"
