"""Zero-downtime adapter swaps: load the new version, prove it answers, flip the alias.

The alias flips only after every engine that answers has loaded the target and answered
a probe naming it (the engines load in parallel). An engine that refuses leaves the
alias (and every status) unchanged and raises vLLM's typed error; an engine that does
not answer is skipped (it is down: the learner's reconciliation loads the active
versions into it when it is back, before gateways route the version to it), unless no
engine answers at all. The replaced version becomes ``retired``.

A rollback steps back through the alias's promotions (``AliasStore.promotion_chain``):
to the version served before the current one, or to a named earlier one, skipping the
versions already rolled back from. Serving one of those again takes a promote.

The engine keeps two versions of an alias loaded: the one served and the one a plain
rollback would go to, so rolling back right after a promote is instant. A flip unloads
the versions that leave that pair (folders stay: serving one again loads it anew). A
same-named adapter is never unloaded to be reloaded: "already loaded" means the engine
has it.

Errors (besides ``engine.VLLMError`` and ``store.RegistryError``)::

    SwapRefused   the target's status or alias forbids it (rejected without force, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from engine._client import (
    AdapterAlreadyLoaded,
    AdapterNotFound,
    EngineUnavailable,
    VLLMClient,
    VLLMError,
)
from store import AdapterRecord, AdapterRegistry, AliasChangeKind, AliasStore, RegistryError

if TYPE_CHECKING:
    from engine._supervisor import EngineSupervisor

logger = logging.getLogger(__name__)

SWAPPABLE = frozenset({"candidate", "active", "retired"})
# The served version and the one a plain rollback goes to (the chain's last two).
KEPT_LOADED = 2


class SwapRefused(RegistryError):
    """The target may not be served (status, alias, or nothing to roll back to)."""


@dataclass(frozen=True)
class SwapResult:
    """What one swap did."""

    alias: str
    version: str
    previous: str | None
    unloaded: tuple[str, ...]
    """Versions of the alias the engine dropped (no longer served nor a rollback step)."""
    load_s: float
    """Seconds from the load request to the alias flip."""


class HotSwap:
    """Activate, promote and roll back adapter versions of the gateway's aliases, on
    every engine of ``engines`` (one client or several).

    ``aliases`` must be the gateway's own ``AliasStore``: it caches aliases in memory,
    and request routing reads that cache. ``actor`` (an admin's key id) is recorded in
    the alias's history.
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        aliases: AliasStore,
        engines: VLLMClient | Sequence[VLLMClient],
    ) -> None:
        self.registry = registry
        self.aliases = aliases
        self.clients = (engines,) if isinstance(engines, VLLMClient) else tuple(engines)
        if not self.clients:
            raise ValueError("a hot-swap needs at least one engine")
        self._locks: dict[str, asyncio.Lock] = {}

    async def activate(self, version: str, *, actor: str | None = None) -> SwapResult:
        """Serve ``version`` under its alias (a candidate, retired or active version)."""
        record = await asyncio.to_thread(self.registry.get, version)
        if record.status not in SWAPPABLE:
            raise SwapRefused(
                f"{version} is {record.status}; only candidate, retired or active versions "
                "can be served (a rejected one needs promote --force)"
            )
        async with self._lock(record.alias):
            return await self._switch(record, "promote", actor)

    async def promote(
        self, version: str, *, force: bool = False, actor: str | None = None
    ) -> SwapResult:
        """Activate ``version``; a ``rejected`` one only with ``force`` (and it is recorded)."""
        record = await asyncio.to_thread(self.registry.get, version)
        if record.status != "rejected":
            return await self.activate(version, actor=actor)
        if not force:
            raise SwapRefused(
                f"{version} was rejected by the gates; promote it with force to serve it "
                f"anyway (gate metrics: {record.gate_metrics})"
            )
        logger.warning("forced promote of rejected adapter %s", version)
        record = await asyncio.to_thread(self.registry.record_forced_promote, version)
        async with self._lock(record.alias):
            return await self._switch(record, "promote", actor)

    async def rollback(
        self, alias: str, version: str | None = None, *, actor: str | None = None
    ) -> SwapResult:
        """Flip ``alias`` back one step of its promotions (or back to ``version``, one of
        its earlier steps), in one swap."""
        async with self._lock(alias):
            version = await asyncio.to_thread(self._rollback_target, alias, version)
            target = await asyncio.to_thread(self.registry.get, version)
            return await self._switch(target, "rollback", actor)

    async def preload(self, version: str) -> AdapterRecord:
        """Load and probe ``version`` on every engine without flipping its alias (a canary
        candidate: routing sends it requests only once its canary is recorded)."""
        record = await asyncio.to_thread(self.registry.get, version)
        if record.status not in SWAPPABLE:
            raise SwapRefused(
                f"{version} is {record.status}; only candidate, retired or active versions "
                "can be served"
            )
        async with self._lock(record.alias):
            await self._load_everywhere(record)
        return record

    async def release(self, version: str) -> bool:
        """Unload a version that no longer serves (a canary's candidate after a rollback
        or abort), unless its alias serves it or a rollback would go to it; whether an
        engine had it loaded."""
        record = await asyncio.to_thread(self.registry.get, version)
        async with self._lock(record.alias):
            await asyncio.to_thread(self.aliases.refresh)
            kept = await asyncio.to_thread(self._kept_loaded, record.alias)
            if version in kept or version in self.aliases.canary_candidates():
                return False
            return await self._unload(version)

    def _rollback_target(self, alias: str, version: str | None) -> str:
        """The version a rollback of ``alias`` serves: ``version`` if named and allowed."""
        if version is not None and (owner := self.registry.get(version).alias) != alias:
            raise SwapRefused(f"{version} belongs to alias {owner!r}, not {alias!r}")
        chain = self.aliases.promotion_chain(alias)
        earlier = chain[:-1]
        if not earlier:
            first = f": {chain[0]} is the first version it served" if chain else ""
            raise SwapRefused(f"alias {alias!r} has no earlier version to roll back to{first}")
        if version is None:
            return earlier[-1]
        if version == chain[-1]:
            raise SwapRefused(f"alias {alias!r} already serves {version}")
        if version not in earlier:
            steps = ", ".join(dict.fromkeys(reversed(earlier)))
            raise SwapRefused(
                f"{version} is no earlier version of alias {alias!r} (a rollback goes back "
                f"to one of {steps}); promote it to serve it again"
            )
        return version

    async def restore_active(self) -> list[str]:
        """Load every alias's active version into the engines (after an engine restart)."""
        loaded = []
        served = [(item.alias, item.adapter) for item in self.aliases.list()]
        # A running canary's candidate serves too.
        served += [("canary", version) for version in self.aliases.canary_candidates()]
        for alias, version in served:
            try:
                record = await asyncio.to_thread(self.registry.get, version)
            except RegistryError:
                logger.warning("alias %s serves unregistered %s: not restored", alias, version)
                continue
            for client in self.clients:
                await _ensure_loaded(client, record)
            loaded.append(version)
        return loaded

    async def reconcile(self, client: VLLMClient) -> list[str]:
        """Load the active versions ``client``'s engine lacks (it restarted); return those
        loaded.

        One listing of the engine's models per call, a load only for what is missing: the
        learner calls this every few seconds for each engine.
        """
        await asyncio.to_thread(self.aliases.refresh)
        loaded = set(await client.list_models())
        served = [record.adapter for record in self.aliases.list()]
        served += self.aliases.canary_candidates()
        missing = [version for version in dict.fromkeys(served) if version not in loaded]
        if not missing:
            return []
        restored = []
        for version in missing:
            try:
                record = await asyncio.to_thread(self.registry.get, version)
            except RegistryError:
                continue  # not built yet (the learner's bootstrap registers version 0)
            await _ensure_loaded(client, record)
            restored.append(version)
        if restored:
            logger.info("engine %s: loaded active versions %s", client.base_url, restored)
        return restored

    async def _load_everywhere(self, record: AdapterRecord) -> None:
        """Load ``record`` on every engine and probe it there, in parallel.

        Raises the first refusal; an engine that does not answer is skipped (reconciliation
        loads it there later), unless none answers.
        """

        async def load(client: VLLMClient) -> None:
            await _ensure_loaded(client, record)
            await client.probe(record.version)

        outcomes = await asyncio.gather(
            *(load(client) for client in self.clients), return_exceptions=True
        )
        unavailable = []
        for client, outcome in zip(self.clients, outcomes, strict=True):
            if isinstance(outcome, EngineUnavailable):
                unavailable.append(outcome)
                logger.warning(
                    "engine %s is down: %s is not loaded there yet (%s)",
                    client.base_url,
                    record.version,
                    outcome.message,
                )
            elif isinstance(outcome, BaseException):
                raise outcome
        if len(unavailable) == len(self.clients):
            raise unavailable[0]

    def _lock(self, alias: str) -> asyncio.Lock:
        return self._locks.setdefault(alias, asyncio.Lock())

    async def _switch(
        self, record: AdapterRecord, kind: AliasChangeKind, actor: str | None
    ) -> SwapResult:
        """Serve ``record`` (its alias's lock held): load, probe, flip, unload the rest."""
        alias = record.alias
        # Another process (a gateway, the learner) may have flipped it meanwhile.
        await asyncio.to_thread(self.aliases.refresh)
        current = self.aliases.get(alias)
        kept_before = await asyncio.to_thread(self._kept_loaded, alias)
        started = asyncio.get_running_loop().time()
        await self._load_everywhere(record)
        alias_record = self.aliases.record(alias)
        public = True if alias_record is None else alias_record.public
        await asyncio.to_thread(
            lambda: self.aliases.set(alias, record.version, public=public, kind=kind, actor=actor)
        )
        load_s = asyncio.get_running_loop().time() - started
        await asyncio.to_thread(self.registry.set_status, record.version, "active")
        kept_after = await asyncio.to_thread(self._kept_loaded, alias)
        unloaded = [
            version for version in sorted(kept_before - kept_after) if await self._unload(version)
        ]
        logger.info("alias %s now serves %s (was %s)", alias, record.version, current)
        return SwapResult(
            alias=alias,
            version=record.version,
            previous=current if current != record.version else None,
            unloaded=tuple(unloaded),
            load_s=load_s,
        )

    def _kept_loaded(self, alias: str) -> set[str]:
        return set(self.aliases.promotion_chain(alias)[-KEPT_LOADED:])

    async def _unload(self, version: str) -> bool:
        """Drop ``version`` from every engine; whether some engine had it loaded."""
        dropped = False
        for client in self.clients:
            try:
                await client.unload_adapter(version)
            except AdapterNotFound:
                continue
            except VLLMError as error:
                # The flip is done; an adapter left loaded costs memory, not correctness.
                logger.warning("could not unload %s from %s: %s", version, client.base_url, error)
                continue
            dropped = True
        return dropped


