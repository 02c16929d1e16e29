"""How the client library survives (or reports) misbehaving servers and networks.

Fake servers run over in-memory streams through the ``connect=`` hook, on Trio's
``autojump_clock``: timeouts and backoff play out in virtual time, so the bounds below are
exact and the tests take no real time.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import structlog.testing
import trio
import trio.testing
from client_fakes import MemoryServer, Replies, ack_everything

from ackservice.client import (
    Ack,
    AckMismatchError,
    AckTimeoutError,
    ConnectError,
    ConnectionLostError,
    Err,
    ProtocolError,
    open_client,
)
from ackservice.protocol import err_line

MakeServer = Callable[..., MemoryServer]

FAST = {"backoff_base": 0.1, "backoff_cap": 5.0}


async def test_silent_server_trips_the_ack_timeout(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that reads but never answers: ``AckTimeoutError`` exactly when the oldest
    message has waited ``ack_timeout``, not before and not after a retry."""

    async def silent(stream: trio.abc.Stream) -> None:
        while await stream.receive_some():
            pass

    fake = memory_server(silent)
    async with open_client(connect=fake.connect, ack_timeout=7.0) as client:
        started = trio.current_time()
        with pytest.raises(AckTimeoutError, match="no reply to message 1 within 7 s"):
            await client.send(b"hello")
        assert trio.current_time() - started == pytest.approx(7.0)
    assert fake.connections == 1


