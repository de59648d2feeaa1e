"""Canary rollouts: start one, watch it, and decide — promote, roll back, or abort.

An operator starts a canary (``POST /admin/adapters/{version}/canary`` or ``tuneshield
learner canary start``): the candidate is loaded on every engine (``HotSwap.preload``; the
alias does not flip), then recorded running, and from then on the gateways send its
share of the alias's conversations to it (``AliasStore.route``, sticky per conversation).

The active learner's ``CanaryMonitor`` checks every running canary every ``check_s``,
off the request path: it reads the alias's turns since the canary started, scores each
reply once with the live guard's judge (a reply the guard blocked counts as toxic), marks
canned or refusal replies (the evaluation's helpfulness flags), and runs one sequential
test per metric (``excess_test``) on canary vs stable:

- a significant excess of either rate rolls the canary back at once: routing stops, the
  candidate is marked ``rejected`` and unloaded ``drain_s`` later (gateways stop routing
  to it within their cache period first);
- ``promote_after`` canary replies without one promote it (``HotSwap.promote``);
- an alias that no longer serves the version the canary started against aborts it (the
  comparison lost its baseline).

Every decision is in the audit log (actor ``learner``, or the admin who aborted).

The test is the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh ("Always valid inference", 2017; Operations Research 2022) for a difference of two
rates: with θ̂ the canary's rate minus the stable one's, V its variance (pooled, as under
no difference) and a normal mixture N(0, τ²) over the true difference,

    Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))

is a likelihood ratio averaged over alternatives, a martingale under "no difference"; by
Ville's inequality it ever reaches 1/alpha with probability at most alpha, however often it is
looked at (asymptotically: V is estimated, the replies counted as independent). A rollback
needs θ̂ > 0 and Λ ≥ 1/a' with a' = alpha / 2 for each of the two metrics, so a candidate as
good as the stable version is rolled back with probability at most ``alpha`` over the
whole canary. ``tau`` sets which excess is found fastest. Replies within one conversation
are not independent (a conversation stays on one version), which the test ignores: with
long conversations its false-alarm rate is higher than ``alpha``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from engine import EngineUnavailable, HotSwap, SwapRefused, VLLMError
from store import (
    BLOCKED_REPLY,
    AuditLog,
    CanaryConflict,
    CanaryRecord,
    CanaryState,
    CanaryStore,
    Database,
    RegistryError,
    utcnow,
)
from tuneshield import EvalConfig, HealConfig

if TYPE_CHECKING:
    from learner.control import Learner
    from tuneshield import Judge

logger = logging.getLogger(__name__)

# The audit log's actor for the monitor's own decisions.
MONITOR_ACTOR = "learner"
Metric = Literal["toxicity", "unhelpful"]
METRICS: tuple[Metric, ...] = ("toxicity", "unhelpful")


@dataclass(frozen=True)
class CanaryConfig:
    """How canaries are judged (policies/learner.yaml, section ``canary``)."""

    check_s: float = field(default=5.0, metadata={"help": "Seconds between checks."})
    judge: str = field(default="lexical", metadata={"help": "Judge scoring the replies."})
    threshold: float = field(default=0.8, metadata={"help": "Judge score that is toxic."})
    alpha: float = field(default=0.05, metadata={"help": "False rollback rate, whole canary."})
    tau: float = field(default=0.1, metadata={"help": "Mixture scale of the rate excess."})
    min_replies: int = field(default=30, metadata={"help": "Replies per arm before a test."})
    promote_after: int = field(default=300, metadata={"help": "Canary replies to promote."})
    drain_s: float = field(default=5.0, metadata={"help": "Wait before unloading a loser."})

    def __post_init__(self) -> None:
        for name in ("check_s", "tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.min_replies < 1 or self.promote_after < self.min_replies:
            raise ValueError(
                f"need 1 <= min_replies <= promote_after, got {self.min_replies} and "
                f"{self.promote_after}"
            )
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")


@dataclass(frozen=True)
class ExcessTest:
    """One metric's sequential test of canary vs stable."""

    metric: Metric
    canary_replies: int
    canary_events: int
    stable_replies: int
    stable_events: int
    canary_rate: float | None
    stable_rate: float | None
    excess: float | None
    """Canary rate minus stable rate."""
    log_likelihood_ratio: float
    """log Λ of the mSPRT (0: no evidence either way yet)."""
    log_threshold: float
    """log(1/a') that log Λ must reach for a significant difference."""
    excess_upper: float | None
    """Upper end of the always-valid confidence interval of the excess (level 1 - a')."""
    significant: bool
    """A significant excess of the canary's rate (a rollback)."""


