"""Scenario 7, a client that never reads its replies: a tiny receive buffer and 100,000
pipelined messages. It is closed after the send timeout, the server's memory grows by
less than 1 MiB, and other clients are unaffected."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload, message_key
from rel_harness import (
    ClientRun,
    ServerUnderTest,
    loopback_address,
    percentile,
    pick,
    pipelined_client,
    poll_until,
)

from ackservice.protocol import message_line
from conftest import Report, StartServer

SEND_TIMEOUT = pick(1.0, 10.0)
MESSAGES = 100_000
PAYLOAD_BYTES = 16
MEMORY_GROWTH_LIMIT = 1024 * 1024
# A round trip of the other clients may wait behind one read of the stuck connection,
# never behind its send timeout: a wait behind it would take 1 s at least (quick). Under a
# CPU hog beside the suite the worst round trip reached 0.55-0.66 s (3 runs in 70), the
# test process starved as much as the server: 0.9 s keeps the claim and that margin.
OTHER_CLIENT_RTT_BOUND = 0.9


@dataclass
class NonReader:
    """How a never-reading client fared."""

    local: str
    written: int
    ended_after: float
    end: str


async def never_reading_client(port: int, messages: int, tag: str, history: History) -> NonReader:
    """Pipeline ``messages`` without ever reading, through a receive buffer as small as
    the kernel allows, until the server ends the connection (a write fails)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    filler = filler_block(4096)
    payloads = [make_payload(f"{tag}{i}", PAYLOAD_BYTES, filler, i) for i in range(messages)]
    for payload in payloads:
        # All noted as written up front: whatever the server records must be known.
        history.written(message_key(payload, "", 0), payload)
    wire = b"".join(message_line(payload) for payload in payloads)
    written = 0
    started = trio.current_time()
    end = "sent everything"
    local = loopback_address(sock)
    async with stream:
        try:
            for offset in range(0, len(wire), 4096):
                await stream.send_all(wire[offset : offset + 4096])
                written = offset + 4096
            # Everything went out and the server is still there: wait for it to give up.
            await trio.sleep(SEND_TIMEOUT * 4)
        except trio.BrokenResourceError as exc:
            end = type(exc.__cause__).__name__ if exc.__cause__ else "broken"
    return NonReader(local, min(written, len(wire)), trio.current_time() - started, end)


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("recording", [True, False], ids=["hook", "no-hook"])
async def test_client_that_never_reads_is_dropped_after_the_send_timeout(
    start_server: StartServer, report: Report, recording: bool
) -> None:
    """A client pipelines 100,000 messages and never reads a reply. The server stops
    reading from it once its replies back up, and after the send timeout drops it (the
    ``connection_closed`` reason is ``send-timeout``). Meanwhile the server's peak RSS
    grows by less than 1 MiB, and a normal client keeps getting every reply, none slower
    than 0.5 s. (A first, smaller non-reader warms up the code paths beforehand, so that
    one-time allocations do not count as growth.)"""
    # Without the hook, --store none: the memory measured is the connection's, not the
    # default SQLite store's page cache, which grows (to its fixed 2 MiB) as the file does.
    flags = ["--send-timeout", str(SEND_TIMEOUT)] + ([] if recording else ["--store", "none"])
    server: ServerUnderTest = await start_server(recording=recording, flags=flags)
    with trio.fail_after(SEND_TIMEOUT * 10 + 30):
        history = History()
        await never_reading_client(server.port, MESSAGES // 4, "warm", history)
        await server.wait_for_event("connection_closed", count=2)
        rss_before = server.rss()
        server.reset_peak_rss()
        stop = trio.Event()
        other: list[ClientRun] = []
        filler = filler_block()

        def payloads():  # type: ignore[no-untyped-def]
            for index in range(1_000_000):  # bounded; stop comes first
                if stop.is_set():
                    return
                yield make_payload(f"other{index}", 100, filler, index)

        async def other_client() -> None:
            other.append(await pipelined_client(server.port, payloads(), history, window=1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_client)
            stuck = await never_reading_client(server.port, MESSAGES, "nr", history)
            stop.set()
        growth = server.peak_rss() - rss_before

    # Log lines reach the file through the server's writer thread, a little after the fact.
    def closed_events() -> list[dict[str, object]]:
        return [e for e in server.events_named("connection_closed") if e["peer"] == stuck.local]

    with trio.fail_after(5):
        await poll_until(lambda: bool(closed_events()))
    [closed] = closed_events()
    assert closed["reason"] == "send-timeout"
    assert closed["duration"] >= SEND_TIMEOUT
    assert growth < MEMORY_GROWTH_LIMIT, f"peak RSS grew {growth / 1024:.0f} KiB"
    [run] = other
    assert run.end == "eof"
    assert run.acked > 10
    assert max(run.rtts) < OTHER_CLIENT_RTT_BOUND
    await server.assert_healthy()
    figures: dict[str, object] = {}
    if recording:
        verdict = check(history, server.records())
        verdict.assert_valid()
        figures = {"other_client_acked": verdict.acked, "lost": len(verdict.lost)}
    report(
        send_timeout_s=SEND_TIMEOUT,
        bytes_written=stuck.written,
        messages_answered_before_drop=closed["messages"],
        dropped_after_s=round(stuck.ended_after, 2),
        client_saw=stuck.end,
        server_duration_s=closed["duration"],
        peak_rss_growth_kib=growth // 1024,
        other_p99_ms=round(percentile(run.rtts, 0.99) * 1000, 2),
        other_max_ms=round(max(run.rtts) * 1000, 2),
        **figures,
    )
