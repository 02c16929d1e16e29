"""A reusable wake-up signal for one waiting task."""

from __future__ import annotations

import trio

__all__ = ["Wakeup"]


class Wakeup:
    """Like ``trio.Event``, but ``wait`` re-arms it, so one task can wait again and again.

    A ``set()`` that comes before the ``wait()`` is not lost: the next wait returns at
    once. Waiters always re-check their condition after waking, so spurious wake-ups are
    harmless. Meant for a single waiting task at a time.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        """Wake the waiter (or the next one to wait)."""
        self._event.set()

    async def wait(self) -> None:
        """Until ``set()`` is called (or has been since the last wait returned)."""
        await self._event.wait()
        self._event = trio.Event()
