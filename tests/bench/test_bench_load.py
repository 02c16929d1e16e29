"""The load generator in-process, over memory streams: verification, timing, modes.

Fake servers here are small Trio handlers that answer each message as a test decides;
timing tests run on pytest-trio's autojump clock, so a 0.5 s stall costs no real time and
every latency is exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from ackservice.bench.load import LoadGenerator, OpenStream, run_load
from ackservice.bench.result import LoadResult, Snapshot
from ackservice.bench.spec import LoadSpec
from ackservice.errors import ConnectError
from ackservice.protocol import MessageFramer, Oversized, ack_line, err_line
from ackservice.server import AckHandler, ServerConfig, serve

Reply = Callable[[int, bytes], Awaitable[bytes]]
"""Given a message's seq and payload, the bytes a fake server sends back."""


async def correct(seq: int, payload: bytes) -> bytes:
    return ack_line(seq, payload)


async def fake_server(stream: trio.abc.Stream, reply: Reply, *, close_at_eof: bool = True) -> None:
    """Serve one connection: answer each message with ``reply``; close after the client's
    EOF (or, with ``close_at_eof=False``, never: the client must give up by itself)."""
    framer = MessageFramer(1 << 20)
    seq = 0
    async with stream:
        while data := await stream.receive_some(65536):
            for frame in framer.feed(data):
                assert not isinstance(frame, Oversized)
                seq += 1
                if answer := await reply(seq, frame):
                    await stream.send_all(answer)
        if not close_at_eof:
            await trio.sleep_forever()


def memory_server(
    nursery: trio.Nursery, serve: Callable[[trio.abc.Stream], Awaitable[None]]
) -> OpenStream:
    """Connections that ``serve`` answers, over in-memory streams."""

    async def open_stream() -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(serve, server)
        return client

    return open_stream


def replying(reply: Reply, **options: bool) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    async def serve(stream: trio.abc.Stream) -> None:
        await fake_server(stream, reply, **options)

    return serve


async def load(serve: Callable[[trio.abc.Stream], Awaitable[None]], **spec: Any) -> LoadResult:
    spec.setdefault("warmup", 0.0)
    async with trio.open_nursery() as nursery:
        result = await run_load(LoadSpec(**spec), open_stream=memory_server(nursery, serve))
        nursery.cancel_scope.cancel()
    return result


def nonzero(errors: dict[str, int]) -> dict[str, int]:
    return {kind: count for kind, count in errors.items() if count}


async def test_every_message_is_acked_by_the_real_handler() -> None:
    """Against the server's own handler, a pipelined run sends exactly --messages messages,
    every reply checks out, and each gets a latency sample."""
    result = await load(AckHandler(), connections=4, window=8, duration=None, messages=500)
    assert result.error_total == 0
    assert result.sent == result.replies == result.acks == 500
    assert result.histogram.count == 500
    assert result.connections == 4


async def test_wrong_replies_are_counted_by_kind() -> None:
    """A server that gets some replies wrong is caught on each one, by kind; the correct
    replies still count."""

    async def sloppy(seq: int, payload: bytes) -> bytes:
        if seq % 10 == 3:
            return b"ACK %d %d 00000000\n" % (seq, len(payload))  # wrong crc
        if seq % 10 == 5:
            return ack_line(seq + 100, payload)  # wrong seq
        if seq % 10 == 7:
            return err_line(seq, "rejected", "not today")
        if seq % 10 == 9:
            return b"ACK %d %d %s\n" % (seq, len(payload) + 1, ack_line(seq, payload)[-9:-1])
        if seq == 12:
            return b"HELLO\n"
        return ack_line(seq, payload)

    result = await load(replying(sloppy), connections=1, window=4, duration=None, messages=30)
    assert nonzero(result.errors) == {"crc": 3, "seq": 3, "err_reply": 3, "nbytes": 3, "format": 1}
    assert result.err_codes == {"rejected": 3}
    assert result.acks == 30 - 13
    assert result.histogram.count == 30 - 13


