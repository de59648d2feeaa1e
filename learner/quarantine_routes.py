"""``/admin/quarantine``: the quarantined API keys and end users (list, quarantine by hand,
release), and ``/admin/users/flagged``: flagged samples per end user.

A quarantined key or end user is still served; its turns stay out of training from the
quarantine on (``store.QuarantineStore``, ``DialogStore.export``). The learner
quarantines on its own after a round (``learner.quarantine``); these routes let an admin
see, add and release quarantines. Each change is in the audit log with the admin's key
id. Registered with the other learner routes (``learner.admin_routes.AdapterAdmin``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import Parameter

from gateway import GatewayError, NotFoundError, Principal, strict_body
from gateway.protocol import MAX_USER_CHARS
from gateway.routes import error_responses, options_handler
from learner.admin_routes import ADMIN_ERRORS, LearnerResources
from learner.round_samples import FlaggedByUser
from store import AlreadyQuarantined, NotQuarantined, QuarantineRecord, SubjectKind

# An API key id or an OpenAI `user` value, as long as the gateway takes one (a key id is
# shorter). No NUL: PostgreSQL's text cannot hold it.
Subject = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_USER_CHARS, pattern=r"^[^\x00]+$")
]
# Why: a sentence or a ticket reference, kept with the row and in the audit log.
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=1000, pattern=r"^[^\x00]+$")]


class Quarantine(msgspec.Struct, frozen=True, kw_only=True):
    """One quarantine of a key or end user, released or not."""

    quarantine_id: str
    kind: SubjectKind
    """``key``: an API key id; ``user``: an end user (the requests' OpenAI ``user``)."""
    subject: str
    active: bool
    """Not released: its turns stay out of training."""
    quarantined_at: datetime
    excluded_from: datetime
    """Its turns created from here on (until the release) stay out of training."""
    actor: str
    """Key id of the admin who quarantined it, or ``learner`` (automatic)."""
    reason: str
    run_id: str | None
    """The round whose samples made the learner quarantine it (null: by hand)."""
    released_at: datetime | None
    released_by: str | None
    release_reason: str | None


class QuarantineRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /admin/quarantine``: quarantine a key or end user by hand."""

    kind: SubjectKind
    subject: Subject
    reason: Reason
    """Why (kept with the quarantine and in the audit log)."""


class ReleaseRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /admin/quarantine/release``: end a quarantine."""

    kind: SubjectKind
    subject: Subject
    reason: Reason | None = None


def _answer(record: QuarantineRecord) -> Quarantine:
    # Stored naive (UTC); answered with the zone, as the other admin routes do.
    def aware(value: datetime | None) -> Any:
        return value.replace(tzinfo=UTC) if value is not None else None

    return Quarantine(
        quarantine_id=record.quarantine_id,
        kind=record.kind,
        subject=record.subject,
        active=record.active,
        quarantined_at=aware(record.quarantined_at),
        excluded_from=aware(record.excluded_from),
        actor=record.actor,
        reason=record.reason,
        run_id=record.run_id,
        released_at=aware(record.released_at),
        released_by=record.released_by,
        release_reason=record.release_reason,
    )


# GET and POST share the path: its OPTIONS answer lists both (see options_handler).
quarantine_options = options_handler("/admin/quarantine", "GET", "POST")


@get(
    "/admin/quarantine",
    summary="Quarantined keys and end users",
    responses=error_responses(*ADMIN_ERRORS),
)
async def list_quarantine(
    principal: Principal,
    learner: LearnerResources,
    released: Annotated[bool, Parameter(query="released")] = False,
    limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100,
) -> list[Quarantine]:
    """The keys and end users quarantined now, newest first (``released=true``: every
    quarantine ever made, released ones too)."""
    records = await asyncio.to_thread(
        learner.quarantine.history, include_released=released, limit=limit
    )
    return [_answer(record) for record in records]


@post(
    "/admin/quarantine",
    status_code=201,
    summary="Quarantine a key or end user",
    responses=error_responses(
        *ADMIN_ERRORS, 409, 413, meanings={409: "The key or end user is quarantined already"}
    ),
)
async def add_quarantine(
    data: QuarantineRequest,
    request: Request[Any, Any, Any],
    principal: Principal,
    learner: LearnerResources,
) -> Quarantine:
    """Keep a key's or end user's turns out of training from now on (it is still served);
    409 when it is quarantined already."""
    data = strict_body(QuarantineRequest, await request.json())
    try:
        record = await asyncio.to_thread(
            learner.quarantine.quarantine,
            data.kind,
            data.subject,
            actor=principal.key_id,
            reason=data.reason,
        )
    except AlreadyQuarantined as error:
        raise GatewayError(
            error.args[0],
            type="invalid_request_error",
            param="subject",
            status_code=409,
            code="already_quarantined",
        ) from None
    return _answer(record)


@post(
    "/admin/quarantine/release",
    status_code=200,
    summary="Release a quarantined key or end user",
    responses=error_responses(
        *ADMIN_ERRORS, 404, 413, meanings={404: "The key or end user is not quarantined"}
    ),
)
async def release_quarantine(
    data: ReleaseRequest,
    request: Request[Any, Any, Any],
    principal: Principal,
    learner: LearnerResources,
) -> Quarantine:
    """End a quarantine: the subject's turns from now on train again (those logged while
    it was quarantined stay out); 404 when it is not quarantined."""
    data = strict_body(ReleaseRequest, await request.json())
    try:
        record = await asyncio.to_thread(
            learner.quarantine.release,
            data.kind,
            data.subject,
            actor=principal.key_id,
            reason=data.reason,
        )
    except NotQuarantined as error:
        raise NotFoundError(error.args[0], param="subject", code="not_quarantined") from None
    return _answer(record)


@get(
    "/admin/users/flagged",
    summary="Samples and flagged samples per end user",
    responses=error_responses(*ADMIN_ERRORS),
)
async def flagged_by_user(principal: Principal, learner: LearnerResources) -> FlaggedByUser:
    """Per end user (the OpenAI ``user`` value of the requests), as ``/admin/keys/flagged``
    per key: the samples the newest rounds trained on, how many their judge flagged, the
    rate, and the same per round; most flagged first."""
    runs = await asyncio.to_thread(learner.runs.list, learner.samples.key_rounds)
    return await asyncio.to_thread(learner.sample_counts.by_user, runs)


QUARANTINE_ROUTES = (
    quarantine_options,
    list_quarantine,
    add_quarantine,
    release_quarantine,
    flagged_by_user,
)
"""The handlers ``AdapterAdmin`` registers."""
