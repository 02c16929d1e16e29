"""Request/response answered in the readiness hub's dispatcher (Connection.answer_waiting),
at info level (the only level where it is used), over real loopback sockets."""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
from typing import Any

import pytest
import trio

from ackservice.protocol import ack_line
from ackservice.server import Server, ServerConfig, serve, server_tls_context
from ackservice.server.connection import Connection
from ackservice.server.metrics import snapshot
from ackservice.server.readiness import Answerer
from ackservice.server.tls_transport import TLSTransport
from ackservice.server.transport import SocketTransport
from support import Connect, LineReader, wait_until
from tls_support import BioClient, TLSFiles, client_context

pytestmark = pytest.mark.usefixtures("close_tls_test_sockets")

EventList = list[dict[str, Any]]
HUB_TASK = "ackservice readiness hub"


@pytest.fixture
def logs(info_level: None, logs: EventList) -> EventList:
    """Info-level events (the conftest's ``logs``, at info level: the answerer is used)."""
    return logs


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[calls, answers] of Connection.answer_waiting: the dispatcher path was really taken."""
    counts = [0, 0]
    original = Connection.answer_waiting

    def spy(self: Connection, later: list[Answerer]) -> float | None:
        counts[0] += 1
        deadline = original(self, later)
        if deadline is not None:
            counts[1] += 1
        return deadline

    monkeypatch.setattr(Connection, "answer_waiting", spy)
    return counts


def in_dispatcher() -> bool:
    return trio.lowlevel.current_task().name == HUB_TASK


async def start(
    nursery: trio.Nursery, tls: ssl.SSLContext | None = None, **settings: Any
) -> Server:
    return await nursery.start(  # type: ignore[no-any-return]
        functools.partial(serve, ServerConfig(port=0, **settings), tls=tls)
    )


async def request_response(
    stream: trio.abc.Stream, reader: LineReader, first: int, count: int
) -> int:
    nbytes = 0
    for seq in range(first, first + count):
        message = b"message %d\n" % seq
        await stream.send_all(message)
        nbytes += len(message)
        with trio.fail_after(5):
            assert await reader.line() == ack_line(seq, message[:-1])[:-1]
    return nbytes


@pytest.mark.usefixtures("info_level")
async def test_messages_answered_in_the_dispatcher_are_counted(
    nursery: trio.Nursery, connect: Connect, answered: list[int]
) -> None:
    """messages, acked and bytes_received count every dispatcher answer, live (metrics) and
    in the totals once closed."""
    server = await start(nursery)
    stream = await connect(server.port)
    nbytes = await request_response(stream, LineReader(stream), 1, 20)
    assert answered[1] >= 5  # answered by the dispatcher (how many depends on timing)
    live = snapshot(server.handler)
    assert (live["messages"]["acked"], live["bytes_received"]) == (20, nbytes)
    (connection,) = server.handler._connections
    assert (connection.messages, connection.acked, connection.bytes_received) == (20, 20, nbytes)
    await stream.send_eof()
    await wait_until(lambda: server.handler.stats.active == 0)
    stats = server.handler.stats
    assert (stats.messages, stats.acked, stats.bytes_received) == (20, 20, nbytes)


@pytest.mark.usefixtures("info_level")
async def test_split_pipelined_and_cr_reads_around_dispatcher_answers(
    nursery: trio.Nursery, connect: Connect, answered: list[int]
) -> None:
    """Reads that are not one whole message (a split line, two messages, a CR held over,
    CRLF, an empty message) go to the task, interleaved with dispatcher answers: replies
    stay correct and in order."""
    server = await start(nursery)
    stream = await connect(server.port)
    reader = LineReader(stream)
    sends = [[b"hel", b"lo\n"], [b"a\nb\n"], [b"cr\r", b"\n"], [b"x\r\n"], [b"\n"], [b"one\n"]]
    expected = [b"hello", b"a", b"b", b"cr", b"x", b"", b"one"]
    for pieces in sends:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0.05)  # a read of its own on the server
    replies = await reader.lines(len(expected))
    assert replies == [ack_line(seq, p)[:-1] for seq, p in enumerate(expected, 1)]
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)


@pytest.mark.usefixtures("info_level")
async def test_idle_timeout_fires_after_the_last_dispatcher_answer(
    nursery: trio.Nursery, connect: Connect, answered: list[int]
) -> None:
    """Answers in the dispatcher move the idle deadline (the timer is re-armed, not obeyed)
    and the re-armed timer still ends the connection idle_timeout after the last one."""
    server = await start(nursery, idle_timeout=0.5)
    stream = await connect(server.port)
    reader = LineReader(stream)
    for seq in range(1, 5):
        await request_response(stream, reader, seq, 1)
        await trio.sleep(0.3)
    last = trio.current_time() - 0.3
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)
    with trio.fail_after(5):
        assert (await reader.line()).startswith(b"ERR 0 idle-timeout ")
    assert 0.45 <= trio.current_time() - last < 2


@pytest.mark.usefixtures("info_level")
async def test_shutdown_after_dispatcher_answers_says_goodbye(
    nursery: trio.Nursery, connect: Connect, answered: list[int]
) -> None:
    server = await start(nursery)
    stream = await connect(server.port)
    reader = LineReader(stream)
    await request_response(stream, reader, 1, 3)
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)
    server.shutdown()
    with trio.fail_after(5):
        assert (await reader.line()).startswith(b"ERR 0 shutting-down ")
        assert await reader.at_eof()


async def test_a_reply_partly_sent_by_the_dispatcher_is_finished_by_the_task(
    nursery: trio.Nursery,
    connect: Connect,
    answered: list[int],
    monkeypatch: pytest.MonkeyPatch,
    logs: EventList,
) -> None:
    """The socket takes part of an inline reply (_UnsentReplies): the task sends the rest,
    in order, before anything else."""
    original = SocketTransport.try_send
    cut = [0]

    def partial(self: SocketTransport, data: bytes) -> int:
        if in_dispatcher() and not cut[0]:
            cut[0] += 1
            return os.write(self._fd, data[:3])
        return original(self, data)

    monkeypatch.setattr(SocketTransport, "try_send", partial)
    server = await start(nursery)
    stream = await connect(server.port)
    await request_response(stream, LineReader(stream), 1, 5)
    assert cut[0] == 1


async def test_an_error_in_the_dispatcher_ends_only_that_connection(
    nursery: trio.Nursery,
    connect: Connect,
    answered: list[int],
    monkeypatch: pytest.MonkeyPatch,
    logs: EventList,
) -> None:
    """A write failing in the dispatcher is raised in the connection's task (reset), logged
    there with the connection's context; the dispatcher goes on serving the others."""
    original = SocketTransport.try_send
    failures: list[type[Exception]] = [ConnectionResetError, RuntimeError]

    def failing(self: SocketTransport, data: bytes) -> int:
        if in_dispatcher() and data.startswith(b"ACK 2 ") and failures:
            raise failures.pop(0)("injected")
        return original(self, data)

    monkeypatch.setattr(SocketTransport, "try_send", failing)
    server = await start(nursery)
    for _ in range(2):
        stream = await connect(server.port)
        reader = LineReader(stream)
        await request_response(stream, reader, 1, 1)
        await stream.send_all(b"message 2\n")
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            assert await reader.at_eof()
    await wait_until(lambda: server.handler.stats.active == 0)
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert [e["reason"] for e in closed] == ["reset", "internal-error"]
    assert all("conn_id" in e for e in logs if e["event"] != "listening")
    failed = [e for e in logs if e["event"] == "connection_failed"]
    assert len(failed) == 1
    assert "conn_id" in failed[0]
    stream = await connect(server.port)  # the dispatcher still runs
    await request_response(stream, LineReader(stream), 1, 3)
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)


