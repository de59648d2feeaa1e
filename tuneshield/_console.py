"""What every CLI verb shares: rich progress bars per stage, and clean user errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)
StageProgress = Callable[[str, int, int], None]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's expected failures into one red line and exit 2, never a trace."""
    try:
        yield
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        # Our own errors already say what is wrong; a library's needs its type for context.
        ours = type(error).__module__.startswith("tuneshield")
        console.print(f"[red]error:[/red] {'' if ours else type(error).__name__ + ': '}{error}")
        raise typer.Exit(code=2) from None


@contextmanager
def environment_set(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` for the block, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def stage_bars(labels: dict[str, str] | None = None) -> Iterator[StageProgress]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage."""
    import datasets
    import transformers

    # Our bars are the display; the libraries' own would interleave with them.
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # TRL's reference log-prob pass draws a tqdm bar of its own, off unless TQDM_DISABLE
    # (read at each pass). Processes started meanwhile inherit it: the demo's engine log
    # loses vLLM's loading bars, not its messages.
    with (
        environment_set("TQDM_DISABLE", "1"),
        Progress(*columns, console=console) as bars,
    ):
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task((labels or {}).get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)
            if not console.is_terminal:
                # Bars are invisible in a log file (nohup, CI): leave one line per step.
                elapsed = bars.tasks[tasks[stage]].elapsed or 0.0
                console.print(f"{stage}: {done}/{total} ({elapsed:.0f} s)")

        yield progress
