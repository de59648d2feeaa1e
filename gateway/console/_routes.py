"""The console's pages and actions: thin handlers over the admin API.

A page handler asks the admin API (``AdminApi``, with the operator's key) and renders a
template; an action handler checks the session's CSRF token (``provide_operator_action``), calls
the admin API, notes what happened for the next page and redirects (POST, redirect,
GET). The admin API decides, validates, audits and answers errors: the console shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.params import Parameter
from litestar.static_files import create_static_files_router

from gateway.console._admin_api import (
    CONFLICT,
    NOT_FOUND,
    AdminApi,
    AdminApiError,
    Caller,
    path,
)
from gateway.console._live import LiveMetrics
from gateway.console._pages import REPORT_CSP, Pages, page_headers
from gateway.console._sessions import Session, Sessions, new_token, tokens_match
from gateway.console._views import (
    alias_cards,
    audit_actions,
    canary_panels,
    duration,
    filter_audit,
    flagged_subjects,
    key_samples,
    lineages,
    round_rows,
    samples_view,
    stage_table,
    traffic_charts,
)
from gateway.errors import AuthenticationError, GatewayError, PermissionDeniedError
from gateway.protocol import ADAPTER_VERSION_NAME, ALIAS_NAME, MAX_USER_CHARS
from gateway.routes import Resources
from gateway.settings import ConsoleConfig

T = TypeVar("T")
CONSOLE_PATH = "/console"
STATIC_DIR = Path(__file__).parent / "static"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Fetch metadata a browser sends with every request: anything but our own pages (or the
# operator typing the address) asking is refused before the token is even compared.
FETCH_SITE = "sec-fetch-site"
OWN_SITES = frozenset({"same-origin", "none"})
HTMX_REQUEST = "hx-request"
LIVE = "live"
"""Route option: a page's live part refreshing itself (not the operator's activity)."""
SIGN_IN_SUFFIX = "_sign_in"
SIGNED_OUT_REASON = "ended"
FORBIDDEN = 403
BAD_GATEWAY = 502
SERVER_ERROR = 500
MAX_KEY_CHARS = 512
MAX_OFFSET = 2**31 - 1
"""Largest sample offset a round page passes on (the admin API's own bound)."""
"""Longest admin key the sign-in form passes on (keys are 47 characters; the environment
admin key is the operator's choice)."""


class SignInRequired(Exception):
    """No live session: sign in first."""


class CsrfRefused(Exception):
    """An action without this session's CSRF token, or sent from another site."""


@dataclass(frozen=True)
class ConsoleState:
    """What the console's lifespan opened, handed to its handlers."""

    config: ConsoleConfig
    resources: Resources
    """The gateway's own (its authenticator, its alias cache, its settings)."""
    sessions: Sessions
    api: AdminApi
    live: LiveMetrics
    pages: Pages


@dataclass(frozen=True)
class Operator:
    """The signed-in operator of a request."""

    session: Session
    caller: Caller
    cookie: str


@dataclass(frozen=True)
class OperatorAction:
    """An operator's action: who, and the form they sent (its CSRF token checked)."""

    operator: Operator
    form: dict[str, str]


def provide_console(state: State) -> ConsoleState:
    """The console's state (set by its lifespan)."""
    return cast(ConsoleState, state.console)


def _client(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client else None


def _is_htmx(request: Request[Any, Any, Any]) -> bool:
    return request.headers.get(HTMX_REQUEST) == "true"


def _secure(request: Request[Any, Any, Any]) -> bool:
    """Whether the browser reached us over TLS (behind a proxy: as uvicorn was told)."""
    return request.url.scheme == "https"


async def provide_operator(request: Request[Any, Any, Any], console: ConsoleState) -> Operator:
    """The operator whose session cookie came with the request; a page refreshing itself
    (route option ``live``) does not count as their activity."""
    cookie = request.cookies.get(console.config.cookie_name)
    touch = not request.route_handler.opt.get(LIVE, False)
    session = console.sessions.get(cookie, touch=touch)
    if session is None or cookie is None:
        raise SignInRequired
    return Operator(session, session.caller(_client(request)), cookie)


async def provide_operator_action(
    request: Request[Any, Any, Any], console: ConsoleState
) -> OperatorAction:
    """The operator, for an action: sent from this console's own pages (fetch metadata)
    with the session's CSRF token (form field or header), else ``CsrfRefused``."""
    operator = await provide_operator(request, console)
    form = {name: str(value) for name, value in (await request.form()).items()}
    token = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    own_site = request.headers.get(FETCH_SITE, "same-origin") in OWN_SITES
    if not own_site or not tokens_match(operator.session.csrf_token, token):
        raise CsrfRefused
    return OperatorAction(operator, form)


async def _optional(call: Awaitable[T]) -> T | None:
    """The answer, or None where the route is not mounted (no learner admin API here)."""
    try:
        return await call
    except AdminApiError as error:
        if error.route_missing:
            return None
        raise


def _page(
    console: ConsoleState, operator: Operator, template: str, **context: Any
) -> Response[str]:
    return console.pages.render(
        template,
        operator=operator.session,
        flash=operator.session.take_flash(),
        refresh_s=console.config.refresh_s,
        **context,
    )


# -- sign-in and sign-out ---------------------------------------------------------------


def _sign_in_form(
    request: Request[Any, Any, Any],
    console: ConsoleState,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response[str]:
    token = new_token()
    response = console.pages.render(
        "sign_in.html",
        status_code=status_code,
        error=error,
        token=token,
        ended=request.query_params.get(SIGNED_OUT_REASON) is not None,
    )
    response.set_cookie(
        console.config.cookie_name + SIGN_IN_SUFFIX,
        token,
        max_age=int(console.config.idle_timeout_s),
        path=CONSOLE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@get("/sign-in")
async def sign_in_page(request: Request[Any, Any, Any], console: ConsoleState) -> Response[Any]:
    """The sign-in form (signed in already: the overview)."""
    if console.sessions.get(request.cookies.get(console.config.cookie_name)) is not None:
        return console.pages.redirect("/")
    return _sign_in_form(request, console)


def _sign_in_refusal(error: GatewayError) -> str:
    if isinstance(error, PermissionDeniedError):
        return "That is a user key. The console is for admin keys only."
    if isinstance(error, AuthenticationError):
        return "That key is not valid: unknown, revoked or mistyped."
    return error.message


@post("/sign-in")
async def sign_in(request: Request[Any, Any, Any], console: ConsoleState) -> Response[Any]:
    """Check an admin key as the admin API does (failed attempts count against the
    address's allowance), then open a session: a fresh random cookie, never the key."""
    form = await request.form()
    cookie_token = request.cookies.get(console.config.cookie_name + SIGN_IN_SUFFIX)
    own_site = request.headers.get(FETCH_SITE, "same-origin") in OWN_SITES
    if not own_site or cookie_token is None or not tokens_match(cookie_token, form.get(CSRF_FIELD)):
        raise CsrfRefused
    key = str(form.get("key") or "").strip()[:MAX_KEY_CHARS]
    try:
        principal = await console.resources.authenticator.authenticate(
            f"Bearer {key}", client=_client(request), admin=True
        )
    except GatewayError as error:
        return _sign_in_form(
            request, console, error=_sign_in_refusal(error), status_code=error.status_code
        )
    name, _ = console.sessions.open(key, principal.key_id)
    response = console.pages.redirect("/")
    response.set_cookie(
        console.config.cookie_name,
        name,
        max_age=int(console.config.session_lifetime_s),
        path=CONSOLE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(console.config.cookie_name + SIGN_IN_SUFFIX, path=CONSOLE_PATH)
    return response


@post("/sign-out")
async def sign_out(operator_action: OperatorAction, console: ConsoleState) -> Response[Any]:
    """End the session here and in the browser."""
    console.sessions.close(operator_action.operator.cookie)
    response = console.pages.redirect("/sign-in")
    response.delete_cookie(console.config.cookie_name, path=CONSOLE_PATH)
    return response


# -- overview ---------------------------------------------------------------------------


async def _overview(console: ConsoleState, caller: Caller) -> dict[str, Any]:
    aliases, adapters, learner = await asyncio.gather(
        console.api.get(caller, "/admin/aliases"),
        _optional(console.api.get(caller, "/admin/adapters")),
        _optional(console.api.get(caller, "/admin/learner/status")),
    )
    config = console.config
    span = duration(config.history_points * config.sample_period_s)
    return {
        "cards": alias_cards(aliases, adapters),
        "learner": learner,
        "charts": traffic_charts(console.live.windows(), f"last {span}"),
        "engines": console.live.engines(),
        "guard": console.resources.settings.guard,
    }


@get("/")
async def overview(operator: Operator, console: ConsoleState) -> Response[str]:
    """Each alias and what it serves; this gateway's traffic, errors and live toxicity."""
    context = await _overview(console, operator.caller)
    return _page(console, operator, "overview.html", **context)


@get("/live/overview", opt={LIVE: True})
async def overview_live(operator: Operator, console: ConsoleState) -> Response[str]:
    """The overview's live part, which the page reloads every ``refresh_s``."""
    context = await _overview(console, operator.caller)
    return console.pages.render(
        "_overview_live.html", refresh_s=console.config.refresh_s, **context
    )


# -- adapters ---------------------------------------------------------------------------


@get("/adapters")
async def adapters(operator: Operator, console: ConsoleState) -> Response[str]:
    """Every alias's versions as a lineage tree, with gate figures, data and actions."""
    caller = operator.caller
    aliases, records = await asyncio.gather(
        console.api.get(caller, "/admin/aliases"),
        _optional(console.api.get(caller, "/admin/adapters")),
    )
    trees = lineages(records, aliases) if records is not None else None
    return _page(console, operator, "adapters.html", trees=trees)


VersionParam = Annotated[str, Parameter(pattern=ADAPTER_VERSION_NAME)]
AliasParam = Annotated[str, Parameter(pattern=ALIAS_NAME)]


@get("/adapters/{version:str}/promote")
async def confirm_promote(
    version: VersionParam, operator: Operator, console: ConsoleState
) -> Response[str]:
    """What promoting ``version`` will do, and the button that does it."""
    caller = operator.caller
    record, aliases = await asyncio.gather(
        console.api.get(caller, path("admin", "adapters", version)),
        console.api.get(caller, "/admin/aliases"),
    )
    serving = next((a["adapter"] for a in aliases if a["alias"] == record["alias"]), None)
    return _page(console, operator, "confirm_promote.html", record=record, serving=serving)


@post("/adapters/{version:str}/promote")
async def promote(
    version: VersionParam, operator_action: OperatorAction, console: ConsoleState
) -> Response[Any]:
    """Promote through the admin API (it loads, probes, flips, and audits)."""
    session = operator_action.operator.session
    force = operator_action.form.get("force") == "true"
    try:
        swap = await console.api.post(
            operator_action.operator.caller,
            path("admin", "adapters", version, "promote"),
            force=force,
        )
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Promote of {version} refused: {error.message}"))
        return console.pages.redirect("/adapters")
    session.flash.append(
        (
            "done",
            f"{swap['alias']} now serves {swap['version']} (was {swap['previous'] or 'nothing'}; "
            f"loaded in {swap['load_s']:.2f} s).",
        )
    )
    return console.pages.redirect("/adapters")


@get("/aliases/{alias:str}/rollback")
async def confirm_rollback(
    alias: AliasParam, operator: Operator, console: ConsoleState
) -> Response[str]:
    """What rolling ``alias`` back will do: the version it serves again, by name."""
    history = await console.api.get(operator.caller, path("admin", "aliases", alias, "history"))
    # The steps a rollback goes back through, from the gateway's alias store: the very
    # function the admin API's rollback asks (nothing replayed here).
    chain = await asyncio.to_thread(console.resources.aliases.promotion_chain, alias)
    target = chain[-2] if len(chain) > 1 else None
    serving = chain[-1] if chain else None
    return _page(
        console,
        operator,
        "confirm_rollback.html",
        alias=alias,
        serving=serving,
        target=target,
        history=history,
    )


@post("/aliases/{alias:str}/rollback")
async def rollback(
    alias: AliasParam, operator_action: OperatorAction, console: ConsoleState
) -> Response[Any]:
    """Roll back to the version the confirmation named (the admin API refuses if that is
    no longer the step back, e.g. another operator acted in between)."""
    session = operator_action.operator.session
    try:
        swap = await console.api.post(
            operator_action.operator.caller,
            "/admin/adapters/rollback",
            alias=alias,
            version=operator_action.form.get("version") or None,
        )
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Rollback of {alias} refused: {error.message}"))
        return console.pages.redirect("/adapters")
    session.flash.append(
        ("done", f"{swap['alias']} rolled back: serves {swap['version']} (was {swap['previous']}).")
    )
    return console.pages.redirect("/adapters")


# -- canary -----------------------------------------------------------------------------


async def _latest_canary(console: ConsoleState, caller: Caller, alias: str) -> Any:
    """The alias's running (else latest) canary; None when it never had one."""
    try:
        return await console.api.get(caller, "/admin/canary", alias=alias)
    except AdminApiError as error:
        if error.status_code == NOT_FOUND and not error.route_missing:
            return None
        raise


async def _canary(console: ConsoleState, caller: Caller) -> dict[str, Any]:
    aliases, records = await asyncio.gather(
        console.api.get(caller, "/admin/aliases"),
        _optional(console.api.get(caller, "/admin/adapters")),
    )
    if records is None:
        return {"panels": None}
    latest = await asyncio.gather(
        *(_latest_canary(console, caller, item["alias"]) for item in aliases)
    )
    canaries = {item["alias"]: canary for item, canary in zip(aliases, latest, strict=True)}
    return {"panels": canary_panels(aliases, records, canaries)}


@get("/canary")
async def canary(
    operator: Operator,
    console: ConsoleState,
    version: Annotated[str | None, Parameter(query="version", pattern=ADAPTER_VERSION_NAME)] = None,
) -> Response[str]:
    """Each alias's running (else latest) canary, live: replies, toxic and canned rates
    per arm, each test's statistic against its threshold, the decision; the forms that
    start one (``version``: the one chosen) and abort one."""
    context = await _canary(console, operator.caller)
    return _page(console, operator, "canary.html", chosen=version, **context)


@get("/live/canary", opt={LIVE: True})
async def canary_live(operator: Operator, console: ConsoleState) -> Response[str]:
    """The canary page's live part."""
    context = await _canary(console, operator.caller)
    return console.pages.render("_canary_live.html", refresh_s=console.config.refresh_s, **context)


@post("/canary")
async def start_canary(operator_action: OperatorAction, console: ConsoleState) -> Response[Any]:
    """Start a canary through the admin API (it loads the version on every engine first,
    and refuses one that may not be a canary now)."""
    session = operator_action.operator.session
    version = operator_action.form.get("version", "")
    try:
        share = float(operator_action.form.get("share", "").strip())
        started = await console.api.post(
            operator_action.operator.caller,
            path("admin", "adapters", version, "canary"),
            share=share,
        )
    except ValueError:
        session.flash.append(("error", "The share must be a number between 0 and 1."))
        return console.pages.redirect("/canary")
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"No canary of {version} started: {error.message}"))
        return console.pages.redirect("/canary")
    session.flash.append(
        (
            "done",
            f"Canary {started['candidate']} answers {started['share']:.0%} of "
            f"{started['alias']}'s conversations (stable: {started['stable']}).",
        )
    )
    return console.pages.redirect("/canary")


@post("/canary/abort")
async def abort_canary(operator_action: OperatorAction, console: ConsoleState) -> Response[Any]:
    """Abort the alias's running canary through the admin API (409 when none runs); an
    empty reason leaves the admin API's own."""
    session = operator_action.operator.session
    alias = operator_action.form.get("alias", "")
    try:
        aborted = await console.api.post(
            operator_action.operator.caller,
            "/admin/canary/abort",
            alias=alias,
            reason=operator_action.form.get("reason", "").strip() or None,
        )
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Canary of {alias} not aborted: {error.message}"))
        return console.pages.redirect("/canary")
    session.flash.append(
        (
            "done",
            f"Canary {aborted['candidate']} of {aborted['alias']} aborted: all its "
            f"conversations go to {aborted['stable']} again.",
        )
    )
    return console.pages.redirect("/canary")


# -- rounds -----------------------------------------------------------------------------


async def _rounds(console: ConsoleState, caller: Caller) -> dict[str, Any]:
    status, runs = await asyncio.gather(
        _optional(console.api.get(caller, "/admin/learner/status")),
        _optional(console.api.get(caller, "/admin/learner/runs", limit=console.config.runs_limit)),
    )
    running = None
    if status is not None and status["running"]:
        running = await console.api.get(caller, path("admin", "learner", "runs", status["running"]))
    return {
        "status": status,
        "running": running,
        "rows": round_rows(runs) if runs is not None else None,
    }


@get("/rounds")
async def rounds(operator: Operator, console: ConsoleState) -> Response[str]:
    """The learner, the round running now (live), and the past rounds with their stage
    times (each round's own ``GET /admin/learner/runs/{id}``, as its report shows them)."""
    caller = operator.caller
    context = await _rounds(console, caller)
    rows = context["rows"] or []
    details = await asyncio.gather(
        *(
            console.api.get(caller, path("admin", "learner", "runs", row.run["run_id"]))
            for row in rows
            if row.finished
        )
    )
    return _page(console, operator, "rounds.html", stages=stage_table(details), **context)


@get("/live/rounds", opt={LIVE: True})
async def rounds_live(operator: Operator, console: ConsoleState) -> Response[str]:
    """The rounds page's live part."""
    context = await _rounds(console, operator.caller)
    return console.pages.render("_rounds_live.html", refresh_s=console.config.refresh_s, **context)


@get("/rounds/run")
async def confirm_round(operator: Operator, console: ConsoleState) -> Response[str]:
    """What starting a round now will do."""
    status = await console.api.get(operator.caller, "/admin/learner/status")
    return _page(console, operator, "confirm_round.html", status=status)


@post("/rounds/run")
async def run_round(operator_action: OperatorAction, console: ConsoleState) -> Response[Any]:
    """Queue a round through the admin API (409 while one is queued or running)."""
    session = operator_action.operator.session
    try:
        run = await console.api.post(operator_action.operator.caller, "/admin/learner/run")
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"No round queued: {error.message}"))
        return console.pages.redirect("/rounds")
    session.flash.append(("done", f"Round {run['run_id']} queued for {run['alias']}."))
    return console.pages.redirect("/rounds")


@get("/rounds/{run_id:str}")
async def round_detail(
    run_id: str,
    operator: Operator,
    console: ConsoleState,
    offset: Annotated[int, Parameter(query="offset", ge=0, le=MAX_OFFSET)] = 0,
) -> Response[str]:
    """One round: stage, progress, error, stage times, the worker log's tail, its report,
    and its flagged samples a page at a time (the admin API's page, from ``offset``)."""
    caller = operator.caller
    run = await console.api.get(caller, path("admin", "learner", "runs", run_id))
    samples = samples_view(None, "No samples yet: they are written when the round's training ends.")
    if run["samples"]:
        route = path("admin", "learner", "runs", run_id, "samples")
        try:
            samples = samples_view(
                await console.api.get(caller, route, flagged=True, offset=offset)
            )
        except AdminApiError as error:
            if error.status_code != CONFLICT:
                raise
            samples = samples_view(None, error.message)
    return _page(console, operator, "round.html", run=run, samples=samples)


@get("/rounds/{run_id:str}/report")
async def round_report(run_id: str, operator: Operator, console: ConsoleState) -> Response[str]:
    """The round's own HTML report, as the admin API serves it, sandboxed."""
    report = await console.api.text(
        operator.caller, path("admin", "learner", "runs", run_id, "report")
    )
    return Response(report, media_type="text/html", headers=page_headers(REPORT_CSP))


# -- keys -------------------------------------------------------------------------------


async def _keys_page(console: ConsoleState, operator: Operator, **context: Any) -> Response[str]:
    keys, flagged = await asyncio.gather(
        console.api.get(operator.caller, "/admin/keys"),
        _optional(console.api.get(operator.caller, "/admin/keys/flagged")),
    )
    context.setdefault("created", None)
    context.setdefault("form", {})
    samples = key_samples(keys, flagged)
    return _page(console, operator, "keys.html", keys=keys, samples=samples, **context)


@get("/keys")
async def keys(operator: Operator, console: ConsoleState) -> Response[str]:
    """Every API key and its state; the form that makes a new one."""
    return await _keys_page(console, operator)


@post("/keys")
async def create_key(operator_action: OperatorAction, console: ConsoleState) -> Response[str]:
    """Make a key through the admin API and show it, once, on this answer only (it is in
    no URL, no session and no later page)."""
    form = operator_action.form
    body: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "role": form.get("role", "user"),
        "opt_out": form.get("opt_out") == "true",
    }
    rate = form.get("rate_limit_per_minute", "").strip()
    try:
        if rate:
            body["rate_limit_per_minute"] = float(rate)
        created = await console.api.post(operator_action.operator.caller, "/admin/keys", body)
    except ValueError:
        operator_action.operator.session.flash.append(("error", "The rate limit must be a number."))
        return await _keys_page(console, operator_action.operator, form=form)
    except AdminApiError as error:
        if error.key_refused:
            raise
        operator_action.operator.session.flash.append(("error", f"No key created: {error.message}"))
        return await _keys_page(console, operator_action.operator, form=form)
    return await _keys_page(console, operator_action.operator, created=created)


