"""A group commit's messages as the server hands them to a store: by read, in columns.

A store's ``store(batch)`` takes a ``Sequence[Message]``, and these are sequences of
``Message`` like any other: a store that indexes or iterates gets ``Message`` tuples. They
exist because making those tuples, one per message, and taking them apart again cost more
than a third of the server's CPU per message pipelined into SQLite (2.29 -> 1.41 us per ACK
without them): a ``MessageRun`` keeps one read's
messages as columns (payloads, CRCs) plus what they share (the connection, the time, the
first seq), and a ``MessageBatch`` the runs of one commit; a store that knows them (SQLite
writes a commit's runs into one row) reads ``MessageBatch.runs`` instead. Nothing here does I/O.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, chain, count, islice, repeat
from operator import attrgetter
from typing import overload

from .base import Message

__all__ = ["MessageBatch", "MessageRun"]

_payloads_of = attrgetter("payloads")
_new_message: Callable[[tuple[object, ...]], Message] = functools.partial(tuple.__new__, Message)


class MessageRun(Sequence[Message]):
    """Messages ``first_seq``, ``first_seq + 1``, ... of one connection, read together:
    ``payloads[i]`` with CRC-32 ``crc32s[i]`` is message ``first_seq + i``.

    The columns are kept, not copied: once the run is handed to a store they must not
    change (a store may still read them after a cancelled call, and the SQLite store
    refuses a run whose columns no longer match)."""

    __slots__ = ("conn_id", "crc32s", "first_seq", "identity", "payloads", "peer", "received_at")

    def __init__(
        self,
        payloads: list[bytes],
        crc32s: list[int],
        received_at: float,
        peer: str,
        conn_id: int,
        first_seq: int,
        identity: str | None = None,
    ) -> None:
        if len(payloads) != len(crc32s):
            raise ValueError("a run needs one CRC-32 per payload")
        self.payloads = payloads
        self.crc32s = crc32s
        self.received_at = received_at
        self.peer = peer
        self.conn_id = conn_id
        self.first_seq = first_seq
        self.identity = identity

    def __len__(self) -> int:
        return len(self.payloads)

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return list(islice(self.tail(start), max(0, stop - start)))
            return [self[i] for i in range(start, stop, step)]
        i = range(len(self.payloads))[index]  # negative indices, and IndexError, as a list
        return Message(
            self.payloads[i],
            self.crc32s[i],
            self.received_at,
            self.peer,
            self.conn_id,
            self.first_seq + i,
            self.identity,
        )

    def tail(self, skip: int) -> MessageRun:
        """The run without its first ``skip`` messages (itself when ``skip`` is 0)."""
        if not skip:
            return self
        return MessageRun(
            self.payloads[skip:],
            self.crc32s[skip:],
            self.received_at,
            self.peer,
            self.conn_id,
            self.first_seq + skip,
            self.identity,
        )

    def __iter__(self) -> Iterator[Message]:
        # No Python call per message: the named tuple's own constructor is a Python function.
        return map(
            _new_message,
            zip(
                self.payloads,
                self.crc32s,
                repeat(self.received_at),
                repeat(self.peer),
                repeat(self.conn_id),
                count(self.first_seq),
                repeat(self.identity),
            ),
        )


class MessageBatch(Sequence[Message]):
    """The messages of ``runs``, one run after the other."""

    __slots__ = ("_ends", "runs")

    def __init__(self, runs: list[MessageRun]) -> None:
        self.runs = runs
        # Where each run ends in the batch; the lengths of the payload lists, not len(run):
        # no Python call per run.
        self._ends = list(accumulate(map(len, map(_payloads_of, runs))))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:  # a store's chunks (JetStream's): made in C, not one call each
                return self._chunk(start, stop) if start < stop else []
            return [self[i] for i in range(start, stop, step)]
        i = range(len(self))[index]
        run = bisect_right(self._ends, i)
        return self.runs[run][i - (self._ends[run - 1] if run else 0)]

    def __iter__(self) -> Iterator[Message]:
        return chain.from_iterable(self.runs)

    def _chunk(self, start: int, stop: int) -> list[Message]:
        """``self[start:stop]`` (``0 <= start < stop <= len(self)``), starting at the run
        holding ``start``: no ``Message`` is made for what comes before it (iterating from
        the batch's start made slicing a batch in chunks quadratic)."""
        run = bisect_right(self._ends, start)
        first = self.runs[run].tail(start - (self._ends[run - 1] if run else 0))
        runs = chain((first,), islice(self.runs, run + 1, None))
        return list(islice(chain.from_iterable(runs), stop - start))


def joined(parts: Sequence[Sequence[Message]]) -> Sequence[Message]:
    """``parts`` one after the other: a ``MessageBatch`` when every part is a run (no
    message is made), else a list."""
    if all(type(part) is MessageRun for part in parts):
        return MessageBatch(list(parts))  # type: ignore[arg-type]  # all runs, just checked
    batch: list[Message] = []
    for part in parts:
        batch += part
    return batch
