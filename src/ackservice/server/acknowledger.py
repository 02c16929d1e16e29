"""The server's side of the protocol when every message is accepted: bytes in, replies out.

Sans-IO like ``ackservice.protocol``, and equivalent to running ``MessageFramer`` and
answering each message with ``ack_line`` (or a too-large ``ERR``): a hypothesis property in
the tests holds the two to identical output for any input and any chunking. It exists for
speed and memory. An ACK needs only a message's length and CRC-32, and ``crc32`` takes a
running value, so a message split across reads is checksummed piece by piece and never
buffered: the state per connection is a few integers, whatever the message size.
"""

from __future__ import annotations

from typing import Final

from ..protocol import ACK_FORMAT, crc32, too_large_line
from .ack_block import ack_block

__all__ = ["Acknowledger"]

_CR: Final = 13  # b"\r"[0]
# Below this line length, bytes.split (C speed, copies each line) beats a find() loop over
# a memoryview (no copies, but Python per line); measured crossover ~512 bytes.
_SPLIT_BELOW_AVERAGE_BYTES: Final = 512


class Acknowledger:
    """Turns a client's byte stream into the reply bytes, keeping no payloads.

    Args:
        max_message_bytes: payloads longer than this get ``ERR <seq> too-large`` the moment
            the limit is crossed; the rest of the line is skipped.
    """

    __slots__ = ("_crc", "_discarding", "_held_cr", "_length", "_max", "oversized", "seq")

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        self._max = max_message_bytes
        self.seq = 0
        """Messages answered so far (the seq of the last reply)."""
        self.oversized: list[int] = []
        """Seqs answered with too-large; the caller reads and clears it."""
        # The incomplete message so far: its length and running CRC, without a final "\r",
        # which is held back until the next byte shows whether it precedes the "\n".
        self._length = 0
        self._crc = 0
        self._held_cr = False
        self._discarding = False

    def feed(self, data: bytes | bytearray) -> bytes:
        """Take the next chunk of the stream; return the replies for the messages it ends."""
        if type(data) is not bytes:
            data = bytes(data)
        reply = self.answer_whole(data)
        if reply is not None:
            return reply
        start = 0
        if self._discarding:
            start = data.find(b"\n") + 1
            if not start:
                return b""
            self._discarding = False
        first_newline = data.find(b"\n", start)
        if first_newline < 0:
            self._extend(data, start, len(data))
            return self._cut_if_too_long()
        replies = []
        if self._length or self._held_cr:
            self._extend(data, start, first_newline)
            replies.append(self._reply_to_pending())
            start = first_newline + 1
        last_newline = data.rfind(b"\n")
        if start <= last_newline:
            replies.append(self._reply_to_lines(data, start, last_newline))
        self._extend(data, last_newline + 1, len(data))
        if self._length > self._max:
            replies.append(self._cut_if_too_long())
        # A newline was found, so there is a reply; usually only one (no copy then).
        return replies[0] if len(replies) == 1 else b"".join(replies)

    def answer_whole(self, data: bytes) -> bytes | None:
        """The ACK for ``data`` if it is exactly one whole message within the limit, with
        nothing before it pending (a request/response client's read); else None, and nothing
        is fed. It cannot be a too-large ``ERR``."""
        last = len(data) - 1
        if (
            data.find(b"\n") == last >= 0
            and not (self._length or self._held_cr or self._discarding)
            and last <= self._max
        ):
            length = last - 1 if last and data[last - 1] == _CR else last
            self.seq += 1
            return ACK_FORMAT % (self.seq, length, crc32(memoryview(data)[:length]))
        return None

    @property
    def at_message_start(self) -> bool:
        """Whether nothing of an incomplete message is pending (the next byte starts one)."""
        return not (self._length or self._held_cr or self._discarding)

    def state(self) -> tuple[int, int, int, bool, bool, int]:
        """A snapshot for ``restore``: a few integers, cheap enough to take per read."""
        return (
            self.seq,
            self._length,
            self._crc,
            self._held_cr,
            self._discarding,
            len(self.oversized),
        )

    def restore(self, state: tuple[int, int, int, bool, bool, int]) -> None:
        """Return to a ``state()`` snapshot, as if what was fed since had not been (so a
        read whose replies came out too large can be fed again in pieces)."""
        self.seq, self._length, self._crc, self._held_cr, self._discarding, oversized = state
        del self.oversized[oversized:]

    def end_of_stream(self) -> bytes:
        """The peer finished sending: bytes after the last newline are one final message,
        whose ``\\r``, if it ends with one, is payload (no ``\\n`` follows it)."""
        self._discarding = False
        if self._held_cr:
            self._crc = crc32(b"\r", self._crc)
            self._length += 1
            self._held_cr = False
        if not self._length:
            return b""
        return self._reply_to_pending()

    def _extend(self, data: bytes, start: int, end: int) -> None:
        """Add ``data[start:end]`` (no newline in it) to the incomplete message."""
        if start == end:
            return
        if self._held_cr:  # a byte follows it, so the held "\r" is payload
            self._crc = crc32(b"\r", self._crc)
            self._length += 1
        self._held_cr = data[end - 1] == _CR
        if self._held_cr:
            end -= 1
        self._crc = crc32(memoryview(data)[start:end], self._crc)
        self._length += end - start

    def _cut_if_too_long(self) -> bytes:
        """Answer the incomplete message as too-large as soon as it exceeds the limit."""
        if self._length <= self._max:
            return b""
        self._reset_pending()
        self._discarding = True
        return self._too_large()

    def _reply_to_pending(self) -> bytes:
        """Answer the incomplete message, now complete (its "\\r", if held, is dropped)."""
        length, crc = self._length, self._crc
        self._reset_pending()
        if length > self._max:
            return self._too_large()
        self.seq += 1
        return ACK_FORMAT % (self.seq, length, crc)

    def _reset_pending(self) -> None:
        self._length = 0
        self._crc = 0
        self._held_cr = False

    def _too_large(self) -> bytes:
        self.seq += 1
        self.oversized.append(self.seq)
        return too_large_line(self.seq, self._max)

    def _reply_to_lines(self, data: bytes, start: int, end: int) -> bytes:
        """Answer the complete lines in ``data[start:end]`` (``data[end]`` is a newline)."""
        # Judge the line length by the first line: counting the newlines first would scan
        # the whole read twice. A wrong guess costs a little speed, never correctness.
        first_end = data.find(b"\n", start, end)
        if 0 <= first_end - start < _SPLIT_BELOW_AVERAGE_BYTES:
            lines = data[start:end].split(b"\n")
            if b"\r" in data:
                lines = [line[:-1] if line[-1:] == b"\r" else line for line in lines]
            lengths = list(map(len, lines))
            crcs = list(map(crc32, lines))
        else:
            lengths, crcs = _measure_long_lines(data, start, end)
        if end - start > self._max and max(lengths) > self._max:
            return self._reply_one_by_one(lengths, crcs)
        first = self.seq + 1
        self.seq += len(lengths)
        if len(lengths) == 1:
            return ACK_FORMAT % (first, lengths[0], crcs[0])
        return ack_block(first, lengths, crcs)

    def _reply_one_by_one(self, lengths: list[int], crcs: list[int]) -> bytes:
        replies = []
        for length, crc in zip(lengths, crcs, strict=True):
            if length > self._max:
                replies.append(self._too_large())
            else:
                self.seq += 1
                replies.append(ACK_FORMAT % (self.seq, length, crc))
        return b"".join(replies)


def _measure_long_lines(data: bytes, start: int, end: int) -> tuple[list[int], list[int]]:
    """Lengths and CRCs of the lines in ``data[start:end]`` without copying them."""
    view = memoryview(data)
    lengths: list[int] = []
    crcs: list[int] = []
    find = data.find
    while True:
        newline = find(b"\n", start, end)
        stop = end if newline < 0 else newline
        line_end = stop - 1 if stop > start and data[stop - 1] == _CR else stop
        lengths.append(line_end - start)
        crcs.append(crc32(view[start:line_end]))
        if newline < 0:
            return lengths, crcs
        start = newline + 1
