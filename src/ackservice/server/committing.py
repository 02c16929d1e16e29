"""Group commit: one store commit covers every message that arrived while the last one ran.

A connection hands the committer the messages of one read and waits for their verdicts.
There is no committer task: the connections take turns leading (the leader/follower scheme
of MySQL's binary-log group commit). A connection that finds no commit running commits
itself, in its own task, everything queued so far; connections arriving meanwhile queue
their messages and wait; when the commit ends, the leader answers them all and hands the
lead to the oldest one still queued, whose commit then covers everything queued while the
last ran. So a busy server makes few, large commits (one fsync for thousands of messages),
a lone client's message is committed at once, and no hop through another task adds to any
message's latency.

A connection reads nothing more until its messages are answered, and all connections wait
before reading while the bytes waiting for a commit exceed a bound: a slow store slows the
clients down instead of filling the server's memory.

A parcel may also come without a waiting task: the readiness hub's dispatcher reads a
connection's request and queues it (``enqueue``) while the connection's task goes on
waiting, so that a message that commits wakes no task at all. Such a parcel has an
``owner``, told when its verdicts are in (``answered``, called by the leader, which may
write the ACKs there and then) or when it is its turn to lead (``lead``: the owner wakes
its task, which then calls ``lead`` here).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final, Protocol

import outcome
import structlog
import trio

from ..store.base import (
    Failed,
    Message,
    Rejected,
    Store,
    StoreUnavailable,
    Unavailable,
    Verdict,
)
from ..store.batch import joined
from .ratelimit import WarningLimiter

__all__ = [
    "COMMIT_SECONDS_BUCKETS",
    "Committer",
    "GroupCommitter",
    "LatencyHistogram",
    "Parcel",
    "ParcelOwner",
]

log = structlog.get_logger(__name__)

# The longest a leader waits for the connections just answered to come back (see _gather).
_MAX_GATHER_WAIT: Final = 0.002


class Committer(Protocol):
    """What a connection hands its messages to."""

    def has_room(self) -> bool:
        """Whether a connection may read more input now."""
        ...

    async def wait_for_room(self) -> None:
        """Wait until ``has_room``."""
        ...

    async def commit(
        self, messages: Sequence[Message], nbytes: int, warnings: WarningLimiter | None = None
    ) -> Sequence[Verdict] | None:
        """Store ``messages`` (``nbytes``: their payloads plus a per-message overhead, what
        they hold in memory); their verdicts, or None: all stored.

        ``warnings``: the connection's limiter, for any per-message warning logged."""
        ...


class ParcelOwner(Protocol):
    """Who queued a parcel without a task waiting for it (``GroupCommitter.enqueue``)."""

    def answered(self, parcel: Parcel, now: float) -> None:
        """``parcel.verdicts`` are in (called in the leader's task, ``now`` being
        ``trio.current_time()``, taken once for every parcel of the commit; must not
        raise)."""
        ...

    def lead(self, parcel: Parcel) -> bool:
        """It is ``parcel``'s turn to lead: have a task call ``GroupCommitter.lead(parcel)``.
        False if nobody can any more (the connection is gone): the parcel is dropped."""
        ...


class Parcel:
    """One connection's messages waiting for a commit, and then their verdicts."""

    __slots__ = ("messages", "nbytes", "owner", "task", "verdicts")

    def __init__(
        self, messages: Sequence[Message], nbytes: int, owner: ParcelOwner | None = None
    ) -> None:
        self.messages = messages
        self.nbytes = nbytes
        self.verdicts: Sequence[Verdict] | None = None
        self.task: trio.lowlevel.Task | None = None
        """The connection's task while it waits, to be rescheduled when answered."""
        self.owner = owner
        """Told instead, for a parcel queued without a task (see ``enqueue``)."""


COMMIT_SECONDS_BUCKETS: Final = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds of the commit latency histogram: an fsync on an SSD takes ~0.5-2 ms, a
JetStream PubAck a few ms, and --store-timeout defaults to 5 s."""


class LatencyHistogram:
    """Plain counts per bucket, for a Prometheus histogram rendered at scrape time: one
    ``observe`` per commit (not per message) costs a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = COMMIT_SECONDS_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


