"""One dedicated thread running a store's blocking calls for Trio, one at a time, in order.

``trio.to_thread.run_sync`` does more per call than a store that makes one blocking call
after another needs: it takes a capacity limiter, copies the context, and names the cached
thread after the call and back (two ``prctl`` system calls through ctypes). For the SQLite
store, whose every commit is such a call, that was 4% of the server's CPU per message
under request/response load (one commit per round of 64 messages; docs/benchmarks.md).
Here a call is a queue put, a wake-up of the thread, and one ``run_sync_soon`` back.

The calls run in the order they were made, each after the previous one returned, also when
a caller stopped waiting for its call (``abandon_on_cancel``): what the store's
``CapacityLimiter(1)`` guaranteed before.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["SerialThread"]

T = TypeVar("T")


class SerialThread:
    """A thread that runs ``run``'s calls one after the other; ``close`` ends it.

    A daemon thread, as Trio's own: a call that never returns (a hung file system) does not
    keep the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False) -> T:
        """``fn(*args)`` in the thread, once every call made before it has returned; what it
        returns or raises.

        Cancelled while it runs: with ``abandon_on_cancel``, ``trio.Cancelled`` at once, and
        the call goes on in the thread, its result dropped; without, the call's result
        (cancellation then comes at the next checkpoint).

        Raises:
            RuntimeError: the thread was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("the thread was closed")
        return await self._wait(self._submit(fn, args), abandon_on_cancel=abandon_on_cancel)

    async def run_last(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` as the thread's last call, then ``close``; what it returns or raises.

        Queued even when the caller is cancelled already, unlike ``run``: what closes a
        resource must run whatever the caller's state (a shutdown in a cancelled scope), or
        nothing could close it any more. Waited for as ``run`` with ``abandon_on_cancel``.

        Raises:
            RuntimeError: the thread was closed.
        """
        if self._closed:
            raise RuntimeError("the thread was closed")
        call = self._submit(fn, args)
        self.close()
        return await self._wait(call, abandon_on_cancel=True)

    def _submit(self, fn: Callable[..., T], args: tuple[object, ...]) -> _Call[T]:
        call = _Call(fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        self._calls.put(call)
        return call

    async def _wait(self, call: _Call[T], *, abandon_on_cancel: bool) -> T:
        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if not abandon_on_cancel:
                return trio.lowlevel.Abort.FAILED
            call.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called: no more calls are taken."""
        return self._closed

    def close(self) -> None:
        """End the thread once the calls already made have run (idempotent)."""
        if not self._closed:
            self._closed = True
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            result = outcome.capture(call.fn, *call.args)
            # The Trio run that made the call may be over: then nobody is waiting.
            with contextlib.suppress(trio.RunFinishedError):
                call.token.run_sync_soon(call.deliver, result)


class _Call(Generic[T]):
    __slots__ = ("abandoned", "args", "fn", "task", "token")

    def __init__(
        self,
        fn: Callable[..., T],
        args: tuple[object, ...],
        token: trio.lowlevel.TrioToken,
        task: trio.lowlevel.Task,
    ) -> None:
        self.fn = fn
        self.args = args
        self.token = token
        self.task = task
        self.abandoned = False
        """Set in Trio's thread, read there too (``deliver``): no lock needed."""

    def deliver(self, result: outcome.Outcome[T]) -> None:
        """In Trio's thread: wake the caller with ``result``, unless it stopped waiting."""
        if not self.abandoned:
            trio.lowlevel.reschedule(self.task, result)
