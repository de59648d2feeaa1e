"""``tuneshield learner canary start|status|abort``: canary rollouts on a running server
(its ``/admin/adapters/{version}/canary`` and ``/admin/canary`` routes, with the admin key)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from learner.adapters_cli import KEY_OPTION, URL_OPTION, _call, _utc

canary_app = typer.Typer(
    help="Canary rollouts: serve a candidate to a share of its alias's conversations; the "
    "learner promotes it or rolls it back."
)
console = Console()
ALIAS_OPTION = typer.Option(
    None, "--alias", help="The alias (default: the server's default alias).", show_default=False
)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def show(canary: dict[str, Any]) -> None:
    """A canary's state, its arms' figures and each test."""
    state = canary["state"]
    colour = {"promoted": "green", "rolled_back": "red", "aborted": "yellow"}.get(state, "bold")
    console.print(
        f"canary {canary['canary_id']}: {canary['candidate']} serves "
        f"{100 * canary['share']:.0f}% of {canary['alias']} (stable {canary['stable']}), "
        f"started {_utc(canary['started_at'])} UTC by {escape(canary['actor'])}: "
        f"[{colour}]{state}[/{colour}]",
        soft_wrap=True,
    )
    if canary.get("decided_at"):
        console.print(
            f"decided {_utc(canary['decided_at'])} UTC by {escape(canary['decided_by'] or '')}: "
            f"{escape(canary['reason'] or '')}",
            soft_wrap=True,
        )
    if not canary["tests"]:
        console.print("not checked by the learner yet")
        return
    table = Table(title=f"tests (false-rollback rate {canary['alpha']})", title_justify="left")
    for column in ("metric", "canary", "stable", "excess", "upper", "log LR", "needs", "excess?"):
        table.add_column(column, no_wrap=True)
    for test in canary["tests"]:
        table.add_row(
            test["metric"],
            f"{test['canary_events']}/{test['canary_replies']} ({_percent(test['canary_rate'])})",
            f"{test['stable_events']}/{test['stable_replies']} ({_percent(test['stable_rate'])})",
            _percent(test["excess"]),
            _percent(test["excess_upper"]),
            f"{test['log_likelihood_ratio']:.2f}",
            f"{test['log_threshold']:.2f}",
            "[red]yes[/red]" if test["significant"] else "no",
        )
    console.print(table)


@canary_app.command("start")
def canary_start(
    version: str = typer.Argument(..., help="The candidate version (see `adapters list`)."),
    share: float = typer.Option(
        ..., "--share", min=0.0, max=1.0, help="Share of the alias's conversations, in (0, 1)."
    ),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Load VERSION on every engine and send it --share of its alias's conversations."""
    show(_call("POST", f"/admin/adapters/{version}/canary", url, admin_key, {"share": share}))


@canary_app.command("status")
def canary_status(
    alias: str | None = ALIAS_OPTION,
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """The alias's running canary (else its latest one): figures, tests, decision."""
    show(_call("GET", "/admin/canary", url, admin_key, {"alias": alias}))


@canary_app.command("abort")
def canary_abort(
    alias: str | None = ALIAS_OPTION,
    reason: str | None = typer.Option(None, "--reason", help="Recorded in the audit log."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Stop the alias's canary now: all its conversations go to the stable version."""
    show(_call("POST", "/admin/canary/abort", url, admin_key, {"alias": alias, "reason": reason}))
