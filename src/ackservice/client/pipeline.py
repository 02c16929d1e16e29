"""``Client.send_many``: feed payloads from any iterable, hand back receipts in order."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING

import trio

from ..errors import AckServiceError
from .message import Outgoing, Receipt
from .wakeup import Wakeup

if TYPE_CHECKING:
    from .connection import Client

__all__ = ["YIELD_EVERY", "Deliveries"]

YIELD_EVERY = 64
"""Receipts ready at once are handed out without a turn of Trio's scheduler each, but every
``YIELD_EVERY``-th still takes one, so that other tasks (the connection's reader and writer,
the feeder) run on while a consumer drains a large window."""


class Deliveries:
    """The async iterator of ``Receipt``\\ s returned by ``Client.send_many``.

    A feeder task (in the client's nursery, started by the first ``__anext__``) takes
    payloads from the source and submits them, staying at most ``window`` messages ahead
    of the receipts handed out; that bound is what lets a 10-million-line input stream.
    It is a class rather than an async generator so that no nursery or cancel scope is
    ever held open across a ``yield`` (Trio's rule for async generators).
    """

    def __init__(
        self, client: Client, payloads: Iterable[bytes] | AsyncIterable[bytes], window: int
    ) -> None:
        self._client = client
        self._payloads = payloads
        self._limit = 2 * window
        self._refill_below = self._limit - max(1, window // 2)
        self._pending: deque[Outgoing] = deque()
        self._room = Wakeup()  # the consumer took a receipt
        self._arrived = Wakeup()  # the feeder submitted a message or finished
        self._feeding: trio.CancelScope | None = None
        self._source_done = False
        self._source_error: Exception | None = None
        self._finished = False
        self._unyielded = 0  # receipts handed out since the last turn of the scheduler

    def __aiter__(self) -> Deliveries:
        return self

    async def __anext__(self) -> Receipt:
        if self._finished:
            raise StopAsyncIteration
        if self._feeding is None:
            self._feeding = trio.CancelScope()
            self._client._start_soon(self._feed)
        while not self._pending:
            if self._source_done:
                self._finished = True
                if self._source_error is not None:
                    raise self._source_error
                raise StopAsyncIteration
            await self._arrived.wait()
        message = self._pending[0]
        if message.done and self._unyielded < YIELD_EVERY:
            # Answered already (a read brings many replies): a cancel point, without a
            # turn of the scheduler per receipt, which cost more than the rest of the
            # client's work on a message together.
            self._unyielded += 1
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            self._unyielded = 0
            await message.wait()
        self._pending.popleft()
        if len(self._pending) <= self._refill_below:
            self._room.set()
        try:
            return message.receipt()
        except AckServiceError:
            self._stop()
            raise

    def take_answered(self) -> list[Receipt]:
        """The receipts that are ready now, in order, without waiting: for a consumer that
        was cancelled (Ctrl-C) and reports what had arrived before it leaves.

        Stops at the first message not answered yet (or failed), and stops the feeder.
        """
        self._stop()
        receipts: list[Receipt] = []
        while self._pending and self._pending[0].reply is not None:
            receipts.append(self._pending.popleft().receipt())
        return receipts

    async def aclose(self) -> None:
        """Stop taking payloads from the source; messages already taken may still go out."""
        self._stop()
        await trio.lowlevel.checkpoint()

    def _stop(self) -> None:
        self._finished = True
        if self._feeding is not None:
            self._feeding.cancel()

    async def _feed(self) -> None:
        assert self._feeding is not None
        with self._feeding:
            try:
                if isinstance(self._payloads, AsyncIterable):
                    async for payload in self._payloads:
                        await self._put(payload)
                else:
                    for payload in self._payloads:
                        await self._put(payload)
            except Exception as exc:
                # The source failed, or gave an invalid payload: the consumer gets this
                # after the receipts of everything taken before it.
                self._source_error = exc
        self._source_done = True
        self._arrived.set()

    async def _put(self, payload: bytes) -> None:
        """Submit one payload once there is room (after a client failure it fails at
        once, and the consumer raises that failure when it reaches it)."""
        if len(self._pending) >= self._limit:
            while len(self._pending) > self._refill_below:
                await self._room.wait()
        self._pending.append(self._client._submit(payload))
        self._arrived.set()
