"""``tuneshield audit``: the running gateway's audit log, filtered; ``tuneshield lineage
TURN_ID``: what made one served reply (version, round, snapshot hash, judge hash).

Like ``tuneshield adapters``, these verbs ask the gateway's ``/admin`` routes with the
admin key (``/admin/audit``, ``/admin/turns/{turn_id}/lineage``); the server validates
the filters and answers a bad one with a 400 naming it, printed as one line.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from learner.adapters_cli import KEY_OPTION, URL_OPTION, _call, _utc

console = Console()
# The most entries one call may ask for (the route's own bound on ``limit``).
MAX_ENTRIES = 1000


def _detail(detail: dict[str, Any]) -> str:
    """An entry's detail as ``name=value`` pairs (values as JSON: strings quoted)."""
    return ", ".join(f"{name}={json.dumps(value)}" for name, value in detail.items())


def audit_table(entries: list[dict[str, Any]]) -> Table:
    """The entries as the CLI prints them, newest first as the server lists them."""
    table = Table(show_edge=False)
    for column in ("recorded (UTC)", "actor", "action", "target"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold")
    for entry in entries:
        table.add_row(
            _utc(entry["at"]),
            escape(entry["actor"]),
            escape(entry["action"]),
            escape(entry["target"] or ""),
            escape(_detail(entry["detail"] or {})),
        )
    return table


def audit(
    action: str | None = typer.Option(None, help="Only this action, e.g. promote, key.create."),
    actor: str | None = typer.Option(None, help="Only by this actor: a key id, cli, learner."),
    target: str | None = typer.Option(None, help="Only on this target: a version, a key id."),
    since: str | None = typer.Option(
        None, help="Only entries at or after this time (RFC 3339: 2026-01-01T10:00:00Z)."
    ),
    limit: int = typer.Option(100, min=1, max=MAX_ENTRIES, help="Newest entries to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answer as JSON."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """The audit log, newest first: who promoted, rolled back, created or revoked a key
    (and the rest), when, on what, and the details."""
    params = {"action": action, "actor": actor, "target": target, "since": since,
              "limit": limit}  # fmt: skip
    entries = _call("GET", "/admin/audit", url, admin_key, params)
    if as_json:
        console.print_json(json.dumps(entries))
        return
    if not entries:
        console.print("no audit entries match")
        return
    console.print(audit_table(entries))


def lineage_lines(answer: dict[str, Any]) -> list[str]:
    """A turn's lineage as lines of console markup, from the turn back to the judge."""
    turn = answer["turn"]
    lines = [
        f"turn {escape(turn['turn_id'])}: conversation {escape(turn['conversation_id'])}, key "
        f"{escape(turn['key_id'])}, {_utc(turn['created_at'])} UTC, alias {escape(turn['alias'])}"
    ]
    version = answer["version"]
    if version is not None:
        state = version["status"] if version["registered"] else "no longer registered"
        parent = f", parent {version['parent']}" if version["parent"] else ""
        lines.append(f"  version  {version['version']} ({state}{parent})")
    run = answer["round"]
    if run is not None:
        lines.append(f"  round    {run['run_id']} ({run['status']})")
    snapshot = answer["snapshot"]
    if snapshot is not None:
        lines.append(
            f"  snapshot sha256 {snapshot['sha256']} ({snapshot['rows']} turns, file "
            f"{answer['snapshot_now']}: {escape(snapshot['path'])})"
        )
    judge = answer["judge"]
    if judge is not None:
        remote = f"; remote: {escape(', '.join(judge['remote']))}" if judge["remote"] else ""
        lines.append(
            f"  judge    {escape(judge['judge'])} sha256 {judge['sha256']} "
            f"({len(judge['files'])} files{remote})"
        )
    if answer["gap"]:
        lines.append(f"  [yellow]ends here:[/yellow] {escape(answer['gap'])}")
    return lines


def lineage(
    turn_id: str = typer.Argument(..., help="A logged turn's id (dialog exports carry it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answer as JSON."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """What made one served reply: the adapter version, the round that trained it, the
    SHA-256 of the snapshot it trained on and the hash of the defense judge's files."""
    answer = _call("GET", f"/admin/turns/{quote(turn_id, safe='')}/lineage", url, admin_key)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    for line in lineage_lines(answer):
        console.print(line, soft_wrap=True)


def register_audit_commands(root: typer.Typer) -> None:
    """Add ``audit`` and ``lineage`` to the root ``tuneshield`` app."""
    root.command("audit")(audit)
    root.command("lineage")(lineage)
