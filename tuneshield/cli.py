"""Library verbs of the ``tuneshield`` CLI: models, classify, heal, train, evaluate."""

from __future__ import annotations

import typer

models_app = typer.Typer(help="Prepare and inspect models (offline).", no_args_is_help=True)


@models_app.command("prepare")
def models_prepare(
    force: bool = typer.Option(False, help="Convert again even if the folder exists."),
) -> None:
    """Convert the shipped SmolLM2-135M-Instruct GGUF into a safetensors folder; print it."""
    from tuneshield._models import ModelError, prepare_default_model

    try:
        folder = prepare_default_model(force=force)
    except ModelError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(str(folder))


def register_library_commands(app: typer.Typer) -> None:
    """Add the library's verbs to the root ``tuneshield`` app."""
    app.add_typer(models_app, name="models")
    from tuneshield._classify_cli import classify_app

    app.add_typer(classify_app, name="classify")
    from tuneshield._train_cli import train

    app.command("train", no_args_is_help=True)(train)
    from tuneshield._pipeline_cli import evaluate_command, heal_command

    app.command("heal", no_args_is_help=True)(heal_command)
    app.command("evaluate")(evaluate_command)
