#!/usr/bin/env python3
"""Coverage-guided fuzzing of the framer and the acknowledger with atheris (libFuzzer).

Each input is a message stream plus a size limit and a chunking, taken from the fuzzer's
bytes. For every input it checks the properties the server's correctness rests on:

1. the only outcomes are ``ACK`` and ``ERR <seq> too-large`` lines, one per message, seqs
   counting from 1, each ACK carrying the length and CRC-32 of the payload it answers;
2. one reply per complete line, plus one for a non-empty tail at end of stream;
3. the output is identical whether the stream comes whole, byte by byte, or in the
   fuzzer's chunks (``MessageFramer`` and ``Acknowledger`` alike);
4. ``MessageFramer`` (the hook path) and ``Acknowledger`` (the no-hook path) produce
   byte-identical replies;
5. the framer never holds more than ``limit + 1`` bytes of a partial message.

A violated property raises ``AssertionError``, which atheris reports as a crash with the
input saved to ``crash-<sha1>`` for replay (``python scripts/fuzz_framer.py crash-...``).

Install atheris into the venv (it is not a dev dependency: CI does not need it; the
hypothesis suite in tests/reliability/test_rel_framer_properties.py runs ``check_input``
from this file on every CI run):

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_framer.py -atheris_runs=1000000 -max_total_time=1800

Any libFuzzer flag works (``-max_len=4096``, ``-jobs``, a corpus directory to keep and
grow the inputs found: ``python scripts/fuzz_framer.py corpus/``). The run stops by
itself after ``-atheris_runs`` executions or ``-max_total_time`` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import zlib
from contextlib import AbstractContextManager


def _instrumentation() -> AbstractContextManager[object]:
    """Instrument ackservice's modules for coverage when run as the fuzzer, not on import
    (the test suite imports this file to run ``check_input`` without atheris)."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris (see the docstring)")
    return atheris.instrument_imports(include=["ackservice"])  # type: ignore[no-any-return]


with _instrumentation():
    from ackservice.protocol import (
        Ack,
        Err,
        MessageFramer,
        ack_line,
        parse_reply,
        too_large_line,
    )
    from ackservice.server.acknowledger import Acknowledger

# Limits the fuzzer picks from: small ones exercise too-large and the "\r" at the limit;
# 65536 is the production default.
LIMITS = (0, 1, 2, 3, 4, 5, 8, 16, 31, 64, 255, 65536)
MAX_CUTS = 16


def split_input(data: bytes) -> tuple[bytes, int, list[int]]:
    """Turn fuzzer bytes into (stream, limit, cut points): byte 0 picks the limit, byte 1
    the number of cuts, then two bytes per cut position, then the stream."""
    if len(data) < 2:
        return data, 16, []
    limit = LIMITS[data[0] % len(LIMITS)]
    cut_count = data[1] % (MAX_CUTS + 1)
    header_end = min(len(data), 2 + 2 * cut_count)
    raw_cuts = data[2:header_end]
    stream = data[header_end:]
    cuts = sorted(
        int.from_bytes(raw_cuts[i : i + 2], "little") % (len(stream) + 1)
        for i in range(0, len(raw_cuts) - 1, 2)
    )
    return stream, limit, cuts


def chunks_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` split at ``cuts`` (sorted positions; empty chunks allowed)."""
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def framer_replies(chunks: list[bytes], limit: int) -> bytes:
    """The replies the hook path sends: frame with MessageFramer, answer each message."""
    framer = MessageFramer(limit)
    frames = []
    for chunk in chunks:
        frames += framer.feed(chunk)
        assert framer.buffered_bytes <= limit + 1, "framer buffered past limit + 1"
    frames += framer.end_of_stream()
    assert framer.buffered_bytes == 0
    out = []
    for seq, frame in enumerate(frames, 1):
        if isinstance(frame, bytes):
            out.append(ack_line(seq, frame))
        else:
            out.append(too_large_line(seq, limit))
    return b"".join(out)


def acknowledger_replies(chunks: list[bytes], limit: int) -> bytes:
    """The replies the no-hook path sends."""
    acknowledger = Acknowledger(limit)
    out = [acknowledger.feed(chunk) for chunk in chunks]
    out.append(acknowledger.end_of_stream())
    return b"".join(out)


def expected_payloads(stream: bytes) -> list[bytes]:
    """The messages of ``stream`` by the protocol's definition, with no size limit: the
    bytes before each ``\\n`` less one final ``\\r``, plus a non-empty tail as is."""
    *lines, tail = stream.split(b"\n")
    payloads = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if tail:
        payloads.append(tail)
    return payloads


def check_replies(replies: bytes, stream: bytes, limit: int) -> None:
    """Properties 1 and 2: only ACK/too-large lines, one per message, correct in order."""
    payloads = expected_payloads(stream)
    lines = replies.split(b"\n")
    assert lines.pop() == b"", "replies do not end with a newline"
    assert len(lines) == len(payloads), f"{len(lines)} replies for {len(payloads)} messages"
    for seq, (line, payload) in enumerate(zip(lines, payloads, strict=True), 1):
        reply = parse_reply(line)
        assert reply.seq == seq, f"reply {line!r} out of order, expected seq {seq}"
        if len(payload) > limit:
            assert isinstance(reply, Err), f"{line!r} for an oversized message"
            assert reply.code == "too-large", line
        else:
            assert isinstance(reply, Ack), f"{line!r} for a message within the limit"
            assert reply.nbytes == len(payload), line
            assert reply.crc32 == zlib.crc32(payload), line


def check_input(data: bytes) -> None:
    """Check every property for one fuzzer input; raise AssertionError on a violation."""
    stream, limit, cuts = split_input(data)
    whole = [stream]
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    chunked = chunks_at(stream, cuts)
    reference = acknowledger_replies(whole, limit)
    check_replies(reference, stream, limit)
    for chunks in (one_by_one, chunked):
        assert acknowledger_replies(chunks, limit) == reference, "acknowledger: chunking"
    for chunks in (whole, one_by_one, chunked):
        assert framer_replies(chunks, limit) == reference, "framer differs from acknowledger"


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