async def _ensure_loaded(client: VLLMClient, record: AdapterRecord) -> None:
    # Already loaded means the engine holds this immutable folder: never reload it.
    with contextlib.suppress(AdapterAlreadyLoaded):
        await client.load_adapter(record.version, record.path)


def restore_on_ready(
    registry: AdapterRegistry,
    aliases: AliasStore,
    *,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Callable[[EngineSupervisor], None]:
    """An ``EngineSupervisor.on_ready`` hook: active adapters are loaded before traffic.

    It runs in the supervisor's thread, so it opens its own loop and client.
    """

    def hook(supervisor: EngineSupervisor) -> None:
        async def run() -> list[str]:
            http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(300.0, connect=5.0))
            async with (
                http,
                VLLMClient(supervisor.base_url, api_key=api_key, client=http) as client,
            ):
                return await HotSwap(registry, aliases, client).restore_active()

        loaded = asyncio.run(run())
        logger.info("engine ready: restored adapters %s", loaded)

    return hook


def identity_version(alias: str) -> str:
    """Version 0 of ``alias``: its identity adapter."""
    return f"{alias}-v0000"


def ensure_identity_adapter(
    registry: AdapterRegistry, alias: str, base_model: str | Path, adapters_dir: Path
) -> AdapterRecord:
    """Version 0 of ``alias``: an identity LoRA, built and registered active on first start.

    Later starts return the registered row untouched (the folder is immutable).
    """
    version = identity_version(alias)
    try:
        return registry.get(version)
    except RegistryError:
        pass
    from tuneshield import make_identity_adapter

    folder = Path(adapters_dir) / version
    if not folder.exists():
        # make_identity_adapter writes to a scratch dir and renames: never half a folder.
        make_identity_adapter(base_model, folder)
    registry.next_version(alias)
    return registry.register(version, folder, status="active", hyperparameters={"kind": "identity"})
