"""``tuneshield adapters list|show|promote|rollback|history``: the running gateway's
adapter API.

The gateway owns the database while it runs, so these verbs talk to its ``/admin`` routes
over HTTP with the admin key, instead of opening the DuckDB file.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway import ADMIN_KEY_ENV, engine_error_message

if TYPE_CHECKING:
    from gateway.settings import RoutingConfig

GATEWAY_URL_ENV = "TUNESHIELD_GATEWAY_URL"
# Tables print times to the second, without fraction or zone.
TIMESTAMP_CHARS = len("YYYY-MM-DDTHH:MM:SS")

adapters_app = typer.Typer(
    help="List, show, promote and roll back adapter versions of a running gateway, and "
    "show an alias's history.",
    no_args_is_help=True,
)
console = Console()
# One line per error, however wide the terminal (a message names the setting to fix).
errors = Console(stderr=True, soft_wrap=True)

# Tests replace the network here.
transport: httpx.BaseTransport | None = None

URL_OPTION = typer.Option(
    None,
    "--url",
    envvar=GATEWAY_URL_ENV,
    help="Gateway root URL (default: host and port of policies/gateway.yaml).",
)
KEY_OPTION = typer.Option(
    None, "--admin-key", envvar=ADMIN_KEY_ENV, help="Admin API key.", show_default=False
)


def _fail(message: str) -> typer.Exit:
    # Escaped: messages name policy sections as "[samples]", which is markup.
    errors.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _policy_routing(missing_option: str) -> RoutingConfig:
    """policies/gateway.yaml's routing, for what the command line left out."""
    from gateway import load_settings
    from tuneshield import PolicyError

    try:
        return load_settings(environ={}).routing
    except PolicyError as error:
        raise _fail(f"{error}; pass {missing_option}") from None


def _default_url() -> str:
    routing = _policy_routing("--url")
    return f"http://{routing.host}:{routing.port}"


def _utc(timestamp: str) -> str:
    """An API timestamp (ISO, UTC) as the tables print it: ``2026-01-01 10:00:00``."""
    return timestamp[:TIMESTAMP_CHARS].replace("T", " ")


def _call(
    method: str,
    path: str,
    url: str | None,
    key: str | None,
    params: dict[str, Any] | None = None,
    *,
    body: dict[str, Any] | None = None,
) -> Any:
    if not key:
        raise _fail(f"no admin key: set {ADMIN_KEY_ENV} or pass --admin-key")
    root = (url or _default_url()).rstrip("/")
    query = {name: value for name, value in (params or {}).items() if value is not None}
    try:
        with httpx.Client(base_url=root, transport=transport, timeout=300.0) as client:
            response = client.request(
                method, path, params=query, json=body, headers={"Authorization": f"Bearer {key}"}
            )
    except httpx.ConnectError:
        raise _fail(
            f"no gateway answers at {root}: start it with `tuneshield gateway`, or pass --url"
        ) from None
    except httpx.HTTPError as error:
        raise _fail(f"request to {root}{path} failed: {error}") from None
    if response.status_code >= 400:
        message = engine_error_message(response.content) or response.text[:500]
        raise _fail(f"{response.status_code}: {message}")
    return response.json()


@adapters_app.command("list")
def adapters_list(
    alias: str | None = typer.Option(None, help="Only this alias's versions."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Every registered version: status, lineage, sample counts."""
    rows = _call("GET", "/admin/adapters", url, admin_key, {"alias": alias})
    table = Table()
    for column in ("version", "status", "parent", "samples", "flagged", "created (UTC)"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            row["version"],
            row["status"],
            row["parent"] or "",
            "" if row["samples"] is None else str(row["samples"]),
            "" if row["flagged"] is None else str(row["flagged"]),
            _utc(row["created_at"]),
        )
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    version: str = typer.Argument(..., help="Version name, e.g. chat-v0007."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """One version's full record (gate metrics and hyper-parameters included)."""
    console.print_json(json.dumps(_call("GET", f"/admin/adapters/{version}", url, admin_key)))


def _print_swap(result: dict[str, Any]) -> None:
    console.print(
        f"{result['alias']} now serves [green]{result['version']}[/green] "
        f"(was {result['previous']}; load to flip {result['load_s']:.2f} s)"
    )
    if result.get("unloaded"):
        console.print(f"unloaded from the engine: {', '.join(result['unloaded'])}")


@adapters_app.command("promote")
def adapters_promote(
    version: str = typer.Argument(..., help="Version to serve."),
    force: bool = typer.Option(False, "--force", help="Serve it even if the gates rejected it."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Load, probe and serve a version (its alias flips only if the engine answers)."""
    params = {"force": "true"} if force else None
    _print_swap(_call("POST", f"/admin/adapters/{version}/promote", url, admin_key, params))


@adapters_app.command("rollback")
def adapters_rollback(
    to: str | None = typer.Option(
        None,
        "--to",
        metavar="VERSION",
        help="An earlier version of the alias's promotions to go back to (default: one step).",
    ),
    alias: str | None = typer.Option(None, help="Alias to roll back (default: the gateway's)."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Serve the version served before the latest promote again (one step back through the
    alias's promotions, never forward to one rolled back from)."""
    params = {"alias": alias, "version": to}
    _print_swap(_call("POST", "/admin/adapters/rollback", url, admin_key, params))


@adapters_app.command("history")
def adapters_history(
    alias: str | None = typer.Option(None, help="Alias to show (default: the policy's)."),
    limit: int = typer.Option(20, min=1, max=1000, help="Newest flips to show."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """The alias's flips, newest first: when, which version, promote or rollback, and who;
    the version served now is marked."""
    alias = alias or _policy_routing("--alias").default_alias
    rows = _call("GET", f"/admin/aliases/{alias}/history", url, admin_key, {"limit": limit})
    # Narrow enough for 80 columns with long alias names: no outer edge, a one-character
    # mark, and no column for the version each flip replaced (it is the row below).
    table = Table(title=f"{alias}, newest first", caption="* served now", show_edge=False)
    for column in ("", "changed (UTC)", "kind", "version", "by"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            "*" if row["active"] else "",
            _utc(row["changed_at"]),
            row["kind"],
            row["version"],
            row["actor"] or "",
        )
    console.print(table)


def register_adapter_commands(root: typer.Typer) -> None:
    """Add ``adapters`` to the root ``tuneshield`` app."""
    root.add_typer(adapters_app, name="adapters")