async def test_a_too_large_message_alone_is_answered_by_the_task_with_its_context(
    nursery: trio.Nursery, connect: Connect, answered: list[int], logs: EventList
) -> None:
    server = await start(nursery, max_message_bytes=9)
    stream = await connect(server.port)
    reader = LineReader(stream)
    await stream.send_all(b"123456789\n")  # at the limit: answered in the dispatcher
    assert await reader.line() == ack_line(1, b"123456789")[:-1]
    await stream.send_all(b"1234567890\n")
    assert (await reader.line()).startswith(b"ERR 2 too-large")
    await request_response(stream, reader, 3, 1)
    (warning,) = [e for e in logs if e["event"] == "message_too_large"]
    assert "conn_id" in warning
    assert warning["seq"] == 2
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)


async def test_a_split_client_hello_on_a_plain_port_at_info_level(
    nursery: trio.Nursery, connect: Connect, answered: list[int], logs: EventList
) -> None:
    """The plain port's ClientHello check (_first) through the dispatcher's reads."""
    server = await start(nursery)
    hello = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    stream = await connect(server.port)
    await trio.sleep(0.05)  # the task waits first
    await stream.send_all(client_hello[:3])
    await trio.sleep(0.05)
    await stream.send_all(client_hello[3:])
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    (closed,) = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "tls-on-plain-port"
    assert closed["messages"] == 0
    assert answered[0] >= 1


