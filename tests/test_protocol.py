"""The sans-IO wire protocol: framing and reply lines, no I/O involved."""

from __future__ import annotations

import contextlib
import itertools
import platform
import zlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ackservice.protocol import (
    MAX_REPLY_LINE_BYTES,
    OVERSIZED,
    Ack,
    Err,
    MessageFramer,
    Oversized,
    ProtocolError,
    Reply,
    ack_line,
    ack_lines,
    crc32,
    crc32_hex,
    err_line,
    escape_controls,
    message_line,
    parse_reply,
)


def frame_all(chunks: list[bytes], limit: int = 16, *, eof: bool = True) -> list[bytes | Oversized]:
    framer = MessageFramer(limit)
    out: list[bytes | Oversized] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    if eof:
        out += framer.end_of_stream()
    return out


def test_spec_example() -> None:
    """b"hello" on a fresh connection is acknowledged as ACK 1 5 3610a686."""
    assert ack_line(1, b"hello") == b"ACK 1 5 3610a686\n"


def test_fragments_are_joined() -> None:
    """A message split over several reads comes out once, whole, with its \\r dropped."""
    framer = MessageFramer()
    assert framer.feed(b"hel") == []
    assert framer.feed(b"lo\r") == []
    assert framer.feed(b"\n") == [b"hello"]


def test_one_read_many_messages() -> None:
    """Several messages in one read come out in order; the incomplete rest waits."""
    framer = MessageFramer()
    assert framer.feed(b"a\nb\r\nc\nd") == [b"a", b"b", b"c"]
    assert framer.buffered_bytes == 1


def test_any_byte_is_payload() -> None:
    """Payloads are bytes, never decoded: NUL, 0xFF, lone \\r and empty lines are messages."""
    assert frame_all([b"\x00\xff\n\r\r\n\n\ra\n"], limit=100) == [b"\x00\xff", b"\r", b"", b"\ra"]


def test_only_one_cr_is_dropped() -> None:
    """Only the single \\r right before the \\n is dropped."""
    assert frame_all([b"x\r\r\n"]) == [b"x\r"]


def test_final_bytes_at_eof_are_a_message() -> None:
    """Bytes after the last newline at a clean EOF are one final message, \\r kept."""
    assert frame_all([b"a\nlast\r"]) == [b"a", b"last\r"]
    assert frame_all([b"a\n"]) == [b"a"]
    assert frame_all([]) == []


def test_limit_applies_to_payload_after_cr() -> None:
    """A payload of exactly the limit is accepted even with its CRLF; one more byte is not."""
    assert frame_all([b"x" * 16 + b"\r\n"]) == [b"x" * 16]
    assert frame_all([b"x" * 17 + b"\n"]) == [OVERSIZED]


def test_too_large_is_reported_before_the_newline() -> None:
    """An oversized message is reported the moment the limit is crossed, then skipped."""
    framer = MessageFramer(4)
    assert framer.feed(b"12345") == [OVERSIZED]
    assert framer.buffered_bytes == 0
    assert framer.feed(b"more garbage without newline") == []
    assert framer.feed(b"rest\nok\n") == [b"ok"]


def test_trailing_cr_at_the_limit_waits_for_the_next_byte() -> None:
    """limit+1 bytes ending in \\r may still be a CRLF-terminated message of the limit."""
    framer = MessageFramer(4)
    assert framer.feed(b"1234\r") == []
    assert framer.feed(b"\n") == [b"1234"]
    assert framer.feed(b"1234\r") == []
    assert framer.feed(b"x") == [OVERSIZED]


def test_buffer_never_exceeds_limit_plus_one() -> None:
    """However the bytes arrive, at most limit+1 bytes of a partial message are held."""
    framer = MessageFramer(10)
    for _ in range(1000):
        framer.feed(b"abc\r")
        assert framer.buffered_bytes <= 11


def test_oversized_at_eof() -> None:
    """A final message at EOF longer than the limit is reported as oversized."""
    framer = MessageFramer(3)
    assert framer.feed(b"abc") == []
    assert framer.end_of_stream() == [b"abc"]  # exactly the limit: fine
    framer.feed(b"abc\r")
    assert framer.end_of_stream() == [OVERSIZED]