@get("/keys/{key_id:str}/revoke")
async def confirm_revoke(key_id: str, operator: Operator, console: ConsoleState) -> Response[str]:
    """What revoking a key will do."""
    listed = await console.api.get(operator.caller, "/admin/keys")
    key = next((item for item in listed if item["key_id"] == key_id), None)
    if key is None:
        raise AdminApiError(404, f"no API key {key_id!r}", "key_not_found")
    return _page(console, operator, "confirm_revoke.html", key=key)


@post("/keys/{key_id:str}/revoke")
async def revoke_key(
    key_id: str, operator_action: OperatorAction, console: ConsoleState
) -> Response[Any]:
    """Revoke through the admin API (at once, idempotent)."""
    session = operator_action.operator.session
    try:
        key = await console.api.delete(
            operator_action.operator.caller, path("admin", "keys", key_id)
        )
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Not revoked: {error.message}"))
        return console.pages.redirect("/keys")
    session.flash.append(("done", f"Key {key['key_id']} ({key['name']}) is revoked."))
    return console.pages.redirect("/keys")


# -- quarantine -------------------------------------------------------------------------


async def _quarantine_page(
    console: ConsoleState, operator: Operator, form: dict[str, str] | None = None
) -> Response[str]:
    caller = operator.caller
    active, history, users, keys_flagged = await asyncio.gather(
        _optional(console.api.get(caller, "/admin/quarantine")),
        _optional(console.api.get(caller, "/admin/quarantine", released=True)),
        _optional(console.api.get(caller, "/admin/users/flagged")),
        _optional(console.api.get(caller, "/admin/keys/flagged")),
    )
    if active is None or history is None:
        return _page(console, operator, "quarantine.html", active=None, form={})
    return _page(
        console,
        operator,
        "quarantine.html",
        active=active,
        released=[item for item in history if not item["active"]],
        users=flagged_subjects("user", users["users"], "end_user", active) if users else None,
        keys=flagged_subjects("key", keys_flagged["keys"], "key_id", active)
        if keys_flagged
        else None,
        form=form or {},
    )