# TLS ----------------------------------------------------------------------------------


async def bio_client(port: int, files: TLSFiles) -> BioClient:
    return await BioClient.connect(port, client_context(files))


@pytest.mark.usefixtures("info_level")
async def test_tls_record_split_across_segments_while_waiting(
    nursery: trio.Nursery, tls_files: TLSFiles, answered: list[int]
) -> None:
    """Part of a record wakes the dispatcher (nothing to decrypt: the wait goes on); the rest
    completes it and it is answered."""
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, None)
    server = await start(nursery, context)
    client = await bio_client(server.port, tls_files)
    await client.sendall(client.encrypt(b"one\n"))
    assert await client.read_line() == ack_line(1, b"one")
    record = client.encrypt(b"split\n")
    await client.sendall(record[:3])
    await trio.sleep(0.05)
    await client.sendall(record[3:])
    assert await client.read_line() == ack_line(2, b"split")
    await client.sendall(client.encrypt(b"three\n"))
    assert await client.read_line() == ack_line(3, b"three")
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)


async def test_tls_reply_partly_sent_by_the_dispatcher(
    nursery: trio.Nursery,
    tls_files: TLSFiles,
    answered: list[int],
    monkeypatch: pytest.MonkeyPatch,
    logs: EventList,
) -> None:
    original = TLSTransport.try_send
    cut = [0]

    def partial(self: TLSTransport, data: bytes) -> int:
        if in_dispatcher() and not cut[0]:
            cut[0] += 1
            self._tls.write(data)
            records = self._outgoing.read()
            sent = os.write(self._fd, records[:5])
            self._unsent = records[sent:]
            return 0
        return original(self, data)

    monkeypatch.setattr(TLSTransport, "try_send", partial)
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, None)
    server = await start(nursery, context)
    client = await bio_client(server.port, tls_files)
    for seq in range(1, 5):
        await client.sendall(client.encrypt(b"m%d\n" % seq))
        assert await client.read_line() == ack_line(seq, b"m%d" % seq)
    assert cut[0] == 1
    await client.sendall(client.close_notify())
    with trio.fail_after(5):
        assert await client.read_all() == b""
    assert client.closed_cleanly


async def test_tls_truncation_seen_by_the_dispatcher_read(
    nursery: trio.Nursery,
    tls_files: TLSFiles,
    answered: list[int],
    logs: EventList,
) -> None:
    """TCP FIN without close_notify after request/response: tls-truncated, counts kept."""
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, None)
    server = await start(nursery, context)
    client = await bio_client(server.port, tls_files)
    for seq in range(1, 4):
        await client.sendall(client.encrypt(b"m%d\n" % seq))
        assert await client.read_line() == ack_line(seq, b"m%d" % seq)
    await client.sendall(client.encrypt(b"partial"))
    client.sock.shutdown(2 - 1)  # SHUT_WR
    await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    (closed,) = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "tls-truncated"
    assert closed["messages"] == 3
    assert answered[1] >= 1  # the dispatcher answered (how often depends on timing)


