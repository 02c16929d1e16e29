"""Formatting the ACK lines for many messages at once, at C speed where it can.

Pure, like ``ackservice.protocol``, and byte for byte the same as one ``ACK_FORMAT % (seq,
length, crc)`` per message (a hypothesis property in the tests holds it so). It exists for
speed: with many small pipelined messages, formatting a decimal and a hexadecimal number per
message with ``%`` was the largest cost of the server after the CRC itself (profiled at ~250
ns a message of ~1 µs).

When a block's messages all have the same length and their sequence numbers share every digit
but the last four (true of every block that does not cross a multiple of 10,000), each line is
the same template with only those four digits and the eight hexadecimal digits of the CRC
differing. The block is then built as the template repeated, with those twelve columns written
by strided slice assignment: the CRCs hex-encoded in one call, the four digits taken from
precomputed digit tables. Other blocks use one ``%`` over a repeated format.
"""

from __future__ import annotations

import struct
from typing import Final

from ..protocol import ACK_FORMAT

__all__ = ["ack_block"]

# Below this many lines the fixed cost of the column writes is more than it saves
# (measured crossover ~24 lines).
_COLUMNS_FROM: Final = 32
_LOW: Final = 10_000  # the low four digits vary within a block; the others may not
# _LOW_DIGITS[k][i] is digit k (thousands first) of i, for i below 10,000.
_LOW_DIGITS: Final = tuple(
    bytes(48 + i // place % 10 for i in range(_LOW)) for place in (1000, 100, 10, 1)
)


def ack_block(first_seq: int, lengths: list[int], crcs: list[int]) -> bytes:
    """The ACK lines for messages ``first_seq``, ``first_seq + 1``, ... with these lengths and
    CRC-32s."""
    count = len(lengths)
    last_seq = first_seq + count - 1
    if (
        count >= _COLUMNS_FROM
        and first_seq >= _LOW
        and first_seq // _LOW == last_seq // _LOW
        and lengths.count(lengths[0]) == count
    ):
        return _by_columns(first_seq, lengths[0], crcs)
    # One % over a repeated format is ~15% faster per message than one % per line.
    values: list[int] = [0] * (3 * count)
    values[0::3] = range(first_seq, last_seq + 1)
    values[1::3] = lengths
    values[2::3] = crcs
    return (ACK_FORMAT * count) % tuple(values)


def _by_columns(first_seq: int, length: int, crcs: list[int]) -> bytes:
    count = len(crcs)
    high, low = divmod(first_seq, _LOW)
    template = b"ACK %d0000 %d 00000000\n" % (high, length)
    width = len(template)
    block = bytearray(template * count)
    digits_at = width - len(b"0000 %d 00000000\n" % length)
    for offset, digits in enumerate(_LOW_DIGITS, digits_at):
        block[offset::width] = digits[low : low + count]
    hex_digits = struct.pack(f">{count}I", *crcs).hex().encode("ascii")
    crc_at = width - len(b"00000000\n")
    for offset in range(8):
        block[crc_at + offset :: width] = hex_digits[offset::8]
    return bytes(block)
