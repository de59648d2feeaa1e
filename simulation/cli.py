"""``tuneshield demo`` (the main job at a named size), ``tuneshield simulate`` (every option)
and ``tuneshield experiment`` (the offline arms experiment)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer

from gateway import ADMIN_KEY_ENV
from tuneshield import console, stage_bars, user_errors

DEFAULT_OUT = Path("reports") / "demo"

_SIZE = typer.Option("default", help="quick (<= 5 min), default (<= 30 min), full.")
_OUT = typer.Option(DEFAULT_OUT, help="Report folder (report.html, results.json, report.md).")
_DATA_DIR = typer.Option(
    None, help="Data dir for the stack (DuckDB, adapters, logs); default: a temp dir."
)
_KEEP = typer.Option(
    False,
    help="Keep the temp data dir (adapters, dialogs, engine log); a failed run always keeps it.",
)
_MODEL = typer.Option(None, help="Chatbot base model (default: policies/demo.yaml).")
_ADMIN_KEY = typer.Option(
    None,
    envvar=ADMIN_KEY_ENV,
    help="Gateway admin key (default: a random one; with --url, one of that gateway's).",
)
_URL = typer.Option(
    None,
    help="Use the stack already running at this gateway URL (e.g. http://127.0.0.1:8080, "
    "`tuneshield serve` on this machine) instead of starting one.",
)


def import_root() -> Path:
    """The running stack's import root (policies/learner.yaml ``import_root``), for a
    stack on this machine whose data dir is ``$TUNESHIELD_DATA_DIR`` (or the default)."""
    from gateway import resolve_data_dir
    from learner import LearnerConfig

    return LearnerConfig.from_policy().import_root_in(resolve_data_dir())


def run_and_report(
    size: str,
    out: Path,
    data_dir: Path | None,
    keep_data: bool,
    admin_key: str | None,
    overrides: dict[str, Any],
    size_overrides: dict[str, Any] | None = None,
    url: str | None = None,
) -> None:
    """Load the config, run the demo with progress bars, write the report, print the table."""
    import httpx
    import openai

    from learner.serve import ENGINE_LOG
    from simulation.config import DemoConfig
    from simulation.remote import RemoteStack
    from simulation.report import evasion_caveat, results_table, write_demo_report
    from simulation.runner import run_demo
    from simulation.stack import DemoStack, Stack, StackError
    from tuneshield import markdown_table

    # The openai client logs every request at INFO under the gateway's logging set-up.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with user_errors():
        if url is not None and not admin_key:
            raise typer.BadParameter(
                f"--url needs the gateway's admin key (--admin-key or ${ADMIN_KEY_ENV})",
                param_hint="--admin-key",
            )
        config = DemoConfig.from_policy(size, size_overrides=size_overrides, **overrides)
        temporary = data_dir is None
        folder = data_dir
        if folder is None:
            # Against a running stack the gateway copies what the demo trains, and only
            # from its import root: train there (the stack must be on this machine).
            scratch = import_root() if url is not None else None
            if scratch is not None:
                scratch.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="tuneshield-demo-", dir=scratch))
        finished = False
        try:

            def make_stack(*args: Any, **kwargs: Any) -> Stack:
                if url is not None and admin_key:
                    return RemoteStack(url, admin_key, *args, **kwargs)
                return DemoStack(*args, admin_key=admin_key, **kwargs)

            with stage_bars() as progress:
                try:
                    results = run_demo(
                        config,
                        folder,
                        progress=progress,
                        announce=console.print,
                        stack_factory=make_stack,
                    )
                except (httpx.TransportError, openai.APIConnectionError) as error:
                    # The engine or the gateway went away mid-run (killed, out of memory):
                    # one line and where to look, not a trace from deep inside a client.
                    where = (
                        f"the engine's log: {folder / ENGINE_LOG}"
                        if url is None
                        else f"the logs of the stack at {url}"
                    )
                    raise StackError(
                        f"the stack stopped answering ({type(error).__name__}: {error}); {where}"
                    ) from None
            report = write_demo_report(results, out)
            finished = True
        finally:
            # A failed or interrupted run keeps its data dir: the engine's log says why.
            if temporary and finished and not keep_data:
                shutil.rmtree(folder, ignore_errors=True)
            elif temporary:
                console.print(f"data dir kept: {folder}")
    typer.echo(markdown_table(results_table(results)))
    caveat = evasion_caveat(config.attack, results["eval"]["judge"])
    if caveat:
        console.print(caveat)
    console.print(f"report: {report}  ({results['seconds']} s)")


def demo(
    size: str = _SIZE,
    out: Path = _OUT,
    data_dir: Path | None = _DATA_DIR,
    keep_data: bool = _KEEP,
    model: str | None = _MODEL,
    admin_key: str | None = _ADMIN_KEY,
    url: str | None = _URL,
) -> None:
    """Attackers try to teach the chatbot toxicity through normal chat; watch TuneShield stop them.

    Starts the real stack (vLLM + gateway), or uses a running one (--url), simulated users
    chat through it, and the arms baseline / control / undefended / tuneshield learn from
    the logged dialogs.
    """
    run_and_report(size, out, data_dir, keep_data, admin_key, {"model": model}, url=url)


def simulate(
    size: str = _SIZE,
    attack: str | None = typer.Option(
        None, help="injection, backdoor, evasion (perturbed text) or jailbreak."
    ),
    rate: float | None = typer.Option(
        None, help="Conversation poisoning rate, e.g. 0.1 (the paper: 0.01-0.4)."
    ),
    arms: str | None = typer.Option(
        None, help="Comma-separated arms (baseline, control, undefended, tuneshield, ...)."
    ),
    ablation: list[str] | None = typer.Option(
        None,
        help="Add ablation arms: no-dpo, canned, weak-judge, quarantine (tuneshield with and "
        "without the learner's quarantine of flagged users; repeatable).",
    ),
    weak_judge_recall: float | None = typer.Option(
        None, help="Share of flags the weakened judge keeps."
    ),
    rounds: int | None = typer.Option(None, help="Learning rounds per arm."),
    users: int | None = typer.Option(None, help="Simulated conversations per round."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, one run each."),
    sft_epochs: float | None = typer.Option(None, help="SFT epochs per round."),
    sft_learning_rate: float | None = typer.Option(None, help="SFT peak learning rate."),
    dpo_learning_rate: float | None = typer.Option(None, help="DPO peak learning rate."),
    out: Path = _OUT,
    data_dir: Path | None = _DATA_DIR,
    keep_data: bool = _KEEP,
    model: str | None = _MODEL,
    admin_key: str | None = _ADMIN_KEY,
    url: str | None = _URL,
) -> None:
    """The demo with every knob: attack, poisoning rate, arms, ablations, rounds, seeds."""
    overrides = {
        "model": model,
        "attack": attack,
        "poison_rate": rate,
        "arms": [a.strip() for a in arms.split(",") if a.strip()] if arms else None,
        "ablations": list(ablation) if ablation else None,
        "weak_judge_recall": weak_judge_recall,
    }
    size_overrides = {
        "rounds": rounds,
        "users": users,
        "sft_epochs": sft_epochs,
        "sft_learning_rate": sft_learning_rate,
        "dpo_learning_rate": dpo_learning_rate,
        "seeds": [int(s) for s in seeds.split(",") if s.strip()] if seeds else None,
    }
    run_and_report(size, out, data_dir, keep_data, admin_key, overrides, size_overrides, url)


def experiment(
    size: str = typer.Option("default", help="quick, default or full (policies/experiment.yaml)."),
    model: str = typer.Option("default", help="Base model: HF id, folder or 'default'."),
    out: Path = typer.Option(Path("reports/experiment"), help="Report folder."),
    arms: str | None = typer.Option(None, help="Comma-separated arms (default: policies)."),
    attack: str | None = typer.Option(None, help="injection, backdoor, evasion or jailbreak."),
    rate: float | None = typer.Option(None, help="Conversation poisoning rate in [0, 1]."),
    judge: str | None = typer.Option(None, help="The defense's judge (policies/judges.yaml)."),
    seed: int | None = typer.Option(None, help="Seed of data, training and sampling."),
    resume: bool = typer.Option(
        False, help="Continue a stopped run of the same configuration in --out."
    ),
) -> None:
    """Poison a chitchat training set, train every arm, and report toxicity vs helpfulness."""
    from simulation.experiment import ExperimentConfig, run_experiment
    from simulation.report import write_experiment_report
    from tuneshield import DEFAULT_MODEL_ALIASES, arms_table, markdown_table, prepare_default_model

    with user_errors():
        config = ExperimentConfig.from_policy(
            size,
            base_model=model,
            arms=arms.split(",") if arms else None,
            attack=attack,
            poison_rate=rate,
            judge=judge,
            seed=seed,
        )
        if model.lower() in DEFAULT_MODEL_ALIASES:
            console.print(f"model: {prepare_default_model()}")
        with stage_bars() as progress:
            results = run_experiment(config, out, progress, resume=resume)
        report = write_experiment_report(results, out)
    console.print(markdown_table(arms_table(results)))
    typer.echo(f"report: {report}")


def register_simulation_commands(app: typer.Typer) -> None:
    """Add ``demo``, ``simulate`` and ``experiment`` to the ``tuneshield`` command."""
    app.command("demo")(demo)
    app.command("simulate")(simulate)
    app.command("experiment")(experiment)
