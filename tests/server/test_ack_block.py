"""ack_block: many ACK lines at once, byte for byte what one ACK_FORMAT per message gives."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ackservice.protocol import ACK_FORMAT
from ackservice.server.ack_block import ack_block

# Around multiples of 10,000, where the digits shared by a block's sequence numbers change,
# and anywhere from 1 to well past 2**64.
seqs = st.one_of(
    st.integers(1, 10**22),
    st.builds(lambda high, back: high * 10_000 - back, st.integers(1, 10**9), st.integers(-80, 80)),
).filter(lambda seq: seq >= 1)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    """Mostly blocks of equal lengths, long enough for the column writes; some mixed. The
    many numbers come from a seeded generator (drawing each is slow), with the extreme CRCs."""
    count = draw(st.integers(1, 300))
    rng = random.Random(draw(st.integers(0, 2**32)))
    if draw(st.booleans()):
        lengths = [draw(st.integers(0, 10**7))] * count
    else:
        lengths = [rng.randrange(70_000) for _ in range(count)]
    crcs = [rng.choice((0, 2**32 - 1, rng.getrandbits(32))) for _ in range(count)]
    return draw(seqs), lengths, crcs


def one_by_one(first_seq: int, lengths: list[int], crcs: list[int]) -> bytes:
    return b"".join(
        ACK_FORMAT % (seq, length, crc)
        for seq, length, crc in zip(
            range(first_seq, first_seq + len(lengths)), lengths, crcs, strict=True
        )
    )


@settings(max_examples=1000)
@given(blocks())
def test_same_bytes_as_one_format_per_message(block: tuple[int, list[int], list[int]]) -> None:
    first_seq, lengths, block_crcs = block
    assert ack_block(first_seq, lengths, block_crcs) == one_by_one(first_seq, lengths, block_crcs)


def test_block_ending_just_before_a_multiple_of_ten_thousand() -> None:
    """The largest block the column writes take: its last seq is 10,000k - 1."""
    lengths, block_crcs = [64] * 100, [0xFFFFFFFF - i for i in range(100)]
    for first_seq in (19_900, 10_000, 99_999_900):
        expected = one_by_one(first_seq, lengths, block_crcs)
        assert ack_block(first_seq, lengths, block_crcs) == expected
    # One further and the block crosses 20,000: the other way, same bytes.
    assert ack_block(19_901, lengths, block_crcs) == one_by_one(19_901, lengths, block_crcs)
