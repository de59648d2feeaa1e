"""``/admin/adapters/{version}/canary``, ``/admin/canary``: start a canary rollout, show
its state (counts, rates, the sequential tests, the decision), abort it.

The learner's monitor (``learner.canary``) decides; these routes only start and abort,
and show what the monitor stored with the canary at its latest check.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from engine import VLLMError
from gateway import ADAPTER_VERSION_NAME, ALIAS_NAME, GatewayError, NotFoundError, Principal
from gateway.routes import error_responses
from learner.admin_routes import ADMIN_ERRORS, LearnerResources, to_http_error
from learner.canary import abort_canary, start_canary
from store import CanaryConflict, CanaryRecord, CanaryState, RegistryError

# The reason an abort records when the operator gives none.
DEFAULT_ABORT_REASON = "aborted by an operator"


class CanaryTest(msgspec.Struct, kw_only=True):
    """One metric's sequential test (mSPRT) of canary vs stable at the latest check."""

    metric: Literal["toxicity", "unhelpful"]
    """``toxicity`` (the guard's judge) or ``unhelpful`` (canned or refusal replies)."""
    canary_replies: int
    canary_events: int
    stable_replies: int
    stable_events: int
    canary_rate: float | None
    stable_rate: float | None
    excess: float | None
    """Canary rate minus stable rate."""
    log_likelihood_ratio: float
    log_threshold: float
    """A rollback needs an excess and a log likelihood ratio at least this."""
    excess_upper: float | None
    """Upper end of the always-valid confidence interval of the excess."""
    significant: bool


class CanaryStatus(msgspec.Struct, kw_only=True):
    """A canary rollout: who started it, how it runs, what was decided."""

    canary_id: str
    alias: str
    candidate: str
    stable: str
    """The version the alias served when the canary started."""
    share: float
    """Share of the alias's conversations the candidate answers."""
    state: CanaryState
    started_at: datetime
    actor: str
    decided_at: datetime | None
    decided_by: str | None
    """``learner`` for the monitor's decisions, the admin's key id for an abort."""
    reason: str | None
    released_at: datetime | None
    """When the candidate was unloaded after a rollback or abort."""
    checked_at: datetime | None
    """The monitor's latest check (null: not checked yet)."""
    alpha: float | None
    """The false-rollback rate of the whole canary (policies/learner.yaml canary)."""
    promote_after: int | None
    tests: list[CanaryTest]


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def canary_status(record: CanaryRecord) -> CanaryStatus:
    """A canary row as the API answers it."""
    statistics: dict[str, Any] = record.statistics
    checked = statistics.get("checked_at")
    return CanaryStatus(
        canary_id=record.canary_id,
        alias=record.alias,
        candidate=record.candidate,
        stable=record.stable,
        share=record.share,
        state=record.state,
        started_at=record.started_at.replace(tzinfo=UTC),
        actor=record.actor,
        decided_at=_aware(record.decided_at),
        decided_by=record.decided_by,
        reason=record.reason,
        released_at=_aware(record.released_at),
        checked_at=_aware(datetime.fromisoformat(checked)) if checked else None,
        alpha=statistics.get("alpha"),
        promote_after=statistics.get("promote_after"),
        tests=msgspec.convert(statistics.get("tests", []), list[CanaryTest]),
    )


def _http_error(error: Exception) -> GatewayError:
    if isinstance(error, CanaryConflict):
        return GatewayError(
            error.args[0], type="invalid_request_error", status_code=409, code="canary_conflict"
        )
    return to_http_error(error)


@post(
    "/admin/adapters/{version:str}/canary",
    status_code=201,
    summary="Start a canary rollout",
    responses=error_responses(
        *ADMIN_ERRORS,
        404,
        409,
        502,
        503,
        meanings={
            404: "No such adapter version",
            409: "It may not be a canary now (its alias serves it or runs a canary already, "
            "it was rejected, its alias is gone); nothing changed",
            502: "The engine refused the adapter; nothing changed",
            503: "The engine is unavailable; nothing changed",
        },
    ),
)
async def start_canary_route(
    version: Annotated[str, Parameter(pattern=ADAPTER_VERSION_NAME)],
    share: Annotated[float, Parameter(query="share", gt=0.0, lt=1.0)],
    principal: Principal,
    learner: LearnerResources,
) -> CanaryStatus:
    """Load ``version`` on every engine, then send ``share`` of its alias's conversations
    to it (sticky per conversation) while the learner's monitor compares its replies with
    the stable version's: it promotes it, or rolls it back on a significant excess of
    toxic or canned/refusal replies."""
    try:
        record = await start_canary(
            learner.hotswap, learner.canaries, learner.audit, version, share, principal.key_id
        )
    except (RegistryError, VLLMError) as error:
        raise _http_error(error) from None
    return canary_status(record)


@get(
    "/admin/canary",
    summary="A canary rollout's state",
    responses=error_responses(*ADMIN_ERRORS, 404, meanings={404: "The alias had no canary"}),
)
async def show_canary(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", pattern=ALIAS_NAME)] = None,
) -> CanaryStatus:
    """The alias's running canary (else its latest one): replies, toxic and canned/refusal
    counts and rates per arm, each test's statistic, and the decision with its reason."""
    name = alias or learner.default_alias
    record = await asyncio.to_thread(learner.canaries.latest, name)
    if record is None:
        raise NotFoundError(f"alias {name!r} had no canary", param="alias", code="canary_not_found")
    return canary_status(record)


@post(
    "/admin/canary/abort",
    status_code=200,
    summary="Abort a canary rollout",
    responses=error_responses(*ADMIN_ERRORS, 409, meanings={409: "The alias runs no canary"}),
)
async def abort_canary_route(
    principal: Principal,
    learner: LearnerResources,
    alias: Annotated[str | None, Parameter(query="alias", pattern=ALIAS_NAME)] = None,
    # No NUL: PostgreSQL text cannot hold one (a 500 where a 400 is due).
    reason: Annotated[
        str, Parameter(query="reason", min_length=1, max_length=500, pattern=r"^[^\x00]*$")
    ] = DEFAULT_ABORT_REASON,
) -> CanaryStatus:
    """Stop the canary now: the alias's conversations all go to its stable version again
    (every gateway within its cache period); the candidate is unloaded shortly after."""
    name = alias or learner.default_alias
    try:
        record = await asyncio.to_thread(
            abort_canary, learner.canaries, learner.audit, name, principal.key_id, reason
        )
    except CanaryConflict as error:
        raise _http_error(error) from None
    await asyncio.to_thread(learner.hotswap.aliases.refresh)
    return canary_status(record)


CANARY_ROUTES: list[HTTPRouteHandler] = [start_canary_route, show_canary, abort_canary_route]
