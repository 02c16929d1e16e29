"""Scenario 10, hostile bytes on the wire: NUL, lone CR, CRLF, invalid UTF-8, empty lines,
runs of 0xFF, over-long lines; 10,000 random streams, each on its own connection (2,000
per server in the normal suite). Exactly one reply per complete line, no crash."""

from __future__ import annotations

import random
import socket
import zlib

import pytest
import trio
from rel_checker import CONNECTION_TAG, History, check, connection_tag, message_key
from rel_harness import pick, reference_frames, reference_replies

from conftest import Report, StartServer

STREAMS = pick(2_000, 10_000)
CONCURRENCY = 20
LIMIT = 64
PIECES = [
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n\n",
    b"\r\r\n",
    b"\x00",
    b"\x00" * 50,
    b"\xff" * 100,
    b"\xc3\x28",  # invalid UTF-8: a lead byte without its continuation
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\x1b[2J",
    b"hello",
    b"ACK 1 5 3610a686",
    b"ERR 0 busy x",
    b"x" * LIMIT,
    b"y" * (LIMIT + 1),
]


def hostile_stream(rng: random.Random) -> bytes:
    """A stream of hostile pieces and random bytes, sometimes ending without a newline."""
    parts = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.2:
            parts.append(rng.randbytes(rng.randint(1, 80)))
        else:
            parts.append(rng.choice(PIECES))
    return b"".join(parts)


def tagged(index: int, stream: bytes) -> tuple[str, bytes]:
    """The connection's name and its whole stream: a tag message, then ``stream``.

    10,000 connections reuse local ports, so messages without an id are keyed by the
    connection's tag rather than its address (see rel_checker).
    """
    tag = connection_tag(f"h{index}")
    return f"{CONNECTION_TAG}h{index}", tag + b"\n" + stream


async def send_in_pieces(stream: bytes, port: int, rng: random.Random) -> bytes:
    """Send ``stream`` on a new connection in random pieces (TCP_NODELAY, so they often
    arrive as sent), half-close, and return every reply."""
    connection = await trio.open_tcp_stream("127.0.0.1", port)
    replies = b""
    async with connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offset = 0
        while offset < len(stream):
            size = rng.choice([1, 2, 3, 7, 64, 1000])
            await connection.send_all(stream[offset : offset + size])
            offset += size
            if rng.random() < 0.1:
                await trio.sleep(0.001)
        await connection.send_eof()
        while data := await connection.receive_some():
            replies += data
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("recording", [True, False], ids=["hook", "no-hook"])
async def test_hostile_streams_get_exactly_one_reply_per_line(
    start_server: StartServer, report: Report, recording: bool
) -> None:
    """Every stream gets, byte for byte, the reference replies (the sans-IO framer's
    messages answered in order): one ACK or ERR too-large per complete line, plus one
    for bytes before the end of stream. The server logs no crash and keeps its
    descriptors; with the hook, the checker finds exactly the acknowledged messages."""
    server = await start_server(recording=recording, flags=["--max-message-bytes", str(LIMIT)])
    history = History()
    slots = trio.Semaphore(CONCURRENCY)
    mismatches: list[tuple[bytes, bytes, bytes]] = []
    lines = 0

    async def one(index: int) -> None:
        nonlocal lines
        async with slots:
            rng = random.Random(index)
            name, stream = tagged(index, hostile_stream(rng))
            frames = reference_frames(stream, LIMIT)
            # The key and payload of each message within the limit.
            accepted = [
                (message_key(frame, name, seq), frame)
                for seq, frame in enumerate(frames, 1)
                if isinstance(frame, bytes)
            ]
            for key, frame in accepted:
                history.written(key, frame)
            replies = await send_in_pieces(stream, server.port, rng)
            expected = reference_replies(stream, LIMIT)
            if replies != expected:
                mismatches.append((stream, replies, expected))
                return
            # The replies are the reference ones: each ACK is that message's.
            lines += len(frames)
            for key, frame in accepted:
                history.acked(key, len(frame), zlib.crc32(frame))

    with trio.fail_after(pick(60, 300)):
        async with trio.open_nursery() as nursery:
            for index in range(STREAMS):
                nursery.start_soon(one, index)

    assert not mismatches, mismatches[:3]
    await server.assert_healthy()
    figures: dict[str, object] = {}
    if recording:
        verdict = check(history, server.records())
        verdict.assert_valid()
        figures = verdict.summary()
    report(streams=STREAMS, replies=lines, mismatches=len(mismatches), **figures)
