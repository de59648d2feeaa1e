"""``tuneshield learner quarantine list|add|release|users``: the quarantined API keys and end
users of a running server, by hand, and flagged samples per end user.

The verbs talk to the gateway's ``/admin/quarantine`` and ``/admin/users/flagged`` routes
with the admin key, like ``tuneshield learner keys``.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from learner.adapters_cli import KEY_OPTION, URL_OPTION, _call, _utc

quarantine_app = typer.Typer(
    help="Keys and end users whose turns stay out of training: list, quarantine, release.",
    no_args_is_help=True,
)
console = Console()
KIND_ARGUMENT = typer.Argument(
    ..., help="key (an API key id) or user (an end user: the requests' OpenAI `user` value)."
)
SUBJECT_ARGUMENT = typer.Argument(..., help="The key id or the user value.")
JSON_OPTION = typer.Option(False, "--json", help="Print the server's answer as JSON.")


def _subject(item: dict[str, Any]) -> str:
    return f"{item['kind']} {escape(item['subject'])}"


@quarantine_app.command("list")
def quarantine_list(
    released: bool = typer.Option(False, "--released", help="Released quarantines too."),
    as_json: bool = JSON_OPTION,
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """The quarantined keys and end users, newest first: since when, by whom, why."""
    params = {"released": str(released).lower()}
    rows = _call("GET", "/admin/quarantine", url, admin_key, params)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"{len(rows)} quarantine(s)", title_justify="left", show_edge=False)
    for column in ("subject", "since (UTC)", "by", "reason", "released"):
        table.add_column(column, no_wrap=column != "reason")
    for row in rows:
        freed = f"{_utc(row['released_at'])} by {row['released_by']}" if row["released_at"] else ""
        table.add_row(
            _subject(row), _utc(row["quarantined_at"]), escape(row["actor"]),
            escape(row["reason"]), escape(freed),
        )  # fmt: skip
    console.print(table)


@quarantine_app.command("add")
def quarantine_add(
    kind: str = KIND_ARGUMENT,
    subject: str = SUBJECT_ARGUMENT,
    reason: str = typer.Option(..., "--reason", help="Why (kept with it, and audited)."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Quarantine a key or end user: still served, its turns from now on never train."""
    body = {"kind": kind, "subject": subject, "reason": reason}
    row = _call("POST", "/admin/quarantine", url, admin_key, body=body)
    console.print(f"quarantined {_subject(row)}")


@quarantine_app.command("release")
def quarantine_release(
    kind: str = KIND_ARGUMENT,
    subject: str = SUBJECT_ARGUMENT,
    reason: str | None = typer.Option(None, "--reason", help="Why (audited)."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Release a key or end user: its turns from now on train again."""
    body = {"kind": kind, "subject": subject, "reason": reason}
    row = _call("POST", "/admin/quarantine/release", url, admin_key, body=body)
    console.print(f"released {_subject(row)} (quarantined since {_utc(row['quarantined_at'])})")


@quarantine_app.command("users")
def quarantine_users(
    as_json: bool = JSON_OPTION,
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Per end user: the samples the latest rounds trained on, how many their judge
    flagged, and the rate (most flagged first); `tuneshield learner keys` per key."""
    answer = _call("GET", "/admin/users/flagged", url, admin_key)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    table = Table(
        title=f"samples per end user over {len(answer['rounds'])} round(s) on disk",
        title_justify="left",
        show_edge=False,
    )
    for column in ("user", "samples", "flagged", "rate", "rounds"):
        table.add_column(column, no_wrap=True)
    for user in answer["users"]:
        table.add_row(
            escape(user["end_user"] if user["end_user"] is not None else "(none)"),
            str(user["samples"]),
            str(user["flagged"]),
            f"{100 * user['flagged_rate']:.1f}%",
            str(len(user["rounds"])),
        )
    console.print(table)
