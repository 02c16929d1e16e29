"""The payload pool: what is sent, and the replies that prove it arrived."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ackservice.bench.payload import PayloadPool
from ackservice.protocol import MessageFramer, ack_line

sizes = st.integers(min_value=0, max_value=300)
seqs = st.integers(min_value=1, max_value=10**12)
counts = st.integers(min_value=1, max_value=2_500)  # beyond the pool: runs wrap around
salts = st.integers(min_value=0, max_value=10**9)


@given(sizes, seqs, counts, salts)
def test_wire_is_the_payloads_each_ending_in_a_newline(
    size: int, first: int, count: int, salt: int
) -> None:
    """wire() is exactly payload(seq) + b"\\n" for each seq, in order, and the framer
    gives the payloads back unchanged (no newline or final \\r inside them)."""
    pool = PayloadPool(size)
    payloads = [pool.payload(seq, salt) for seq in range(first, first + count)]
    wire = pool.wire(first, count, salt)
    assert wire == b"".join(payload + b"\n" for payload in payloads)
    assert MessageFramer(size).feed(wire) == payloads
    assert all(len(payload) == size for payload in payloads)


@given(sizes, seqs, counts, salts)
def test_expected_replies_are_the_protocols_ack_lines(
    size: int, first: int, count: int, salt: int
) -> None:
    """expected() equals protocol.ack_line for every message: the wire format is defined
    once, in protocol.py."""
    pool = PayloadPool(size)
    assert pool.expected(first, count, salt) == b"".join(
        ack_line(seq, pool.payload(seq, salt)) for seq in range(first, first + count)
    )


def test_consecutive_messages_and_connections_differ() -> None:
    """Neighbouring messages, and the same seq on two connections, carry different
    payloads, so a reply that checksums the wrong message is caught."""
    pool = PayloadPool(64)
    assert pool.payload(1, salt=0) != pool.payload(2, salt=0)
    assert pool.payload(1, salt=0) != pool.payload(1, salt=7919)
    assert len({pool.payload(seq, 0) for seq in range(1, 1001)}) == 1000


def test_large_payloads_keep_the_pool_small() -> None:
    """For large sizes the pool holds fewer variants, so its memory stays bounded."""
    pool = PayloadPool(1 << 20)
    assert 2 <= pool.variants <= 8
    assert PayloadPool(0).variants == 1
