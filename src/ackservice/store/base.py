"""What a store is: the batch interface the server commits through, and what reads it back.

The server hands a store every message that arrived, from every connection, while the
previous commit ran (group commit), and sends each message's reply only after the store
answered for it. So an ``ACK`` means exactly what the store's answer means: for the SQLite
and JetStream stores, that the message is durably kept.

Embedders implement ``Store`` to make their own system the store; the per-message
``on_message`` hook is the slow, simple alternative (it is adapted to this interface).
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple, Protocol

from ..errors import AckServiceError

__all__ = [
    "Failed",
    "Message",
    "Rejected",
    "Store",
    "StoreError",
    "StoreReader",
    "StoreStats",
    "StoreUnavailable",
    "StoredMessage",
    "Unavailable",
    "Verdict",
]


class Message(NamedTuple):
    """One message for the store to keep: its payload and where it came from.

    A named tuple, not a dataclass: the server makes one per message on the hot path.
    """

    payload: bytes
    crc32: int
    """zlib's CRC-32 of ``payload`` (the one in its ACK)."""
    received_at: float
    """When the read carrying it completed, in seconds since the Unix epoch."""
    peer: str
    """The client's address, ``host:port`` (``[v6]:port``)."""
    conn_id: int
    """The server's number for the connection (unique per server run)."""
    seq: int
    """The message's sequence number on its connection (its ACK's seq)."""
    identity: str | None = None
    """The authenticated client (a TLS client certificate's subject), if any."""


class Rejected(NamedTuple):
    """The store refuses this message for good: ``ERR <seq> rejected <reason>``; the client
    must not resend it."""

    reason: str


class Unavailable(NamedTuple):
    """The store cannot take this message now: ``ERR <seq> unavailable <detail>``; it was not
    stored and is safe to resend later."""

    detail: str


class Failed(NamedTuple):
    """The store (or the application behind it) failed on this message:
    ``ERR <seq> internal-error <detail>``."""

    detail: str


Verdict = Rejected | Unavailable | Failed | None
"""A store's answer for one message; ``None`` means stored."""


class StoreError(AckServiceError):
    """A store could not be opened or used as configured (bad URL, unusable path, ...)."""


class StoreUnavailable(AckServiceError):
    """Raised by ``Store.store`` when it can keep none of the batch right now (disk full,
    database locked, NATS down): every message in it gets ``ERR <seq> unavailable``.

    ``detail`` is the text sent with it; anything else (``StoreUnavailable(exc)``, a common
    idiom) is taken as its ``str()``, since that text is what it means and the outage must
    still be an outage (clients resend ``unavailable``, not ``internal-error``).
    """

    def __init__(self, detail: str) -> None:
        detail = detail if isinstance(detail, str) else str(detail)
        super().__init__(detail)
        self.detail = detail


class Store(Protocol):
    """Where acknowledged messages are kept.

    The server calls ``store`` with one batch at a time (never two at once) and cancels a
    call that runs past its store timeout; the batch's messages are then answered
    ``unavailable``, so a cancelled call may still have stored them: delivery is
    at-least-once. ``aclose`` is called once, after the last batch.
    """

    @property
    def description(self) -> str:
        """Where messages go, for the start-up log (no secrets)."""
        ...

    async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        """Keep ``batch``; return once it is durable.

        ``batch`` is a sequence of ``Message``, often a ``MessageBatch`` (``store.batch``):
        index, slice or iterate it (as often as needed, also after returning), or read its
        ``runs`` (each one read's messages in columns) to avoid a ``Message`` per message.
        It is not a ``list``: ``batch == [...]`` is false and ``batch + [...]`` fails;
        compare or concatenate ``list(batch)``. Each index or iteration makes new
        ``Message`` tuples (equal, not the same objects). Do not change its ``runs``.

        Returns:
            ``None`` when every message was stored (the common case), else one ``Verdict``
            per message, in order.

        Raises:
            StoreUnavailable: none of the batch could be stored now.
        """
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


class StoredMessage(NamedTuple):
    """A message as read back from a store."""

    id: int
    """The store's position for it: increasing, never reused (a SQLite row id, a JetStream
    stream sequence); resume reading after the last one processed."""
    received_at: float
    peer: str
    conn_id: int
    seq: int
    crc32: int
    payload: bytes
    identity: str | None = None


class StoreStats(NamedTuple):
    """What a store holds."""

    messages: int
    stored_bytes: int
    """What the store holds for them: SQLite, the payloads; JetStream, the stream's bytes
    (headers included)."""
    first_id: int | None
    last_id: int | None
    first_received_at: float | None
    last_received_at: float | None


class StoreReader(Protocol):
    """Reads a store back (``python -m ackservice.store``)."""

    def messages(self, *, after: int = 0, follow: bool = False) -> AsyncIterator[StoredMessage]:
        """The stored messages with ``id > after``, in id order; with ``follow``, keep waiting
        for new ones instead of ending."""
        ...

    async def stats(self) -> StoreStats:
        """Count, bytes and the first and last message."""
        ...

    async def prune(self, *, before_id: int | None = None, older_than: float | None = None) -> int:
        """Delete messages with ``id < before_id`` and/or received more than ``older_than``
        seconds ago; return how many were deleted."""
        ...

    async def aclose(self) -> None:
        """Release the reader's resources."""
        ...
