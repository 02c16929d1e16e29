"""What one connection may cost the server, whatever its client does: memory held for a
client that never reads, patience with a client that reads slowly, and log lines."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
import trio
import trio.testing

from ackservice.protocol import ack_line
from ackservice.server import AckHandler, MessageContext, Reject, ServerConfig
from ackservice.server.ratelimit import WARNINGS_PER_SECOND
from support import LineReader

EventList = list[dict[str, Any]]

# What a client that never reads may pin in the server beyond the kernel's buffers: the
# read (64 KiB) and one piece of replies (REPLY_PIECE_BYTES, 64 KiB), plus a little.
HELD_BYTES_BOUND = 192 * 1024


def events_named(logs: EventList, name: str) -> EventList:
    return [e for e in logs if e["event"] == name]


async def accept_all(payload: bytes, context: MessageContext) -> None:
    """An application hook that accepts every message."""


@pytest.mark.parametrize("hook", [None, accept_all], ids=["acknowledger", "hook"])
async def test_a_client_that_never_reads_pins_little_memory(
    nursery: trio.Nursery, hook: Any
) -> None:
    """64 KiB of empty lines make ~1.4 MB of replies. While the client reads none of them,
    the connection holds the read and one piece of replies at most (under 192 KiB of
    Python allocations), not all of them; when it reads at last, every reply is there, in
    order."""
    client, server_side = trio.testing.lockstep_stream_pair()  # send_all waits for a reader
    messages = 65536
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        nursery.start_soon(
            AckHandler(ServerConfig(send_timeout=1000), on_message=hook), server_side
        )
        await client.send_all(b"\n" * messages)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert held < HELD_BYTES_BOUND, f"{held / 1024:.0f} KiB held"
    replies = LineReader(client)
    assert await replies.lines(messages - 1) == [ack_line(1, b"")[:-1]] + [
        ack_line(seq, b"")[:-1] for seq in range(2, messages)
    ]
    assert await replies.line() == ack_line(messages, b"")[:-1]


async def test_a_slow_but_steady_reader_is_never_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """send_timeout bounds how long a client may make no progress reading, not how long a
    write may take: a client reading 10 kB/s gets every one of 6,000 replies (~126 kB, 12 s
    of reading) with a 10 s send timeout, and is not dropped."""
    client, server_side = trio.testing.lockstep_stream_pair()
    nursery.start_soon(AckHandler(ServerConfig(send_timeout=10)), server_side)
    messages = 6000
    await client.send_all(b"012345678\n" * messages)
    received = bytearray()
    started = trio.current_time()
    expected = b"".join(ack_line(seq, b"012345678") for seq in range(1, messages + 1))
    while len(received) < len(expected):
        await trio.sleep(0.1)
        received += await client.receive_some(1000)
    assert bytes(received) == expected
    assert trio.current_time() - started > 10
    await client.send_eof()
    await trio.testing.wait_all_tasks_blocked()
    assert events_named(logs, "connection_closed")[0]["reason"] == "eof"


async def test_a_reader_that_stalls_is_still_dropped_after_send_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """A client that reads some replies and then stops is dropped send_timeout after its
    last progress, not after the write began."""
    client, server_side = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await AckHandler(ServerConfig(send_timeout=5))(server_side)
        done.set()

    nursery.start_soon(serve)
    await client.send_all(b"012345678\n" * 6000)  # three 64 KiB pieces of replies
    for _ in range(30):  # reads 1,000 bytes every 0.2 s for 6 s
        await trio.sleep(0.2)
        await client.receive_some(1000)
    stalled_at = trio.current_time()
    await done.wait()
    assert trio.current_time() - stalled_at <= 5
    assert events_named(logs, "connection_closed")[0]["reason"] == "send-timeout"


async def reject_all(payload: bytes, context: MessageContext) -> None:
    raise Reject("no")


async def fail_all(payload: bytes, context: MessageContext) -> None:
    raise RuntimeError("application bug")


async def never_answer(payload: bytes, context: MessageContext) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("event", "config", "hook"),
    [
        ("message_rejected", ServerConfig(), reject_all),
        ("message_too_large", ServerConfig(max_message_bytes=1), None),
        ("on_message_failed", ServerConfig(), fail_all),
        ("on_message_timed_out", ServerConfig(hook_timeout=0.001), never_answer),
    ],
)
async def test_per_message_warnings_are_rate_limited_per_connection(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    logs: EventList,
    event: str,
    config: ServerConfig,
    hook: Any,
) -> None:
    """A client whose every message draws a warning gets the first few per second logged in
    full, then one ``warnings_suppressed`` summary with the count, not one line each: a
    hook refusing 50,000 tiny messages must not become 8 MB of log."""
    messages = 2000
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(AckHandler(config, on_message=hook), server_side)
    await client.send_all(b"xy\n" * messages)
    await client.send_eof()
    replies = LineReader(client)
    assert len(await replies.lines(messages)) == messages
    assert await replies.at_eof()
    await trio.testing.wait_all_tasks_blocked()
    logged = events_named(logs, event)
    summaries = events_named(logs, "warnings_suppressed")
    assert 1 <= len(logged) <= WARNINGS_PER_SECOND * (1 + int(trio.current_time()))
    assert {s["suppressed_event"] for s in summaries} == {event}
    assert len(logged) + sum(s["count"] for s in summaries) == messages
    assert len(summaries) <= 1 + int(trio.current_time())
    assert all(s["conn_id"] == logged[0]["conn_id"] for s in summaries)


async def test_the_warning_allowance_renews_every_second(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """After a quiet second a connection's warnings are logged in full again, and the
    summary of the suppressed ones comes before them."""
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(AckHandler(on_message=reject_all), server_side)
    replies = LineReader(client)
    await client.send_all(b"x\n" * 20)
    await replies.lines(20)
    await trio.sleep(1.5)
    await client.send_all(b"x\n" * 2)
    await replies.lines(2)
    names = [e["event"] for e in logs if e["event"] in ("message_rejected", "warnings_suppressed")]
    assert names == ["message_rejected"] * WARNINGS_PER_SECOND + [
        "warnings_suppressed",
        "message_rejected",
        "message_rejected",
    ]
    assert events_named(logs, "warnings_suppressed")[0]["count"] == 20 - WARNINGS_PER_SECOND
