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
from learner.demo.cli import register_demo_commands
from learner.learner_cli import register_learner_commands
from learner.serve import serve
from tuneshield.cli import register_library_commands

# These machines reach no model hub: fail fast instead of retrying one. Set
# HF_HUB_OFFLINE=0 where a hub is reachable to load models by id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
register_learner_commands(app)
register_demo_commands(app)
