"""Scenario 8, oversized lines: the limit + 1 byte, 1 MiB and 100 MiB without a newline get
``ERR too-large``; the server never buffers past the limit, and the connection and the
next one keep working."""

from __future__ import annotations

import zlib

import pytest
import trio
from rel_checker import History, check
from rel_harness import ServerUnderTest

from ackservice.protocol import DEFAULT_MAX_MESSAGE_BYTES, Ack, Err, parse_reply
from conftest import Report, StartServer
from support import LineReader

LARGE_LIMIT = 4 << 20
CHUNK = 256 << 10
# Python's allocator keeps some freed memory: even a server that keeps no bytes of a line
# ends some runs a few hundred KiB up (measured: 0 to 1.1 MiB over a 100 MiB line, on both
# paths). At the default limit that noise is larger than the limit itself, so there the
# bound is 2x the limit plus this allowance, which still fails any buffering of the line;
# with a 4 MiB limit the "under 2x the limit" is asserted as it stands.
ALLOCATOR_ALLOWANCE = 1536 << 10
DEFAULT_LIMIT = DEFAULT_MAX_MESSAGE_BYTES
DEFAULT_GROWTH_BOUND = 2 * DEFAULT_LIMIT + ALLOCATOR_ALLOWANCE


def lines_for(limit: int) -> dict[str, int]:
    """The issue's oversized lines: the limit + 1, 1 MiB (when that is over the limit),
    and 100 MiB, each without a newline until its end."""
    sizes = {"limit_plus_1": limit + 1, "1MiB": 1 << 20, "100MiB": 100 << 20}
    return {name: size for name, size in sizes.items() if size > limit}


async def send_and_check(
    stream: trio.SocketStream, reader: LineReader, seq: int, pid: str, history: History
) -> None:
    """One message carrying ``pid``; its ACK must come back as ``seq``."""
    payload = b"@%s|" % pid.encode()
    history.written(pid, payload)
    await stream.send_all(payload + b"\n")
    reply = parse_reply(await reader.line())
    assert reply == Ack(seq, len(payload), zlib.crc32(payload)), reply
    history.acked(pid, len(payload), zlib.crc32(payload))


async def oversized_line(server: ServerUnderTest, name: str, size: int, history: History) -> int:
    """On a fresh connection: one message, then ``size`` bytes without a newline, then the
    newline and one more message, checking every reply; return how many of the ``size``
    bytes had been sent when the ``ERR`` arrived."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    sent = 0
    err_after = -1
    async with stream:
        reader = LineReader(stream)
        await send_and_check(stream, reader, 1, f"{name}-before", history)
        async with trio.open_nursery() as nursery:

            async def read_err() -> None:
                nonlocal err_after
                err = parse_reply(await reader.line())
                err_after = sent
                assert isinstance(err, Err), err
                assert (err.seq, err.code) == (2, "too-large")

            nursery.start_soon(read_err)
            chunk = b"x" * CHUNK
            while sent < size:
                piece = chunk[: min(CHUNK, size - sent)]
                await stream.send_all(piece)
                sent += len(piece)
            await stream.send_all(b"\n")
        await send_and_check(stream, reader, 3, f"{name}-after", history)
    return err_after


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recording", "limit", "growth_bound"),
    [
        pytest.param(True, DEFAULT_MAX_MESSAGE_BYTES, 2 * 65536 + ALLOCATOR_ALLOWANCE, id="hook"),
        pytest.param(
            False, DEFAULT_MAX_MESSAGE_BYTES, 2 * 65536 + ALLOCATOR_ALLOWANCE, id="no-hook"
        ),
        pytest.param(True, LARGE_LIMIT, 2 * LARGE_LIMIT, id="hook-4MiB"),
        pytest.param(False, LARGE_LIMIT, 2 * LARGE_LIMIT, id="no-hook-4MiB"),
    ],
)
async def test_oversized_lines_are_refused_without_buffering(
    start_server: StartServer, report: Report, recording: bool, limit: int, growth_bound: int
) -> None:
    """Each oversized line (the limit + 1 byte, 1 MiB, 100 MiB) gets ``ERR 2 too-large``
    between ``ACK 1`` and ``ACK 3`` on its connection and is never handed to the
    application; on the 100 MiB line the ERR arrives while the line is still being sent
    (as soon as the limit is crossed). The next connection is served as usual. The server's
    peak RSS over each line grows by less than twice the limit (see ALLOCATOR_ALLOWANCE
    for the default limit)."""
    server = await start_server(recording=recording, flags=["--max-message-bytes", str(limit)])
    history = History()
    figures: dict[str, object] = {"limit": limit}
    growths = []
    lines = lines_for(limit)
    with trio.fail_after(120):
        for name, size in lines.items():
            rss_before = server.rss()
            server.reset_peak_rss()
            err_after = await oversized_line(server, name, size, history)
            growths.append(server.peak_rss() - rss_before)
            figures[f"{name}_peak_rss_growth_kib"] = growths[-1] // 1024
            figures[f"{name}_err_after_bytes"] = err_after
            if name == "100MiB":
                assert err_after < size, "too-large came only after the whole line"
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await send_and_check(stream, LineReader(stream), 1, f"{name}-next", history)
    await server.assert_healthy()
    assert len(server.events_named("message_too_large")) == len(lines)
    if recording:
        verdict = check(history, server.records())
        verdict.assert_valid()
        assert verdict.recorded == 3 * len(lines)  # nothing of the oversized lines
    report(**figures)
    assert max(growths) < growth_bound, f"peak RSS grew {max(growths) / 1024:.0f} KiB"
