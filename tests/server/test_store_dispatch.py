"""Reads queued for a store's commit by the readiness hub's dispatcher (Connection
._queue_waiting): the commit's leader writes the ACKs, and the connection's task wakes only
for what needs it (leading a commit, verdicts to log, the end, a shutdown). At info level,
the only level where it is used, over real loopback sockets."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
import trio

from ackservice.protocol import ack_line, crc32
from ackservice.server import Server, ServerConfig, serve, server_tls_context
from ackservice.server.committing import GroupCommitter
from ackservice.server.connection import Connection, _QueuedRead, _UnsentReplies
from ackservice.store import Message, MessageRun, Rejected, Unavailable, Verdict
from support import Connect, LineReader, wait_until
from tls_support import TLSFiles, client_context

EventList = list[dict[str, Any]]


class GatedStore:
    """Keeps every batch; a batch waits for ``gate`` (when set up) before it is stored, and
    ``verdict_for`` may refuse a message by its payload."""

    description = "gated"

    def __init__(self) -> None:
        self.batches: list[list[Message]] = []
        self.gate: trio.Event | None = None
        self.arrived = trio.Event()

    async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append(list(batch))
        verdicts = [verdict_for(message.payload) for message in batch]
        return None if all(v is None for v in verdicts) else verdicts

    async def aclose(self) -> None:
        pass

    @property
    def stored(self) -> list[tuple[int, int, bytes]]:
        return [(m.conn_id, m.seq, m.payload) for batch in self.batches for m in batch]


def verdict_for(payload: bytes) -> Verdict:
    if payload.startswith(b"reject"):
        return Rejected("not this one")
    if payload.startswith(b"later"):
        return Unavailable("try again")
    return None


@pytest.fixture
def logs(info_level: None, logs: EventList) -> EventList:
    """Info-level events (the conftest's ``logs``, at info level: the dispatcher is used)."""
    return logs


@pytest.fixture
def task_answers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many reads the connections' tasks framed themselves (Connection._answer_each):
    the dispatcher's queueing leaves them few."""
    calls = [0]
    original = Connection._answer_each

    async def spy(self: Connection, data: bytes) -> bytes:
        calls[0] += 1
        return await original(self, data)

    monkeypatch.setattr(Connection, "_answer_each", spy)
    return calls


async def start(nursery: trio.Nursery, store: GatedStore, **settings: Any) -> Server:
    return await nursery.start(  # type: ignore[no-any-return]
        functools.partial(serve, ServerConfig(port=0, **settings), store=store)
    )


async def request_response(
    stream: trio.abc.Stream, reader: LineReader, name: bytes, count: int
) -> None:
    for seq in range(1, count + 1):
        message = b"%s %d" % (name, seq)
        await stream.send_all(message + b"\n")
        with trio.fail_after(5):
            assert await reader.line() == ack_line(seq, message)[:-1]


async def test_request_response_is_acknowledged_by_the_commits_leader(
    nursery: trio.Nursery, connect: Connect, logs: EventList, task_answers: list[int]
) -> None:
    """Eight request/response clients at once: every ACK right and after its message was
    stored, each message stored once and in order, and the connections' tasks framed
    (almost) none of the reads themselves."""
    store = GatedStore()
    server = await start(nursery, store)
    names = [b"client-%d" % n for n in range(8)]
    async with trio.open_nursery() as clients:
        for name in names:
            stream = await connect(server.port)
            clients.start_soon(request_response, stream, LineReader(stream), name, 25)
    stored = store.stored
    assert len(stored) == 8 * 25
    for name in names:
        mine = [(seq, payload) for _, seq, payload in stored if payload.startswith(name + b" ")]
        assert mine == [(seq, b"%s %d" % (name, seq)) for seq in range(1, 26)]
    assert task_answers[0] <= 8  # a first read may come before the task waits
    live = server.handler.stats
    assert sum(c.acked for c in server.handler._connections) + live.acked == 200


async def queued_behind_a_running_commit(
    server: Server, store: GatedStore, connect: Connect, *payloads: bytes
) -> tuple[trio.abc.Stream, list[tuple[trio.abc.Stream, LineReader]]]:
    """A first connection's commit held up in the store (its message "hold"), and one more
    connection per payload, each with that payload sent and queued by the dispatcher for
    the next commit: the blocker's stream, and each queued connection with its reader."""
    store.gate = trio.Event()
    blocker = await connect(server.port)
    await blocker.send_all(b"hold\n")
    with trio.fail_after(5):
        await store.arrived.wait()
    queued = []
    for payload in payloads:
        stream = await connect(server.port)
        await stream.send_all(payload + b"\n")
        queued.append((stream, LineReader(stream)))
    committer = server.handler.committer
    await wait_until(lambda: len(committer._queue) == len(payloads))  # type: ignore[union-attr]
    return blocker, queued


async def test_refused_messages_are_answered_and_logged_by_the_connections_task(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """Verdicts other than "stored" need the connection's log context: a queued read's task
    is woken to answer them (ERR rejected, logged with its conn_id; ERR unavailable)."""
    store = GatedStore()
    server = await start(nursery, store)
    _, queued = await queued_behind_a_running_commit(
        server, store, connect, b"reject me", b"later please"
    )
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await queued[0][1].line() == b"ERR 1 rejected not this one"
        assert await queued[1][1].line() == b"ERR 1 unavailable try again"
    (warning,) = [e for e in logs if e["event"] == "message_rejected"]
    assert (warning["seq"], warning["conn_id"]) == (1, 2)
    stream, reader = queued[1]
    await stream.send_all(b"fine\n")  # and the connection goes on as before
    with trio.fail_after(5):
        assert await reader.line() == ack_line(2, b"fine")[:-1]


async def test_shutdown_answers_a_read_waiting_for_its_commit_first(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """A shutdown that begins while a read waits for its commit: the client gets its ACK
    (the message is stored), then ERR 0 shutting-down; nothing is lost."""
    store = GatedStore()
    server = await start(nursery, store)
    _, [(_, reader)] = await queued_behind_a_running_commit(
        server, store, connect, b"during shutdown"
    )
    server.shutdown()
    await trio.sleep(0.1)  # the connection's task is woken for the shutdown meanwhile
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await reader.line() == ack_line(1, b"during shutdown")[:-1]
        assert (await reader.line()).startswith(b"ERR 0 shutting-down")
    assert (2, 1, b"during shutdown") in store.stored


async def test_end_of_stream_while_a_read_waits_for_its_commit(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """A client that half-closes right after its message: the end of the stream wakes the
    task, which waits for the commit, writes the ACK, then closes."""
    store = GatedStore()
    server = await start(nursery, store)
    _, [(stream, reader)] = await queued_behind_a_running_commit(
        server, store, connect, b"last words"
    )
    await stream.send_eof()
    await trio.sleep(0.1)
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await reader.line() == ack_line(1, b"last words")[:-1]
        assert await reader.at_eof()
    await wait_until(lambda: len(server.handler._connections) == 1)  # the blocker's
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert [(e["conn_id"], e["reason"], e["acked"]) for e in closed] == [(2, "eof", 1)]


async def test_reads_queued_behind_a_commit_make_the_next_one(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """Reads queued while a commit runs are the next commit, led by the oldest one's task
    (woken to lead) and answered together."""
    store = GatedStore()
    server = await start(nursery, store)
    blocker, queued = await queued_behind_a_running_commit(server, store, connect, b"two", b"three")
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await LineReader(blocker).line() == ack_line(1, b"hold")[:-1]
        assert await queued[0][1].line() == ack_line(1, b"two")[:-1]
        assert await queued[1][1].line() == ack_line(1, b"three")[:-1]
    batches = [[m.payload for m in batch] for batch in store.batches]
    assert batches == [[b"hold"], [b"two", b"three"]]


@pytest.mark.parametrize(
    ("sent", "messages"),
    [
        (b"one", [b"one"]),
        (b"one\ntwo\n\nfour", [b"one", b"two", b"", b"four"]),  # split without the framer
        (b"one\r\ntwo\r", [b"one", b"two"]),  # a "\r" to strip: the framer's work
        (b"a\rb\r\n", [b"a\rb", b""]),  # only a "\r" before "\n" is dropped
        (b"", [b""]),
    ],
)
async def test_a_queued_read_is_framed_as_the_connections_task_frames_it(
    nursery: trio.Nursery, connect: Connect, logs: EventList, sent: bytes, messages: list[bytes]
) -> None:
    """Reads of whole lines queued by the dispatcher: the same messages, and ACKs, as the
    framer gives (empty lines are messages; a "\\r" before a newline is not part of one)."""
    store = GatedStore()
    server = await start(nursery, store)
    _, [(_, reader)] = await queued_behind_a_running_commit(server, store, connect, sent)
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        for seq, message in enumerate(messages, 1):
            assert await reader.line() == ack_line(seq, message)[:-1]
    assert [m.payload for m in store.batches[1]] == messages


async def test_a_forced_exit_with_a_read_waiting_for_its_commit(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """Cancelled (a forced exit) while reads wait for a commit that never ends: the server
    stops at once, and the queued read is answered to nobody."""
    store = GatedStore()
    with trio.CancelScope() as server_scope:
        async with trio.open_nursery() as server_nursery:
            server = await start(server_nursery, store, store_timeout=60)
            await queued_behind_a_running_commit(server, store, connect, b"stuck")
            server_scope.cancel()
    assert server_scope.cancelled_caught
    committer = server.handler.committer
    assert isinstance(committer, GroupCommitter)
    assert not committer._queue


async def test_a_client_that_stops_reading_its_acks_is_dropped_at_the_send_timeout(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """The leader writes a queued read's ACKs without waiting; what the socket does not
    take goes to the connection's task, which gives up after send_timeout like any other
    write (the messages were stored: the client resends what it saw no ACK for)."""
    store = GatedStore()
    server = await start(nursery, store, send_timeout=0.5)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    try:
        read = b"\n" * 2000  # empty messages: ~40 KB of ACKs for each 2 KB read
        with trio.move_on_after(10):
            while not any(e["event"] == "connection_closed" for e in logs):
                await stream.send_all(read)
                await trio.sleep(0.002)  # each its own read, queued by the dispatcher
    except trio.BrokenResourceError:
        pass  # closed by the server while sending: what this test waits for
    finally:
        await stream.aclose()
    await wait_until(lambda: any(e["event"] == "connection_closed" for e in logs))
    (closed,) = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "send-timeout"
    assert len(store.stored) >= closed["messages"] > 0


class _Owner:
    """The least a Connection needs from its owner, for the unit tests below."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.config = ServerConfig()
        self.shutting_down = False
        self.committer = committer

    def connection_closed(self, connection: Connection) -> None:
        pass


class _Transport:
    """Takes ``takes`` bytes of a write (or raises ``fails``), and records wake-ups."""

    needs_handshake = False
    identity = None

    def __init__(self, takes: int | None = None, fails: Exception | None = None) -> None:
        self.takes, self.fails = takes, fails
        self.written = b""
        self.wakes = 0
        self.may_have_more = False

    def try_send(self, data: bytes) -> int:
        if self.fails is not None:
            raise self.fails
        sent = len(data) if self.takes is None else min(self.takes, len(data))
        self.written += data[:sent]
        return sent

    def wake(self) -> None:
        self.wakes += 1


def _queued_connection(transport: _Transport) -> tuple[Connection, Any]:
    """A connection (at info level) whose read of two messages is queued behind another
    commit, as the dispatcher leaves it."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    committer = GroupCommitter(GatedStore(), timeout=5, max_pending_bytes=1 << 20)
    committer._leading = True  # another connection's commit runs
    connection = Connection(_Owner(committer), 1, "127.0.0.1:1", transport)  # type: ignore[arg-type]
    payloads = [b"one", b"two"]
    messages = MessageRun(payloads, [crc32(p) for p in payloads], 0.0, "127.0.0.1:1", 1, 1)
    parcel = committer.enqueue(messages, 6, connection)
    connection._queued = _QueuedRead(parcel, messages)
    return connection, parcel


async def test_answered_writes_the_acks_the_socket_takes_and_leaves_the_rest_to_the_task() -> None:
    transport = _Transport(takes=5)
    connection, parcel = _queued_connection(transport)
    connection.answered(parcel, 1.0)
    acks = ack_line(1, b"one") + ack_line(2, b"two")
    assert transport.written == acks[:5]
    assert connection._held == _UnsentReplies(acks, 5)
    assert (transport.wakes, connection.messages, connection._queued) == (1, 2, None)


async def test_answered_leaves_a_failed_write_to_the_task() -> None:
    failure = BrokenPipeError()
    transport = _Transport(fails=failure)
    connection, parcel = _queued_connection(transport)
    connection.answered(parcel, 1.0)
    assert connection._held is failure
    assert transport.wakes == 1


async def test_answered_writes_nothing_for_a_closed_connection() -> None:
    """Closed meanwhile (a forced exit): its socket's number may be another's by now."""
    transport = _Transport()
    connection, parcel = _queued_connection(transport)
    connection._withdraw_queued()
    connection.answered(parcel, 1.0)
    assert (transport.written, transport.wakes, connection._held) == (b"", 0, None)


@pytest.mark.parametrize("attempt", range(6))  # which cancelled task runs first varies
async def test_a_forced_exit_while_tasks_wait_for_their_queued_reads(
    connect: Connect, logs: EventList, attempt: int
) -> None:
    """A shutdown wakes the queued reads' tasks (they wait for their commit, _wait_queued),
    then a forced exit cancels them all while the commit before theirs still runs: the
    leader, cancelled too, hands the lead on without rescheduling a task its cancellation
    rescheduled already (Trio's AssertionError in the leader: connection_failed)."""
    store = GatedStore()
    with trio.CancelScope() as server_scope:
        async with trio.open_nursery() as server_nursery:
            server = await start(server_nursery, store, store_timeout=60, shutdown_grace=60)
            await queued_behind_a_running_commit(server, store, connect, b"one", b"two", b"three")
            server.shutdown()
            connections = list(server.handler._connections)
            await wait_until(
                lambda: all(
                    c._queued is None or c._queued.waiter is not None
                    for c in connections
                    if c.conn_id != 1
                )
            )
            server_scope.cancel()
    assert server_scope.cancelled_caught
    failures = [e for e in logs if e["event"] in ("connection_failed", "parcel_owner_failed")]
    assert failures == []
    committer = server.handler.committer
    assert isinstance(committer, GroupCommitter)
    assert not committer._queue


async def test_a_task_cancelled_while_waiting_for_its_queued_read_is_not_woken_again() -> None:
    """Cancelled in _wait_queued, the task is rescheduled at once but runs later; a leader
    handing it the lead (or answering it) meanwhile must not reschedule it a second time
    (Trio refuses: an AssertionError in the leader's task)."""
    transport = _Transport()
    connection, parcel = _queued_connection(transport)
    queued = connection._queued
    scopes: list[trio.CancelScope] = []

    async def wait() -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await connection._wait_queued()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await wait_until(lambda: queued.waiter is not None)
        scopes[0].cancel()
        assert connection.lead(parcel)  # before the cancelled task ran: not rescheduled
        assert connection._held is not None
    assert queued.waiter is None


async def test_input_arriving_while_a_read_waits_for_its_commit_is_read_once_answered(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """An edge that comes while a read is queued is not read then (one queued read per
    connection) and will not come again: once the commit answers the queued read, the task
    reads it, a whole line and a partial one, then the end of the stream."""
    store = GatedStore()
    server = await start(nursery, store)
    _, [(stream, reader)] = await queued_behind_a_running_commit(server, store, connect, b"a")
    (connection,) = [c for c in server.handler._connections if c.conn_id == 2]
    await stream.send_all(b"b\nc")
    await wait_until(lambda: connection._queued is not None and connection._queued.unread_edge)
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await reader.line() == ack_line(1, b"a")[:-1]
        assert await reader.line() == ack_line(2, b"b")[:-1]
    await stream.send_all(b"d\n")
    await stream.send_eof()
    with trio.fail_after(5):
        assert await reader.line() == ack_line(3, b"cd")[:-1]
        assert await reader.at_eof()
    assert [p for _, _, p in store.stored] == [b"hold", b"a", b"b", b"cd"]


async def test_an_idle_timeout_shorter_than_the_commit_answers_the_queued_read_first(
    nursery: trio.Nursery, connect: Connect, logs: EventList
) -> None:
    """Waiting for a slow store is not idling: the idle timer that fires meanwhile waits for
    the queued read's answer, and the ACK comes before any ERR 0 idle-timeout."""
    store = GatedStore()
    server = await start(nursery, store, idle_timeout=0.2)
    _, [(_, reader)] = await queued_behind_a_running_commit(server, store, connect, b"slow")
    await trio.sleep(0.5)
    store.gate.set()  # type: ignore[union-attr]
    with trio.fail_after(5):
        assert await reader.line() == ack_line(1, b"slow")[:-1]
        assert (await reader.line()).startswith(b"ERR 0 idle-timeout")
    assert (2, 1, b"slow") in store.stored


async def test_request_response_over_mutual_tls_is_queued_and_stored_with_the_identity(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList, task_answers: list[int]
) -> None:
    """Over TLS (client certificates), reads are queued by the dispatcher as over plain TCP:
    every ACK after its message was stored, with the client's identity, and the tasks
    framed (almost) none of the reads."""
    store = GatedStore()
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    server: Server = await nursery.start(
        functools.partial(serve, ServerConfig(port=0), store=store, tls=context)
    )
    client_tls = client_context(tls_files, cert=tls_files.client_cert, key=tls_files.client_key)

    async def one_client(name: bytes) -> None:
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream = trio.SSLStream(raw, client_tls, server_hostname="127.0.0.1")
        try:
            await request_response(stream, LineReader(stream), name, 20)
        finally:
            await stream.aclose()

    async with trio.open_nursery() as clients:
        for n in range(4):
            clients.start_soon(one_client, b"tls-%d" % n)
    assert len(store.stored) == 80
    (identity,) = {m.identity for batch in store.batches for m in batch}
    assert identity is not None
    assert identity.endswith("CN=ackservice-test-client")
    assert task_answers[0] <= 8
