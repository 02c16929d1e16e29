"""Acknowledger: the no-hook reply path, held to the framer's behaviour byte for byte."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ackservice.protocol import MessageFramer, Oversized, ack_line, too_large_line
from ackservice.server.acknowledger import Acknowledger


def reference_replies(chunks: list[bytes], limit: int) -> bytes:
    """What the server must send: frame with MessageFramer, answer each message."""
    framer = MessageFramer(limit)
    frames = [f for chunk in chunks for f in framer.feed(chunk)] + framer.end_of_stream()
    return b"".join(
        too_large_line(seq, limit) if isinstance(f, Oversized) else ack_line(seq, f)
        for seq, f in enumerate(frames, 1)
    )


def acknowledger_replies(chunks: list[bytes], limit: int) -> bytes:
    acknowledger = Acknowledger(limit)
    out = b"".join(acknowledger.feed(chunk) for chunk in chunks)
    return out + acknowledger.end_of_stream()


# Streams rich in the bytes that matter, with long lines so both line-measuring strategies
# (split for short lines, memoryview scan for long ones) and the size limit are exercised.
pieces = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"a", b"\x00", b"\xff", b"x" * 7, b"y" * 600, b"z" * 2000]
)
streams = st.lists(pieces, max_size=40).map(b"".join) | st.binary(max_size=300)
limits = st.sampled_from([0, 1, 5, 16, 700, 2500, 65536])


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


@settings(max_examples=1500)
@given(chunked(), limits)
def test_same_replies_as_framing_then_answering(chunks: list[bytes], limit: int) -> None:
    """For any stream, any chunking and any limit, the replies equal those made by framing
    the stream and answering each message (ACK, or too-large past the limit)."""
    assert acknowledger_replies(chunks, limit) == reference_replies(chunks, limit)


@settings(max_examples=1000)
@given(
    st.lists(st.sampled_from([b"", b"a", b"\r", b"x\r", b"y" * 600, b"z" * 2000]), max_size=30),
    limits,
)
def test_one_message_per_read(messages: list[bytes], limit: int) -> None:
    """Each read exactly one whole message, as request/response clients send them (the
    acknowledger's shortcut), also after a too-large one: the same replies as framing."""
    chunks = [message + b"\n" for message in messages]
    assert acknowledger_replies(chunks, limit) == reference_replies(chunks, limit)


@settings(max_examples=600)
@given(streams, limits)
def test_byte_by_byte_equals_whole(data: bytes, limit: int) -> None:
    """Fed one byte at a time, the replies are the same as fed whole."""
    one_by_one = [data[i : i + 1] for i in range(len(data))]
    assert acknowledger_replies(one_by_one, limit) == acknowledger_replies([data], limit)


def test_spec_example() -> None:
    """hello on a fresh connection: ACK 1 5 3610a686."""
    assert Acknowledger(65536).feed(b"hello\n") == b"ACK 1 5 3610a686\n"


def test_large_message_across_reads_is_never_buffered() -> None:
    """A message spread over many reads is acknowledged from a running checksum: nothing of
    it is kept, and the ACK matches the whole payload."""
    acknowledger = Acknowledger(10_000_000)
    payload = bytes(range(256)).replace(b"\n", b"") * 20_000  # ~5 MB
    tracemalloc.start()
    try:
        held_before, _ = tracemalloc.get_traced_memory()
        for start in range(0, len(payload), 65536):
            # Each read is allocated here, so keeping it (even by reference) would show.
            assert acknowledger.feed(payload[start : start + 65536]) == b""
        held_after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held_after - held_before < 4096  # a few integers, not megabytes of payload
    assert acknowledger.feed(b"\r\n") == ack_line(1, payload)


def test_oversized_seqs_are_reported_for_logging() -> None:
    """The seqs answered with too-large are listed so the server can warn about them."""
    acknowledger = Acknowledger(3)
    acknowledger.feed(b"ok\ntoo long\nok\nalso too long")
    assert acknowledger.oversized == [2, 4]
    assert acknowledger.seq == 4


def test_negative_limit_is_refused() -> None:
    """A negative limit is a programming error."""
    with pytest.raises(ValueError, match="max_message_bytes"):
        Acknowledger(-1)