async def test_connection_closed_mid_stream_is_reconnected_and_resent(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The server acknowledges 3 messages then drops the connection: the client reconnects,
    sends the unacknowledged ones again, and every message ends up acknowledged."""
    first_seen: list[bytes] = []
    second_seen: list[bytes] = []

    async def ack_three_then_close(stream: trio.abc.Stream) -> None:
        replies = Replies()
        while len(first_seen) < 10:
            first_seen.extend(replies.frames(await stream.receive_some()))
        await stream.send_all(b"".join(replies.ack(p) for p in first_seen[:3]))

    async def second(stream: trio.abc.Stream) -> None:
        await ack_everything(stream, second_seen)

    fake = memory_server(ack_three_then_close, second)
    payloads = [b"m%d" % i for i in range(10)]
    async with open_client(connect=fake.connect, **FAST) as client:
        receipts = [r async for r in client.send_many(payloads)]
    assert all(r.acked for r in receipts)
    assert [r.attempts for r in receipts] == [1] * 3 + [2] * 7
    assert second_seen == payloads[3:]  # at-least-once: these reached the server twice
    assert (client.stats.sent, client.stats.resent, client.stats.connections) == (10, 7, 2)


async def test_shutting_down_server_is_left_for_a_new_connection(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """``ERR 0 shutting-down`` after two ACKs: the rest is resent on a new connection."""

    async def ack_two_then_shut_down(stream: trio.abc.Stream) -> None:
        replies = Replies()
        seen: list[bytes] = []
        while len(seen) < 5:
            seen.extend(replies.frames(await stream.receive_some()))
        lines = [replies.ack(p) for p in seen[:2]]
        await stream.send_all(b"".join(lines) + err_line(0, "shutting-down", "bye"))

    fake = memory_server(ack_two_then_shut_down, ack_everything)
    async with open_client(connect=fake.connect, **FAST) as client:
        receipts = [r async for r in client.send_many([b"a", b"b", b"c", b"d", b"e"])]
    assert [r.reply.seq for r in receipts] == [1, 2, 1, 2, 3]
    assert all(r.acked for r in receipts)
    assert fake.connections == 2


@pytest.mark.parametrize(
    ("wrong_reply", "complaint"),
    [
        (b"ACK 1 5 00000000\n", "crc32 00000000, but 5 bytes with crc32 3610a686"),
        (b"ACK 1 4 3610a686\n", "as 4 bytes"),
        (b"ACK 2 5 3610a686\n", "seq 2, expected seq 1"),
        (b"ERR 7 rejected no\n", "seq 7, expected seq 1"),
    ],
    ids=["crc32", "nbytes", "seq", "err-seq"],
)
async def test_a_reply_that_does_not_match_is_an_error(
    memory_server: MakeServer,
    autojump_clock: trio.testing.MockClock,
    wrong_reply: bytes,
    complaint: str,
) -> None:
    """Every ACK is checked against what was sent: a wrong crc32, length or seq is an
    ``AckMismatchError``, never a success."""

    async def lying(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(wrong_reply)
        await trio.sleep_forever()

    async with open_client(connect=memory_server(lying).connect) as client:
        with pytest.raises(AckMismatchError, match=complaint):
            await client.send(b"hello")
        assert client.stats.acked == 0


@pytest.mark.parametrize("garbage", [b"HELLO THERE\n", b"ACK 1 5\n", b"ACK " + b"9" * 2000 + b"\n"])
async def test_a_malformed_reply_is_a_protocol_error(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock, garbage: bytes
) -> None:
    """A reply line that is not ACK/ERR, or absurdly long, is a ``ProtocolError``."""

    async def babbling(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(garbage)
        await trio.sleep_forever()

    async with open_client(connect=memory_server(babbling).connect) as client:
        with pytest.raises(ProtocolError):
            await client.send(b"hello")


async def test_refused_connections_use_up_the_retry_budget(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing listening: ``retries`` further attempts, with backoff no longer than the
    doubling bounds (0.1 + 0.2 + 0.4 s), then ``ConnectError``."""
    fake = memory_server(None)
    started = trio.current_time()
    with pytest.raises(ConnectError, match=r"connection refused \(tried 4 times over"):
        async with open_client(connect=fake.connect, retries=3, **FAST):
            pass  # pragma: no cover
    assert fake.attempts == 4
    assert trio.current_time() - started <= 0.1 + 0.2 + 0.4


async def test_a_connect_attempt_is_bounded_by_the_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection attempt that hangs is abandoned after ``connect_timeout``."""

    async def hang() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    with pytest.raises(ConnectError, match=r"timed out after 2 s \(tried once over 2.0 s\)"):
        async with open_client(connect=hang, connect_timeout=2.0, retries=0):
            pass  # pragma: no cover


async def test_backoff_never_exceeds_the_cap(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """However many failures, no single wait is longer than ``backoff_cap``."""
    fake = memory_server(None)
    with pytest.raises(ConnectError):
        async with open_client(connect=fake.connect, retries=20, backoff_cap=0.5):
            pass  # pragma: no cover
    assert fake.attempts == 21
    assert trio.current_time() <= 20 * 0.5


async def test_server_recovering_within_the_budget_is_reached(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Two refusals, then a listening server: the client connects and delivers."""
    fake = memory_server(None, None, ack_everything)
    async with open_client(connect=fake.connect, retries=2, **FAST) as client:
        assert await client.send(b"x") == Ack(1, 1, zlib.crc32(b"x"))
    assert fake.attempts == 3


async def test_progress_starts_the_retry_count_over(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """``retries`` counts consecutive failures: a server that acknowledges one message per
    connection and then drops it never exhausts a budget of one retry."""

    async def one_then_close(stream: trio.abc.Stream) -> None:
        replies = Replies()
        frames: list[bytes] = []
        while not frames:
            frames = replies.frames(await stream.receive_some())
        await stream.send_all(replies.ack(frames[0]))

    fake = memory_server(one_then_close)
    async with open_client(connect=fake.connect, retries=1, **FAST) as client:
        receipts = [r async for r in client.send_many([b"%d" % i for i in range(8)])]
    assert all(r.acked for r in receipts)
    assert fake.connections == 8


async def test_connections_that_never_answer_use_up_the_retry_budget(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that accepts and says ``ERR 0 busy`` every time: after ``retries`` more
    tries the client gives up with ``ConnectionLostError`` carrying the server's reason."""

    async def busy(stream: trio.abc.Stream) -> None:
        await stream.send_all(err_line(0, "busy", "server at its connection limit"))

    fake = memory_server(busy)
    async with open_client(connect=fake.connect, retries=2, **FAST) as client:
        with pytest.raises(ConnectionLostError) as lost:
            await client.send(b"hello")
    assert lost.value.reason == "busy"
    assert lost.value.detail.startswith("server at its connection limit (tried 3 times")
    assert fake.connections == 3


async def test_a_rejected_message_is_not_resent_after_a_reconnect(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """``ERR <seq>`` is a final answer: only unanswered messages go out again."""
    second_seen: list[bytes] = []

    async def reject_first_then_close(stream: trio.abc.Stream) -> None:
        replies = Replies()
        seen: list[bytes] = []
        while len(seen) < 3:
            seen.extend(replies.frames(await stream.receive_some()))
        await stream.send_all(err_line(1, "rejected", "no"))

    async def second(stream: trio.abc.Stream) -> None:
        await ack_everything(stream, second_seen)

    fake = memory_server(reject_first_then_close, second)
    async with open_client(connect=fake.connect, **FAST) as client:
        receipts = [r async for r in client.send_many([b"a", b"b", b"c"])]
    assert receipts[0].reply == Err(1, "rejected", "no")
    assert second_seen == [b"b", b"c"]


async def test_idle_client_reconnects_only_when_it_has_something_to_send(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The server closes an idle connection (``ERR 0 idle-timeout``): the client does not
    reconnect in a loop, but opens a new connection for the next message."""

    async def idle_timeout(stream: trio.abc.Stream) -> None:
        await trio.sleep(300)
        await stream.send_all(err_line(0, "idle-timeout", "no complete message for 300 s"))

    fake = memory_server(idle_timeout, ack_everything)
    async with open_client(connect=fake.connect, **FAST) as client:
        await trio.sleep(3600)
        assert fake.connections == 1
        assert await client.send(b"later") == Ack(1, 5, zlib.crc32(b"later"))
    assert fake.connections == 2


async def test_cancelled_send_that_was_not_written_is_never_sent(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """With the window full, a ``send`` cancelled while queued is withdrawn: the server
    never receives it."""
    seen: list[bytes] = []
    release = trio.Event()

    async def slow(stream: trio.abc.Stream) -> None:
        replies = Replies()
        while not seen:
            seen.extend(replies.frames(await stream.receive_some()))
        await release.wait()
        await stream.send_all(replies.ack(seen[0]))
        while data := await stream.receive_some():
            frames = replies.frames(data)
            seen.extend(frames)
            await stream.send_all(b"".join(replies.ack(p) for p in frames))

    async with open_client(connect=memory_server(slow).connect, window=1) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send, b"first")
            await trio.sleep(1)
            with trio.move_on_after(1):
                await client.send(b"withdrawn")
            release.set()
        assert await client.send(b"third") == Ack(2, 5, zlib.crc32(b"third"))
    assert seen == [b"first", b"third"]


async def test_ack_timeout_counts_from_the_oldest_message(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The timeout is about the oldest unacknowledged message: sending more later does
    not push it back."""

    async def silent(stream: trio.abc.Stream) -> None:
        while await stream.receive_some():
            pass

    failed_at: list[float] = []

    async with open_client(connect=memory_server(silent).connect, ack_timeout=5.0) as client:

        async def send(payload: bytes) -> None:
            with pytest.raises(AckTimeoutError, match="no reply to message 1 within 5 s"):
                await client.send(payload)
            failed_at.append(trio.current_time())

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, b"one")
            await trio.sleep(3)
            nursery.start_soon(send, b"two")
    assert failed_at == [pytest.approx(started + 5.0)] * 2


async def test_a_reconnect_is_logged_with_the_reason_but_no_payloads(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A lost connection is one ``connection_lost`` warning (the server's reason, how many
    messages go out again); no event carries a payload."""

    async def shut_down_at_once(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(err_line(0, "shutting-down", "server is shutting down"))

    fake = memory_server(shut_down_at_once, ack_everything)
    with structlog.testing.capture_logs() as events:
        async with open_client(connect=fake.connect, **FAST) as client:
            await client.send(b"secret payload")
    lost = [e for e in events if e["event"] == "connection_lost"]
    assert lost == [
        {
            "event": "connection_lost",
            "log_level": "warning",
            "server": "127.0.0.1:9876",
            "reason": "shutting-down",
            "detail": "server is shutting down",
            "resending": 1,
        }
    ]
    assert [e["event"] for e in events].count("connected") == 2
    assert not any("secret" in repr(e) for e in events)