async def test_an_extra_reply_is_unexpected() -> None:
    """A reply nobody asked for is counted as unexpected."""

    async def chatty(seq: int, payload: bytes) -> bytes:
        return ack_line(seq, payload) + (b"ACK 99 0 00000000\n" if seq == 2 else b"")

    result = await load(replying(chatty), connections=1, duration=None, messages=5)
    assert nonzero(result.errors) == {"unexpected": 1}


async def test_err_0_ends_the_connection_and_its_messages_are_lost() -> None:
    """ERR 0 busy then a close: counted by code, and the messages in flight are lost."""

    async def busy(stream: trio.abc.Stream) -> None:
        # As the real server does: the line, a half-close, then drain until the client
        # closes, so that the line is not lost to a reset.
        async with stream:
            await stream.send_all(err_line(0, "busy", "server at its connection limit"))
            await stream.send_eof()  # type: ignore[attr-defined]
            while await stream.receive_some(65536):
                pass

    result = await load(busy, connections=2, window=3, duration=1.0)
    assert nonzero(result.errors) == {"err_reply": 2, "lost": 6}
    assert result.err_codes == {"busy": 2}


async def test_a_server_closing_early_is_a_connection_error() -> None:
    """A connection closed by the server mid-run, without a word, is a connection error
    and its outstanding messages are lost."""

    async def hang_up(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.receive_some(65536)

    result = await load(hang_up, connections=1, window=5, duration=1.0)
    assert nonzero(result.errors) == {"connection": 1, "lost": 5}


async def test_unanswered_messages_time_out(autojump_clock: trio.testing.MockClock) -> None:
    """A server that never answers: after --timeout the in-flight messages are timeouts,
    and the run ends by itself."""

    async def silent(seq: int, payload: bytes) -> bytes:
        return b""

    result = await load(replying(silent), connections=2, window=4, duration=60.0, reply_timeout=2)
    assert nonzero(result.errors) == {"timeout": 8}
    assert trio.current_time() < 5


async def test_a_server_that_does_not_close_after_eof_is_noticed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After all replies and our end of stream, the server must close; if it does not
    within --timeout, that is a noclose error."""
    result = await load(
        replying(correct, close_at_eof=False),
        connections=1,
        duration=None,
        messages=3,
        reply_timeout=1,
    )
    assert nonzero(result.errors) == {"noclose": 1}
    assert result.acks == 3


def stalls_once(at_seq: int, seconds: float) -> Reply:
    """Answers at once, except that message ``at_seq`` waits ``seconds`` first."""

    async def reply(seq: int, payload: bytes) -> bytes:
        if seq == at_seq:
            await trio.sleep(seconds)
        return ack_line(seq, payload)

    return reply


async def test_open_loop_charges_a_stall_to_every_message_scheduled_during_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 100 msg/s for 2 s, a 0.5 s stall delays the 50 messages scheduled during it, and
    each is timed from its schedule: p99 and p90 show the stall (coordinated omission
    corrected), although the window of 1 kept those messages in the client."""
    result = await load(
        replying(stalls_once(at_seq=100, seconds=0.5)),
        connections=1,
        window=1,
        rate=100.0,
        duration=2.0,
    )
    histogram = result.histogram
    assert result.error_total == 0
    assert histogram.count == result.acks == 200
    assert histogram.percentile(99) >= 0.45e9
    assert histogram.percentile(90) >= 0.25e9
    assert histogram.percentile(50) < 0.01e9


async def test_closed_loop_hides_the_same_stall_in_its_percentiles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same stall in closed loop delays one message: only the max shows it. (This is
    why --rate exists.)"""
    result = await load(
        replying(stalls_once(at_seq=100, seconds=0.5)),
        connections=1,
        window=1,
        duration=None,
        messages=200,
    )
    assert result.histogram.percentile(99) < 0.01e9
    assert result.histogram.max >= 0.5e9


async def test_open_loop_sends_at_the_target_rate(autojump_clock: trio.testing.MockClock) -> None:
    """With --rate, the number of messages follows the schedule, not the server's speed."""
    result = await load(AckHandler(), connections=4, window=2, rate=400.0, duration=3.0)
    assert result.acks == result.sent == 1200
    assert result.acks_per_second == pytest.approx(400)


async def test_churn_opens_a_connection_per_message() -> None:
    """--churn: every message on a new connection, each reply checked."""
    result = await load(AckHandler(), connections=3, churn=True, duration=None, messages=40)
    assert result.error_total == 0
    assert result.acks == result.connections == 40


async def test_warmup_messages_are_not_measured(autojump_clock: trio.testing.MockClock) -> None:
    """Replies during the warm-up are checked but are not in the throughput or latencies."""

    async def slow(seq: int, payload: bytes) -> bytes:
        await trio.sleep(0.125)  # exact in binary, so no message lands on a boundary by luck
        return ack_line(seq, payload)

    result = await load(replying(slow), connections=1, warmup=1.0, duration=1.0)
    assert result.replies == 16
    assert result.acks == result.histogram.count == 8
    assert result.elapsed == 1.0


async def test_stop_ends_the_measurement_early(autojump_clock: trio.testing.MockClock) -> None:
    """stop() (the first Ctrl-C) ends the window now; the result says it was interrupted."""

    async def slow(seq: int, payload: bytes) -> bytes:
        await trio.sleep(0.01)
        return ack_line(seq, payload)

    async with trio.open_nursery() as nursery:
        generator = LoadGenerator(
            LoadSpec(connections=1, duration=60.0),
            open_stream=memory_server(nursery, replying(slow)),
        )
        await generator.connect()

        async def stop_soon() -> None:
            await trio.sleep(1.0)
            generator.stop()

        nursery.start_soon(stop_soon)
        result = await generator.run()
        nursery.cancel_scope.cancel()
    assert result.interrupted
    assert result.elapsed == pytest.approx(1.0, abs=0.02)
    assert result.error_total == 0


async def test_progress_is_reported_while_running(autojump_clock: trio.testing.MockClock) -> None:
    """on_progress gets live counters about once a second."""
    snapshots: list[Snapshot] = []
    async with trio.open_nursery() as nursery:
        generator = LoadGenerator(
            LoadSpec(connections=1, rate=10.0, duration=3.0),
            open_stream=memory_server(nursery, AckHandler()),
        )
        await generator.connect()
        await generator.run(on_progress=snapshots.append)
        nursery.cancel_scope.cancel()
    assert len(snapshots) >= 2
    assert snapshots[0].measuring
    assert snapshots[-1].replies >= 20


async def test_no_connection_at_all_is_a_connect_error() -> None:
    """When not a single connection opens, connect() raises ConnectError with the reason."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once it is closed
    generator = LoadGenerator(LoadSpec(port=port, connections=3))
    with pytest.raises(ConnectError, match="connection refused"):
        await generator.connect()
    assert generator.tally.errors["connect"] == 3


async def test_over_real_sockets_against_the_real_server() -> None:
    """The TCP transport end to end: pipelined, open-loop and churn runs on loopback."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, ServerConfig(port=0))
        runs: list[dict[str, Any]] = [{"window": 16}, {"rate": 500.0, "window": 4}, {"churn": True}]
        for options in runs:
            spec = LoadSpec(port=server.port, connections=2, duration=None, messages=200, **options)
            result = await run_load(spec)
            assert result.error_total == 0, (options, result.errors)
            assert result.acks == 200
        server.shutdown()


def test_spec_split_shares_add_up() -> None:
    """--procs shares: connections, messages and rate add up to the whole."""
    spec = LoadSpec(connections=10, duration=None, messages=1001, rate=300.0)
    shares = spec.split(3)
    assert [share.connections for share in shares] == [4, 3, 3]
    assert sum(share.messages or 0 for share in shares) == 1001
    assert sum(share.rate or 0 for share in shares) == pytest.approx(300.0)
    assert [share.first_connection for share in shares] == [0, 4, 7]
    assert all(share.all_connections == 10 for share in shares)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"connections": 0}, "connections"),
        ({"window": 2, "churn": True}, "window must be 1"),
        ({"duration": None}, "duration or a message count"),
        ({"rate": 0.0}, "rate"),
        ({"warmup": 3599.0, "duration": 2.0}, "at most 3600"),
    ],
)
def test_spec_refuses_impossible_settings(options: dict[str, object], message: str) -> None:
    """Settings that cannot make a run are refused up front with a clear reason."""
    with pytest.raises(ValueError, match=message):
        LoadSpec(**options)  # type: ignore[arg-type]
