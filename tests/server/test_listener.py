"""serve() and AckHandler over real loopback sockets, in-process."""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import random
import socket
import struct
import sys
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from ackservice.protocol import ack_line
from ackservice.server import AckHandler, MessageContext, Server, ServerConfig, serve
from ackservice.server import listener as listener_module
from ackservice.server.connection import Connection
from ackservice.server.sockets import listen_addresses, parse_hosts
from support import Connect, LineReader, wait_until


async def start(nursery: trio.Nursery, **settings: Any) -> Server:
    on_message = settings.pop("on_message", None)
    config = ServerConfig(port=0, **settings)
    server: Server = await nursery.start(functools.partial(serve, config, on_message=on_message))
    return server


def assert_keepalive(
    sock: socket.socket | trio.socket.SocketType, idle: int, interval: int
) -> None:
    """Keepalive is on, probing after ``idle`` s of silence, then every ``interval`` s, 3 times."""
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


async def test_serve_reports_the_bound_port(nursery: trio.Nursery) -> None:
    """Started with port 0, serve reports the port the system picked, and serves on it."""
    server = await start(nursery)
    assert server.port != 0
    assert server.addresses == [("127.0.0.1", server.port)]
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"hello\n")
        assert await LineReader(stream).line() == b"ACK 1 5 3610a686"


async def test_the_listening_event_names_allowed_networks_as_written(
    nursery: trio.Nursery,
) -> None:
    """The ``listening`` event's settings give ``--allow`` networks as an operator writes
    them (``10.0.0.0/8``), so a JSON log says ``["10.0.0.0/8"]``; before, it said
    ``["IPv4Network('10.0.0.0/8')"]`` (the objects' repr)."""
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    with capture_logs() as logs:
        await start(nursery, allow=networks)
    (listening,) = [event for event in logs if event["event"] == "listening"]
    assert listening["settings"]["allow"] == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_port_in_use_names_the_address(nursery: trio.Nursery, host: str) -> None:
    """An embedder's serve() on a port in use: the OSError (errno and type as the system
    gave them) names the address; it said only "[Errno 98] Address already in use"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as taken:
        try:
            taken.bind((host, 0))
        except OSError:
            pytest.skip(f"no {host} here")
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(host=host, port=port)
        with pytest.raises(OSError, match="Address already in use") as caught:
            await nursery.start(serve, config)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value) == f"[Errno {errno.EADDRINUSE}] Address already in use: '{where}'"


@pytest.mark.usefixtures("either_level")
async def test_many_clients_pipelining_get_correct_in_order_acks(nursery: trio.Nursery) -> None:
    """200 concurrent clients, each pipelining 500 messages of mixed sizes, all get correct
    ACKs in order."""
    server = await start(nursery)
    rng = random.Random(7)

    async def client(index: int) -> None:
        payloads = [rng.randbytes(rng.randrange(0, 300)).replace(b"\n", b"") for _ in range(500)]
        payloads = [p.rstrip(b"\r") for p in payloads]
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"".join(p + b"\n" for p in payloads))
            await stream.send_eof()
            replies = await LineReader(stream).lines(500)
        assert replies == [ack_line(seq, p)[:-1] for seq, p in enumerate(payloads, 1)]

    async with trio.open_nursery() as clients:
        for index in range(200):
            clients.start_soon(client, index)
    # Totals are added as each connection finishes closing.
    await wait_until(lambda: server.handler.stats.active == 0)
    assert server.handler.stats.acked == 100_000


async def test_final_line_survives_unread_client_input(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A refused client that keeps sending still receives its ERR 0 busy line: the server
    half-closes and drains instead of resetting the connection."""
    server = await start(nursery, max_connections=1, drain_timeout=5)
    holder = await connect(server.port)
    await holder.send_all(b"hold\n")
    await LineReader(holder).line()
    refused = await connect(server.port)

    async def keep_sending() -> None:
        try:
            for _ in range(256):
                await refused.send_all(b"x" * 16384)
        except trio.BrokenResourceError:
            pass
        await refused.send_eof()

    nursery.start_soon(keep_sending)
    reader = LineReader(refused)
    assert (await reader.line()).startswith(b"ERR 0 busy ")
    assert await reader.at_eof()