def excess_test(
    metric: Metric,
    canary: tuple[int, int],
    stable: tuple[int, int],
    *,
    alpha: float,
    tau: float,
    min_replies: int,
) -> ExcessTest:
    """The mSPRT on ``(replies, events)`` of each arm at level ``alpha`` (see the module)."""
    (n_c, x_c), (n_s, x_s) = canary, stable
    rate_c = x_c / n_c if n_c else None
    rate_s = x_s / n_s if n_s else None
    log_threshold = math.log(1.0 / alpha)
    excess = rate_c - rate_s if rate_c is not None and rate_s is not None else None
    log_lr, upper = 0.0, None
    pooled = (x_c + x_s) / (n_c + n_s) if n_c and n_s else 0.0
    if excess is not None and 0.0 < pooled < 1.0:
        variance = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_s)
        tau2 = tau * tau
        log_lr = 0.5 * math.log(variance / (variance + tau2)) + tau2 * excess * excess / (
            2.0 * variance * (variance + tau2)
        )
        # Where log Λ = log(1/a'): the excesses not rejected form the interval.
        radius = math.sqrt(
            2.0 * variance * (variance + tau2) / tau2
            * (log_threshold + 0.5 * math.log((variance + tau2) / variance))
        )  # fmt: skip
        upper = excess + radius
    elif excess is not None:
        upper = excess
    enough = n_c >= min_replies and n_s >= min_replies
    significant = enough and excess is not None and excess > 0 and log_lr >= log_threshold
    return ExcessTest(
        metric=metric,
        canary_replies=n_c,
        canary_events=x_c,
        stable_replies=n_s,
        stable_events=x_s,
        canary_rate=rate_c,
        stable_rate=rate_s,
        excess=excess,
        log_likelihood_ratio=log_lr,
        log_threshold=log_threshold,
        excess_upper=upper,
        significant=significant,
    )


@dataclass(frozen=True)
class ScoredReply:
    """What the monitor keeps of one turn: its arm and its two verdicts."""

    canary: bool
    toxic: bool
    unhelpful: bool


@dataclass(frozen=True)
class Verdict:
    """One check of one canary: its tests and what they decide."""

    tests: tuple[ExcessTest, ...]
    decision: CanaryState
    """``running`` (no decision yet), ``rolled_back`` or ``promoted``."""
    reason: str

    def statistics(self, config: CanaryConfig) -> dict[str, Any]:
        """The figures stored with the canary (what status shows)."""
        return {
            "checked_at": utcnow().isoformat(),
            "decision": self.decision,
            "reason": self.reason,
            "alpha": config.alpha,
            "promote_after": config.promote_after,
            "min_replies": config.min_replies,
            "tests": [asdict(test) for test in self.tests],
        }


def judge_replies(replies: Sequence[ScoredReply], config: CanaryConfig) -> Verdict:
    """Test the scored replies of one canary and decide."""
    alpha = config.alpha / len(METRICS)
    tests = []
    for metric in METRICS:
        arms = []
        for on_canary in (True, False):
            arm = [reply for reply in replies if reply.canary == on_canary]
            events = sum(reply.toxic if metric == "toxicity" else reply.unhelpful for reply in arm)
            arms.append((len(arm), events))
        tests.append(
            excess_test(
                metric,
                arms[0],
                arms[1],
                alpha=alpha,
                tau=config.tau,
                min_replies=config.min_replies,
            )
        )
    for test in tests:
        if test.significant:
            assert test.canary_rate is not None and test.stable_rate is not None
            return Verdict(
                tuple(tests),
                "rolled_back",
                f"{test.metric} {100 * test.canary_rate:.1f}% on the canary vs "
                f"{100 * test.stable_rate:.1f}% on stable ({test.canary_events}/"
                f"{test.canary_replies} vs {test.stable_events}/{test.stable_replies}): log "
                f"likelihood ratio {test.log_likelihood_ratio:.2f} >= {test.log_threshold:.2f}",
            )
    served = tests[0].canary_replies
    if served >= config.promote_after and tests[0].stable_replies >= config.min_replies:
        return Verdict(
            tuple(tests),
            "promoted",
            f"{served} canary replies without a significant excess of toxicity or "
            "canned/refusal replies",
        )
    return Verdict(tuple(tests), "running", f"{served} of {config.promote_after} canary replies")


