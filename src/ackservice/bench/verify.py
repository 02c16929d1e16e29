"""Checking every reply, sans-IO: reply bytes in, counts and latencies out.

The fast path does not parse at all. The replies that correct answers would produce are
known in advance (``PayloadPool.expected``), so a read's complete lines are compared with
them in one ``bytes`` comparison and, when equal, counted by their newlines. Only when the
comparison fails does the checker go line by line and let ``protocol.parse_reply`` say what
went wrong (a seq, a length, a CRC, an ``ERR``, garbage), so the wire format is still parsed
in one place only.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

from ..errors import ProtocolError
from ..protocol import MAX_REPLY_LINE_BYTES, Ack, Err, parse_reply
from .histogram import LatencyHistogram

__all__ = ["ERROR_KINDS", "ReplyChecker", "Tally"]

ERROR_KINDS: Final = (
    "format",  # a reply line that is not a well-formed ACK or ERR line (or a broken one)
    "seq",  # an ACK for another message than the one due
    "nbytes",  # the right seq, the wrong length
    "crc",  # the right seq and length, the wrong checksum
    "err_reply",  # an ERR line (per message or ERR 0); err_codes says which codes
    "unexpected",  # a reply when no message was waiting for one
    "connect",  # a connection attempt failed (refused, timed out)
    "connection",  # an open connection broke or was closed by the server mid-run
    "timeout",  # messages with no reply within the reply timeout
    "lost",  # messages waiting for a reply when their connection ended
    "noclose",  # the server did not close after our end of stream, within the timeout
)


class Tally:
    """The counters and the latency histogram of one load generator process.

    A latency is recorded for each correctly answered message whose origin (send time in
    closed loop, scheduled time in open loop) falls in the measurement window; ``acks``
    counts correct replies received inside the window, for throughput.
    """

    __slots__ = (
        "acks",
        "connections",
        "err_codes",
        "errors",
        "histogram",
        "last_ack",
        "replies",
        "sent",
        "window_end",
        "window_start",
    )

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()
        self.window_start = math.inf
        self.window_end = math.inf
        self.acks = 0
        self.last_ack = -math.inf
        self.replies = 0
        self.sent = 0
        self.connections = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.err_codes: dict[str, int] = {}

    @property
    def error_total(self) -> int:
        """All errors, of every kind."""
        return sum(self.errors.values())

    def count_err_code(self, code: str) -> None:
        """Count one ``ERR`` line with this code."""
        self.errors["err_reply"] += 1
        self.err_codes[code] = self.err_codes.get(code, 0) + 1


class ReplyChecker:
    """Matches one connection's reply stream against the messages sent on it, in order.

    ``expect`` registers messages as they are sent; ``absorb`` takes whatever the transport
    delivered. Each reply line answers the oldest outstanding message, right or wrong, as
    the protocol matches replies by order; an ``ERR 0`` line answers none (the server is
    about to close the connection).
    """

    __slots__ = ("_batches", "_expected", "_partial", "_tally", "closed_by_server", "outstanding")

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._expected = bytearray()  # the correct replies of the outstanding messages
        self._partial = b""  # an incomplete reply line
        self._batches: deque[_Batch] = deque()
        self.outstanding = 0
        self.closed_by_server: str | None = None  # the code of an ERR 0 line

    def expect(
        self, replies: bytes, count: int, origin: float, sent_at: float, spacing: float = 0.0
    ) -> None:
        """Register ``count`` messages just sent, whose correct replies are ``replies``."""
        self._expected += replies
        self.outstanding += count
        self._batches.append(_Batch(origin, count, sent_at, spacing))

    @property
    def oldest_sent_at(self) -> float | None:
        """When the oldest message still waiting for its reply was sent, if any."""
        return self._batches[0].sent_at if self._batches else None

    def absorb(self, data: bytes | bytearray, now: float) -> None:
        """Check the replies in ``data`` (any chunk of the stream), received at ``now``.

        Raises:
            ProtocolError: a reply line grew beyond ``MAX_REPLY_LINE_BYTES`` (counted as a
                ``format`` error by the caller, which should drop the connection).
        """
        if isinstance(data, bytearray):
            data = bytes(data)
        if self._partial:
            data = self._partial + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self._partial = data[end:]
            if len(self._partial) > MAX_REPLY_LINE_BYTES:
                raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE_BYTES} bytes")
            if end == 0:
                return
            data = data[:end]
        else:
            self._partial = b""
        if self._expected.startswith(data):
            del self._expected[:end]
            self._settle(data.count(b"\n"), now, correct=True)
        else:
            for line in data.split(b"\n")[:-1]:
                self._check_line(line, now)

    def at_eof(self) -> None:
        """The server closed its side: a reply line cut short is a format error."""
        if self._partial:
            self._partial = b""
            self._tally.errors["format"] += 1

    def abandon(self) -> int:
        """Give up on every outstanding message (the connection is over); return how many."""
        count = self.outstanding
        self.outstanding = 0
        self._batches.clear()
        self._expected.clear()
        return count

    def _check_line(self, line: bytes, now: float) -> None:
        tally = self._tally
        if self.outstanding == 0 or self.closed_by_server is not None:
            reply = _parse(line)
            if isinstance(reply, Err) and reply.is_connection_error:
                self._connection_closing(reply)
            else:
                tally.errors["unexpected"] += 1
            return
        end = self._expected.find(b"\n")
        wanted = bytes(self._expected[:end])
        correct = line == wanted
        if not correct:
            reply = _parse(line)
            if isinstance(reply, Err) and reply.is_connection_error:
                self._connection_closing(reply)  # answers no message
                return
            tally.errors[_mismatch(reply, wanted, tally)] += 1
        del self._expected[: end + 1]
        self._settle(1, now, correct=correct)

    def _connection_closing(self, reply: Err) -> None:
        self._tally.count_err_code(reply.code)
        self.closed_by_server = reply.code

    def _settle(self, count: int, now: float, *, correct: bool) -> None:
        """The ``count`` oldest outstanding messages got their replies at ``now``."""
        tally = self._tally
        self.outstanding -= count
        start = tally.window_start
        end = tally.window_end
        if correct:
            tally.replies += count
            if start <= now < end:
                tally.acks += count
                tally.last_ack = now
        record = tally.histogram.record if correct else None
        batches = self._batches
        while count:
            batch = batches[0]
            origin = batch.origin
            size = batch.count
            spacing = batch.spacing
            take = size if size <= count else count
            if record is not None:
                if not spacing:
                    if start <= origin < end:
                        record(int((now - origin) * 1e9), take)
                else:
                    for k in range(take):
                        scheduled = origin + k * spacing
                        if start <= scheduled < end:
                            record(int((now - scheduled) * 1e9))
            if take == size:
                batches.popleft()
            else:
                batch.origin = origin + take * spacing
                batch.count = size - take
            count -= take


class _Batch:
    """``count`` messages sent together at ``sent_at``; the first one's latency is measured
    from ``origin``, each next one's from ``spacing`` seconds later (open loop)."""

    __slots__ = ("count", "origin", "sent_at", "spacing")

    def __init__(self, origin: float, count: int, sent_at: float, spacing: float) -> None:
        self.origin = origin
        self.count = count
        self.sent_at = sent_at
        self.spacing = spacing


def _parse(line: bytes) -> Ack | Err | None:
    try:
        return parse_reply(line)
    except ProtocolError:
        return None


def _mismatch(reply: Ack | Err | None, wanted: bytes, tally: Tally) -> str:
    """The error kind of ``reply`` where the line ``wanted`` was due (ERR lines counted)."""
    if reply is None:
        return "format"
    if isinstance(reply, Err):
        tally.err_codes[reply.code] = tally.err_codes.get(reply.code, 0) + 1
        return "err_reply"
    due = parse_reply(wanted)
    assert isinstance(due, Ack)  # our own expected lines are ACK lines
    if reply.seq != due.seq:
        return "seq"
    if reply.nbytes != due.nbytes:
        return "nbytes"
    if reply.crc32 != due.crc32:
        return "crc"
    return "format"  # the right numbers, spelt differently (padding, case, a "\r")
