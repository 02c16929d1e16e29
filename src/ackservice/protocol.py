"""The ackservice wire protocol (v1), sans-IO: bytes in, messages and reply lines out.

Nothing here does I/O, imports trio or logs: the server and the client both drive this
module, so the wire format lives in exactly one place (the h11 pattern). docs/protocol.md is
the prose version of this file.

Client to server: a message is the bytes up to ``\\n``; one ``\\r`` right before the ``\\n``
is dropped. Server to client, one line per message, in order::

    ACK <seq> <nbytes> <crc32>\\n       the message arrived intact (crc32: 8 lowercase hex)
    ERR <seq> <code> <detail>\\n        the message was not accepted
    ERR 0 <code> <detail>\\n            about the connection, sent just before it closes
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .errors import ProtocolError

try:
    # ISA-L's CRC-32 (PCLMULQDQ): the same function as zlib's, measured 4x faster on a 64-byte
    # message (37 vs 154 ns) and 10x on 16 KiB, where zlib's was a fifth of the server's CPU
    # per pipelined ACK (docs/benchmarks.md, "CRC-32").
    from isal.isal_zlib import crc32
except ImportError:  # a platform without its wheels (the dependency is not required there)
    from zlib import crc32

__all__ = [
    "ACK_FORMAT",
    "CONNECTION_SEQ",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_REPLY_LINE_BYTES",
    "OVERSIZED",
    "Ack",
    "Err",
    "ErrorCode",
    "MessageFramer",
    "Oversized",
    "ProtocolError",
    "Reply",
    "ack_line",
    "ack_lines",
    "crc32",
    "crc32_hex",
    "err_line",
    "escape_controls",
    "message_line",
    "parse_reply",
    "too_large_line",
]

# 64 KiB: large enough for a log record or a small document, small enough that the server's
# worst case (one partial message per connection) stays modest at 10,000 connections.
DEFAULT_MAX_MESSAGE_BYTES: Final = 65536

# The seq of an ERR line that is about the connection rather than about one message.
CONNECTION_SEQ: Final = 0

# Reply lines are short ("ERR 18446744073709551615 internal-error " plus a one-line detail);
# a client refuses anything longer rather than buffering a misbehaving peer without bound.
# The bound counts bytes of the whole line, "\n" included: ``err_line`` never writes more,
# and the client refuses more (emoji are 4 bytes each, so a bound in characters is not one).
MAX_REPLY_LINE_BYTES: Final = 1024
# An error code is a short word; a longer one is refused so the detail always keeps room.
_MAX_CODE_BYTES: Final = 64
# The longest "ERR <seq> <code> " prefix: seq is at most 20 digits (2**64 - 1).
_MAX_PREFIX_BYTES: Final = len("ERR  ") + 20 + _MAX_CODE_BYTES + 1
# Left for the detail, and its cut-off mark.
_MAX_DETAIL_BYTES: Final = MAX_REPLY_LINE_BYTES - _MAX_PREFIX_BYTES - len("\n")
_ELLIPSIS: Final = "..."
# Format characters that reorder text on display ("Trojan Source", CVE-2021-42574).
_BIDI_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

# The ACK line; ``%`` with (seq, nbytes, crc32). Everything that writes ACKs uses this.
ACK_FORMAT: Final = b"ACK %d %d %08x\n"


class ErrorCode:
    """The error codes the v1 protocol defines (lowercase words on the wire)."""

    TOO_LARGE: Final = "too-large"
    REJECTED: Final = "rejected"
    INTERNAL_ERROR: Final = "internal-error"
    BUSY: Final = "busy"
    IDLE_TIMEOUT: Final = "idle-timeout"
    SHUTTING_DOWN: Final = "shutting-down"
    UNAVAILABLE: Final = "unavailable"
    """Not accepted now (the store is down, full or too slow): safe to send again later."""
    FORBIDDEN: Final = "forbidden"
    """The server does not serve this client's address (``--allow``): retrying cannot help."""
    TLS_REQUIRED: Final = "tls-required"
    """Plaintext sent to a TLS port; the only line the server sends unencrypted there."""