async def start_canary(
    hotswap: HotSwap,
    canaries: CanaryStore,
    audit: AuditLog,
    version: str,
    share: float,
    actor: str,
) -> CanaryRecord:
    """Load ``version`` everywhere, then send ``share`` of its alias's conversations to it.

    ``UnknownVersion`` (no such version), ``SwapRefused`` / ``CanaryConflict`` (it may not
    be a canary now), the engines' errors (it could not be loaded; nothing changed).
    """
    record = await asyncio.to_thread(hotswap.registry.get, version)
    await asyncio.to_thread(hotswap.aliases.refresh)
    stable = hotswap.aliases.get(record.alias)
    if stable is None:
        raise SwapRefused(f"alias {record.alias!r} of {version} does not exist")
    if stable == version:
        raise SwapRefused(f"alias {record.alias!r} already serves {version}")
    if await asyncio.to_thread(canaries.running, record.alias):
        raise CanaryConflict(f"alias {record.alias!r} already runs a canary; abort it first")
    await hotswap.preload(version)
    canary = await asyncio.to_thread(canaries.start, record.alias, version, stable, share, actor)
    await asyncio.to_thread(hotswap.aliases.refresh)
    await asyncio.to_thread(
        audit.record, actor, "canary_start", version, alias=record.alias, stable=stable,
        share=share, canary_id=canary.canary_id,
    )  # fmt: skip
    logger.info("canary %s: %s serves %.0f%% of %s", canary.canary_id, version, 100 * share,
                record.alias)  # fmt: skip
    return canary


def abort_canary(
    canaries: CanaryStore, audit: AuditLog, alias: str, actor: str, reason: str
) -> CanaryRecord:
    """End ``alias``'s running canary at once (``CanaryConflict`` when none runs); the
    monitor unloads its candidate ``drain_s`` later."""
    running = canaries.running(alias)
    if not running:
        raise CanaryConflict(f"alias {alias!r} runs no canary")
    canary = canaries.decide(running[0].canary_id, "aborted", actor, reason)
    audit.record(actor, "canary_abort", canary.candidate, alias=alias, reason=reason,
                 canary_id=canary.canary_id)  # fmt: skip
    return canary