@get("/quarantine")
async def quarantine(
    operator: Operator,
    console: ConsoleState,
    kind: Annotated[str | None, Parameter(query="kind", pattern="^(key|user)$")] = None,
    subject: Annotated[str | None, Parameter(query="subject", max_length=MAX_USER_CHARS)] = None,
) -> Response[str]:
    """The keys and end users quarantined now (and those released), the form that
    quarantines one (``kind`` and ``subject``: filled in), and the flagged counts per
    end user and per key."""
    form = {"kind": kind or "", "subject": subject or ""}
    return await _quarantine_page(console, operator, form)


@post("/quarantine")
async def add_quarantine(operator_action: OperatorAction, console: ConsoleState) -> Response[Any]:
    """Quarantine a key or end user through the admin API (409: it is already)."""
    form, session = operator_action.form, operator_action.operator.session
    body = {
        "kind": form.get("kind", ""),
        "subject": form.get("subject", "").strip(),
        "reason": form.get("reason", "").strip(),
    }
    try:
        added = await console.api.post(operator_action.operator.caller, "/admin/quarantine", body)
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Not quarantined: {error.message}"))
        return await _quarantine_page(console, operator_action.operator, form)
    session.flash.append(
        (
            "done",
            f"The {added['kind']} {added['subject']} is quarantined: its turns stay out "
            "of training from now on.",
        )
    )
    return console.pages.redirect("/quarantine")


