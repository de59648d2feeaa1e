"""``tuneshield learner``: the learner role (control plane) in its own process; and
``tuneshield learner run|status|report|samples|keys``: the running server's learning
rounds, their training samples, and flagged samples per API key; ``tuneshield learner
quarantine ...`` (learner/quarantine_cli.py): quarantined keys and end users.

The verbs talk to a running gateway's ``/admin/learner`` routes with the admin key, like
``tuneshield adapters``; the bare command starts a learner on the shared store.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    LOG_LEVEL_OPTION,
    UPSTREAM_URL_ENV,
    LogLevel,
    configure_logging,
)
from learner import adapters_cli
from learner.adapters_cli import KEY_OPTION, URL_OPTION, _call, _default_url, _fail, _utc
from learner.canary_cli import canary_app
from learner.quarantine_cli import quarantine_app

learner_app = typer.Typer(
    help="Run the learner (no verb), or queue learning rounds on a running server, follow "
    "them, read their reports.",
    invoke_without_command=True,
)
learner_app.add_typer(quarantine_app, name="quarantine")
learner_app.add_typer(canary_app, name="canary")
console = Console()
FINISHED = ("succeeded", "failed", "rejected")
# Under the data dir: what `learner report` saves when no --out is given.
REPORTS_FOLDER = "reports"
REPORT_TIMEOUT_S = 60.0
# A progress bar as it lands in a log file: "Map:  40%|####  | 2/5 [00:01<00:02, ...]".
PROGRESS_BAR = re.compile(r"\d+%\||\[\d+:\d{2}(?::\d{2})?[<,]")
# What --engine-url takes: an http(s) URL with a host (the engine's root).
ENGINE_URL = re.compile(r"^https?://[^\s/?#]+")


def _describe(run: dict[str, Any]) -> str:
    progress = run.get("progress")
    share = f" {100 * progress:.0f}%" if isinstance(progress, (int, float)) else ""
    parts = [f"{run['run_id']}: [bold]{run['status']}[/bold]", f"stage {run.get('stage')}{share}"]
    if run.get("version"):
        parts.append(f"version {run['version']}")
    if run.get("error"):
        parts.append(f"[red]{escape(run['error'])}[/red]")
    return ", ".join(parts)


def _when(timestamp: str | None, missing: str) -> str:
    """An API timestamp (ISO, UTC) for people, or ``missing`` when there is none."""
    return f"{_utc(timestamp)} UTC" if timestamp else missing


def meaningful_lines(lines: list[str]) -> list[str]:
    """A log tail without blank lines and progress bars (a worker on a terminal draws them)."""
    return [line for line in lines if line.strip() and not PROGRESS_BAR.search(line)]


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def gate_table(gates: dict[str, Any]) -> Table:
    """The gates' checks (a version's ``gate_metrics``, as the server judged them)."""
    judge = escape(gates.get("judge") or "unknown")
    table = Table(title=f"gates (judge {judge})", title_justify="left")
    for column in ("metric", "candidate", "active", "limit", "result"):
        table.add_column(column, no_wrap=True)
    for check in gates["checks"]:
        if check["candidate"] is None or check["active"] is None:
            # The gates leave a metric unchecked when either side has no number.
            result = "not checked"
        else:
            result = "[green]pass[/green]" if check["ok"] else "[red]fail[/red]"
        table.add_row(
            check["metric"],
            _figure(check["candidate"]),
            _figure(check["active"]),
            check["limit"],
            result,
        )
    return table


def verdict(run: dict[str, Any], record: dict[str, Any] | None) -> list[str]:
    """What became of the round's candidate, and why (lines of console markup)."""
    version, alias = run.get("version"), run["alias"]
    gates = (record or {}).get("gate_metrics") or {}
    error = escape(run.get("error") or "no error recorded")
    if run["status"] == "succeeded":
        how = "no gates ran" if gates.get("skipped") else "it passed every gate"
        return [f"[green]promoted[/green]: {version} now serves alias {alias} ({how})"]
    if run["status"] == "rejected":
        served = (record or {}).get("parent")
        keeps = f"; alias {alias} keeps serving {served}" if served else ""
        reasons = gates.get("reasons") or [run.get("error") or "no reason recorded"]
        return [
            f"[red]rejected[/red]: {version} is registered as rejected{keeps}, because:",
            *(f"  {escape(reason)}" for reason in reasons),
        ]
    if version:
        return [f"[red]not promoted[/red]: {error}"]
    return [f"[red]failed[/red]: {error}"]


