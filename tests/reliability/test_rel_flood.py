"""Scenario 11, connection flood: with a limit of 1,000, open 1,500. The extra 500 get
``ERR 0 busy`` within 1 s each, the served ones are unaffected, and once slots free up
new connections are accepted again within 1 s."""

from __future__ import annotations

import zlib

import pytest
import trio
from rel_checker import History, check
from rel_harness import percentile, poll_until

from ackservice.protocol import Ack, Err, parse_reply
from conftest import Report, StartServer
from support import LineReader

LIMIT = 1_000
OPENED = 1_500
FREED = 100
BUSY_WITHIN = 1.0
ACCEPTED_AGAIN_WITHIN = 1.0
CONNECT_CONCURRENCY = 100


class Flooder:
    """One connection of the flood, with the messages it sent and what it was told."""

    def __init__(self, index: int, history: History) -> None:
        self.index = index
        self.history = history
        self.stream: trio.SocketStream | None = None
        self.reader: LineReader | None = None
        self.seq = 0

    async def open(self, port: int) -> tuple[Ack | Err, float]:
        """Connect and send one message; its reply and the seconds since connecting."""
        started = trio.current_time()
        self.stream = await trio.open_tcp_stream("127.0.0.1", port)
        self.reader = LineReader(self.stream)
        return await self.send(), trio.current_time() - started

    async def send(self) -> Ack | Err:
        assert self.stream is not None
        assert self.reader is not None
        self.seq += 1
        pid = f"f{self.index}-{self.seq}"
        payload = b"@%s|flood" % pid.encode()
        self.history.written(pid, payload)
        await self.stream.send_all(payload + b"\n")
        reply = parse_reply(await self.reader.line())
        if isinstance(reply, Ack):
            assert reply == Ack(self.seq, len(payload), zlib.crc32(payload)), reply
            self.history.acked(pid, reply.nbytes, reply.crc32)
        return reply

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


@pytest.mark.slow
async def test_connection_flood_beyond_the_limit(start_server: StartServer, report: Report) -> None:
    """1,500 connections each send a message: 1,000 get its ACK, 500 get ``ERR 0 busy``
    (each within 1 s of connecting) and the end of the stream. The 1,000 then each
    send a second message and get ``ACK 2``. After 100 of them leave, 100 new
    connections are each accepted (ACK, not busy) within 1 s. The server's
    descriptors return to the baseline once everyone has left."""
    server = await start_server(
        recording=True, flags=["--max-connections", str(LIMIT), "--drain-timeout", "2"]
    )
    history = History()
    served: list[Flooder] = []
    busy_after: list[float] = []
    slots = trio.Semaphore(CONNECT_CONCURRENCY)

    async def flood(index: int) -> None:
        async with slots:
            flooder = Flooder(index, history)
            reply, after = await flooder.open(server.port)
        if isinstance(reply, Err):
            assert (reply.seq, reply.code) == (0, "busy"), reply
            busy_after.append(after)
            assert flooder.reader is not None
            assert await flooder.reader.at_eof()
            await flooder.close()
        else:
            served.append(flooder)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(OPENED):
                    nursery.start_soon(flood, index)
            assert len(served) == LIMIT
            assert len(busy_after) == OPENED - LIMIT

            async def second_message(flooder: Flooder) -> None:
                # send() checks the ACK: seq 2, this message's length and CRC-32.
                assert isinstance(await flooder.send(), Ack)

            async with trio.open_nursery() as nursery:
                for flooder in served:
                    nursery.start_soon(second_message, flooder)

            leaving, served = served[:FREED], served[FREED:]
            for flooder in leaving:
                await flooder.close()
            freed_at = trio.current_time()
            accepted_after: list[float] = []

            async def newcomer(index: int) -> None:
                while True:  # bounded by the fail_after above
                    flooder = Flooder(index, history)
                    reply, _ = await flooder.open(server.port)
                    if isinstance(reply, Ack):
                        accepted_after.append(trio.current_time() - freed_at)
                        served.append(flooder)
                        return
                    await flooder.close()
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                for index in range(OPENED, OPENED + FREED):
                    nursery.start_soon(newcomer, index)
    finally:
        for flooder in served:
            await flooder.close()

    assert max(busy_after) < BUSY_WITHIN, f"busy after {max(busy_after):.2f} s"
    assert max(accepted_after) < ACCEPTED_AGAIN_WITHIN, f"{max(accepted_after):.2f} s"
    await server.assert_healthy()
    # All "busy": nothing else refuses here. The server logs a few a second and the count
    # of the rest within the next second.
    with trio.move_on_after(5):
        await poll_until(lambda: server.count_refusals() >= OPENED - LIMIT)
    refused = server.count_refusals()
    assert refused >= OPENED - LIMIT
    verdict = check(history, server.records())
    verdict.assert_valid()
    report(
        limit=LIMIT,
        opened=OPENED,
        busy=len(busy_after),
        busy_p50_ms=round(percentile(busy_after, 0.5) * 1000, 1),
        busy_max_ms=round(max(busy_after) * 1000, 1),
        accepted_again_max_ms=round(max(accepted_after) * 1000, 1),
        refused_while_full=refused - (OPENED - LIMIT),
        **verdict.summary(),
    )