@pytest.mark.usefixtures("info_level")
async def test_many_request_response_clients_with_mixed_reads(
    nursery: trio.Nursery, answered: list[int]
) -> None:
    """50 clients, 200 messages each: whole, split, or two per send, at random; every ACK
    correct and in order, every message counted."""
    import random

    server = await start(nursery)
    total_bytes = [0]

    async def client(index: int) -> None:
        rng = random.Random(index)
        seq = 0
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            reader = LineReader(stream)
            while seq < 200:
                kind = rng.random()
                payloads = [rng.randbytes(rng.randrange(0, 200)).replace(b"\n", b"").rstrip(b"\r")]
                if kind < 0.1:
                    payloads.append(b"second %d" % seq)
                data = b"".join(p + b"\n" for p in payloads)
                total_bytes[0] += len(data)
                if kind > 0.9 and len(data) > 2:
                    cut = rng.randrange(1, len(data))
                    await stream.send_all(data[:cut])
                    await trio.sleep(0.001)
                    await stream.send_all(data[cut:])
                else:
                    await stream.send_all(data)
                for payload in payloads:
                    seq += 1
                    assert await reader.line() == ack_line(seq, payload)[:-1]

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for index in range(50):
                clients.start_soon(client, index)
        await wait_until(lambda: server.handler.stats.active == 0)
    stats = server.handler.stats
    assert stats.messages == stats.acked >= 50 * 200
    assert stats.bytes_received == total_bytes[0]
    assert answered[1] > 5000


@pytest.mark.usefixtures("info_level")
async def test_shutdown_during_request_response_load_loses_nothing(
    nursery: trio.Nursery, answered: list[int]
) -> None:
    """Shutdown while 50 clients do request/response: each gets an ACK for every message
    the server counted, then ERR 0 shutting-down; the totals match what clients received."""
    server = await start(nursery)
    acks = [0]
    ended = [0]

    async def client(index: int) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            reader = LineReader(stream)
            seq = 0
            while True:
                seq += 1
                try:
                    await stream.send_all(b"c%d m%d\n" % (index, seq))
                except trio.BrokenResourceError:
                    break
                try:
                    line = await reader.line()
                except (EOFError, trio.BrokenResourceError):
                    break
                if line.startswith(b"ERR 0 shutting-down"):
                    ended[0] += 1
                    break
                assert line == ack_line(seq, b"c%d m%d" % (index, seq))[:-1]
                acks[0] += 1

    async with trio.open_nursery() as clients:
        for index in range(50):
            clients.start_soon(client, index)
        await trio.sleep(0.5)
        server.shutdown()
    await wait_until(lambda: server.handler.stats.active == 0)
    assert ended[0] == 50
    assert server.handler.stats.acked == acks[0] > 0
    assert answered[1] > 0


@pytest.mark.usefixtures("info_level")
async def test_tls_request_response_with_split_records_then_close_notify(
    nursery: trio.Nursery, tls_files: TLSFiles, answered: list[int]
) -> None:
    import random

    context = server_tls_context(tls_files.server_cert, tls_files.server_key, None)
    server = await start(nursery, context)

    async def client(index: int) -> None:
        rng = random.Random(index)
        bio = await bio_client(server.port, tls_files)
        for seq in range(1, 101):
            payload = b"c%d m%d " % (index, seq) + b"x" * rng.randrange(0, 100)
            record = bio.encrypt(payload + b"\n")
            if rng.random() < 0.2:
                cut = rng.randrange(1, len(record))
                await bio.sendall(record[:cut])
                await trio.sleep(0.001)
                await bio.sendall(record[cut:])
            else:
                await bio.sendall(record)
            assert await bio.read_line() == ack_line(seq, payload)
        await bio.sendall(bio.close_notify())
        assert await bio.read_all() == b""
        assert bio.closed_cleanly

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for index in range(10):
                clients.start_soon(client, index)
        await wait_until(lambda: server.handler.stats.active == 0)
    assert server.handler.stats.acked == 1000
    assert answered[1] > 500