def show_outcome(run: dict[str, Any], url: str | None, admin_key: str | None) -> None:
    """A finished round: its gate table, the verdict, and on failure the log's last lines."""
    record = None
    if run.get("version"):
        record = _call("GET", f"/admin/adapters/{run['version']}", url, admin_key)
    gates = (record or {}).get("gate_metrics") or {}
    if gates.get("checks"):
        console.print(gate_table(gates))
    for line in verdict(run, record):
        console.print(line)
    if run["status"] == "failed" and not run.get("version"):
        # The worker failed (with a version, it was the hot-swap after it).
        lines = meaningful_lines(run.get("log_tail") or [])
        if lines:
            console.print("the round's log ends with:")
            for line in lines:
                console.print(f"  {line}", markup=False, highlight=False)


@learner_app.callback()
def learner_role(
    context: typer.Context,
    model: str = typer.Option(
        "default", help="Base model folder or 'default' (SmolLM2-135M); the engines' model."
    ),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, envvar=DATA_DIR_ENV, help="Holds adapters/, rounds/ and snapshots/."
    ),
    engine_url: list[str] | None = typer.Option(
        None,
        "--engine-url",
        envvar=UPSTREAM_URL_ENV,
        help="An engine whose adapters this learner keeps in line (default: the engine "
        "policy's address).",
    ),
    log_level: LogLevel = LOG_LEVEL_OPTION,
) -> None:
    """Run the learner: exactly one is active per store (a leader lock); a second one waits
    and takes over when the first dies. Stops on Ctrl-C or SIGTERM."""
    if context.invoked_subcommand is not None:
        return
    import asyncio

    from engine import load_engine_config
    from gateway import load_settings
    from learner.metrics import MetricsPortError
    from learner.process import LearnerSettings, run_learner
    from learner.rounds import LearnerConfig, LearnerOptions
    from store import ADAPTERS_FOLDER, DatabaseBusyError, DatabaseUnavailableError, redact
    from tuneshield import ModelError, PolicyError, resolve_model

    # One line per error, however wide the terminal: a message names the setting to fix.
    errors = Console(stderr=True, soft_wrap=True)
    configure_logging(log_level)
    not_urls = [url for url in engine_url or [] if not ENGINE_URL.match(url)]
    if not_urls:
        errors.print(
            f"[red]error:[/red] --engine-url (${UPSTREAM_URL_ENV}) must be an http(s) URL "
            f"such as http://127.0.0.1:8000, got {escape(', '.join(not_urls))}"
        )
        raise typer.Exit(1)
    try:
        engine_config = load_engine_config()
        gateway = load_settings(data_dir=data_dir)
        config = LearnerConfig.from_policy()
        model_path = resolve_model(model, prepare=True)
    except (ModelError, PolicyError) as error:
        # Escaped: the message names policy sections as "[round]", which is markup.
        errors.print(f"[red]error:[/red] {escape(str(error))}")
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
    except (DatabaseBusyError, DatabaseUnavailableError, MetricsPortError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    errors.print("learner stopped")


@learner_app.command("run")
def learner_run(
    wait: bool = typer.Option(False, "--wait", help="Follow the round until it ends."),
    poll_s: float = typer.Option(5.0, help="Seconds between progress checks with --wait."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Ask the server for a learning round now (on the dialogs since the last round); with
    --wait, follow it and end with its gate table and verdict."""
    run = _call("POST", "/admin/learner/run", url, admin_key)
    console.print(f"started {run['run_id']}")
    if not wait:
        return
    # A line when the round moves to another stage; on a terminal the spinner shows the
    # progress in between.
    shown: tuple[str, str | None] = (run["status"], run.get("stage"))
    with console.status(_describe(run)) as spinner:
        while run["status"] not in FINISHED:
            time.sleep(poll_s)
            run = _call("GET", f"/admin/learner/runs/{run['run_id']}", url, admin_key)
            spinner.update(_describe(run))
            step = (run["status"], run.get("stage"))
            # The end is told by the verdict below.
            if step != shown and run["status"] not in FINISHED:
                console.print(_describe(run))
                shown = step
    show_outcome(run, url, admin_key)
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
        schedule = (
            f"{status['schedule']}, next {_when(status['next_run'], 'not planned')}"
            if status["scheduled"]
            else "off (rounds run when asked)"
        )
        since = _when(status["watermark"], "the start (no round has trained yet)")
        console.print(
            f"alias {status['alias']} serves {status['active_version']}; "
            f"round running: {status['running'] or 'none'}\n"
            f"schedule: {schedule}\n"
            f"{status['new_conversations']} new conversations since {since}; a scheduled "
            f"round needs {status['min_new_dialogs']}"
        )
    for run in status["recent_runs"]:
        console.print(_describe(run))


@learner_app.command("report")
def learner_report(
    run_id: str = typer.Argument(..., help="A run id (see `tuneshield learner status`)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help=f"Where to save the page (default: {REPORTS_FOLDER}/round-RUN_ID.html in the data "
        "dir).",
        show_default=False,
    ),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", envvar=DATA_DIR_ENV, help="Data dir for the default --out."
    ),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Save a round's HTML report (plots inline) and print where it went."""
    run = _call("GET", f"/admin/learner/runs/{run_id}", url, admin_key)
    if not run["report"]:
        raise _fail(f"run {run_id} has no report yet ({run['status']}, stage {run['stage']})")
    root = (url or _default_url()).rstrip("/")
    try:
        with httpx.Client(
            base_url=root, transport=adapters_cli.transport, timeout=REPORT_TIMEOUT_S
        ) as client:
            response = client.get(
                f"/admin/learner/runs/{run_id}/report",
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            response.raise_for_status()
    except httpx.HTTPError as error:
        raise _fail(f"could not fetch the report of {run_id}: {error}") from None
    path = out or data_dir / REPORTS_FOLDER / f"round-{run_id}.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(response.text, encoding="utf-8")
    except OSError as error:
        raise _fail(f"could not save the report to {path}: {error.strerror or error}") from None
    # Unwrapped, so that the path can be copied from the terminal.
    console.print(
        f"report of {run_id} ({run['status']}) saved to {path.resolve()}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


def _score(value: float | None) -> str:
    return "unscored" if value is None else f"score {value:.2f}"


@learner_app.command("samples")
def learner_samples(
    run_id: str = typer.Argument(..., help="A run id (see `tuneshield learner status`)."),
    flagged: bool | None = typer.Option(
        None,
        "--flagged/--not-flagged",
        help="Only the samples the judge flagged, or only the others (default: all).",
        show_default=False,
    ),
    limit: int | None = typer.Option(
        None,
        min=1,
        help="Samples to show (default and most: the server's samples.page_max policy).",
        show_default=False,
    ),
    offset: int = typer.Option(0, min=0, help="Skip this many first (to page)."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answer as JSON."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """A round's training samples: the judge's score and verdict, the reply as sent and as
    healed, and the API key each came from."""
    params = {"flagged": None if flagged is None else str(flagged).lower(), "limit": limit,
              "offset": offset}  # fmt: skip
    page = _call("GET", f"/admin/learner/runs/{run_id}/samples", url, admin_key, params)
    if as_json:
        console.print_json(json.dumps(page))
        return
    which = {None: "", True: " flagged", False: " not flagged"}[flagged]
    shown = f"{offset + 1}-{offset + len(page['data'])}" if page["data"] else "none"
    console.print(
        f"{run_id}: {page['flagged']} of {page['samples']} samples flagged; showing {shown} "
        f"of {page['total']}{which}",
        soft_wrap=True,
    )
    for item in page["data"]:
        verdict = "[red]flagged[/red]" if item["flagged"] else "not flagged"
        if item["recall_capped"]:
            verdict += " (un-flagged by the recall cap)"
        healed = f", healed ({item['heal_mode']})" if item["healed_reply"] is not None else ""
        key = escape(item["key_id"] or "none")
        console.print(
            f"#{item['index'] + 1} key {key}, {_score(item['judge_score'])}, {verdict}{healed}",
            soft_wrap=True,
        )
        # The conversation's own words: printed as they are, never read as markup.
        console.print(f"  sent:    {item['original_reply']}", soft_wrap=True, markup=False,
                      highlight=False)  # fmt: skip
        if item["healed_reply"] is not None:
            console.print(f"  trained: {item['healed_reply']}", soft_wrap=True, markup=False,
                          highlight=False)  # fmt: skip
    if offset + len(page["data"]) < page["total"]:
        console.print(f"more: --offset {offset + len(page['data'])}")


@learner_app.command("keys")
def learner_keys(
    as_json: bool = typer.Option(False, "--json", help="Print the server's answer as JSON."),
    url: str | None = URL_OPTION,
    admin_key: str | None = KEY_OPTION,
) -> None:
    """Per API key: the samples the latest rounds trained on, how many their judge flagged,
    and the rate (most flagged first)."""
    answer = _call("GET", "/admin/keys/flagged", url, admin_key)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    rounds = answer["rounds"]
    table = Table(
        title=f"samples per key over {len(rounds)} round(s) on disk",
        title_justify="left",
        show_edge=False,
    )
    for column in ("key", "samples", "flagged", "rate", "rounds"):
        table.add_column(column, no_wrap=True)
    for key in answer["keys"]:
        table.add_row(
            escape(key["key_id"] or "(none)"),
            str(key["samples"]),
            str(key["flagged"]),
            f"{100 * key['flagged_rate']:.1f}%",
            str(len(key["rounds"])),
        )
    console.print(table)


def register_learner_commands(root: typer.Typer) -> None:
    """Add ``learner`` to the root ``tuneshield`` app."""
    root.add_typer(learner_app, name="learner")