# What a waiting parcel's task is woken with: its verdicts are in, or it is to lead.
_ANSWERED: Final = False
_LEAD: Final = True


def _refuse_abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    """A queued parcel's wait cannot be cancelled: once queued, its messages may be stored
    whatever happens to the connection, and the leader answers every parcel it took, even
    when cancelled (a cancel scope with ``shield=True`` per wait would cost ~4 us each)."""
    return trio.lowlevel.Abort.FAILED


class GroupCommitter:
    """Commits the messages of many connections through ``store``, one batch at a time.

    Args:
        store: where messages are kept.
        timeout: seconds a commit may take; past it the batch is answered ``unavailable``.
        max_pending_bytes: payload bytes waiting for or in a commit, beyond which connections
            stop reading.
    """

    def __init__(self, store: Store, *, timeout: float, max_pending_bytes: int) -> None:
        self.store = store
        self._timeout = timeout
        self._max_pending_bytes = max_pending_bytes
        self._queue: list[Parcel] = []
        self._pending_bytes = 0
        self._leading = False
        self._room = trio.Event()
        self._room.set()
        # Gathering (see _gather): how many parcels the next commit should wait for.
        self._expected = 0
        self._last_duration = 0.0
        self._gathered: trio.Event | None = None
        self._outage: _Outage | None = None
        self.commits = 0
        """Commits made so far (batches handed to the store)."""
        self.latency = LatencyHistogram()
        """How long each commit's store call took (the answers written after it not
        included; a commit cancelled by shutdown not counted)."""
        self.outages = 0
        """Outages so far: runs of failed commits, each logged as one store_unavailable."""

    @property
    def available(self) -> bool:
        """Whether the store takes messages now: the last commit worked and the store does
        not say it is disconnected (a JetStream store knows before any commit fails).

        An outage whose last failure came while the store said it was disconnected ends
        here once the store says it is connected again, before any commit: /readyz must
        turn ready without traffic, since a load balancer sends none to a server not ready.
        """
        store_connected: bool = getattr(self.store, "available", True)
        if self._outage is None:
            return store_connected
        return store_connected and self._outage.store_said_disconnected

    def has_room(self) -> bool:
        return self._pending_bytes < self._max_pending_bytes

    async def wait_for_room(self) -> None:
        while not self.has_room():
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    async def commit(
        self, messages: Sequence[Message], nbytes: int, warnings: WarningLimiter | None = None
    ) -> Sequence[Verdict] | None:
        parcel = Parcel(messages, nbytes)
        if self._add(parcel):
            parcel.task = trio.lowlevel.current_task()
            to_lead = await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
            if not to_lead:
                return parcel.verdicts
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        return await self._lead(parcel)

    def enqueue(self, messages: Sequence[Message], nbytes: int, owner: ParcelOwner) -> Parcel:
        """Queue ``messages`` for the next commit without a task waiting for them; ``owner``
        is told when they are answered, or when to lead (see the module docstring).

        If no commit is running, the caller must lead at once (``leading`` is then its
        parcel's): it is not told through ``owner.lead``, as it is the one asking.
        """
        parcel = Parcel(messages, nbytes, owner)
        if not self._add(parcel):
            self._leading = True  # the caller's task leads, once it runs
            self.leading = parcel
        return parcel

    def _add(self, parcel: Parcel) -> bool:
        """Queue ``parcel``; whether a commit runs (or its leader was told to begin), so that
        ``parcel`` waits for the next one."""
        self._queue.append(parcel)
        self._pending_bytes += parcel.nbytes
        if not self._leading:
            return False
        gathered = self._gathered
        if gathered is not None and len(self._queue) >= self._expected:
            gathered.set()  # the leader gathering its commit (_gather) has all it waits for
        return True

    leading: Parcel | None = None
    """A queued parcel whose owner was told to lead and has not begun yet."""

    async def lead(self, parcel: Parcel) -> Sequence[Verdict] | None:
        """Lead the commit ``parcel``'s owner was told to lead; its verdicts."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self._lead(parcel)

    def withdraw(self, parcel: Parcel) -> None:
        """Take back a parcel queued by ``enqueue`` whose connection is gone, unless a commit
        took it already (its owner is then answered, and writes nothing)."""
        if parcel in self._queue:
            self._queue.remove(parcel)
            self._release(parcel.nbytes)
        if self.leading is parcel:  # it was to lead: someone else must
            self.leading = None
            self._hand_on()

    async def _lead(self, own: Parcel) -> Sequence[Verdict] | None:
        """Commit everything queued (``own`` included), then hand the lead on."""
        self._leading = True
        self.leading = None
        try:
            await self._gather()
            parcels, self._queue = self._queue, []
            started = trio.current_time()
            await self._commit(parcels, own)
            self._last_duration = trio.current_time() - started
            # The connections just answered are likely to send again: the next commit waits
            # (briefly) until as many are queued as this one answered plus those already
            # queued behind it.
            self._expected = len(parcels) + len(self._queue)
        finally:
            self._hand_on()
        return own.verdicts

    def _hand_on(self) -> None:
        """Make the oldest queued parcel's connection the next leader, if any is queued;
        newcomers queue behind it until it runs."""
        self._leading = False
        while self._queue:
            successor = self._queue[0]
            self._leading = True
            if successor.owner is None:
                _wake(successor, _LEAD)
                return
            self.leading = successor
            if successor.owner.lead(successor):
                return
            # Its connection is gone: nothing can be answered, and it asked for nothing yet.
            self.leading = None
            self._queue.pop(0)
            self._release(successor.nbytes)
            self._leading = False

    def _release(self, nbytes: int) -> None:
        self._pending_bytes -= nbytes
        if self.has_room():
            self._room.set()

    async def _gather(self) -> None:
        """Wait, briefly, for the connections just answered to send again.

        Without this, request/response clients split into two cohorts: the ones answered by
        a commit send their next message while the next commit (of the others) already
        runs, so each waits for two commits and each commit holds half of them. Waiting
        until as many parcels are queued as the last commit answered, plus those queued
        behind it, but never longer than half what the last commit took, lets one commit
        serve them all (PostgreSQL's commit_delay is the same idea). A client that does not
        come back costs at most that half commit of latency; a lone client, nothing.
        Shielded: it is short, and a leader must not be cancelled before it took its batch.
        """
        if len(self._queue) >= self._expected:
            return
        self._gathered = trio.Event()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(min(self._last_duration / 2, _MAX_GATHER_WAIT)):
                await self._gathered.wait()
        self._gathered = None

    async def _commit(self, parcels: list[Parcel], leader: Parcel) -> None:
        """Store the parcels' messages as one batch and answer every parcel, even when
        cancelled (then with ``unavailable``)."""
        batch = joined([parcel.messages for parcel in parcels])
        verdicts: Sequence[Verdict] | None
        started = trio.current_time()
        try:
            verdicts = await self._store(batch)
        except BaseException:
            verdicts = [Unavailable("server stopped before storing it")] * len(batch)
            raise
        else:
            # The store's own time, not the answers written after it: what an operator
            # looking at commit latency is after (is the disk, or NATS, slow?).
            self.latency.observe(trio.current_time() - started)
        finally:
            self.commits += 1
            if verdicts is not None:  # else every parcel's stay None: all stored
                start = 0
                for parcel in parcels:
                    end = start + len(parcel.messages)
                    parcel.verdicts = verdicts[start:end]
                    start = end
            now = trio.current_time()
            for parcel in parcels:
                self._pending_bytes -= parcel.nbytes
                if parcel is leader:
                    continue
                if parcel.owner is None:
                    _wake(parcel, _ANSWERED)
                    continue
                try:
                    parcel.owner.answered(parcel, now)
                except Exception:  # a bug there must not leave the other parcels unanswered
                    log.exception("parcel_owner_failed")
            if self.has_room():
                self._room.set()

    async def _store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        """The store's verdicts on ``batch``; every way it can fail becomes verdicts too."""
        failure: Verdict
        with trio.move_on_after(self._timeout) as scope:
            try:
                verdicts = await self.store.store(batch)
            except StoreUnavailable as exc:
                failure = Unavailable(exc.detail)
            except (Exception, SystemExit) as exc:
                # A bug in the store: its messages are not known to be kept. Logged once
                # per outage, with the traceback. SystemExit too, as from a hook (hook.py):
                # one store's sys.exit must not end the application embedding the server;
                # Trio's Cancelled and KeyboardInterrupt still propagate.
                failure = Failed("the store failed on this message")
                self._failed(batch, failure, exc)
                return [failure] * len(batch)
            else:
                if verdicts is not None:
                    wrong = _wrong_answer(verdicts, len(batch))
                    if wrong is not None:
                        # A store bug like an exception, logged as one, though with no
                        # traceback: the connection would otherwise fail on it with no
                        # reply at all (an AssertionError or TypeError from our code).
                        failure = Failed(wrong)
                        self._failed(batch, failure, None, store_bug=True)
                        return [failure] * len(batch)
                    if not isinstance(verdicts, list | tuple):
                        # Any Sequence is an answer (a deque, say), but _commit slices it.
                        verdicts = list(verdicts)
                self._recovered()
                return verdicts
        if scope.cancelled_caught:
            failure = Unavailable(f"store did not commit within {self._timeout:g} s")
        self._failed(batch, failure, None)
        return [failure] * len(batch)

    def _failed(
        self,
        batch: Sequence[Message],
        failure: Verdict,
        exc: BaseException | None,
        *,
        store_bug: bool = False,
    ) -> None:
        if self._outage is None:
            self._outage = _Outage(trio.current_time())
            self.outages += 1
            fields = {"store": self.store.description, "detail": getattr(failure, "detail", "")}
            if exc is not None:
                log.error("store_failed", **fields, exc_info=exc)
            elif store_bug:
                log.error("store_failed", **fields)
            else:
                log.error("store_unavailable", **fields)
        self._outage.messages += len(batch)
        self._outage.store_said_disconnected = not getattr(self.store, "available", True)

    def _recovered(self) -> None:
        outage = self._outage
        if outage is None:
            return
        self._outage = None
        log.info(
            "store_recovered",
            store=self.store.description,
            unavailable_for=round(trio.current_time() - outage.started, 3),
            messages_refused=outage.messages,
        )


def _wrong_answer(verdicts: object, expected: int) -> str | None:
    """What is wrong with a store's answer, if it is not one ``Verdict`` per message.

    Checked here, once per commit that has verdicts (rare: most return ``None``), so that
    the connections can trust every verdict they are handed.
    """
    if not isinstance(verdicts, Sequence) or isinstance(verdicts, str | bytes):
        return "the store's answer was not a sequence of verdicts"
    if len(verdicts) != expected:
        return "the store answered for a different number of messages"
    for verdict in verdicts:
        if verdict is None:
            continue
        # Its text goes into an ERR line: anything but str would fail there, in the
        # connection, on the way to the client.
        if not isinstance(verdict, _VERDICT_TYPES) or not isinstance(verdict[0], str):
            return "the store's answer held something other than a verdict"
    return None


_VERDICT_TYPES: Final = (Rejected, Unavailable, Failed)


class _Outage:
    __slots__ = ("messages", "started", "store_said_disconnected")

    def __init__(self, started: float) -> None:
        self.started = started
        self.messages = 0
        # Whether the store said it was disconnected at the latest failure: then its
        # reconnecting ends the outage for `available`; else only a working commit does.
        self.store_said_disconnected = False


def _wake(parcel: Parcel, to_lead: bool) -> None:
    task, parcel.task = parcel.task, None
    assert task is not None
    trio.lowlevel.reschedule(task, outcome.Value(to_lead))  # an outcome is unwrapped once