@pytest.mark.usefixtures("either_level")
async def test_graceful_shutdown_refuses_new_connections(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """After shutdown() the listener is closed at once: new connections are refused, while a
    connected client is told shutting-down."""
    server = await start(nursery)
    connected = await connect(server.port)
    await connected.send_all(b"a\n")
    reader = LineReader(connected)
    assert (await reader.line()).startswith(b"ACK 1 ")
    server.shutdown()
    assert (await reader.line()).startswith(b"ERR 0 shutting-down ")
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", server.port)


async def test_grace_period_bounds_shutdown(
    autojump_clock: trio.testing.MockClock, connect: Connect
) -> None:
    """Connections still busy when the grace period ends are cancelled and serve returns."""
    stuck = trio.Event()

    async def on_message(payload: bytes, context: MessageContext) -> None:
        stuck.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await start(nursery, shutdown_grace=3, on_message=on_message)
        stream = await connect(server.port)
        await stream.send_all(b"never finishes\n")
        await stuck.wait()
        started = trio.current_time()
        server.shutdown()
    assert trio.current_time() - started == pytest.approx(3)
    assert server.handler.stats.active == 0


async def test_handler_embeds_in_trio_serve_tcp(nursery: trio.Nursery, connect: Connect) -> None:
    """AckHandler is a plain Trio stream handler: trio.serve_tcp runs it unchanged, and it
    turns on TCP keepalive (idle 300 s, interval 100 s, 3 probes) on accepted sockets."""
    accepted: list[trio.SocketStream] = []
    handler = AckHandler()

    async def remember_then_handle(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await handler(stream)

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, remember_then_handle, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    stream = await connect(port)
    await stream.send_all(b"hello\n")
    assert await LineReader(stream).line() == b"ACK 1 5 3610a686"
    assert_keepalive(accepted[0].socket, idle=300, interval=100)


def test_a_handler_kept_across_trio_runs_serves_in_each() -> None:
    """An AckHandler made once and used in several Trio runs (a module-level handler, a
    fixture shared by pytest-trio tests, each its own run) serves in every run. Before,
    the second run's connections used the readiness hub of the first, whose epoll had
    closed with it: ValueError from the handler, which ended trio.serve_tcp."""
    handler = AckHandler()

    async def one_exchange() -> bytes:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with trio.fail_after(10):
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(b"hello\n")
                    reply = await LineReader(stream).line()
            nursery.cancel_scope.cancel()
        return reply

    assert [trio.run(one_exchange) for _ in range(2)] == [b"ACK 1 5 3610a686"] * 2


@pytest.mark.usefixtures("either_level")
async def test_reset_by_peer_ends_only_that_connection(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A client that resets its connection (SO_LINGER 0) mid-stream ends only that
    connection; the server and other clients carry on."""
    server = await start(nursery)
    healthy = await connect(server.port)
    for _ in range(20):
        with trio.socket.socket() as doomed:
            await doomed.connect(("127.0.0.1", server.port))
            await doomed.send(b"x\n" * 5000)
            doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await healthy.send_all(b"still fine\n")
    assert (await LineReader(healthy).line()).startswith(b"ACK 1 ")
    await wait_until(lambda: server.handler.stats.active == 1)


class ExhaustedListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose accept fails with EMFILE a number of times, then yields a stream."""

    def __init__(self, failures: int, stream: trio.abc.Stream) -> None:
        self.failures = failures
        self.stream: trio.abc.Stream | None = stream

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if self.stream is None:
            await trio.sleep_forever()
        stream, self.stream = self.stream, None
        return stream

    async def aclose(self) -> None:
        pass


async def test_out_of_descriptors_is_logged_rarely_and_survived(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """When accept keeps failing for lack of file descriptors, the server retries every
    100 ms, logs one error per 10 s (with the count) instead of one per retry, and serves
    again as soon as accept succeeds."""
    client, server_side = trio.testing.memory_stream_pair()
    listener = ExhaustedListener(failures=250, stream=server_side)  # 25 s of failures
    server = Server(AckHandler(), [])
    with capture_logs() as logs:
        nursery.start_soon(server._accept_loop, listener, nursery)
        await client.send_all(b"hello\n")
        assert await LineReader(client).line() == b"ACK 1 5 3610a686"
    failures = [e for e in logs if e["event"] == "accept_failed"]
    assert len(failures) == 3  # at 0 s, 10 s and 20 s of 25 s of failures
    assert failures[0]["failures"] == 1
    assert all(99 <= e["failures"] <= 101 for e in failures[1:])
    assert failures[0]["error"] == "EMFILE"


# The socket loop (raw reads and writes on TCP) keeps the same timing rules as the stream
# loop that the memory-stream tests cover; these check them over real sockets, real clock.


@pytest.mark.usefixtures("info_level")
async def test_idle_timeout_over_tcp_ignores_trickled_bytes(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """Over TCP, a client trickling bytes without a newline is closed idle_timeout after its
    last complete message, with ERR 0 idle-timeout."""
    server = await start(nursery, idle_timeout=0.6)
    stream = await connect(server.port)
    reader = LineReader(stream)
    await stream.send_all(b"complete\n")
    assert (await reader.line()).startswith(b"ACK 1 ")
    last_complete = trio.current_time()

    async def trickle() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(50):
                await stream.send_all(b"x")
                await trio.sleep(0.05)

    nursery.start_soon(trickle)
    with trio.fail_after(5):
        assert (await reader.line()).startswith(b"ERR 0 idle-timeout ")
    assert 0.55 <= trio.current_time() - last_complete < 3


@pytest.mark.usefixtures("info_level")
async def test_active_connection_outlives_many_idle_periods(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A connection sending a complete message more often than idle_timeout is never closed,
    however long it lasts (the lazily kept deadline is re-armed, not obeyed)."""
    server = await start(nursery, idle_timeout=0.3)
    stream = await connect(server.port)
    reader = LineReader(stream)
    for seq in range(1, 16):  # ~1.5 s: five idle periods
        await stream.send_all(b"tick\n")
        assert (await reader.line()).startswith(b"ACK %d " % seq)
        await trio.sleep(0.1)


@pytest.mark.usefixtures("info_level")
async def test_request_response_then_half_close_ends_the_connection(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """Messages answered one at a time (in the readiness hub's dispatcher, the connection's
    task still waiting), then the client's half-close: the connection ends at once. The
    end of stream's wake-up must read, not take the socket as drained by the last answer."""
    server = await start(nursery)
    stream = await connect(server.port)
    reader = LineReader(stream)
    for seq in range(1, 6):
        await stream.send_all(b"message %d\n" % seq)
        assert await reader.line() == ack_line(seq, b"message %d" % seq)[:-1]
    await stream.send_eof()
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""


@pytest.mark.usefixtures("info_level")
async def test_pipelined_batches_are_answered_in_the_dispatcher(
    nursery: trio.Nursery, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sending batches of messages, each after the replies to the last: every
    batch read while the connection waits is answered by the readiness hub's dispatcher
    (its replies written after the other ready sockets were read), correct and in order,
    including lines with a carriage return and empty ones."""
    written_later = 0
    send_later = Connection.send_later

    def counting_send_later(self: Connection) -> None:
        nonlocal written_later
        written_later += 1
        send_later(self)

    monkeypatch.setattr(Connection, "send_later", counting_send_later)
    server = await start(nursery)
    stream = await connect(server.port)
    reader = LineReader(stream)
    seq = 0
    for batch in range(20):
        payloads = [b"batch %d message %d" % (batch, i) for i in range(50)] + [b"", b"cr"]
        await stream.send_all(b"".join(p + b"\n" for p in payloads[:-1]) + b"cr\r\n")
        replies = await reader.lines(len(payloads))
        assert replies == [ack_line(seq + k, p)[:-1] for k, p in enumerate(payloads, 1)]
        seq += len(payloads)
    assert written_later >= 10  # the first batch may be read by the task itself
    await stream.send_eof()
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    await wait_until(lambda: server.handler.stats.active == 0)
    assert server.handler.stats.acked == seq


@pytest.mark.usefixtures("either_level")
async def test_client_not_reading_over_tcp_is_dropped_after_send_timeout(
    nursery: trio.Nursery,
) -> None:
    """Over TCP, a client that never reads its replies fills the socket buffers; the server
    stops reading from it and drops it after send_timeout, while others are served."""
    server = await start(nursery, send_timeout=0.5)
    with capture_logs() as logs:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        with sock, trio.move_on_after(10), contextlib.suppress(OSError):
            for _ in range(100_000):  # ~20 MB of replies unread
                await sock.send(b"m\n" * 5000)
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as other:
            await other.send_all(b"fine\n")
            assert (await LineReader(other).line()).startswith(b"ACK 1 ")
        await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert closed[0]["reason"] == "send-timeout"


async def accept_all(payload: bytes, context: MessageContext) -> None:
    pass


# 400 messages: ~9 KB of ACKs, more than the smallest receive buffer holds, far less than a
# server's socket takes.
BURST = b"".join(b"message %04d\n" % i for i in range(400))


async def connect_with_the_smallest_receive_buffer(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    await sock.connect(("127.0.0.1", port))
    return sock


async def read_to_the_end(sock: trio.socket.SocketType) -> None:
    while await sock.recv(65536):
        pass


@pytest.mark.usefixtures("either_level")
@pytest.mark.parametrize("hook", [False, True], ids=["no-store", "hook"])
async def test_client_that_stops_reading_and_sending_is_dropped_after_send_timeout(
    nursery: trio.Nursery, hook: bool
) -> None:
    """A client sends a burst whose replies fit in the server's socket buffer but not in its
    own, then neither reads nor sends (hung). No write of the server waits (the kernel took
    every reply), yet its replies stay unacknowledged: it is dropped as a client leaving its
    replies unread for send_timeout, not kept until the idle timeout, and with a reset.
    (The reliability suite met this as a never-reading client whose TCP had wedged.)"""

    server = await start(
        nursery, send_timeout=0.5, idle_timeout=60, on_message=accept_all if hook else None
    )
    with capture_logs() as logs:
        sock = await connect_with_the_smallest_receive_buffer(server.port)
        with sock:
            await sock.send(BURST)
            await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
            # Closed with a reset: its replies cannot be delivered, and a plain close would
            # leave the kernel holding and retrying them for minutes.
            with trio.fail_after(5), pytest.raises(ConnectionResetError):
                await read_to_the_end(sock)
    [closed] = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "send-timeout"
    assert closed["messages"] == 400
    assert closed["duration"] >= 0.5


@pytest.mark.usefixtures("either_level")
@pytest.mark.parametrize("hook", [False, True], ids=["no-store", "hook"])
async def test_client_that_hangs_after_a_quiet_spell_is_dropped_after_send_timeout(
    nursery: trio.Nursery, hook: bool
) -> None:
    """A client quiet for longer than send_timeout (its replies all delivered, so only the
    idle deadline was left to its wait) then sends a burst and hangs: it is dropped within
    two send timeouts of the burst, not at the idle timeout. (The burst is answered in the
    readiness hub's dispatcher, whose new deadline is earlier than the one the wait had.)"""

    server = await start(
        nursery, send_timeout=0.5, idle_timeout=60, on_message=accept_all if hook else None
    )
    with capture_logs() as logs:
        sock = await connect_with_the_smallest_receive_buffer(server.port)
        with sock:
            await sock.send(b"first\n")
            assert (await sock.recv(100)).startswith(b"ACK 1 ")
            await trio.sleep(0.8)  # past the look at send_timeout, which found nothing
            await sock.send(BURST)
            await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    [closed] = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "send-timeout"
    assert closed["messages"] == 401


@pytest.mark.usefixtures("either_level")
async def test_request_response_client_pausing_past_the_send_timeout_is_kept(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A request/response client that pauses longer than twice send_timeout between
    requests (its replies all delivered) is kept: the look at its send queue finds it
    empty, and only the idle deadline applies."""
    server = await start(nursery, send_timeout=0.2, idle_timeout=60)
    with capture_logs() as logs:
        stream = await connect(server.port)
        reader = LineReader(stream)
        for seq in range(1, 4):
            await stream.send_all(b"request %d\n" % seq)
            assert await reader.line() == ack_line(seq, b"request %d" % seq)[:-1]
            await trio.sleep(0.5)
        assert not [e for e in logs if e["event"] == "connection_closed"]
    assert server.handler.stats.active == 1


@pytest.mark.usefixtures("either_level")
async def test_replies_waiting_in_the_clients_own_buffer_are_not_a_stall(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A client that leaves its replies unread in its own receive buffer for longer than
    twice send_timeout is kept: its kernel acknowledged them, so the server's send queue
    is empty; it then reads them all and goes on."""
    server = await start(nursery, send_timeout=0.2, idle_timeout=60)
    with capture_logs() as logs:
        stream = await connect(server.port)
        payloads = [b"message %04d" % i for i in range(400)]
        await stream.send_all(b"".join(p + b"\n" for p in payloads))
        await trio.sleep(0.6)
        reader = LineReader(stream)
        assert await reader.lines(400) == [ack_line(s, p)[:-1] for s, p in enumerate(payloads, 1)]
        await stream.send_all(b"more\n")
        assert await reader.line() == ack_line(401, b"more")[:-1]
        assert not [e for e in logs if e["event"] == "connection_closed"]


@pytest.mark.usefixtures("info_level")
async def test_slow_steady_reader_of_replies_the_kernel_holds_is_kept(
    nursery: trio.Nursery,
) -> None:
    """Replies the server's kernel took in full but the client's tiny receive buffer cannot,
    read a little at a time (1 KiB every 0.1 s for ~1.3 s, under a 0.4 s send timeout): no
    write waits, and the send queue shrinks between looks, so the client is never dropped."""
    server = await start(nursery, send_timeout=0.4, idle_timeout=60)
    with capture_logs() as logs:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        await sock.connect(("127.0.0.1", server.port))
        with sock:
            payloads = [b"message %04d" % i for i in range(600)]  # ~14 KB of ACKs
            await sock.send(b"".join(p + b"\n" for p in payloads))
            expected = b"".join(ack_line(s, p) for s, p in enumerate(payloads, 1))
            received = b""
            with trio.fail_after(10):
                while len(received) < len(expected):
                    await trio.sleep(0.1)
                    received += await sock.recv(1024)
            assert received == expected
            assert not [e for e in logs if e["event"] == "connection_closed"]


@pytest.mark.usefixtures("info_level")
async def test_send_timeout_longer_than_the_idle_timeout_leaves_the_idle_timeout(
    nursery: trio.Nursery,
) -> None:
    """With send_timeout above idle_timeout, a client that stops reading and sending after
    a burst is closed at the idle timeout, as idle-timeout: no look at the send queue comes
    first."""
    server = await start(nursery, send_timeout=30, idle_timeout=0.5, drain_timeout=0.2)
    with capture_logs() as logs:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        await sock.connect(("127.0.0.1", server.port))
        with sock:
            await sock.send(b"".join(b"message %04d\n" % i for i in range(400)))
            await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    [closed] = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "idle-timeout"
    assert 0.5 <= closed["duration"] < 2


@pytest.mark.usefixtures("either_level")
async def test_shutdown_ends_a_wait_that_has_looked_at_its_send_queue(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """A client quiet past send_timeout (the look at its send queue done, its wait now until
    the idle deadline) is told shutting-down at once when the server shuts down."""
    server = await start(nursery, send_timeout=0.2, idle_timeout=60)
    stream = await connect(server.port)
    reader = LineReader(stream)
    await stream.send_all(b"one\n")
    assert (await reader.line()).startswith(b"ACK 1 ")
    await trio.sleep(0.5)
    server.shutdown()
    with trio.fail_after(2):
        assert (await reader.line()).startswith(b"ERR 0 shutting-down ")


async def test_shutdown_waits_for_a_slow_hook_over_tcp(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """Over TCP, shutdown during a slow hook lets it finish and its ACK go out before
    ERR 0 shutting-down; the idle deadline never interrupts the hook."""

    async def slow(payload: bytes, context: MessageContext) -> None:
        await trio.sleep(0.5)

    server = await start(nursery, on_message=slow, idle_timeout=0.2)
    stream = await connect(server.port)
    await stream.send_all(b"slow\n")
    await trio.sleep(0.1)
    server.shutdown()
    reader = LineReader(stream)
    assert await reader.line() == ack_line(1, b"slow")[:-1]
    assert (await reader.line()).startswith(b"ERR 0 shutting-down ")


async def test_serve_turns_on_keepalive_and_nodelay_for_accepted_sockets(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """Sockets accepted by serve() send replies without Nagle's delay and probe silent peers
    after tcp_keepalive seconds (set once on the listener where the system passes them on,
    else on each socket)."""
    server = await start(nursery, tcp_keepalive=120)
    stream = await connect(server.port)
    await stream.send_all(b"hello\n")
    await LineReader(stream).line()
    # The server side of the connection, reached through the handler's bookkeeping: a plain
    # socket on the fast path, else a SocketStream.
    [connection] = server.handler._connections
    transport = connection._transport
    accepted = getattr(transport, "_sock", None)
    if accepted is None:
        assert isinstance(transport._stream, trio.SocketStream)
        accepted = transport._stream.socket
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert_keepalive(accepted, idle=120, interval=40)


async def test_each_connection_logs_with_its_own_conn_id_and_peer(
    nursery: trio.Nursery, connect: Connect
) -> None:
    """Over TCP, the events of each connection, the hook's own included, carry that
    connection's conn_id and peer (bound before its task starts), and none leak into the
    server's other events."""
    hook_log = structlog.get_logger("app")

    async def on_message(payload: bytes, context: MessageContext) -> None:
        hook_log.info("app_saw_message", payload_len=len(payload))

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        server = await start(nursery, on_message=on_message)
        peers = []
        for _ in range(2):
            stream = await connect(server.port)
            local_host, local_port = stream.socket.getsockname()[:2]
            peers.append(f"{local_host}:{local_port}")
            await stream.send_all(b"hi\n")
            await LineReader(stream).line()
            await stream.aclose()
        await wait_until(
            lambda: server.handler.stats.connections == 2 and not server.handler.stats.active
        )
    by_conn: dict[int, set[str]] = {}
    for event in logs:
        if event["event"] in {"connection_opened", "app_saw_message", "connection_closed"}:
            by_conn.setdefault(event["conn_id"], set()).add(f"{event['event']}@{event['peer']}")
    assert by_conn == {
        conn_id: {
            f"{name}@{peer}"
            for name in ("connection_opened", "app_saw_message", "connection_closed")
        }
        for conn_id, peer in zip((1, 2), peers, strict=True)
    }
    [listening] = [event for event in logs if event["event"] == "listening"]
    assert "conn_id" not in listening


@pytest.mark.skipif(sys.platform != "linux", reason="the plain-socket accept path is Linux's")
@pytest.mark.usefixtures("accept_nothing")
async def test_shutdown_tells_connections_still_in_the_listen_queue(nursery: trio.Nursery) -> None:
    """Connections the server never accepted before shutting down are accepted and told
    ERR 0 shutting-down, instead of being reset when the listening socket closes."""

    server = await start(nursery)
    clients = []
    for _ in range(3):  # nobody accepts: they wait in the listen queue
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", server.port))
        clients.append(client)
    server.shutdown()
    for client in clients:
        with client, trio.fail_after(5):
            reply = await LineReader(trio.SocketStream(client)).line()
        assert reply.startswith(b"ERR 0 shutting-down ")


async def test_peer_gone_errors_close_as_reset_not_as_a_failure(
    nursery: trio.Nursery, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read failing because the peer is gone (here ETIMEDOUT, as when keepalive probes go
    unanswered) closes the connection as a reset, without a connection_failed error."""
    with capture_logs() as logs:
        server = await start(nursery)
        stream = await connect(server.port)
        await stream.send_all(b"one\n")
        await LineReader(stream).line()
        [connection] = server.handler._connections
        failing_fd, real_read = connection._transport._fd, os.read

        def read(fd: int, size: int) -> bytes:
            if fd == failing_fd:
                raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")
            return real_read(fd, size)

        monkeypatch.setattr(os, "read", read)
        await stream.send_all(b"two\n")
        await wait_until(lambda: not server.handler._connections)
    [closed] = [event for event in logs if event["event"] == "connection_closed"]
    assert closed["reason"] == "reset"
    assert not [event for event in logs if event["event"] == "connection_failed"]


@pytest.mark.usefixtures("accept_nothing")
async def test_shutdown_leaves_the_queue_of_a_listener_handed_in(nursery: trio.Nursery) -> None:
    """A listening socket handed to serve() may be shared (socket activation, a sibling
    worker): connections still queued at shutdown are left for whoever else holds it."""

    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(16)
    other_holder = raw.dup()
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    server: Server = await nursery.start(
        functools.partial(serve, ServerConfig(), listeners=[listener])
    )
    with other_holder, trio.socket.socket() as client:
        await client.connect(("127.0.0.1", server.port))  # waits in the shared queue
        server.shutdown()
        await wait_until(lambda: listener.socket.fileno() == -1)
        other_holder.setblocking(False)
        accepted, _ = other_holder.accept()  # BlockingIOError if the queue was emptied
        with accepted:
            accepted.sendall(b"served by the next instance\n")
            reply = await LineReader(trio.SocketStream(client)).line()
            assert reply == b"served by the next instance"


# Every errno Trio's SocketListener skips in accept(): a connection that died in the
# listen queue, not a fault of the listening socket.
TRIO_IGNORABLE_ACCEPT_ERRNOS = sorted(trio._highlevel_socket._ignorable_accept_errnos)


def test_listener_skips_the_same_accept_errors_as_trio() -> None:
    """The plain-socket accept path skips exactly the errnos Trio's SocketListener skips."""
    assert set(TRIO_IGNORABLE_ACCEPT_ERRNOS) == listener_module._IGNORABLE_ERRNOS


class _FlakyListeningSocket(socket.socket):
    """A listening socket whose next accept() calls fail with the given errnos first."""

    injected: list[int]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.injected:
            code = self.injected.pop()
            raise OSError(code, os.strerror(code))
        return super().accept()


@pytest.mark.parametrize("code", TRIO_IGNORABLE_ACCEPT_ERRNOS, ids=errno.errorcode.get)
async def test_plain_socket_accept_survives_a_connection_that_died_in_the_queue(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """accept() failing with any errno Trio skips (ECONNRESET, ETIMEDOUT, ENOSR, ...) is
    skipped by the plain-socket accept loop: the server goes on serving."""
    if not listener_module._ACCEPT_PLAIN_SOCKETS:
        pytest.skip("the plain-socket accept path is Linux-only")
    made = listener_module._plain_listening_socket

    def flaky(listener: trio.SocketListener) -> socket.socket:
        plain = made(listener)
        sock = _FlakyListeningSocket(fileno=plain.detach())
        sock.setblocking(False)
        sock.injected = [code, code]
        return sock

    monkeypatch.setattr(listener_module, "_plain_listening_socket", flaky)
    server = await start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"hello\n")
        assert await LineReader(stream).line() == b"ACK 1 5 3610a686"
    await wait_until(lambda: server.handler.stats.active == 0)


class _FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """Wraps a SocketListener; its first accept() calls fail with the given errnos."""

    def __init__(self, inner: trio.SocketListener, injected: list[int]) -> None:
        self.inner = inner
        self.socket = inner.socket
        self.injected = injected

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.injected:
            code = self.injected.pop()
            raise OSError(code, os.strerror(code))
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("code", TRIO_IGNORABLE_ACCEPT_ERRNOS, ids=errno.errorcode.get)
async def test_listener_accept_survives_a_connection_that_died_in_the_queue(
    nursery: trio.Nursery, code: int
) -> None:
    """A listener that is not Trio's own (handed in, so served through ``accept()``) and
    raises any of those errnos does not end the server either."""
    (inner,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    flaky = _FlakyListener(inner, [code, code])
    server: Server = await nursery.start(
        functools.partial(serve, ServerConfig(port=0), listeners=[flaky])  # type: ignore[list-item]
    )
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"hello\n")
        assert await LineReader(stream).line() == b"ACK 1 5 3610a686"
    assert not flaky.injected


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6_loopback = pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)"
)


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("127.0.0.1", ("127.0.0.1",)),
        ("[::1]", ("::1",)),
        ("127.0.0.1, [::1] ,::1", ("127.0.0.1", "::1")),
        ("*", ("*",)),
    ],
)
def test_host_values_take_brackets_and_commas(text: str, hosts: tuple[str, ...]) -> None:
    """--host takes several comma-separated addresses, IPv6 ones bracketed or not."""
    assert parse_hosts(text) == hosts


@pytest.mark.parametrize("text", ["", " , ", "[::1", "127.0.0.1]", "[localhost]"])
def test_malformed_host_values_are_refused(text: str) -> None:
    """An empty item or an unmatched bracket is an error, not a guess."""
    with pytest.raises(ValueError, match="expected"):
        parse_hosts(text)


async def test_every_interface_means_ipv4_and_ipv6() -> None:
    """``*`` resolves to both wildcards (0.0.0.0 and ::), while ``::`` alone is IPv6 only
    (checked without binding: tests never listen beyond loopback)."""
    everywhere = await listen_addresses(("*",), 9876)
    assert {(family, sockaddr[0]) for family, _, _, sockaddr in everywhere} == {
        (socket.AF_INET, "0.0.0.0"),
        (socket.AF_INET6, "::"),
    }
    ipv6 = await listen_addresses(("::",), 9876)
    assert [family for family, *_ in ipv6] == [socket.AF_INET6]


@needs_ipv6_loopback
async def test_serves_several_addresses_on_one_port(nursery: trio.Nursery) -> None:
    """Given 127.0.0.1 and [::1] with port 0, the server listens on both, on one port,
    reports both, and serves each; the IPv6 socket does not also take IPv4."""
    server = await start(nursery, host="127.0.0.1,[::1]")
    assert server.addresses == [("127.0.0.1", server.port), ("[::1]", server.port)]
    assert server.listeners[1].socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    for host in ("127.0.0.1", "::1"):
        async with await trio.open_tcp_stream(host, server.port) as stream:
            await stream.send_all(b"hello\n")
            assert await LineReader(stream).line() == b"ACK 1 5 3610a686"
    await wait_until(lambda: server.handler.stats.active == 0)
