"""Waiting for many sockets at once with one edge-triggered epoll set (Linux).

``trio.lowlevel.wait_readable`` registers a descriptor with ``EPOLLONESHOT``, so every wait
costs an ``epoll_ctl`` system call: profiling a server of many request/response clients put
it at ~20% of the CPU. Here each connection's socket is registered once, edge-triggered, in
an epoll set of our own; one dispatcher task waits for that set (one ``epoll_ctl`` per batch of
ready sockets, not per socket) and wakes the connection tasks whose sockets became readable.

A wait may carry a deadline, so a connection needs no cancel scope of its own for its idle
timeout (a scope and its cancel status are ~0.9 KiB per idle connection). Deadlines are kept
lazily, as connections push theirs later with every message: at most one timer per socket sits
in a heap, and when it fires a socket whose deadline has moved on is simply re-armed.

A waiting connection may also leave an ``Answerer`` (``set_answerer``): when its socket
becomes readable, the dispatcher calls it in place of waking the task, and the task goes on
waiting if it answered. A request/response client's message is then read, acknowledged and
answered without a task switch (Trio's reschedule, run-loop step and coroutine resume are
~3 µs of a ~15 µs round trip), and a pipelining client's read too, its replies written once
every socket of the round was read (``send_later``); anything else wakes the task as before.

Edge-triggered rules the callers must follow: wait only after a read came back short or with
``EAGAIN``, and when the events include ``EPOLLRDHUP``/``EPOLLHUP``/``EPOLLERR`` keep reading
until end of stream or ``EAGAIN``, since the end of stream may have arrived in the same edge as
the data. Events that arrive while no task waits are kept and returned by the next wait.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import select
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import outcome
import trio

__all__ = ["AVAILABLE", "END_EVENTS", "WOKEN", "Answerer", "ReadinessHub", "current_hub"]

AVAILABLE: Final = hasattr(select, "epoll")
END_EVENTS: Final = (
    getattr(select, "EPOLLRDHUP", 0)
    | getattr(select, "EPOLLHUP", 0)
    | getattr(select, "EPOLLERR", 0)
)
WOKEN: Final = 0
"""What a wait returns when it ended without input: its deadline passed, or ``wake`` was
called. Epoll reports at least one event bit otherwise."""

# Waits woken by their deadline per scheduling round. Connections that connected together
# time out together, and each then says goodbye (a final line, a half-close, a log event):
# 1,000 at once stalled every other client for tens of milliseconds.
_WAKE_BATCH: Final = 64
# Ready sockets taken per scheduling round. The dispatcher may read, answer and write each of
# them itself, so a round holds every other task (a signal's handler too) until it is done:
# with 200 pipelining connections in one round, SIGTERM took over 300 ms to close the listener
# on a busy machine. The rest stay in the epoll set's ready list for the next round.
_DISPATCH_BATCH: Final = 64
# Stale timer entries (of sockets since forgotten) tolerated beyond twice the live ones
# before the heap is rebuilt, as Trio does with its own deadlines: amortized O(1) per socket.
_STALE_TIMERS_KEPT: Final = 1000


class Answerer(Protocol):
    """Answers a waiting connection's input in the dispatcher, instead of its task."""

    def answer_waiting(self, later: list[Answerer]) -> float | None:
        """Read and answer what arrived, without waiting; return the wait's deadline (it goes
        on), or None to end the wait (the task then takes over whatever is left). Replies to
        be written after every other ready socket was read: append self to ``later``. Must
        not raise: an exception here would end the dispatcher."""
        ...

    def send_later(self) -> None:
        """Write the replies ``answer_waiting`` put off (it appended self to ``later``); what
        the socket does not take, or an error, goes to the task, which this then wakes. Must
        not raise."""
        ...


_HUB: trio.lowlevel.RunVar[ReadinessHub] = trio.lowlevel.RunVar("ackservice_readiness_hub")


