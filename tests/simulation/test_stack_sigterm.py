"""A SIGTERM to a process that runs a stack stops the stack first (its engine is not left);
so does one to a benchmark script, whatever it started.

The engine runs in a session of its own, so a process that Python's default SIGTERM ended
at once left vLLM running, holding its port and memory. The stack here is a stand-in that
prints what it does, and whose ``stop`` waits for a line on stdin: the test sends its
signals while the stop is known to be under way. What is under test is how a demo run and
``Stack``'s context manager start and stop a stack, not vLLM.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from simulation.sigterm import SIGNAL_EXIT_BASE

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


# The stack's context manager inside a decorated benchmark main (efficacy.py's demo runs).
DECORATED_STACK = PROBE + textwrap.dedent(
    """
    from simulation.sigterm import unwinds_on_sigterm

    @unwinds_on_sigterm
    def main():
        with Probe():
            print("inside", flush=True)

    main()
    """
)

# A benchmark's main that started a child in a session of its own (as an engine or a
# ``tuneshield serve`` is), and stops it on the way out.
BENCHMARK = textwrap.dedent(
    """
    import subprocess, sys, time
    from simulation.sigterm import unwinds_on_sigterm

    @unwinds_on_sigterm
    def main():
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        try:
            print(child.pid, flush=True)
            time.sleep(60)
        finally:
            child.terminate()
            child.wait()
            print("stopped", flush=True)

    main()
    """
)


@contextmanager
def _python(script: str, *args: str, stderr: int | None = None) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
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


@pytest.mark.parametrize(
    ("script", "inside"),
    [(WITH_STACK, "handled True"), (DECORATED_STACK, "inside")],
    ids=["stack", "stack-in-a-decorated-benchmark"],
)
def test_a_sigterm_during_a_normal_stop_ends_the_process_once_the_stop_is_done(
    script: str, inside: str
) -> None:
    """Also inside a decorated benchmark main, which handles SIGTERM first: the stack's
    own guard still holds the signal until the stop is done."""
    with _python(script, "leave") as process:
        assert [_line(process), _line(process), _line(process)] == ["ready", inside, "stopping"]
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


def test_a_sigterm_to_a_benchmark_stops_what_it_started() -> None:
    with _python(BENCHMARK) as process:
        child = int(_line(process))
        process.send_signal(signal.SIGTERM)
        assert _finish(process) == ["stopped"]
        assert process.returncode == KILLED
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_every_benchmark_script_unwinds_on_sigterm() -> None:
    """Each benchmark's ``main`` is decorated, so that a ``kill`` or a timeout never leaves
    an engine or a server behind; gpu_round.py runs on a lent machine without the
    project's packages, and starts no process."""
    scripts = sorted((REPOSITORY / "benchmarks").glob("*.py"))
    assert len(scripts) > 10
    for script in scripts:
        if script.name == "gpu_round.py":
            continue
        tree = ast.parse(script.read_text(encoding="utf-8"))
        main = next(
            node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"
        )
        names = [d.id for d in main.decorator_list if isinstance(d, ast.Name)]
        assert names == ["unwinds_on_sigterm"], script.name


def test_benchmark_scripts_import_the_packages_their_names_shadow() -> None:
    """Run as a script, Python puts benchmarks/ first on sys.path, where engine.py and
    gateway.py shadow the packages of the same names: a script importing them puts the
    repository there first (``run_from_repository``)."""
    shadowed = {script.stem for script in (REPOSITORY / "benchmarks").glob("*.py")}
    for script in sorted((REPOSITORY / "benchmarks").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        fixed = False
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                function = node.value.func
                fixed |= isinstance(function, ast.Name) and function.id == "run_from_repository"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in shadowed:
                assert fixed, f"{script.name} imports {node.module} before run_from_repository"


def test_overlapping_holds_end_the_process_when_the_outermost_ends() -> None:
    """Two inner guards holding one outer guard (two stacks inside a decorated main): a
    SIGTERM inside the inner hold waits for the outer hold to end as well."""
    script = textwrap.dedent(
        """
        import os, signal
        from simulation.sigterm import SigtermUnwinds, unwinds_on_sigterm

        @unwinds_on_sigterm
        def main():
            with SigtermUnwinds() as first, SigtermUnwinds() as second:
                with first.held():
                    with second.held():
                        os.kill(os.getpid(), signal.SIGTERM)
                        print("inner done", flush=True)
                    print("outer done", flush=True)
                print("after", flush=True)

        main()
        """
    )
    with _python(script) as process:
        assert _finish(process) == ["inner", "done", "outer", "done"]
        assert process.returncode == KILLED


def test_a_sigterm_held_through_a_block_that_raises_still_ends_the_process() -> None:
    """A stop that fails after a SIGTERM came during it: the process ends with the
    signal's status even where the caller handles the stop's error."""
    script = textwrap.dedent(
        """
        import os, signal
        from simulation.sigterm import SigtermUnwinds

        with SigtermUnwinds() as guard:
            try:
                with guard.held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    raise RuntimeError("the stop failed")
            except RuntimeError:
                print("handled", flush=True)
            print("after", flush=True)
        """
    )
    with _python(script, stderr=subprocess.PIPE) as process:
        out, err = process.communicate(timeout=60)
    assert out.split() == [] and process.returncode == KILLED
    assert "RuntimeError: the stop failed" in err
