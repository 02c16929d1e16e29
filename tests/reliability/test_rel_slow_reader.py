"""Scenario 21, a slow but steady reader: a client pipelines far more than the socket
buffers hold and reads its replies at 250 kB/s, for several times the send timeout. The
send timeout means "no progress reading for that long", so it is never dropped, and every
message it was told was acknowledged is in the record."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload
from rel_harness import ServerUnderTest, pick, pipelined_client

from conftest import Report, StartServer

SEND_TIMEOUT = pick(2.5, 5.0)
READING_FOR = pick(8.0, 30.0)
# Fast enough that the server sees progress well within a send timeout: at 80 kB/s it saw
# none for over 2 s at times (the client's kernel announces room only once ~128 KiB of its
# buffer's accounting is free, else the server learns of it from zero-window probes whose
# interval doubles), and slow enough that a stuck-looking write lasts several send timeouts.
BYTES_PER_SECOND = 250_000
TICK = 0.05
PAYLOAD_BYTES = 40
# Messages in flight: ~11 MB of replies, more than both sockets' buffers hold once grown.
WINDOW = 400_000
# Read at full speed first, so that the kernel grows both buffers to megabytes (the client's
# receive window, the server's send buffer): then a blocked write is reported writable only
# after a third of ~4 MB drained, ~5 s at 250 kB/s, which a send timeout on the whole write
# (or reset by writability) would take for a stuck client.
BURST = 1.0


class PacedStream:
    """A client's ``SocketStream`` that reads at most ``BYTES_PER_SECOND`` while ``paced``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.paced = False
        self.read = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.paced:
            return await self.stream.receive_some(max_bytes)
        await trio.sleep(TICK)
        data = await self.stream.receive_some(int(BYTES_PER_SECOND * TICK))
        self.read += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("recording", [True, False], ids=["hook", "no-hook"])
async def test_a_slow_steady_reader_is_never_dropped(
    start_server: StartServer, report: Report, recording: bool
) -> None:
    """A client keeps up to 400,000 messages in flight and, after a second at full speed,
    reads its replies at 250 kB/s for over three send timeouts. It is never dropped (the
    connection ends with its own EOF), every message gets its ACK, and the checker finds
    nothing lost."""
    flags = ["--send-timeout", str(SEND_TIMEOUT)]
    if not recording:
        flags += ["--store", "none"]
    server: ServerUnderTest = await start_server(recording=recording, flags=flags)
    history = History()
    filler = filler_block()
    stop = trio.Event()

    def payloads() -> Iterator[bytes]:
        for index in range(2_000_000):  # bounded; stop comes first
            if stop.is_set():
                return
            yield make_payload(f"slow{index}", PAYLOAD_BYTES, filler, index)

    sock = trio.socket.socket()
    # A fixed receive buffer: Linux reopens a closed receive window only once 1/16 of the
    # buffer (or a segment, 64 KiB on loopback) is free, so the server sees a reader's
    # progress every ~64 KiB here (0.26 s at 250 kB/s); an autotuned buffer of megabytes
    # would show it every few hundred KiB, and only a send timeout longer than that can
    # tell a slow reader from a stuck one.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    await sock.connect(("127.0.0.1", server.port))
    stream = PacedStream(trio.SocketStream(sock))
    with trio.fail_after(READING_FOR + 60):
        async with trio.open_nursery() as nursery:

            async def pace() -> None:
                await trio.sleep(BURST)
                stream.paced = True
                await trio.sleep(READING_FOR)
                stop.set()
                stream.paced = False
                figures["paced_bytes"] = stream.read

            figures: dict[str, Any] = {}
            nursery.start_soon(pace)
            run = await pipelined_client(
                server.port,
                payloads(),
                history,
                window=WINDOW,
                stream=stream,  # type: ignore[arg-type]
            )
    [closed] = [e for e in server.events_named("connection_closed") if e["peer"] == run.local]
    assert run.end == "eof", run.end
    assert closed["reason"] == "eof", closed
    assert run.acked == run.written
    assert closed["duration"] > READING_FOR > 3 * SEND_TIMEOUT
    await server.assert_healthy()
    if recording:
        verdict = check(history, server.records())
        verdict.assert_valid()
        figures |= verdict.summary()
    report(
        send_timeout_s=SEND_TIMEOUT,
        paced_for_s=READING_FOR,
        paced_rate_kbps=round(figures.pop("paced_bytes") / READING_FOR / 1000, 1),
        messages=run.written,
        connection_s=closed["duration"],
        **figures,
    )
