"""The ``tuneshield`` command: the one CLI for library, gateway, engine and learner verbs.

It lives in ``learner`` because the learner is the layer that composes the others; the
``tuneshield`` library itself stays free of web and scheduler imports.
"""

from __future__ import annotations

import os

import typer

from engine import engine
from gateway import register_gateway_commands
from learner.adapters_cli import register_adapter_commands
from learner.audit_cli import register_audit_commands
from learner.learner_cli import register_learner_commands
from learner.serve import serve
from tuneshield.cli import register_library_commands

# These machines reach no model hub: fail fast instead of retrying one. Set
# HF_HUB_OFFLINE=0 where a hub is reachable to load models by id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _register_simulation(app: typer.Typer) -> None:
    """``demo``, ``simulate`` and ``experiment`` where the simulation harness is installed.

    The one place production names ``simulation``: the harness drives the real stack and is
    no dependency of it, so a deployment without it simply has no such verbs.
    """
    try:
        from simulation.cli import register_simulation_commands
    except ModuleNotFoundError as error:
        if error.name != "simulation":
            raise
        return
    register_simulation_commands(app)


app = typer.Typer(
    name="tuneshield",
    help="TuneShield Gateway: serve a chatbot, log dialogs, learn from them safely.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_library_commands(app)
app.command("engine")(engine)
app.command("serve")(serve)
register_gateway_commands(app)
register_adapter_commands(app)
register_audit_commands(app)
register_learner_commands(app)
_register_simulation(app)
