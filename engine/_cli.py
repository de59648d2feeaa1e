"""``tuneshield engine``: run the vLLM engine in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

DATA_DIR_ENV = "TUNESHIELD_DATA_DIR"


def engine(
    model: str = typer.Option("default", help="Model folder, hub id, or 'default' (SmolLM2)."),
    port: int | None = typer.Option(None, help="Listen port (default: policies/engine.yaml)."),
    host: str | None = typer.Option(None, help="Listen address (keep it loopback)."),
    tensor_parallel_size: int | None = typer.Option(
        None, help="GPU build: GPUs to split the model across."
    ),
    data_dir: Path = typer.Option(
        Path(".data"), envvar=DATA_DIR_ENV, help="Data folder; the log is logs/engine.log in it."
    ),
) -> None:
    """Start vLLM with runtime LoRA, wait until it answers, restart it if it dies."""
    from rich.console import Console
    from rich.markup import escape

    from engine._supervisor import EngineError, EngineSupervisor, load_engine_config
    from gateway import configure_logging
    from tuneshield import ModelError, PolicyError

    # Every role logs in one format (vLLM's own output goes to the engine's log file).
    configure_logging()
    # One line per message, however wide the terminal: an error names the setting to fix.
    console = Console(stderr=True, soft_wrap=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    log_path = data_dir / "logs" / "engine.log"
    try:
        config = load_engine_config(port=port, host=host, tensor_parallel_size=tensor_parallel_size)
        supervisor = EngineSupervisor(config, model, log_path=log_path)
        console.print(f"starting the {supervisor.build} engine for {supervisor.model_path}")
        console.print(f"log: {log_path}")
        with supervisor:
            console.print(
                f"[green]ready[/green] in {supervisor.last_startup_s:.0f} s at "
                f"{supervisor.base_url} (base model served as "
                f"'{config.served_model_name}'); Ctrl-C stops it"
            )
            while not stop.wait(1.0):
                pass
        console.print("stopped")
    except KeyboardInterrupt:
        console.print("stopped")
    except (EngineError, ModelError, PolicyError) as error:
        # Escaped: a policy error names its section as "[engine]", which is markup.
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
