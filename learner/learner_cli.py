"""``tuneshield learner``: the learner role (control plane) in its own process; and
``tuneshield learner run|status|report``: the running server's learning rounds.

The verbs talk to a running gateway's ``/admin/learner`` routes with the admin key, like
``tuneshield adapters``; the bare command starts a learner on the shared store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

from gateway import DATA_DIR_ENV, UPSTREAM_URL_ENV
from learner import adapters_cli
from learner.adapters_cli import KEY_OPTION, URL_OPTION, _call, _default_url, _fail

learner_app = typer.Typer(
    help="Run the learner (no verb), or queue learning rounds on a running server, follow "
    "them, read their reports.",
    invoke_without_command=True,
)
console = Console()
FINISHED = ("succeeded", "failed", "rejected")


def _describe(run: dict[str, Any]) -> str:
    progress = run.get("progress")
    share = f" {100 * progress:.0f}%" if isinstance(progress, (int, float)) else ""
    parts = [f"{run['run_id']}: [bold]{run['status']}[/bold]", f"stage {run.get('stage')}{share}"]
    if run.get("version"):
        parts.append(f"version {run['version']}")
    if run.get("error"):
        parts.append(f"[red]{run['error']}[/red]")
    return ", ".join(parts)


@learner_app.callback()
def learner_role(
    context: typer.Context,
    model: str = typer.Option(
        "default", help="Base model folder or 'default' (SmolLM2-135M); the engines' model."
    ),
    data_dir: Path = typer.Option(
        Path(".data"), envvar=DATA_DIR_ENV, help="Holds adapters/, rounds/ and snapshots/."
    ),
    engine_url: list[str] | None = typer.Option(
        None,
        "--engine-url",
        envvar=UPSTREAM_URL_ENV,
        help="An engine whose adapters this learner keeps in line (default: the engine "
        "policy's address).",
    ),
) -> None:
    """Run the learner: exactly one is active per store (a leader lock); a second one waits
    and takes over when the first dies. Stops on Ctrl-C or SIGTERM."""
    if context.invoked_subcommand is not None:
        return
    import asyncio
    import logging

    from engine import load_engine_config
    from gateway import load_settings
    from learner.process import LearnerSettings, run_learner
    from learner.rounds import LearnerConfig, LearnerOptions
    from store import ADAPTERS_FOLDER, DatabaseBusyError, DatabaseUnavailableError, redact
    from tuneshield import ModelError, PolicyError, resolve_model

    errors = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # One line per engine request (the reconcile listing every few seconds) is noise.
    for noisy in ("httpx", "httpcore", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        engine_config = load_engine_config()
        gateway = load_settings(data_dir=data_dir)
        config = LearnerConfig.from_policy()
        model_path = resolve_model(model, prepare=True)
    except (ModelError, PolicyError) as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    settings = LearnerSettings(
        data_dir=data_dir,
        store=gateway.store,
        engine_urls=tuple(engine_url or [engine_config.base_url]),
        engine_api_key=gateway.upstream_api_key,
        seed_aliases=gateway.routing.seed_aliases,
        options=LearnerOptions(model_path, data_dir / ADAPTERS_FOLDER, config),
    )
    errors.print(
        f"learner on {redact(settings.store.url)}, engines {', '.join(settings.engine_urls)}"
    )
    try:
        asyncio.run(run_learner(settings))
    except (DatabaseBusyError, DatabaseUnavailableError) as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    errors.print("learner stopped")


@learner_app.command("run")
def learner_run(
    wait: bool = typer.Option(False, "--wait", help="Follow the round until it ends."),
    poll_s: float = typer.Option(5.0, help="Seconds between progress checks with --wait."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Ask the server for a learning round now (on the dialogs since the last round)."""
    run = _call("POST", "/admin/learner/run", url, admin_key)
    console.print(f"started {run['run_id']}")
    if not wait:
        return
    shown = ""
    while run["status"] not in FINISHED:
        time.sleep(poll_s)
        run = _call("GET", f"/admin/learner/runs/{run['run_id']}", url, admin_key)
        line = _describe(run)
        if line != shown:
            console.print(line)
            shown = line
    if run["status"] != "succeeded":
        raise typer.Exit(1)


@learner_app.command("status")
def learner_status(url: str | None = URL_OPTION, admin_key: str | None = KEY_OPTION) -> None:
    """Whether a round runs, the schedule, the watermark and the latest runs."""
    status = _call("GET", "/admin/learner/status", url, admin_key)
    if not status["enabled"]:
        queued = ", ".join(status.get("queued") or []) or "none"
        console.print(
            "no learner is active (start `tuneshield learner` on this store, or use "
            f"`tuneshield serve`); queued rounds: {queued}"
        )
    else:
        console.print(
            f"alias {status['alias']} serves {status['active_version']}; "
            f"running: {status['running'] or 'none'}\n"
            f"schedule: {status['schedule']} (next {status['next_run'] or 'never'}), "
            f"{status['new_conversations']} new conversations since {status['watermark']} "
            f"({status['min_new_dialogs']} needed)"
        )
    for run in status["recent_runs"]:
        console.print(_describe(run))


@learner_app.command("report")
def learner_report(
    run_id: str = typer.Argument(..., help="A run id (see `tuneshield learner status`)."),
    out: Path = typer.Option(Path("round-report.html"), "--out", help="Where to save the page."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Save a round's HTML report (plots inline) and print where it went."""
    run = _call("GET", f"/admin/learner/runs/{run_id}", url, admin_key)
    if not run["report"]:
        raise _fail(f"run {run_id} has no report yet ({run['status']}, stage {run['stage']})")
    root = (url or _default_url()).rstrip("/")
    try:
        with httpx.Client(base_url=root, transport=adapters_cli.transport, timeout=60.0) as client:
            response = client.get(
                f"/admin/learner/runs/{run_id}/report",
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            response.raise_for_status()
    except httpx.HTTPError as error:
        raise _fail(f"could not fetch the report of {run_id}: {error}") from None
    out.write_text(response.text, encoding="utf-8")
    console.print(f"report of {run_id} ({run['status']}) saved to {out}")


def register_learner_commands(root: typer.Typer) -> None:
    """Add ``learner`` to the root ``tuneshield`` app."""
    root.add_typer(learner_app, name="learner")