class Oversized:
    """Stands in the framer's output for a message longer than the limit (it was discarded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OVERSIZED"


OVERSIZED: Final = Oversized()


class MessageFramer:
    """Splits a byte stream into newline-terminated messages with a hard size bound.

    Feed it whatever the transport delivered; it returns the complete messages, in order.
    A message whose payload exceeds ``max_message_bytes`` comes out as ``OVERSIZED`` the
    moment the bound is crossed (not when its newline finally arrives), and the rest of that
    line is skipped; the framer never holds more than ``max_message_bytes + 1`` bytes of a
    partial message. The output does not depend on how the stream was split into chunks.
    """

    __slots__ = ("_discarding", "_held", "_max", "_parts")

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        self._max = max_message_bytes
        # The pieces of the incomplete message, joined once when its newline arrives: no
        # copy per read (quadratic for long messages) and no growing buffer to reallocate
        # (which fragments the heap). The bound is checked before adding, never after.
        self._parts: list[bytes] = []
        self._held = 0
        self._discarding = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete message held until its newline arrives."""
        return self._held

    @property
    def at_message_start(self) -> bool:
        """Whether nothing of an incomplete message is pending (the next byte starts one)."""
        return not self._parts and not self._discarding

    def feed(self, data: bytes | bytearray) -> list[bytes | Oversized]:
        """Take the next chunk of the stream; return the messages it completed."""
        if type(data) is not bytes:
            data = bytes(data)  # so every message is immutable bytes, whatever the transport
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data = data[newline + 1 :]
            self._discarding = False
        limit = self._max
        out: list[bytes | Oversized] = []
        newline = data.find(b"\n")
        if newline < 0:
            self._hold(data, out)
            return out
        if self._parts:
            # The first line completes the held message: build it once, unless it is
            # already too long whatever its last byte (a "\r" may still be dropped).
            head = data[:newline]
            if self._held + len(head) > limit + 1:
                out.append(OVERSIZED)
            else:
                self._parts.append(head)
                out.append(_strip_and_bound(b"".join(self._parts), limit))
            self._parts = []
            self._held = 0
            data = data[newline + 1 :]
        lines = data.split(b"\n")
        tail = lines.pop()
        if b"\r" in data or len(data) > limit:
            out += [_strip_and_bound(line, limit) for line in lines]
        else:
            out += lines  # the common case: no line needs stripping or can be too long
        self._hold(tail, out)
        return out

    def _hold(self, piece: bytes, out: list[bytes | Oversized]) -> None:
        """Add ``piece`` (no newline in it) to the incomplete message, or cut it off."""
        if not piece:
            return
        # A final "\r" may still be the one dropped before "\n", so it does not count yet.
        if self._held + len(piece) - (piece[-1:] == b"\r") > self._max:
            out.append(OVERSIZED)
            self._parts = []
            self._held = 0
            self._discarding = True
        else:
            self._parts.append(piece)
            self._held += len(piece)

    def end_of_stream(self) -> list[bytes | Oversized]:
        """The peer finished sending: bytes after the last newline are one final message.

        No ``\\r`` is dropped from that final message, since no ``\\n`` follows it.
        """
        tail = b"".join(self._parts)
        self._parts = []
        self._held = 0
        self._discarding = False
        if not tail:
            return []
        return [tail if len(tail) <= self._max else OVERSIZED]


def _strip_and_bound(line: bytes, limit: int) -> bytes | Oversized:
    if line[-1:] == b"\r":
        line = line[:-1]
    return line if len(line) <= limit else OVERSIZED


def message_line(payload: bytes) -> bytes:
    """The bytes that carry ``payload`` as one message, terminator included.

    The server drops one ``\\r`` before the ``\\n``, so a payload that itself ends in
    ``\\r`` goes out as ``payload\\r\\r\\n``, which keeps its own ``\\r``.

    Raises:
        ValueError: the payload contains a newline, so it cannot be one message.
    """
    if b"\n" in payload:
        raise ValueError("a message cannot contain a newline")
    return payload + (b"\r\n" if payload[-1:] == b"\r" else b"\n")


# -- Reply lines ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK <seq> <nbytes> <crc32>``: message ``seq`` arrived with this length and checksum."""

    seq: int
    nbytes: int
    crc32: int

    def matches(self, payload: bytes) -> bool:
        """Whether this acknowledgment proves that ``payload`` arrived intact."""
        return self.nbytes == len(payload) and self.crc32 == crc32(payload)


@dataclass(frozen=True, slots=True)
class Err:
    """``ERR <seq> <code> <detail>``: message ``seq`` was not accepted, or (seq 0) the
    connection is about to close."""

    seq: int
    code: str
    detail: str

    @property
    def is_connection_error(self) -> bool:
        """Whether this error is about the whole connection (seq 0) rather than one message."""
        return self.seq == CONNECTION_SEQ


Reply = Ack | Err


