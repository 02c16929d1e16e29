"""What the client knows about each message: the public ``Receipt`` and ``ClientStats``,
and the internal record of a message on its way."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..errors import AckServiceError
from ..protocol import Ack, Err, crc32, message_line

__all__ = ["ClientStats", "Outgoing", "Receipt"]


@dataclass(frozen=True, slots=True)
class Receipt:
    """The outcome of one message sent with ``Client.send_many``.

    Attributes:
        index: the message's position among everything this client was given to send
            (1-based; unlike the wire ``seq`` it does not start over on a new connection).
        payload: the bytes that were sent.
        reply: the verified ``Ack``, or the ``Err`` with which the server refused it (for
            ``unavailable``: the last such answer, once the retry budget ran out).
        rtt: seconds from the (last) write of the message to its reply.
        attempts: how many times it was written: more than 1 after a reconnect (the server
            may then have received it more than once) or an ``unavailable`` answer.
    """

    index: int
    payload: bytes
    reply: Ack | Err
    rtt: float
    attempts: int

    @property
    def acked(self) -> bool:
        """Whether the server acknowledged the message (rather than refusing it)."""
        return isinstance(self.reply, Ack)


@dataclass(slots=True)
class ClientStats:
    """Running totals of one client.

    Attributes:
        submitted: messages given to the client to send.
        sent: messages written at least once (each counted once).
        resent: extra writes of messages after a reconnect (possible duplicates).
        retried: extra writes of messages the server had answered ``unavailable`` (it did
            not keep them, so these are no duplicates).
        acked: messages acknowledged and verified.
        rejected: messages the server refused with ``ERR <seq>`` (final refusals only).
        unavailable: messages given up on because the server still answered
            ``unavailable`` when the retry budget ran out (neither acked nor rejected).
        connections: connections opened.
    """

    submitted: int = 0
    sent: int = 0
    resent: int = 0
    retried: int = 0
    acked: int = 0
    rejected: int = 0
    unavailable: int = 0
    connections: int = 0


class Outgoing:
    """A message from submission until its reply (or the client's failure) completes it."""

    __slots__ = (
        "_done_event",
        "attempts",
        "crc32",
        "failure",
        "first_unavailable_at",
        "index",
        "payload",
        "replied_at",
        "reply",
        "retry_pending",
        "sent_at",
        "unavailable_answers",
    )

    def __init__(self, index: int, payload: bytes) -> None:
        self.index = index
        self.payload = payload
        self.crc32 = crc32(payload)
        self.attempts = 0
        self.sent_at = 0.0
        self.replied_at = 0.0
        self.reply: Ack | Err | None = None
        self.failure: AckServiceError | None = None
        # ``unavailable`` answers so far, when the first came, and whether the next write
        # is a retry after one (not a possible duplicate, unlike a resend after a loss).
        self.unavailable_answers = 0
        self.first_unavailable_at: float | None = None
        self.retry_pending = False
        self._done_event: trio.Event | None = None

    @property
    def done(self) -> bool:
        """Whether a reply or a failure has completed this message."""
        return self.reply is not None or self.failure is not None

    def wire(self) -> bytes:
        """The bytes that carry this message, terminator included."""
        return message_line(self.payload)

    def complete(self, reply: Ack | Err, now: float) -> None:
        """The server answered this message."""
        self.reply = reply
        self.replied_at = now
        if self._done_event is not None:
            self._done_event.set()

    def fail(self, failure: AckServiceError) -> None:
        """The client gave up before this message was answered."""
        self.failure = failure
        if self._done_event is not None:
            self._done_event.set()

    async def wait(self) -> None:
        """Until the message is done (a checkpoint even if it already is)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        if self._done_event is None:
            self._done_event = trio.Event()
        await self._done_event.wait()

    def receipt(self) -> Receipt:
        """The receipt of a done message; raises the client's failure if it had one."""
        if self.reply is None:
            assert self.failure is not None, "receipt() of a message that is not done"
            # One failure is raised in every task waiting on the client; without the reset
            # each raise would append its frames to the tracebacks of all the others.
            raise self.failure.with_traceback(None)
        return Receipt(
            self.index, self.payload, self.reply, self.replied_at - self.sent_at, self.attempts
        )