@post("/quarantine/release")
async def release_quarantine(
    operator_action: OperatorAction, console: ConsoleState
) -> Response[Any]:
    """Release a key or end user through the admin API (404: it is not quarantined)."""
    form, session = operator_action.form, operator_action.operator.session
    body = {"kind": form.get("kind", ""), "subject": form.get("subject", "")}
    reason = form.get("reason", "").strip()
    if reason:
        body["reason"] = reason
    try:
        released = await console.api.post(
            operator_action.operator.caller, "/admin/quarantine/release", body
        )
    except AdminApiError as error:
        if error.key_refused:
            raise
        session.flash.append(("error", f"Not released: {error.message}"))
        return console.pages.redirect("/quarantine")
    session.flash.append(
        (
            "done",
            f"The {released['kind']} {released['subject']} is released: its turns train "
            "again from now on.",
        )
    )
    return console.pages.redirect("/quarantine")


# -- audit ------------------------------------------------------------------------------


@get("/audit")
async def audit(
    operator: Operator,
    console: ConsoleState,
    action: Annotated[str | None, Parameter(query="action", max_length=64)] = None,
    actor: Annotated[str | None, Parameter(query="actor", max_length=128)] = None,
    target: Annotated[str | None, Parameter(query="target", max_length=128)] = None,
) -> Response[str]:
    """The audit log, newest first: one action (asked of the admin API), and entries of
    one actor or about one target among those."""
    caller, limit = operator.caller, console.config.audit_limit
    entries, everything = await asyncio.gather(
        _optional(console.api.get(caller, "/admin/audit", action=action or None, limit=limit)),
        _optional(console.api.get(caller, "/admin/audit", limit=limit)),
    )
    return _page(
        console,
        operator,
        "audit.html",
        entries=filter_audit(entries, actor, target) if entries is not None else None,
        actions=audit_actions(everything or []),
        filters={"action": action or "", "actor": actor or "", "target": target or ""},
    )


