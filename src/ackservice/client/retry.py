"""When to try connecting again, and how to say why a connection attempt failed.

Pure code (no I/O, no trio): the connection asks the budget whether another attempt is
allowed and how long to sleep first.
"""

from __future__ import annotations

import math
import os
import random
import socket

__all__ = ["RetryBudget", "backoff_delay", "describe_connect_error"]


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures.

    "Full jitter" from the AWS Architecture Blog's *Exponential Backoff and Jitter*: a
    uniform draw from ``[0, min(cap, base * 2**failures)]``. The randomness spreads out
    clients that all lost the same server at the same moment, so a restarted server is
    not met by every one of them at once.
    """
    # min() first so a long run of failures cannot overflow the float.
    bound = cap if failures >= 64 else min(cap, base * 2.0**failures)
    return rng.uniform(0.0, bound)


class RetryBudget:
    """Counts a run of consecutive failed attempts; a connection that makes progress ends it.

    A run may go on while both limits allow: at most ``retries`` attempts after the first
    one (``None``: no count), and no attempt after ``retry_for`` seconds from the run's first
    failure. With ``retries=3`` a run ends after the fourth attempt; with the defaults
    (``None``, 30 s) a server that is back within 30 s is reached, however many attempts
    that takes.
    """

    __slots__ = ("_first_attempt_at", "_first_failure_at", "failures", "retries", "retry_for")

    def __init__(self, retries: int | None, retry_for: float = math.inf) -> None:
        self.retries = retries
        self.retry_for = retry_for
        self.failures = 0
        self._first_attempt_at: float | None = None
        self._first_failure_at: float | None = None

    def attempt_starting(self, now: float) -> None:
        """Note the start of an attempt (the first of a run starts the clock of the summary)."""
        if self._first_attempt_at is None:
            self._first_attempt_at = now

    def failed(self, now: float) -> bool:
        """Record a failed attempt; return whether another one is allowed."""
        self.failures += 1
        if self._first_failure_at is None:
            self._first_failure_at = now
        if self.retries is not None and self.failures > self.retries:
            return False
        return self.remaining(now) > 0

    def remaining(self, now: float) -> float:
        """Seconds left for retries in this run (the next backoff is cut to fit)."""
        if self._first_failure_at is None:
            return self.retry_for
        return self._first_failure_at + self.retry_for - now

    def succeeded(self) -> None:
        """A connection made progress: the next failure starts a new run."""
        self.failures = 0
        self._first_attempt_at = None
        self._first_failure_at = None

    def summary(self, now: float) -> str:
        """``tried 4 times over 3.1 s``, for the error that ends a run of failures."""
        started = now if self._first_attempt_at is None else self._first_attempt_at
        times = "once" if self.failures == 1 else f"{self.failures} times"
        return f"tried {times} over {now - started:.1f} s"


def describe_connect_error(exc: BaseException) -> str:
    """A short, lowercase reason such as ``connection refused``.

    ``trio.open_tcp_stream`` raises a plain ``OSError("all attempts to connect ... failed")``
    whose cause is a group holding one error per address tried; the first of those says
    what actually happened.
    """
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return describe_connect_error(cause.exceptions[0])
    if isinstance(exc, OSError) and exc.errno is not None:
        # os.strerror, not exc.strerror: trio's per-address errors read "Error connecting
        # to ('127.0.0.1', 9876): Connection refused", and the address is said elsewhere.
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__
