"""Group commit: one store commit covers every message that arrived while the last one ran.

A connection hands the committer the messages of one read and waits for their verdicts; the
committer's task takes everything handed in since its previous commit, from every
connection, and stores it as one batch. So a busy server makes few, large commits (one fsync
for thousands of messages) and an idle one commits each read at once. A connection reads
nothing more until its messages are answered, and all connections wait before reading while
the bytes waiting for a commit exceed a bound: a slow store slows the clients down instead of
filling the server's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog
import trio

from ..store.base import Failed, Message, Store, StoreUnavailable, Unavailable, Verdict

__all__ = ["Committer", "GroupCommitter"]

log = structlog.get_logger(__name__)


class Committer(Protocol):
    """What a connection hands its messages to."""

    def has_room(self) -> bool:
        """Whether a connection may read more input now."""
        ...

    async def wait_for_room(self) -> None:
        """Wait until ``has_room``."""
        ...

    async def commit(self, messages: list[Message], nbytes: int) -> Sequence[Verdict] | None:
        """Store ``messages`` (``nbytes`` of payload); their verdicts, or None: all stored."""
        ...


class _Parcel:
    """One connection's messages waiting for a commit, and then their verdicts."""

    __slots__ = ("done", "messages", "nbytes", "verdicts")

    def __init__(self, messages: list[Message], nbytes: int) -> None:
        self.messages = messages
        self.nbytes = nbytes
        self.verdicts: Sequence[Verdict] | None = None
        self.done = trio.Event()


class GroupCommitter:
    """Commits the messages of many connections through ``store``, one batch at a time.

    ``run`` must be running (in a nursery that outlives the connections) for commits to
    happen; ``Server`` starts it.

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
        self._queue: list[_Parcel] = []
        self._pending_bytes = 0
        self._work = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._outage: _Outage | None = None
        self.commits = 0
        """Commits made so far (batches handed to the store)."""

    def has_room(self) -> bool:
        return self._pending_bytes < self._max_pending_bytes

    async def wait_for_room(self) -> None:
        while not self.has_room():
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    async def commit(self, messages: list[Message], nbytes: int) -> Sequence[Verdict] | None:
        parcel = _Parcel(messages, nbytes)
        self._queue.append(parcel)
        self._pending_bytes += nbytes
        self._work.set()
        # Shielded: once handed in, the messages may be stored whatever happens to this
        # connection, and the committer owns the parcel; a forced shutdown cancels the
        # committer itself, which then sets every parcel done.
        with trio.CancelScope(shield=True):
            await parcel.done.wait()
        return parcel.verdicts

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until cancelled; parcels still waiting then are answered
        ``unavailable`` (their connections are being cancelled too)."""
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._work = trio.Event()
                    await self._work.wait()
                parcels, self._queue = self._queue, []
                await self._commit(parcels)
        finally:
            for parcel in self._queue:
                parcel.verdicts = [Unavailable("server stopped before storing it")] * len(
                    parcel.messages
                )
                parcel.done.set()

    async def _commit(self, parcels: list[_Parcel]) -> None:
        batch = parcels[0].messages if len(parcels) == 1 else _joined(parcels)
        verdicts: Sequence[Verdict] | None
        try:
            verdicts = await self._store(batch)
        except BaseException:
            verdicts = [Unavailable("server stopped before storing it")] * len(batch)
            raise
        finally:
            self.commits += 1
            start = 0
            for parcel in parcels:
                end = start + len(parcel.messages)
                parcel.verdicts = None if verdicts is None else verdicts[start:end]
                start = end
                self._pending_bytes -= parcel.nbytes
                parcel.done.set()
            if self.has_room():
                self._room.set()

    async def _store(self, batch: list[Message]) -> Sequence[Verdict] | None:
        """The store's verdicts on ``batch``; every way it can fail becomes verdicts too."""
        failure: Verdict
        with trio.move_on_after(self._timeout) as scope:
            try:
                verdicts = await self.store.store(batch)
            except StoreUnavailable as exc:
                failure = Unavailable(exc.detail)
            except Exception as exc:
                # A bug in the store: its messages are not known to be kept. Logged once
                # per outage, with the traceback.
                failure = Failed("the store failed on this message")
                self._failed(batch, failure, exc)
                return [failure] * len(batch)
            else:
                if verdicts is not None and len(verdicts) != len(batch):
                    failure = Failed("the store answered for a different number of messages")
                    self._failed(batch, failure, None)
                    return [failure] * len(batch)
                self._recovered()
                return verdicts
        if scope.cancelled_caught:
            failure = Unavailable(f"store did not commit within {self._timeout:g} s")
        self._failed(batch, failure, None)
        return [failure] * len(batch)

    def _failed(self, batch: list[Message], failure: Verdict, exc: BaseException | None) -> None:
        if self._outage is None:
            self._outage = _Outage(trio.current_time())
            fields = {"store": self.store.description, "detail": getattr(failure, "detail", "")}
            if exc is None:
                log.error("store_unavailable", **fields)
            else:
                log.error("store_failed", **fields, exc_info=exc)
        self._outage.messages += len(batch)

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


class _Outage:
    __slots__ = ("messages", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.messages = 0


def _joined(parcels: list[_Parcel]) -> list[Message]:
    batch: list[Message] = []
    for parcel in parcels:
        batch += parcel.messages
    return batch
