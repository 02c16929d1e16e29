"""What the load generator sends, and the exact reply bytes that prove each message arrived.

Building a payload and computing its CRC-32 for every message would make the client about as
busy as the server it measures. Instead, as ``loadgen.c`` does, a pool of distinct payloads
(windows into one buffer of random printable bytes) is prepared once with their CRCs, and
message ``seq`` of a connection uses payload ``(salt + seq) % variants``. Consecutive messages
always differ, and connections use different salts, so a server that checksums the wrong
message (a neighbour, another connection's) is caught; what is left per message is copying
bytes and formatting one expected ACK line.
"""

from __future__ import annotations

import random
from typing import Final

from ..protocol import ack_line

__all__ = ["PayloadPool"]

# At most this many distinct payloads; fewer for large sizes, so the pool stays near
# _POOL_BYTES (two copies are kept, see PayloadPool.wire).
_MAX_VARIANTS: Final = 1024
_POOL_BYTES: Final = 4 << 20
_SEED: Final = 0x5EED


class PayloadPool:
    """Payloads of one size, their wire form, and their expected ACK lines.

    Args:
        size: payload length in bytes (the newline is not counted).
    """

    __slots__ = ("_ring", "_tails", "line_bytes", "size", "variants")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self.line_bytes = size + 1
        self.variants = 1 if size == 0 else max(2, min(_MAX_VARIANTS, _POOL_BYTES // (size + 1)))
        rng = random.Random(_SEED)
        # Printable ASCII: no "\n" (it would split the message) and no "\r" (a final one
        # would be dropped by the framer). Payloads are windows shifted by one byte.
        filler = bytes(rng.choices(range(0x20, 0x7F), k=size + self.variants))
        payloads = [filler[v : v + size] for v in range(self.variants)]
        # Two copies back to back: any run of up to `variants` consecutive payloads, wrapping
        # around, is one contiguous slice, so a whole window is sent with a single copy.
        self._ring = b"".join(payload + b"\n" for payload in payloads) * 2
        # ack_line(seq, payload) == b"ACK %d" % seq + tail: the tail (" <nbytes> <crc32>\n")
        # depends on the payload only, so it is taken once from the protocol's own encoder.
        self._tails: list[bytes] = []
        for payload in payloads:
            template = ack_line(0, payload)
            if not template.startswith(b"ACK 0 "):  # pragma: no cover - protocol changed
                raise RuntimeError(f"unexpected ACK line layout: {template!r}")
            self._tails.append(template[len(b"ACK 0") :])
        self._tails *= 2

    def payload(self, seq: int, salt: int) -> bytes:
        """The payload of message ``seq`` on a connection with this ``salt``."""
        start = (salt + seq) % self.variants * self.line_bytes
        return self._ring[start : start + self.size]

    def wire(self, first_seq: int, count: int, salt: int) -> bytes:
        """Messages ``first_seq`` .. ``first_seq + count - 1``, newline-terminated, joined."""
        variants = self.variants
        line_bytes = self.line_bytes
        chunks = []
        seq = first_seq
        while count > 0:
            run = min(count, variants)
            start = (salt + seq) % variants * line_bytes
            chunks.append(self._ring[start : start + run * line_bytes])
            seq += run
            count -= run
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def expected(self, first_seq: int, count: int, salt: int) -> bytes:
        """The ACK lines that answer ``wire(first_seq, count, salt)``, joined."""
        variants = self.variants
        tails = self._tails
        out = []
        seq = first_seq
        while count > 0:
            run = min(count, variants)
            start = (salt + seq) % variants
            out += [
                b"ACK %d%s" % pair
                for pair in zip(range(seq, seq + run), tails[start : start + run], strict=True)
            ]
            seq += run
            count -= run
        return b"".join(out)