def test_zero_limit_accepts_only_empty_messages() -> None:
    """With a limit of 0, only empty messages are accepted."""
    assert frame_all([b"\n\r\nx\n"], limit=0) == [b"", b"", OVERSIZED]


def test_bytearray_input_gives_bytes_messages() -> None:
    """Whatever buffer type the transport hands over, messages are immutable bytes."""
    [message] = MessageFramer().feed(bytearray(b"hi\n"))
    assert type(message) is bytes


def test_negative_limit_is_refused() -> None:
    """A negative limit is a programming error, reported at once."""
    with pytest.raises(ValueError, match="max_message_bytes"):
        MessageFramer(-1)


# Streams rich in the bytes the framer cares about, so edge cases are common.
interesting_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"\x00", b"\xff", b"xxxxxxxx"]), max_size=60
).map(b"".join)


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(interesting_bytes)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=1000)
@given(chunkings(), st.integers(0, 20))
def test_chunking_does_not_change_messages(case: tuple[bytes, list[bytes]], limit: int) -> None:
    """Any split of a byte stream into chunks yields the same messages as feeding it whole."""
    data, chunks = case
    assert frame_all(chunks, limit) == frame_all([data], limit)


@settings(max_examples=1000)
@given(interesting_bytes, st.integers(0, 20))
def test_byte_by_byte_equals_whole(data: bytes, limit: int) -> None:
    """Feeding one byte at a time gives the same messages as feeding everything at once."""
    one_by_one = [data[i : i + 1] for i in range(len(data))]
    assert frame_all(one_by_one, limit) == frame_all([data], limit)


@settings(max_examples=800)
@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=20))
def test_messages_round_trip(payloads: list[bytes]) -> None:
    """Payloads without newlines, each sent as a line, come back exactly (within the limit)."""
    wire = b"".join(p + b"\n" for p in payloads)
    expected = [p[:-1] if p.endswith(b"\r") else p for p in payloads]
    assert frame_all([wire], limit=30) == expected


@settings(max_examples=800)
@given(interesting_bytes, st.integers(0, 20))
def test_one_frame_per_newline(data: bytes, limit: int) -> None:
    """Exactly one message or OVERSIZED per complete line, plus one for a non-empty tail."""
    frames = frame_all([data], limit)
    lines = data.count(b"\n")
    tail = data.rsplit(b"\n", 1)[-1]
    # An oversized line reported before its newline counts once, at that line.
    assert len(frames) == lines + (1 if tail else 0)


@settings(max_examples=1000)
@given(st.integers(1, 2**63), st.binary(max_size=100))
def test_ack_lines_parse_back(seq: int, payload: bytes) -> None:
    """Every ACK line the server writes parses back to what proves the payload intact."""
    ack = parse_reply(ack_line(seq, payload)[:-1])
    assert ack == Ack(seq, len(payload), zlib.crc32(payload))
    assert isinstance(ack, Ack)
    assert ack.matches(payload)
    assert not ack.matches(payload + b"!")


@settings(max_examples=1000)
@given(st.integers(0, 2**63), st.text(max_size=400))
def test_err_lines_are_one_line_and_parse_back(seq: int, detail: str) -> None:
    """ERR lines stay one line whatever the detail holds, and parse back; a detail that
    fits is kept whole, its whitespace folded and its control characters escaped."""
    line = err_line(seq, "rejected", detail)
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    reply = parse_reply(line[:-1])
    assert isinstance(reply, Err)
    assert (reply.seq, reply.code) == (seq, "rejected")
    folded = escape_controls(" ".join(detail.split()))
    if not reply.detail.endswith("..."):
        assert reply.detail == folded.encode(errors="replace").decode()


_CODES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)


@settings(max_examples=1000)
@given(st.integers(0, 2**64 - 1), _CODES, st.text(max_size=2000))
def test_err_lines_are_bounded_in_bytes(seq: int, code: str, detail: str) -> None:
    """Whatever the code and detail, an ERR line is at most MAX_REPLY_LINE_BYTES bytes
    (the bound the client enforces), one line, valid UTF-8, with no control character."""
    line = err_line(seq, code, detail)
    assert len(line) <= MAX_REPLY_LINE_BYTES
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    text = line.decode()  # raises if not valid UTF-8
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text[:-1])
    reply = parse_reply(line[:-1])
    assert isinstance(reply, Err)
    assert (reply.seq, reply.code) == (seq, code)


