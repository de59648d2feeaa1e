"""The ``tuneshield`` command: the one CLI for library, gateway, engine and learner verbs.

It lives in ``learner`` because the learner is the layer that composes the others; the
``tuneshield`` library itself stays free of web and scheduler imports.
"""

from __future__ import annotations

import typer

from tuneshield.cli import register_library_commands

app = typer.Typer(
    name="tuneshield",
    help="TuneShield Gateway: serve a chatbot, log dialogs, learn from them safely.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_library_commands(app)
# Server-side command groups are registered below, one line each.
