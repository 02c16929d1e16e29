"""SIGINT and SIGTERM for a command-line run: the first asks it to stop cleanly, a second
ends the process at once.

Why not ``trio.open_signal_receiver`` alone: its handler only queues the signal for a task,
and a task runs only when the event loop does. A run blocked in a write to standard output
that nobody reads (``client < file | stalled-reader``) never gets there, so Ctrl-C and
SIGTERM did nothing at all, the second as little as the first, and systemd waited for its
stop timeout to SIGKILL. Here a second signal is acted on in the handler itself.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import trio

__all__ = ["STOP_SIGNALS", "StopSignals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Owns SIGINT and SIGTERM while ``installed()``.

    The first signal, while a session is ``stopping()``-aware, calls its ``stop(signum)`` in
    Trio's thread: the run stops cleanly (whole lines out, a summary, exit 130 or 143). A
    second signal, or a first one when no session is there to stop (before the run starts,
    or in its final flush), ends the process at once by the signal's default action (a shell
    shows 130 or 143), after ``farewell`` on stderr if stderr can take it without waiting.

    Args:
        farewell: the one line (with its newline) that says the run was cut short.
    """

    def __init__(self, farewell: bytes) -> None:
        self.received: int | None = None
        """The first signal, if one came."""
        self._farewell = farewell
        self._stop: Callable[[int], object] | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        # A signal ignored when we started stays ignored, as Python itself leaves it (``nohup``,
        # a ``cmd &`` of a non-interactive shell): whoever started us chose that.
        previous = {
            signum: signal.signal(signum, self._handle)
            for signum in STOP_SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: a handler not set from Python, not restorable
                    signal.signal(signum, handler)

    @contextlib.contextmanager
    def stopping(self, stop: Callable[[int], object]) -> Iterator[None]:
        """Inside a Trio run: the first signal calls ``stop(signum)`` between tasks."""
        self._token = trio.lowlevel.current_trio_token()
        self._stop = stop
        try:
            yield
        finally:
            self._stop = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        stop, token = self._stop, self._token
        if self.received is None and stop is not None and token is not None:
            self.received = signum
            # Signal-safe (Trio's own signal handler calls it the same way).
            token.run_sync_soon(stop, signum)
            return
        self.received = self.received or signum
        self._end_now(signum)

    def _end_now(self, signum: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            # Not to a stderr that would block: it may be the stalled pipe itself.
            if select.select([], [2], [], 0)[1]:
                os.write(2, self._farewell)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
