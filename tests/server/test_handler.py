"""AckHandler over in-memory streams: the protocol, limits, timeouts, hook and shutdown."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
import trio
import trio.testing

from ackservice.protocol import ack_line
from ackservice.server import AckHandler, MessageContext, Reject, ServerConfig, connection
from support import LineReader

EventList = list[dict[str, Any]]


def open_connection(
    nursery: trio.Nursery, handler: AckHandler
) -> tuple[trio.testing.StapledStream[Any, Any], LineReader]:
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(handler, server_side)
    return client, LineReader(client)


def events_named(logs: EventList, name: str) -> EventList:
    return [e for e in logs if e["event"] == name]


async def test_acks_every_message_in_order(nursery: trio.Nursery) -> None:
    """Each message gets exactly one ACK, seqs counting from 1, with its length and CRC-32."""
    client, replies = open_connection(nursery, AckHandler())
    await client.send_all(b"hello\nsecond message\r\n\n")
    assert await replies.lines(3) == [
        b"ACK 1 5 3610a686",
        ack_line(2, b"second message")[:-1],
        ack_line(3, b"")[:-1],
    ]


async def test_seq_is_per_connection(nursery: trio.Nursery) -> None:
    """Every connection counts its own messages from 1."""
    handler = AckHandler()
    first, first_replies = open_connection(nursery, handler)
    second, second_replies = open_connection(nursery, handler)
    await first.send_all(b"a\nb\n")
    await second.send_all(b"c\n")
    assert [line.split()[1] for line in await first_replies.lines(2)] == [b"1", b"2"]
    assert (await second_replies.line()).split()[1] == b"1"


class CountingStream(trio.abc.Stream):
    """Wraps a stream and records the size of every send_all."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_one_read_is_answered_in_one_write(nursery: trio.Nursery) -> None:
    """Replies to all the messages of one read leave in a single write (pipelining speed)."""
    client, server_side = trio.testing.memory_stream_pair()
    counting = CountingStream(server_side)
    nursery.start_soon(AckHandler(), counting)
    await client.send_all(b"m\n" * 1000)
    await LineReader(client).lines(1000)
    assert len(counting.writes) == 1


async def test_too_large_is_answered_before_the_newline(nursery: trio.Nursery) -> None:
    """Crossing the size limit is answered at once; the rest of the line is dropped and the
    next message is served normally with the next seq."""
    client, replies = open_connection(nursery, AckHandler(ServerConfig(max_message_bytes=10)))
    await client.send_all(b"x" * 11)
    assert (await replies.line()).startswith(b"ERR 1 too-large ")
    await client.send_all(b"y" * 100_000)  # still the same line: silently dropped
    await client.send_all(b"z\nok\n")
    assert await replies.line() == ack_line(2, b"ok")[:-1]


async def test_eof_acks_everything_including_the_tail_then_closes(nursery: trio.Nursery) -> None:
    """After the client's EOF the server answers everything, counts the unterminated tail as
    a final message, then closes."""
    client, replies = open_connection(nursery, AckHandler())
    await client.send_all(b"a\nlast")
    await client.send_eof()
    assert await replies.lines(2) == [ack_line(1, b"a")[:-1], ack_line(2, b"last")[:-1]]
    assert await replies.at_eof()