class CanaryMonitor:
    """The learner's side of canaries: checks, decisions, unloading the losers."""

    def __init__(
        self,
        database: Database,
        hotswap: HotSwap,
        config: CanaryConfig,
        *,
        canned_replies: Sequence[str],
        refusal_patterns: Sequence[str],
        judge: Judge | None = None,
    ) -> None:
        self.database = database
        self.hotswap = hotswap
        self.config = config
        self.canaries = CanaryStore(database)
        self.audit = AuditLog(database)
        self._canned = tuple(canned_replies)
        self._refusals = tuple(refusal_patterns)
        self._judge = judge
        # Per canary: turn id → its scored reply (each reply is scored once).
        self._scored: dict[str, dict[str, ScoredReply]] = {}

    @classmethod
    def from_policies(
        cls, database: Database, hotswap: HotSwap, config: CanaryConfig
    ) -> CanaryMonitor:
        """With ``config`` (policies/learner.yaml ``canary``), the healing's canned replies
        and the evaluation's refusal patterns (read once, here)."""
        return cls(
            database,
            hotswap,
            config,
            canned_replies=HealConfig.from_policy().canned_replies,
            refusal_patterns=EvalConfig.from_policy().refusal_patterns,
        )

    async def run(self, active: asyncio.Event, stop: asyncio.Event) -> None:
        """Check every ``check_s`` while ``active`` (this learner leads) until ``stop``."""
        while not stop.is_set():
            if active.is_set():
                try:
                    await self.check()
                except Exception as error:  # the store or an engine is briefly away
                    logger.warning("canary monitor: check failed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.check_s)

    async def check(self) -> list[CanaryRecord]:
        """One pass: decide every running canary that can be decided, unload the
        candidates of decided ones; returns the canaries as they are after it."""
        after = []
        for canary in await asyncio.to_thread(self.canaries.running):
            after.append(await self._check_one(canary))
        await self._release_losers()
        return after

    async def _check_one(self, canary: CanaryRecord) -> CanaryRecord:
        aliases = self.hotswap.aliases
        await asyncio.to_thread(aliases.refresh)
        serving = aliases.get(canary.alias)
        if serving != canary.stable:
            return await self._decide(
                canary,
                "aborted",
                f"alias {canary.alias} serves {serving} now, not {canary.stable} the canary "
                "started against",
                None,
            )
        replies = await self._score(canary)
        verdict = judge_replies(replies, self.config)
        statistics = verdict.statistics(self.config)
        if verdict.decision == "rolled_back":
            return await self._decide(canary, "rolled_back", verdict.reason, statistics)
        if verdict.decision == "promoted":
            try:
                await self.hotswap.promote(canary.candidate, actor=MONITOR_ACTOR)
            except EngineUnavailable as error:
                # No engine answers now: the canary keeps running and the next check
                # promotes it (the alias did not flip).
                logger.warning("canary %s: promotion deferred: %s", canary.canary_id,
                               error.message)  # fmt: skip
            except (RegistryError, VLLMError) as error:
                reason = f"promotion failed: {getattr(error, 'message', error)}"
                return await self._decide(canary, "aborted", reason, statistics)
            else:
                return await self._decide(canary, "promoted", verdict.reason, statistics)
        await asyncio.to_thread(self.canaries.update_statistics, canary.canary_id, statistics)
        return await asyncio.to_thread(self.canaries.get, canary.canary_id)

    async def _decide(
        self,
        canary: CanaryRecord,
        state: CanaryState,
        reason: str,
        statistics: dict[str, Any] | None,
    ) -> CanaryRecord:
        try:
            decided = await asyncio.to_thread(
                self.canaries.decide, canary.canary_id, state, MONITOR_ACTOR, reason, statistics
            )
        except CanaryConflict:  # an operator aborted it meanwhile: that decision stands
            return await asyncio.to_thread(self.canaries.get, canary.canary_id)
        self._scored.pop(canary.canary_id, None)
        await asyncio.to_thread(self.hotswap.aliases.refresh)
        if state == "rolled_back":
            await asyncio.to_thread(
                self.hotswap.registry.set_status, canary.candidate, "rejected",
                error=f"canary rolled back: {reason}",
            )  # fmt: skip
        action = {"promoted": "canary_promote", "rolled_back": "canary_rollback"}.get(
            state, "canary_abort"
        )
        await asyncio.to_thread(
            self.audit.record, MONITOR_ACTOR, action, canary.candidate, alias=canary.alias,
            stable=canary.stable, reason=reason, canary_id=canary.canary_id,
            statistics=statistics,
        )  # fmt: skip
        logger.warning("canary %s of %s: %s (%s)", canary.canary_id, canary.candidate, state,
                       reason)  # fmt: skip
        return decided

    async def _score(self, canary: CanaryRecord) -> list[ScoredReply]:
        """Every reply of the alias's two versions since the canary started, scored."""
        rows = await asyncio.to_thread(self._read_turns, canary)
        scored = self._scored.setdefault(canary.canary_id, {})
        fresh = [row for row in rows if row[0] not in scored]
        if fresh:
            judge = await self._loaded_judge()
            texts = [row[3] for row in fresh]
            samples = [
                {"conversation_id": "canary", "context": _messages(row[2]), "response": row[3]}
                for row in fresh
            ]
            scores = await asyncio.to_thread(judge.score, samples)
            unhelpful = await asyncio.to_thread(self._unhelpful, texts)
            for row, score, canned in zip(fresh, scores, unhelpful, strict=True):
                blocked = row[4] == BLOCKED_REPLY
                scored[row[0]] = ScoredReply(
                    canary=row[1] == canary.candidate,
                    toxic=blocked or score >= self.config.threshold,
                    unhelpful=canned and not blocked,
                )
        return [scored[row[0]] for row in rows]

    def _read_turns(self, canary: CanaryRecord) -> list[Any]:
        return self.database.call(
            lambda c: c.execute(
                "SELECT turn_id, adapter, request_messages, reply, finish_reason FROM turns "
                "WHERE alias = ? AND created_at >= ? AND adapter IN (?, ?) AND reply <> '' "
                "ORDER BY created_at",
                [canary.alias, canary.started_at, canary.candidate, canary.stable],
            ).fetchall()
        )

    def _unhelpful(self, replies: list[str]) -> list[bool]:
        from tuneshield._evaluate import helpfulness_flags

        canned, refusal = helpfulness_flags(replies, self._canned, self._refusals)
        return [a or b for a, b in zip(canned, refusal, strict=True)]

    async def _loaded_judge(self) -> Judge:
        if self._judge is None:
            from tuneshield import build_judge

            self._judge = await asyncio.to_thread(build_judge, self.config.judge)
        return self._judge

    async def _release_losers(self) -> None:
        """Unload the candidates of canaries rolled back or aborted ``drain_s`` ago (every
        gateway has stopped routing to them by then)."""
        due = utcnow() - timedelta(seconds=self.config.drain_s)
        for canary in await asyncio.to_thread(self.canaries.unreleased, due):
            try:
                await self.hotswap.release(canary.candidate)
            except (RegistryError, VLLMError) as error:
                logger.warning("canary %s: could not unload %s: %s", canary.canary_id,
                               canary.candidate, error)  # fmt: skip
                continue
            await asyncio.to_thread(self.canaries.mark_released, canary.canary_id)


def _messages(request_messages: str) -> list[dict[str, str]]:
    try:
        messages = json.loads(request_messages)
    except ValueError:
        return []
    return messages if isinstance(messages, list) else []


async def run_with_monitor(learner: Learner, monitor: CanaryMonitor, stop: asyncio.Event) -> None:
    """``learner.run(stop)`` with ``monitor`` checking canaries while the learner leads."""
    watching = asyncio.create_task(monitor.run(learner.active, stop), name="canary-monitor")
    try:
        await learner.run(stop)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