def crc32_hex(payload: bytes) -> str:
    """The checksum as it appears on the wire: zlib's CRC-32 as 8 lowercase hex digits."""
    return f"{crc32(payload):08x}"


def ack_line(seq: int, payload: bytes) -> bytes:
    """The ``ACK`` line for message ``seq`` carrying ``payload``."""
    return ACK_FORMAT % (seq, len(payload), crc32(payload))


def ack_lines(first_seq: int, payloads: Iterable[bytes]) -> bytes:
    """The ``ACK`` lines for consecutive messages, joined for a single write."""
    return b"".join(
        [
            ACK_FORMAT % (seq, len(payload), crc32(payload))
            for seq, payload in enumerate(payloads, first_seq)
        ]
    )


def too_large_line(seq: int, max_message_bytes: int) -> bytes:
    """The ``ERR <seq> too-large`` line for a message over ``max_message_bytes``."""
    return err_line(
        seq, ErrorCode.TOO_LARGE, f"message exceeds {max_message_bytes} bytes; it was dropped"
    )


def err_line(seq: int, code: str, detail: str) -> bytes:
    """An ``ERR`` line of at most ``MAX_REPLY_LINE_BYTES`` bytes, valid UTF-8.

    ``detail`` is folded onto one line, its control characters are escaped (``\\x1b``: a
    detail reaches people's terminals) and it is cut to fit, at a character boundary, with
    ``...``, so whatever an application put in it cannot break the reply stream's framing
    or the client's line bound.

    Raises:
        ValueError: ``code`` is not one printable ASCII word of at most 64 bytes, or
            ``seq`` is not from 0 to 2**64 - 1.
    """
    if (
        not code
        or len(code) > _MAX_CODE_BYTES
        or not code.isascii()
        or not code.isprintable()
        or any(c.isspace() for c in code)
    ):
        raise ValueError(f"error code must be one ASCII word of at most 64 bytes, got {code!r}")
    if not 0 <= seq < 2**64:
        raise ValueError(f"seq must be from 0 to 2**64 - 1, got {seq}")
    one_line = escape_controls(" ".join(detail.split()))
    encoded = one_line.encode(errors="replace")  # lone surrogates become "?"
    if len(encoded) > _MAX_DETAIL_BYTES:
        cut = encoded[: _MAX_DETAIL_BYTES - len(_ELLIPSIS)]
        # Dropping an incomplete last character keeps the line valid UTF-8.
        encoded = cut.decode(errors="ignore").encode() + _ELLIPSIS.encode()
    return b"ERR %d %s %s\n" % (seq, code.encode(), encoded)


def escape_controls(text: str) -> str:
    """``text`` with control characters (C0, DEL, C1) and bidirectional overrides shown
    as ``\\xNN``/``\\uNNNN`` escapes, so text from a peer cannot drive a terminal (ESC
    sequences, BEL, OSC titles) or disguise itself when printed."""
    if text.isprintable():
        return text  # the common case, checked in C
    return "".join(_escape_char(c) for c in text)


def _escape_char(char: str) -> str:
    if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def parse_reply(line: bytes) -> Reply:
    """Parse one reply line (without its ``\\n``).

    Raises:
        ProtocolError: the line is not a well-formed ``ACK`` or ``ERR`` line.
    """
    if line[-1:] == b"\r":
        line = line[:-1]
    ack = _ACK_LINE.fullmatch(line)
    if ack is not None:  # the common case, in one C call: half the time of the checks below
        return Ack(int(ack[1]), int(ack[2]), int(ack[3], 16))
    try:
        text = line.decode("ascii") if line.startswith(b"ACK ") else line.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"reply line is not valid text: {line[:80]!r}") from None
    if text.startswith("ACK "):
        parts = text.split(" ")
        if (
            len(parts) == 4
            and _is_decimal(parts[1])
            and _is_decimal(parts[2])
            and len(parts[3]) == 8
            and all(c in "0123456789abcdef" for c in parts[3])
        ):
            return Ack(int(parts[1]), int(parts[2]), int(parts[3], 16))
    elif text.startswith("ERR "):
        parts = text.split(" ", 3)
        if len(parts) >= 3 and _is_decimal(parts[1]) and parts[2]:
            return Err(int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")
    raise ProtocolError(f"malformed reply line: {line[:80]!r}")


# A well-formed ACK line: what the checks of ``parse_reply`` accept as one, and nothing more
# (ASCII digits only, eight lowercase hex digits).
_ACK_LINE: Final = re.compile(rb"ACK ([0-9]+) ([0-9]+) ([0-9a-f]{8})")


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()
