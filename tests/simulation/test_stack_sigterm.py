"""A SIGTERM to a process that runs a stack stops the stack first (its engine is not left).

The engine runs in a session of its own, so a process that Python's default SIGTERM ended
at once left vLLM running, holding its port and memory. The stack here is a stand-in whose
``stop`` says it ran: what is under test is ``Stack``'s context manager, not vLLM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from simulation.stack import Stack

    def start(self):
        print("ready", flush=True)

    def stop(self):
        print("stopping", flush=True)
        time.sleep(1.0)  # a second SIGTERM arrives meanwhile and must not cut this short
        print("stopped", flush=True)

    members = {name: lambda self, *args: None for name in Stack.__abstractmethods__}
    Probe = type("Probe", (Stack,), members | {"start": start, "stop": stop})
    with Probe():
        if sys.argv[1] == "wait":
            time.sleep(60)
    print("after", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    """
)


def _run(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True)


def test_sigterm_stops_the_stack_before_the_process_exits() -> None:
    process = _run("wait")
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().strip() == "stopping"
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert rest.split() == ["stopped"]


def test_the_default_sigterm_handler_is_back_once_the_stack_stopped() -> None:
    process = _run("leave")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert out.split() == ["ready", "stopping", "stopped", "after", "True"]