def current_hub() -> ReadinessHub:
    """The hub of the current Trio run, started on first use as a system task."""
    try:
        return _HUB.get()
    except LookupError:
        hub = ReadinessHub()
        _HUB.set(hub)
        trio.lowlevel.spawn_system_task(hub.dispatch, name="ackservice readiness hub")
        return hub


class ReadinessHub:
    """One epoll set for many sockets; ``dispatch`` must run as a task for waits to end."""

    __slots__ = (
        "_aborts",
        "_answerers",
        "_armed",
        "_deadlines",
        "_epoll",
        "_pending",
        "_timer_scope",
        "_timers",
        "_waiters",
        "ended_fds",
    )

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._pending: dict[int, int] = {}
        self.ended_fds: set[int] = set()
        """Sockets whose end of stream (or an error) epoll has reported: input that came in
        the same edge must be read to the end, not waited for."""
        # Each registered fd's abort function for wait_task_rescheduled, made once.
        self._aborts: dict[int, Callable[[trio.lowlevel.RaiseCancelT], trio.lowlevel.Abort]] = {}
        # Deadlines of the waits in progress, and the timer heap: (when, fd) entries, at most
        # one live entry per fd, whose time is in _armed (any other entry for it is stale).
        self._deadlines: dict[int, float] = {}
        self._timers: list[tuple[float, int]] = []
        self._armed: dict[int, float] = {}
        self._timer_scope: trio.CancelScope | None = None
        self._answerers: dict[int, Answerer] = {}

    def register(self, fd: int) -> None:
        """Start watching ``fd``; data already waiting on it counts as the first edge."""
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._aborts[fd] = self._aborter(fd)

    def set_answerer(self, fd: int, answerer: Answerer) -> None:
        """Let ``answerer`` take the input of ``fd``'s waits from now on (see the module
        docstring); until ``fd`` is forgotten."""
        self._answerers[fd] = answerer

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it (its number may be reused)."""
        self.forget(fd)
        # Already closed (the kernel dropped it from the set), or the run is ending.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` without a system call, because it is about to be closed.

        Closing a descriptor removes it from the epoll set, but only if it is its file's
        last descriptor: use ``unregister`` for one that may have been duplicated.
        """
        self._pending.pop(fd, None)
        self.ended_fds.discard(fd)
        self._aborts.pop(fd, None)
        self._answerers.pop(fd, None)
        if self._armed.pop(fd, None) is None:
            return  # no timer of its own in the heap
        if len(self._timers) > _STALE_TIMERS_KEPT + 2 * len(self._armed):
            self._drop_stale_timers()

    def wait_readable(self, fd: int, deadline: float = math.inf) -> Awaitable[int]:
        """Wait until ``fd`` has new input; return the epoll events seen, or ``WOKEN``.

        ``WOKEN`` means ``deadline`` (Trio clock) passed or ``wake`` was called first. A
        checkpoint: it raises ``trio.Cancelled`` if cancelled, and events are never lost to a
        cancellation. Not a coroutine function, so a waiting connection keeps no frame here.
        """
        if fd in self._pending:
            return self._take_pending(fd)
        if deadline != math.inf:
            self._deadlines[fd] = deadline
            armed = self._armed.get(fd)
            if armed is None or deadline < armed:
                self._arm(fd, deadline)
        self._waiters[fd] = trio.lowlevel.current_task()
        # Handed to the caller to await: one coroutine frame fewer per waiting connection.
        return trio.lowlevel.wait_task_rescheduled(self._aborts[fd])  # noqa: ASYNC105

    def wake(self, fd: int) -> None:
        """End the wait on ``fd`` now, if there is one; it returns ``WOKEN``."""
        task = self._waiters.pop(fd, None)
        if task is not None:
            self._deadlines.pop(fd, None)
            trio.lowlevel.reschedule(task, outcome.Value(WOKEN))

    async def _take_pending(self, fd: int) -> int:
        # Trio's checkpoint pattern: raise if cancelled before taking the events (that call
        # yields only when it raises), then yield without being cancellable.
        await trio.lowlevel.checkpoint_if_cancelled()
        events = self._pending.pop(fd)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return events

    def _aborter(self, fd: int) -> Callable[[trio.lowlevel.RaiseCancelT], trio.lowlevel.Abort]:
        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            del self._waiters[fd]
            self._deadlines.pop(fd, None)
            return trio.lowlevel.Abort.SUCCEEDED

        return abort

    def _drop_stale_timers(self) -> None:
        """Rebuild the heap from the live timers: each closed connection leaves a stale
        entry, which would otherwise stay (and wake the dispatcher) for a whole idle timeout."""
        armed = self._armed
        self._timers[:] = [(when, fd) for when, fd in self._timers if armed.get(fd) == when]
        heapq.heapify(self._timers)

    def _arm(self, fd: int, when: float) -> None:
        self._armed[fd] = when
        heapq.heappush(self._timers, (when, fd))
        scope = self._timer_scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when

    def _fire_timers(self, now: float) -> None:
        """Wake the waits whose deadline has passed, at most ``_WAKE_BATCH`` (the rest wait
        for the next scheduling round); re-arm the ones that moved on."""
        timers = self._timers
        woken = 0
        while timers and timers[0][0] <= now and woken < _WAKE_BATCH:
            when, fd = heapq.heappop(timers)
            if self._armed.get(fd) != when:
                continue  # stale: the fd was forgotten or armed earlier since
            del self._armed[fd]
            deadline = self._deadlines.get(fd)
            if deadline is None:
                continue  # not waiting now; its next wait arms a timer again
            if deadline <= now:
                self.wake(fd)
                woken += 1
            else:
                self._arm(fd, deadline)

    async def dispatch(self) -> None:
        """Wake the tasks whose sockets became readable or whose deadlines passed; runs
        until the Trio run ends."""
        epfd = self._epoll.fileno()
        waiters = self._waiters
        pending = self._pending
        deadlines = self._deadlines
        ended = self.ended_fds
        answerers = self._answerers
        # Answerers whose replies are written once every ready socket was read: a write
        # wakes the peer, and waking it once per batch of sockets costs the kernel less.
        later: list[Answerer] = []
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                # The scope's deadline is the earliest live timer; _arm moves it earlier.
                timers = self._timers
                while timers and self._armed.get(timers[0][1]) != timers[0][0]:
                    heapq.heappop(timers)  # stale
                with trio.CancelScope() as self._timer_scope:
                    if timers:
                        self._timer_scope.deadline = timers[0][0]
                    while True:
                        await trio.lowlevel.wait_readable(epfd)
                        for fd, events in self._epoll.poll(0, _DISPATCH_BATCH):
                            task = waiters.get(fd)
                            if events & END_EVENTS:
                                ended.add(fd)  # the task reads to the end: not answered here
                            elif task is not None:
                                answerer = answerers.get(fd)
                                if answerer is not None:
                                    deadline = answerer.answer_waiting(later)
                                    if deadline is not None:  # answered: the wait goes on
                                        # A later deadline saves a wake-up (the timer then
                                        # re-arms); an earlier one (the connection's look at
                                        # its send queue, send_timeout after a message,
                                        # while the wait had only its idle deadline left)
                                        # needs a timer of its own, or it would wait for
                                        # the idle one.
                                        deadlines[fd] = deadline
                                        armed = self._armed.get(fd)
                                        if armed is None or deadline < armed:
                                            self._arm(fd, deadline)
                                        continue
                            if task is None:
                                pending[fd] = pending.get(fd, 0) | events
                            else:
                                del waiters[fd]
                                deadlines.pop(fd, None)
                                reschedule(task, outcome.Value(events))
                        if later:
                            for answerer in later:
                                answerer.send_later()
                            later.clear()
                self._timer_scope = None
                self._fire_timers(trio.current_time())
        finally:
            self._epoll.close()