def test_wide_characters_are_cut_to_the_byte_bound() -> None:
    """400 emoji (1,600 bytes) come out cut at a character boundary, within the client's
    bound, not as a 1,207-byte line the official client refuses."""
    line = err_line(1, "rejected", "\N{GRINNING FACE}" * 400)
    assert len(line) <= MAX_REPLY_LINE_BYTES
    assert line.endswith("\N{GRINNING FACE}...\n".encode())
    framer = MessageFramer(MAX_REPLY_LINE_BYTES)  # how the client reads replies
    assert framer.feed(line) == [line[:-1]]


def test_control_characters_in_details_are_escaped() -> None:
    """ESC, BEL, an OSC title sequence and a bidi override reach the wire as visible
    escapes, so no terminal interprets them."""
    line = err_line(3, "rejected", "a\x1b[31mred\x1b]0;title\x07 \x9b \u202eevil\x7f")
    assert line == b"ERR 3 rejected a\\x1b[31mred\\x1b]0;title\\x07 \\x9b \\u202eevil\\x7f\n"


@pytest.mark.parametrize("code", ["x" * 65, "caf\u00e9", "", "bell\x07"])
def test_error_code_must_be_a_short_printable_word(code: str) -> None:
    """A code that could overflow the line or carry control characters is refused."""
    with pytest.raises(ValueError, match="one ASCII word"):
        err_line(1, code, "x")


@settings(max_examples=800)
@given(st.binary(max_size=60))
def test_parse_reply_never_crashes(line: bytes) -> None:
    """Arbitrary bytes parse to a reply or raise ProtocolError, nothing else."""
    with contextlib.suppress(ProtocolError):
        parse_reply(line)


