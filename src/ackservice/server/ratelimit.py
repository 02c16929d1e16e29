"""Per-connection warnings that a client cannot turn into a flood of log lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import structlog
import trio

__all__ = ["WARNINGS_PER_SECOND", "WarningLimiter"]

log = structlog.get_logger(__name__)

WARNINGS_PER_SECOND: Final = 5
"""Per-message warnings a connection logs in full per second; the rest are counted. A hook
that refuses every message would otherwise turn 50,000 tiny messages into 8 MB of log."""
_WINDOW: Final = 1.0


class WarningLimiter:
    """Logs a connection's first few per-message warnings each second, then counts them.

    The count is logged as one ``warnings_suppressed`` event (per event name, with
    ``count``) when the next second's first warning comes, or when ``flush`` is called (the
    connection closes). Warnings and errors alike go through ``warn``, each with the logger
    method that would have logged it.
    """

    __slots__ = ("_logged", "_suppressed", "_window_ends")

    def __init__(self) -> None:
        self._window_ends = -1.0
        self._logged = 0
        self._suppressed: dict[str, int] = {}

    def warn(self, emit: Callable[..., Any], event: str, **fields: Any) -> None:
        """``emit(event, **fields)`` if this second's allowance is not spent, else count it."""
        now = trio.current_time()
        if now >= self._window_ends:
            self.flush()
            self._window_ends = now + _WINDOW
            self._logged = 0
        if self._logged < WARNINGS_PER_SECOND:
            self._logged += 1
            emit(event, **fields)
        else:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1

    @property
    def suppressing(self) -> bool:
        """Whether warnings were counted, not logged, since the last ``flush``."""
        return bool(self._suppressed)

    @property
    def window_ends(self) -> float:
        """When this second's allowance ends (Trio clock)."""
        return self._window_ends

    def flush(self) -> None:
        """Log the counts of the warnings suppressed so far, one event per name."""
        if not self._suppressed:
            return
        suppressed, self._suppressed = self._suppressed, {}
        for event, count in suppressed.items():
            log.warning("warnings_suppressed", suppressed_event=event, count=count)