async def test_idle_connection_is_closed_with_a_reason(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """With no complete message for idle_timeout, the server says idle-timeout and closes."""
    client, replies = open_connection(nursery, AckHandler(ServerConfig(idle_timeout=30)))
    start = trio.current_time()
    line = await replies.line()
    assert line.startswith(b"ERR 0 idle-timeout ")
    assert trio.current_time() - start == pytest.approx(30)
    await client.aclose()  # the server drains until the client closes
    await trio.testing.wait_all_tasks_blocked()
    assert events_named(logs, "connection_closed")[0]["reason"] == "idle-timeout"


async def test_connection_cancelled_from_outside_still_leaves_the_totals(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """An embedder bounding a connection with its own timeout: the cancelled connection is
    logged, leaves the totals and frees its slot (closing it raises Cancelled again)."""
    handler = AckHandler(ServerConfig(max_connections=1))
    client, server_side = trio.testing.memory_stream_pair()

    async def bounded() -> None:
        with trio.move_on_after(5):
            await handler(server_side)

    nursery.start_soon(bounded)
    await client.send_all(b"a\n")
    assert (await LineReader(client).line()).startswith(b"ACK 1 ")
    await trio.sleep(10)
    assert handler.stats.active == 0
    assert not handler._connections
    assert handler.stats.messages == 1
    assert events_named(logs, "connection_closed")[0]["reason"] == "cancelled"
    second, replies = open_connection(nursery, handler)  # the slot is free again
    await second.send_all(b"b\n")
    assert (await replies.line()).startswith(b"ACK 1 ")


async def test_shutdown_just_after_input_arrives_still_answers_it(nursery: trio.Nursery) -> None:
    """Input that has arrived when the shutdown starts is answered before the goodbye, also
    when the connection task has not run yet (stream loop)."""
    handler = AckHandler()
    client, replies = open_connection(nursery, handler)
    await trio.testing.wait_all_tasks_blocked()
    await client.send_all(b"hello\n")
    handler.begin_shutdown()
    assert await replies.line() == b"ACK 1 5 3610a686"
    assert (await replies.line()).startswith(b"ERR 0 shutting-down ")


async def test_slow_hook_does_not_count_as_idleness(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A hook slower than idle_timeout: the reply comes, and the idle clock starts then, so
    the connection is closed idle_timeout after the reply, not at once."""

    async def slow(payload: bytes, context: MessageContext) -> None:
        await trio.sleep(25)

    client, replies = open_connection(
        nursery, AckHandler(ServerConfig(idle_timeout=10), on_message=slow)
    )
    await client.send_all(b"slow\n")
    assert (await replies.line()).startswith(b"ACK 1 ")
    replied_at = trio.current_time()
    assert (await replies.line()).startswith(b"ERR 0 idle-timeout ")
    assert trio.current_time() - replied_at == pytest.approx(10)


async def test_idle_timer_restarts_on_complete_messages_not_bytes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A client trickling one byte a second never completes a message, so it is still closed
    idle_timeout after its last complete message."""
    client, replies = open_connection(nursery, AckHandler(ServerConfig(idle_timeout=10)))
    await trio.sleep(8)
    await client.send_all(b"done\n")  # restarts the timer at t=8
    assert (await replies.line()).startswith(b"ACK 1 ")
    closed_at: list[float] = []

    async def watch() -> None:
        line = await replies.line()
        assert line.startswith(b"ERR 0 idle-timeout")
        closed_at.append(trio.current_time())

    nursery.start_soon(watch)
    start = trio.current_time()
    for _ in range(30):
        if closed_at:
            break
        await client.send_all(b"x")
        await trio.sleep(1)
    assert closed_at[0] - start == pytest.approx(10, abs=0.01)


async def test_hook_accepts_before_the_ack(nursery: trio.Nursery) -> None:
    """The ACK is sent only after the application hook returns; the hook sees the context."""
    release = trio.Event()
    seen: list[tuple[bytes, MessageContext]] = []

    async def on_message(payload: bytes, context: MessageContext) -> None:
        seen.append((payload, context))
        await release.wait()

    client, replies = open_connection(nursery, AckHandler(on_message=on_message))
    await client.send_all(b"hello\n")
    await trio.testing.wait_all_tasks_blocked()
    assert seen[0][0] == b"hello"
    assert seen[0][1].seq == 1
    with trio.move_on_after(0.05):
        await replies.line()
        pytest.fail("ACK sent before the hook accepted the message")
    release.set()
    assert await replies.line() == b"ACK 1 5 3610a686"


async def test_hook_rejection_and_failure_are_per_message(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """Reject("why") gives ERR rejected, any other exception ERR internal-error (logged with
    its traceback); either way the connection goes on."""

    async def on_message(payload: bytes, context: MessageContext) -> None:
        if payload == b"bad":
            raise Reject("payload is bad\nreally")
        if payload == b"boom":
            raise RuntimeError("application bug")

    client, replies = open_connection(nursery, AckHandler(on_message=on_message))
    await client.send_all(b"ok\nbad\nboom\nok\n")
    lines = await replies.lines(4)
    assert lines[0].startswith(b"ACK 1 ")
    assert lines[1] == b"ERR 2 rejected payload is bad really"
    assert lines[2].startswith(b"ERR 3 internal-error ")
    assert lines[3].startswith(b"ACK 4 ")
    [failure] = events_named(logs, "on_message_failed")
    assert isinstance(failure["exc_info"], RuntimeError)  # logged with its traceback
    assert failure["seq"] == 3
    assert events_named(logs, "message_rejected")[0]["reason"] == "payload is bad\nreally"


async def test_over_the_limit_is_told_busy(nursery: trio.Nursery, logs: EventList) -> None:
    """Past max_connections a new connection gets ERR 0 busy and is closed; the served one
    is unaffected."""
    handler = AckHandler(ServerConfig(max_connections=1))
    first, first_replies = open_connection(nursery, handler)
    await trio.testing.wait_all_tasks_blocked()
    second, second_replies = open_connection(nursery, handler)
    assert (await second_replies.line()).startswith(b"ERR 0 busy ")
    await second.aclose()
    await first.send_all(b"still here\n")
    assert (await first_replies.line()).startswith(b"ACK 1 ")
    assert handler.stats.refused_busy == 1
    assert events_named(logs, "connection_refused")[0]["reason"] == "busy"


async def test_shutdown_answers_what_was_read_then_closes(nursery: trio.Nursery) -> None:
    """A connection mid-batch at shutdown answers every message it read, then says
    shutting-down; an idle connection is told at once."""
    entered = trio.Event()
    release = trio.Event()

    async def on_message(payload: bytes, context: MessageContext) -> None:
        if payload == b"slow":
            entered.set()
            await release.wait()

    handler = AckHandler(on_message=on_message)
    busy, busy_replies = open_connection(nursery, handler)
    _, idle_replies = open_connection(nursery, handler)
    await busy.send_all(b"slow\nnext\n")
    await entered.wait()
    handler.begin_shutdown()
    assert (await idle_replies.line()).startswith(b"ERR 0 shutting-down ")
    release.set()
    assert await busy_replies.lines(3) == [
        ack_line(1, b"slow")[:-1],
        ack_line(2, b"next")[:-1],
        b"ERR 0 shutting-down server is shutting down, retry later",
    ]
    assert await busy_replies.at_eof()
    _, late_replies = open_connection(nursery, handler)
    assert (await late_replies.line()).startswith(b"ERR 0 shutting-down ")


async def test_client_that_never_reads_is_dropped_after_send_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """A client that stops reading its replies is disconnected after send_timeout, so it
    cannot pin server memory."""
    client, server_side = trio.testing.lockstep_stream_pair()  # send_all waits for a reader
    done = trio.Event()

    async def serve() -> None:
        await AckHandler(ServerConfig(send_timeout=5))(server_side)
        done.set()

    nursery.start_soon(serve)
    start = trio.current_time()
    await client.send_all(b"never read my reply\n")
    await done.wait()
    assert trio.current_time() - start == pytest.approx(5)
    assert events_named(logs, "connection_closed")[0]["reason"] == "send-timeout"


async def test_broken_connection_ends_only_itself(nursery: trio.Nursery, logs: EventList) -> None:
    """A peer that vanishes mid-reply ends its own connection; others carry on."""
    handler = AckHandler()
    doomed, _ = open_connection(nursery, handler)
    healthy, healthy_replies = open_connection(nursery, handler)
    await doomed.send_all(b"x\n" * 10)
    await doomed.aclose()
    await trio.testing.wait_all_tasks_blocked()
    await healthy.send_all(b"y\n")
    assert (await healthy_replies.line()).startswith(b"ACK 1 ")
    assert handler.stats.active == 1


class ExplodingStream(trio.abc.Stream):
    """A stream whose receive fails with an unexpected exception, as a buggy transport might."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pass

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise ValueError("transport bug")

    async def aclose(self) -> None:
        pass


async def test_unexpected_failure_never_escapes_the_handler(logs: EventList) -> None:
    """Whatever goes wrong inside a connection is logged and ends that connection only: the
    handler returns normally, so an accept loop using it never crashes."""
    await AckHandler()(ExplodingStream())
    assert events_named(logs, "connection_failed")[0]["exc_info"] is True
    assert events_named(logs, "connection_closed")[0]["reason"] == "internal-error"


async def test_connection_events_carry_context_but_never_payloads(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """Open and close events carry conn_id and peer; the close summarises counts; message
    contents never appear in any event, at any level."""
    handler = AckHandler(ServerConfig(max_message_bytes=20))
    client, replies = open_connection(nursery, handler)
    await client.send_all(b"SECRET-MARKER-1\n" + b"SECRET-MARKER-2" * 3 + b"\n")
    await replies.lines(2)
    await client.send_eof()
    assert await replies.at_eof()
    await trio.testing.wait_all_tasks_blocked()
    [opened] = events_named(logs, "connection_opened")
    [closed] = events_named(logs, "connection_closed")
    assert opened["conn_id"] == closed["conn_id"] == 1
    assert opened["peer"] == closed["peer"]
    assert closed["reason"] == "eof"
    assert (closed["messages"], closed["acked"], closed["errors"]) == (2, 1, 1)
    assert closed["bytes"] == 16 + 46
    assert "SECRET" not in repr(logs)
    assert [e["seq"] for e in events_named(logs, "message_acked")] == [1]  # debug, unconfigured


@pytest.mark.parametrize(("level", "expected"), [(10, True), (20, False)])
def test_per_message_work_is_skipped_when_debug_is_off(level: int, expected: bool) -> None:
    """Per-message debug events are only built when debug is on, so they cost nothing in
    production; the check follows the configured level."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        assert connection._debug_enabled() is expected
    finally:
        structlog.reset_defaults()