def _parse_reply_by_checks(line: bytes) -> Reply:
    """``parse_reply`` as it was before its ACK fast path (a regular expression): the checks
    it must agree with, kept as the reference."""
    if line[-1:] == b"\r":
        line = line[:-1]
    try:
        text = line.decode("ascii") if line.startswith(b"ACK ") else line.decode()
    except UnicodeDecodeError:
        raise ProtocolError("not text") from None
    if text.startswith("ACK "):
        parts = text.split(" ")
        if (
            len(parts) == 4
            and parts[1].isascii()
            and parts[1].isdigit()
            and parts[2].isascii()
            and parts[2].isdigit()
            and len(parts[3]) == 8
            and all(c in "0123456789abcdef" for c in parts[3])
        ):
            return Ack(int(parts[1]), int(parts[2]), int(parts[3], 16))
    elif text.startswith("ERR "):
        parts = text.split(" ", 3)
        if len(parts) >= 3 and parts[1].isascii() and parts[1].isdigit() and parts[2]:
            return Err(int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")
    raise ProtocolError("malformed")


# Lines built as ACK lines are, each part usually right and now and then not quite.
_DECIMAL = st.integers(0, 10**20).map(b"%d".__mod__)
_NOT_QUITE_DECIMAL = st.sampled_from([b"", b"+1", b"1_0", b"-1", b"\xb2", "\u0663".encode()])
_DECIMAL_ISH = st.one_of(_DECIMAL, _DECIMAL, _DECIMAL, _NOT_QUITE_DECIMAL)
_HEX = st.integers(0, 2**32 - 1).map(b"%08x".__mod__)
_HEX_ISH = st.one_of(
    _HEX, _HEX, st.text("0123456789abcdefABCDEF_", min_size=7, max_size=9).map(str.encode)
)
_SPACE_ISH = st.sampled_from([b" "] * 6 + [b"  ", b"\t", b""])
_ACK_LIKE = st.tuples(
    st.sampled_from([b"ACK"] * 4 + [b"ack", b"ERR"]),
    _SPACE_ISH,
    _DECIMAL_ISH,
    _SPACE_ISH,
    _DECIMAL_ISH,
    _SPACE_ISH,
    _HEX_ISH,
    st.sampled_from([b"", b"", b"", b"\r", b"\r", b"\r\r", b" ", b"\n", b" x"]),
).map(b"".join)


@settings(max_examples=2000)
@given(st.one_of(_ACK_LIKE, st.binary(max_size=40)))
@example(b"ACK 1_0 5 0123abcd")  # int() takes underscores, the checks do not
@example(b"ACK +1 5 0123abcd")
@example("ACK \u0663 5 0123abcd".encode())  # a digit, but not an ASCII one
@example(b"ACK 1  5 0123abcd")
@example(b"ACK 1 5 0123ABCD")
@example(b"ACK 1 5 0123abcd\r\r")  # one "\r" is dropped, not two
@example(b"ACK 1 5 0123abcd\r")
def test_parse_reply_agrees_with_its_checks(line: bytes) -> None:
    """The ACK fast path accepts exactly the lines the plain checks accept, with the same
    values; anything else still goes the plain way (a ``ProtocolError`` for both)."""
    try:
        expected: Reply | None = _parse_reply_by_checks(line)
    except ProtocolError:
        expected = None
    if expected is None:
        with pytest.raises(ProtocolError):
            parse_reply(line)
    else:
        assert parse_reply(line) == expected


def test_ack_lines_batches_consecutive_seqs() -> None:
    """A batch of ACKs is the concatenation of the single lines, seqs counting up."""
    assert ack_lines(7, [b"a", b""]) == ack_line(7, b"a") + ack_line(8, b"")


@pytest.mark.parametrize(
    "line",
    [
        b"ACK 1 5 3610A686",  # uppercase hex
        b"ACK 1 5 3610a68",  # 7 digits
        b"ACK x 5 3610a686",
        b"ACK 1 5 3610a686 extra",
        b"ACK -1 5 3610a686",
        b"ERR",
        b"ERR one busy x",
        b"HELLO",
        b"",
        b"ERR \xff busy",
    ],
)
def test_malformed_replies_are_protocol_errors(line: bytes) -> None:
    """Anything but a well-formed ACK or ERR line is a ProtocolError."""
    with pytest.raises(ProtocolError):
        parse_reply(line)


def test_connection_error_reply() -> None:
    """ERR 0 lines are about the connection, and may come with a CRLF from odd servers."""
    reply = parse_reply(b"ERR 0 busy server at its limit\r")
    assert reply == Err(0, "busy", "server at its limit")
    assert isinstance(reply, Err)
    assert reply.is_connection_error


def test_crc32_hex_is_eight_lowercase_digits() -> None:
    """The wire checksum is zero-padded lowercase hex."""
    assert crc32_hex(b"") == "00000000"
    assert crc32_hex(b"hello") == "3610a686"


def test_error_code_must_be_a_word() -> None:
    """An error code with spaces would break the reply grammar, so it is refused."""
    with pytest.raises(ValueError, match="one ASCII word"):
        err_line(1, "two words", "x")


@settings(max_examples=800)
@given(st.binary(max_size=40).filter(lambda b: b"\n" not in b))
def test_message_line_survives_framing(payload: bytes) -> None:
    """Whatever a payload ends with (a \\r included), message_line carries it intact."""
    assert frame_all([message_line(payload)], limit=100) == [payload]


def test_message_line_refuses_newlines() -> None:
    """A payload with a newline cannot be one message."""
    with pytest.raises(ValueError, match="newline"):
        message_line(b"two\nlines")


@given(st.binary(max_size=4096), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_crc32_is_zlibs_for_any_bytes_running_value_and_view(
    data: bytes, start: int, offset: int
) -> None:
    """The protocol's CRC-32 (ISA-L's where installed) is zlib's, as every client computes it:
    whole, continued from a running value, and over a memoryview slice (the server's uses)."""
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)
    assert crc32(memoryview(data)[offset:]) == zlib.crc32(data[offset:])


@pytest.mark.skipif(
    platform.machine() not in {"x86_64", "AMD64", "aarch64", "arm64"},
    reason="the isal dependency is only declared where it has wheels",
)
def test_crc32_is_isals_where_the_dependency_is_declared() -> None:
    """The fast CRC is really in use where pyproject.toml installs it (a broken import would
    fall back to zlib silently, and only the benchmarks would notice)."""
    assert crc32.__module__.startswith("isal")
