"""A SIGTERM to a process that runs a stack stops the stack first (its engine is not left).

The engine runs in a session of its own, so a process that Python's default SIGTERM ended
at once left vLLM running, holding its port and memory. The stack here is a stand-in that
prints what it does, and whose ``stop`` waits for a line on stdin: the test sends its
signals while the stop is known to be under way. What is under test is how a demo run and
``Stack``'s context manager start and stop a stack, not vLLM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simulation.stack import SIGNAL_EXIT_BASE

REPOSITORY = Path(__file__).resolve().parents[2]
KILLED = SIGNAL_EXIT_BASE + signal.SIGTERM

PROBE = textwrap.dedent(
    """
    import signal, sys, time
    from simulation.stack import Stack

    def start(self):
        print("ready", flush=True)
        if sys.argv[1] == "start":
            time.sleep(60)

    def stop(self):
        print("stopping", flush=True)
        sys.stdin.readline()
        print("stopped", flush=True)

    members = {name: lambda self, *args: None for name in Stack.__abstractmethods__}
    Probe = type("Probe", (Stack,), members | {"start": start, "stop": stop})
    """
)

# ``Stack``'s context manager; "block" waits inside it for a SIGTERM.
WITH_STACK = PROBE + textwrap.dedent(
    """
    with Probe():
        print("handled", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, flush=True)
        if sys.argv[1] == "block":
            time.sleep(60)
    print("after", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    """
)

# A demo run (demo, simulate and efficacy.py go through run_demo) on the tiny model.
DEMO = PROBE + textwrap.dedent(
    """
    from pathlib import Path
    from simulation.config import DemoConfig
    from simulation.runner import run_demo

    config = DemoConfig.from_policy("quick", model=sys.argv[2])
    run_demo(
        config, Path(sys.argv[3]), announce=lambda *_: None, stack_factory=lambda *_, **__: Probe()
    )
    """
)


@contextmanager
def _python(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPOSITORY,
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def _finish(process: subprocess.Popen[str]) -> list[str]:
    """Let the stop go on; what the process printed after it, once it has exited."""
    out, _ = process.communicate("\n", timeout=60)
    return out.split()


def test_a_sigterm_while_a_demo_starts_its_stack_stops_the_stack(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with _python(DEMO, "start", str(tiny_model_dir), str(tmp_path)) as process:
        assert _line(process) == "ready"
        process.send_signal(signal.SIGTERM)
        assert _line(process) == "stopping"
        assert _finish(process) == ["stopped"]
        assert process.returncode == KILLED


def test_a_sigterm_inside_the_stack_stops_it_and_more_wait_for_the_stop() -> None:
    with _python(WITH_STACK, "block") as process:
        assert [_line(process), _line(process)] == ["ready", "handled True"]
        process.send_signal(signal.SIGTERM)
        assert _line(process) == "stopping"
        process.send_signal(signal.SIGTERM)
        assert _finish(process) == ["stopped"]
        assert process.returncode == KILLED


def test_a_sigterm_during_a_normal_stop_ends_the_process_once_the_stop_is_done() -> None:
    with _python(WITH_STACK, "leave") as process:
        assert [_line(process), _line(process), _line(process)] == [
            "ready",
            "handled True",
            "stopping",
        ]
        process.send_signal(signal.SIGTERM)
        assert _finish(process) == ["stopped"]
        assert process.returncode == KILLED


def test_the_default_sigterm_handler_is_back_once_the_stack_stopped() -> None:
    with _python(WITH_STACK, "leave") as process:
        assert _finish(process) == [
            "ready",
            "handled",
            "True",
            "stopping",
            "stopped",
            "after",
            "True",
        ]
        assert process.returncode == 0