# -- errors -----------------------------------------------------------------------------


def _console_of(request: Request[Any, Any, Any]) -> ConsoleState:
    return provide_console(request.app.state)


def _on_sign_in_required(request: Request[Any, Any, Any], _: SignInRequired) -> Response[Any]:
    return _console_of(request).pages.redirect("/sign-in", htmx=_is_htmx(request))


def _on_csrf_refused(request: Request[Any, Any, Any], _: CsrfRefused) -> Response[str]:
    return _console_of(request).pages.render(
        "error.html",
        status_code=FORBIDDEN,
        title="Action refused",
        message="This form was not sent from this console's own page, or it has expired. "
        "Nothing was changed. Go back, reload the page and try again.",
    )


def _on_admin_error(request: Request[Any, Any, Any], error: AdminApiError) -> Response[Any]:
    console = _console_of(request)
    if error.key_refused:
        # The key was revoked or lost its admin role: the session ends with it.
        console.sessions.close(request.cookies.get(console.config.cookie_name))
        return console.pages.redirect(f"/sign-in?{SIGNED_OUT_REASON}=1", htmx=_is_htmx(request))
    return console.pages.render(
        "error.html",
        status_code=error.status_code if error.status_code < SERVER_ERROR else BAD_GATEWAY,
        title=f"The admin API answered {error.status_code}",
        message=error.message,
    )


