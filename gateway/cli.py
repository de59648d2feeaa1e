"""Gateway verbs of the ``tuneshield`` CLI: ``gateway``, ``keys …``, ``dialogs …``.

``keys`` and ``dialogs`` open the DuckDB file directly, which DuckDB allows only while no
gateway runs (one writing process per file): stop the gateway first, or use its admin
API (``/admin/keys``, ``/admin/dialogs``) while it runs.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.auth import ROLES, create_key
from gateway.logs import LogLevel, configure_logging
from gateway.settings import DATA_DIR_ENV, UPSTREAM_URL_ENV, load_settings
from store import (
    DATABASE_URL_ENV,
    AmbiguousConversation,
    Database,
    DatabaseBusyError,
    DatabaseUnavailableError,
    DialogStore,
    KeyStore,
    open_database,
)

app = typer.Typer(help="Run the gateway; manage API keys and logged dialogs.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Create, list and revoke API keys (gateway stopped; else use /admin/keys).",
    no_args_is_help=True,
)
dialogs_app = typer.Typer(
    help="Export or delete logged dialogs (gateway stopped; else use /admin/dialogs).",
    no_args_is_help=True,
)
console = Console()
# One line per error, however wide the terminal: a message names the setting to fix.
errors = Console(stderr=True, soft_wrap=True)
MAX_PORT = 65535
# The audit log's actor for key changes made here (no admin key is involved).
CLI_ACTOR = "cli"

DATA_DIR_OPTION = typer.Option(
    None, "--data-dir", envvar=DATA_DIR_ENV, help="Folder holding gateway.duckdb."
)

# Every role's (serve, gateway, learner): one level for all its components' loggers.
LOG_LEVEL_OPTION = typer.Option(
    LogLevel.info, "--log-level", case_sensitive=False, help="Log level of every component."
)


def _open(data_dir: Path | None) -> Database:
    from tuneshield import PolicyError

    try:
        settings = load_settings(data_dir=data_dir)
        return open_database(settings.store_url, settings.store.config)
    except (PolicyError, DatabaseBusyError, DatabaseUnavailableError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None


@app.command("gateway")
def run_gateway(
    upstream: list[str] | None = typer.Option(
        None,
        envvar=UPSTREAM_URL_ENV,
        help="OpenAI-compatible engine, e.g. http://127.0.0.1:8000; repeat it for an engine "
        "pool (requests go to the least busy engine that holds the version).",
    ),
    port: int | None = typer.Option(
        None, min=1, max=MAX_PORT, help="Port (default: policies/gateway.yaml)."
    ),
    host: str | None = typer.Option(None, help="Interface (default: 127.0.0.1 from the policy)."),
    data_dir: Path | None = DATA_DIR_OPTION,
    log_level: LogLevel = LOG_LEVEL_OPTION,
    access_log: bool = typer.Option(
        False, help="Log one line per request (the dialog log and /metrics already count them)."
    ),
) -> None:
    """Run the gateway alone in front of any OpenAI-compatible engine."""
    configure_logging(log_level)
    import uvicorn

    from gateway.app import create_app, server_options
    from learner import AdapterAdmin
    from tuneshield import PolicyError

    try:
        settings = load_settings(upstream_url=upstream, data_dir=data_dir)
        # The learner policy, read once: the rounds this gateway queues run with it.
        admin = AdapterAdmin()
    except PolicyError as error:
        # Escaped: the message names policy sections as "[routing]", which is markup.
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    try:
        # Opened once before serving: an unreachable or busy store ends the command with
        # one line here, not with a traceback from the server's startup.
        open_database(settings.store_url, settings.store.config).close()
    except DatabaseBusyError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    except DatabaseUnavailableError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))} (the store: ${DATABASE_URL_ENV})")
        raise typer.Exit(1) from None
    if settings.admin_key is None:
        errors.print(
            "[yellow]note:[/yellow] TUNESHIELD_ADMIN_KEY is not set; admin routes accept only "
            "admin keys made with `tuneshield keys create --role admin`."
        )
    uvicorn.run(
        create_app(settings, extensions=[admin]),
        **server_options(
            settings,
            host=host or settings.routing.host,
            port=settings.routing.port if port is None else port,
            log_level=log_level,
            access_log=access_log,
        ),
    )


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who or what the key is for."),
    role: str = typer.Option("user", help=f"One of {', '.join(ROLES)}."),
    opt_out: bool = typer.Option(False, help="Keep this key's dialogs out of training."),
    rate_limit: float | None = typer.Option(None, help="Requests per minute (default: policy)."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {ROLES}, got {role!r}")
    database = _open(data_dir)
    try:
        created = create_key(
            KeyStore(database),
            name,
            role="admin" if role == "admin" else "user",
            opt_out=opt_out,
            rate_limit_per_minute=rate_limit,
            actor=CLI_ACTOR,
        )
    finally:
        database.close()
    errors.print(f"created {created.record.key_id} ({role}); the key is shown only this once:")
    typer.echo(created.key)


@keys_app.command("list")
def keys_list(data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """List keys (ids, roles, state; never secrets)."""
    database = _open(data_dir)
    try:
        records = KeyStore(database).list()
    finally:
        database.close()
    table = Table()
    for column in ("key_id", "name", "role", "state", "opt_out", "created (UTC)"):
        table.add_column(column, no_wrap=column != "name")
    for record in records:
        table.add_row(
            record.key_id,
            record.name,
            record.role,
            "revoked" if record.revoked else "active",
            "yes" if record.opt_out else "no",
            f"{record.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """Revoke a key."""
    database = _open(data_dir)
    try:
        record = KeyStore(database).revoke(key_id, actor=CLI_ACTOR)
    finally:
        database.close()
    if record is None:
        errors.print(f"[red]error:[/red] no key {key_id!r}")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@dialogs_app.command("export")
def dialogs_export(
    out: Path = typer.Argument(..., help="Parquet file to write."),
    since: datetime | None = typer.Option(None, help="Only turns after this UTC time."),
    include_opt_out: bool = typer.Option(False, help="Also export opted-out dialogs."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Export the turns training would see to Parquet: opted-out (unless asked for),
    guard-flagged, undelivered and quarantined turns left out."""
    database = _open(data_dir)
    try:
        rows = DialogStore(database).export(out, since=since, include_opt_out=include_opt_out)
    finally:
        database.close()
    console.print(f"wrote {rows} turns to {out}")


@dialogs_app.command("delete")
def dialogs_delete(
    key_id: str | None = typer.Option(None, help="Delete every turn of this key."),
    conversation_id: str | None = typer.Option(None, help="Delete one conversation."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Delete one key's or one conversation's logged turns (a conversation id is scoped to
    its key: give --key-id too when several keys used it). Copies in snapshots and round
    files are purged by the learner's next privacy pass."""
    if key_id is None and conversation_id is None:
        raise typer.BadParameter("give --key-id, --conversation-id, or both")
    database = _open(data_dir)
    try:
        deleted = DialogStore(database).delete(key_id=key_id, conversation_id=conversation_id)
    except AmbiguousConversation as error:
        raise typer.BadParameter(str(error), param_hint="--key-id") from None
    finally:
        database.close()
    console.print(f"deleted {deleted} turns")


app.add_typer(keys_app, name="keys")
app.add_typer(dialogs_app, name="dialogs")


def register_gateway_commands(root: typer.Typer) -> None:
    """Add ``gateway``, ``keys`` and ``dialogs`` to the root ``tuneshield`` app."""
    root.command("gateway")(run_gateway)
    root.add_typer(keys_app, name="keys")
    root.add_typer(dialogs_app, name="dialogs")
