"""SIGTERM as Ctrl-C: a process stopped by ``kill`` or a timeout leaves through its
``finally`` blocks and context managers, which stop what it started.

Engines run in sessions of their own (so that their whole tree can be killed), and
``tuneshield serve`` children of a benchmark in processes of their own: Python's default
for SIGTERM ends the process at once, and they outlived it, holding their ports and
memory. Demo runs and stacks enter ``SigtermUnwinds``; benchmark scripts decorate their
``main`` with ``unwinds_on_sigterm``.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import ParamSpec, Self, TypeVar

# A process ended by signal N exits with 128 + N, as shells report it.
SIGNAL_EXIT_BASE = 128

P = ParamSpec("P")
R = TypeVar("R")


class SigtermUnwinds:
    """While entered, SIGTERM ends this process as Ctrl-C does: through every ``finally``.

    Python's default for SIGTERM ends the process at once, and the engine runs in a
    session of its own (so that its whole tree can be killed), so it outlived a demo
    stopped by ``kill`` or a timeout, holding its port and its memory. The first SIGTERM
    raises ``SystemExit``; later ones are ignored, and one that comes during ``held()``
    (the stop itself) waits for its end, so that none cuts the stop short. Only the main
    thread may set handlers; a handler someone else set is left alone, but one entered
    inside another (a stack inside a decorated benchmark main) holds the outer one in its
    ``held()``.
    """

    def __init__(self) -> None:
        self._installed = False
        self._holding = False
        self._received: int | None = None
        self._outer: SigtermUnwinds | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self
        handler = signal.getsignal(signal.SIGTERM)
        if handler is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        elif isinstance(getattr(handler, "__self__", None), SigtermUnwinds):
            # Nested (a stack inside a decorated benchmark): the outer one handles the
            # signal, so this one's held() must hold the outer one.
            self._outer = handler.__self__  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._outer = None
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        first = self._received is None
        self._received = signum
        if first and not self._holding:
            raise SystemExit(SIGNAL_EXIT_BASE + signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A SIGTERM that comes inside ends the process once the block has run (or raised)."""
        if self._outer is not None:
            with self._outer.held():
                yield
            return
        before, holding = self._received, self._holding
        self._holding = True
        failure: BaseException | None = None
        try:
            yield
        except BaseException as error:
            failure = error
            raise
        finally:
            # Holds may overlap (several inner instances hold one outer one).
            self._holding = holding
            # The outermost hold ends the process; an inner one leaves that to it. It
            # does so even when the block raised, else a caller that handles the error
            # would go on, and every later SIGTERM be ignored as a repeat of this one.
            # Python prints nothing for SystemExit, context included: the error is
            # printed first, so that a stop that failed says so.
            if not holding and before is None and self._received is not None:
                if failure is not None and not isinstance(failure, SystemExit):
                    traceback.print_exception(failure)
                raise SystemExit(SIGNAL_EXIT_BASE + self._received)


def unwinds_on_sigterm(main: Callable[P, R]) -> Callable[P, R]:
    """``main`` run inside ``SigtermUnwinds``: a SIGTERM raises ``SystemExit`` (exit
    status 143) where ``main`` is, and what it started is stopped on the way out."""

    @functools.wraps(main)
    def unwinding(*args: P.args, **kwargs: P.kwargs) -> R:
        with SigtermUnwinds():
            return main(*args, **kwargs)

    return unwinding