def _on_http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[str]:
    return _console_of(request).pages.render(
        "error.html",
        status_code=error.status_code,
        title=f"Error {error.status_code}",
        message=error.detail,
    )


def build_routers() -> list[Router]:
    """The console's pages (``/console``) and its static files (``/console/static``)."""
    pages = Router(
        CONSOLE_PATH,
        route_handlers=[
            sign_in_page,
            sign_in,
            sign_out,
            overview,
            overview_live,
            adapters,
            confirm_promote,
            promote,
            confirm_rollback,
            rollback,
            canary,
            canary_live,
            start_canary,
            abort_canary,
            rounds,
            rounds_live,
            confirm_round,
            run_round,
            round_detail,
            round_report,
            keys,
            create_key,
            confirm_revoke,
            revoke_key,
            quarantine,
            add_quarantine,
            release_quarantine,
            audit,
        ],
        dependencies={
            "console": Provide(provide_console, sync_to_thread=False),
            "operator": Provide(provide_operator),
            "operator_action": Provide(provide_operator_action),
        },
        exception_handlers={
            SignInRequired: _on_sign_in_required,
            CsrfRefused: _on_csrf_refused,
            AdminApiError: _on_admin_error,
            HTTPException: _on_http_error,
        },
        include_in_schema=False,
    )
    static = create_static_files_router(
        path=f"{CONSOLE_PATH}/static",
        directories=[STATIC_DIR],
        include_in_schema=False,
    )
    return [pages, static]
