"""Storing before acknowledging: group commit, verdicts, outages, back-pressure, shutdown.

These run the handler over in-memory streams with small in-process stores written against
the ``Store`` protocol, as an embedder would write one; the SQLite and JetStream stores
have their own tests, and end-to-end tests drive them through real processes.
"""

from __future__ import annotations

import collections
import functools
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from server_support import ListStore, connect
from structlog.testing import capture_logs

from ackservice.protocol import ack_line
from ackservice.server import AckHandler, MessageContext, Reject, ServerConfig, serve
from ackservice.server.committing import GroupCommitter, Parcel
from ackservice.store import Message, Rejected, StoreUnavailable, Unavailable, Verdict
from support import LineReader

EventList = list[dict[str, Any]]


async def test_ack_follows_the_commit_and_carries_the_message(nursery: trio.Nursery) -> None:
    """A message is acknowledged only after the store has it, with its payload, CRC, seq,
    connection and arrival time."""
    store = ListStore()
    store.gate = trio.Event()
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"hello\n")
    await store.commit_started.wait()
    with trio.move_on_after(0.5):
        await replies.line()
        pytest.fail("an ACK left before the commit returned")
    store.gate.set()
    assert await replies.line() == b"ACK 1 5 3610a686"
    [[message]] = store.batches
    assert (message.payload, message.crc32, message.seq) == (b"hello", 0x3610A686, 1)
    assert message.conn_id == 1
    assert message.peer == "StapledStream"
    assert message.received_at > 1.7e9
    await client.aclose()


async def test_one_commit_covers_every_connection_that_waited(nursery: trio.Nursery) -> None:
    """While a commit runs, whatever arrives from any connection waits and then goes into
    one next commit together: group commit, not a commit per connection or per message."""
    store = ListStore()
    store.gate = trio.Event()
    handler = AckHandler(ServerConfig(), store=store)
    first, first_replies = connect(nursery, handler)
    await first.send_all(b"first\n")
    await store.commit_started.wait()  # the first commit holds the store
    others = [connect(nursery, handler) for _ in range(5)]
    for index, (client, _) in enumerate(others):
        await client.send_all(b"a%d\nb%d\n" % (index, index))
    await trio.testing.wait_all_tasks_blocked()
    store.gate.set()
    assert (await first_replies.line()).startswith(b"ACK 1 ")
    for _, replies in others:
        assert [line.split()[1] for line in await replies.lines(2)] == [b"1", b"2"]
    assert [len(batch) for batch in store.batches] == [1, 10]


async def test_a_pipelined_read_is_one_commit_and_one_block_of_replies(
    nursery: trio.Nursery,
) -> None:
    """Every message of one read goes into one commit, and their ACKs come in one write."""
    store = ListStore()
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    payloads = [b"message %d" % i for i in range(100)]
    await client.send_all(b"".join(p + b"\n" for p in payloads))
    lines = await replies.lines(100)
    assert lines == [ack_line(i, p)[:-1] for i, p in enumerate(payloads, 1)]
    assert store.payloads == payloads
    assert len(store.batches) == 1


async def test_verdicts_become_per_message_errors(nursery: trio.Nursery, logs: EventList) -> None:
    """A store's verdicts answer each message: rejected and unavailable are ERR lines with
    the store's words, the others are ACKed, and too-large messages keep their place."""
    store = ListStore()
    store.verdicts = {b"bad": Rejected("not allowed"), b"later": Unavailable("busy shard")}
    handler = AckHandler(ServerConfig(max_message_bytes=10), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"ok\nbad\n" + b"x" * 20 + b"\nlater\nfine\n")
    assert await replies.lines(5) == [
        ack_line(1, b"ok")[:-1],
        b"ERR 2 rejected not allowed",
        b"ERR 3 too-large message exceeds 10 bytes; it was dropped",
        b"ERR 4 unavailable busy shard",
        ack_line(5, b"fine")[:-1],
    ]
    assert store.payloads == [b"ok", b"fine"]


async def test_outage_answers_unavailable_logs_once_and_recovers(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """While the store cannot commit, every message gets ERR unavailable (safe to resend),
    the connection stays open, one event says so, and one says when it recovered."""
    store = ListStore()
    store.failing = True
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    for index in range(5):
        await client.send_all(b"m%d\n" % index)
        assert await replies.line() == b"ERR %d unavailable disk full" % (index + 1)
    store.failing = False
    await client.send_all(b"again\n")
    assert await replies.line() == ack_line(6, b"again")[:-1]
    assert [e["event"] for e in logs if e["event"].startswith("store_")] == [
        "store_unavailable",
        "store_recovered",
    ]
    recovered = next(e for e in logs if e["event"] == "store_recovered")
    assert recovered["messages_refused"] == 5


class _DisconnectingStore(ListStore):
    """A store that knows when it is disconnected (as JetStream's does): ``available``."""

    def __init__(self) -> None:
        super().__init__()
        self.available = True

    async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
        if not self.available:
            raise StoreUnavailable("not connected")
        return await super().store(batch)


async def test_a_store_that_reconnects_is_available_again_without_traffic(
    nursery: trio.Nursery,
) -> None:
    """An outage that began because the store said it was disconnected ends, for /readyz
    and ``ackservice_store_up``, once the store says it is connected again: before, it
    lasted until the next commit worked, and a load balancer that sends traffic only to a
    ready server never sent the message that would have ended it."""
    store = _DisconnectingStore()
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    store.available = False
    await client.send_all(b"lost\n")
    assert await replies.line() == b"ERR 1 unavailable not connected"
    committer = handler.committer
    assert isinstance(committer, GroupCommitter)
    assert not committer.available
    store.available = True  # reconnected in the background; no message since
    assert committer.available


async def test_a_failing_commit_keeps_the_store_unavailable_while_it_says_connected(
    nursery: trio.Nursery,
) -> None:
    """An outage the store did not announce (a full disk, a commit past --store-timeout)
    lasts until a commit works: nothing else would say it is over."""
    store = _DisconnectingStore()
    store.failing = True
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"m\n")
    assert await replies.line() == b"ERR 1 unavailable disk full"
    committer = handler.committer
    assert isinstance(committer, GroupCommitter)
    assert not committer.available
    store.failing = False
    assert not committer.available
    await client.send_all(b"again\n")
    assert await replies.line() == ack_line(2, b"again")[:-1]
    assert committer.available


async def test_a_store_unavailable_made_from_an_exception_answers_unavailable(
    nursery: trio.Nursery,
) -> None:
    """``raise StoreUnavailable(exc) from exc`` (the exception rather than its text) still
    answers the batch unavailable, with the exception's text, so clients resend. Before, the
    connection died without a reply on an AttributeError from the protocol module, and
    counted the other messages of the read as acked."""

    class FullDisk(ListStore):
        async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                raise StoreUnavailable(exc) from exc  # type: ignore[arg-type]

    handler = AckHandler(ServerConfig(), store=FullDisk())
    client, replies = connect(nursery, handler)
    await client.send_all(b"a\n")
    assert await replies.line() == b"ERR 1 unavailable [Errno 28] No space left on device"
    await client.send_all(b"b\n")
    assert await replies.line() == b"ERR 2 unavailable [Errno 28] No space left on device"


async def test_a_commit_past_the_store_timeout_is_unavailable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A commit that takes longer than store_timeout is abandoned: its messages are told
    unavailable instead of the client waiting out its own ack timeout."""
    store = ListStore()
    store.gate = trio.Event()  # never opened
    handler = AckHandler(ServerConfig(store_timeout=2.0), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"stuck\n")
    assert await replies.line() == b"ERR 1 unavailable store did not commit within 2 s"


async def test_a_failing_store_is_an_internal_error_not_a_crash(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """A store that raises anything else answers internal-error, logs the traceback once,
    and the server goes on."""

    class BrokenStore(ListStore):
        async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
            raise RuntimeError("bug in the store")

    handler = AckHandler(ServerConfig(), store=BrokenStore())
    client, replies = connect(nursery, handler)
    await client.send_all(b"a\n")
    assert (await replies.line()).startswith(b"ERR 1 internal-error ")
    await client.send_all(b"b\n")
    assert (await replies.line()).startswith(b"ERR 2 internal-error ")
    [failed] = [e for e in logs if e["event"] == "store_failed"]
    assert isinstance(failed["exc_info"], RuntimeError)


async def test_a_store_raising_system_exit_fails_its_batch_only(
    nursery: trio.Nursery, logs: EventList
) -> None:
    """SystemExit from a store (a library in it calling ``sys.exit``) is a store failure
    like any other, as it is from a hook: internal-error for that batch, ``store_failed``
    with the traceback, and the server goes on. Before, it ended the connection's task and
    with it the embedding application's nursery."""

    class ExitingStore(ListStore):
        async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
            if batch[0].payload == b"exit":
                raise SystemExit(3)
            return await super().store(batch)

    handler = AckHandler(ServerConfig(), store=ExitingStore())
    client, replies = connect(nursery, handler)
    await client.send_all(b"exit\n")
    assert (await replies.line()).startswith(b"ERR 1 internal-error ")
    await client.send_all(b"after\n")
    assert await replies.line() == ack_line(2, b"after")[:-1]
    [failed] = [e for e in logs if e["event"] == "store_failed"]
    assert isinstance(failed["exc_info"], SystemExit)


async def test_verdicts_in_any_sequence_answer_their_messages(nursery: trio.Nursery) -> None:
    """``Store.store`` may answer with any ``Sequence`` of verdicts, not only a list: a
    ``collections.deque`` (which cannot be sliced) answers each message like a list does.
    Before, the connection died on a TypeError from slicing it, without a reply."""

    class DequeStore(ListStore):
        async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
            verdicts = await super().store(batch)
            return None if verdicts is None else collections.deque(verdicts)

    store = DequeStore()
    store.verdicts = {b"bad": Rejected("not allowed")}
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"ok\nbad\n")
    assert await replies.lines(2) == [ack_line(1, b"ok")[:-1], b"ERR 2 rejected not allowed"]


def _strings(batch: Sequence[Message]) -> Any:
    return ["stored" for _ in batch]


def _verdict_classes(batch: Sequence[Message]) -> Any:
    return [Rejected for _ in batch]  # the class, not Rejected("reason")


def _a_generator(batch: Sequence[Message]) -> Any:
    return (None for _ in batch)  # not a Sequence: no len()


def _bytes_reasons(batch: Sequence[Message]) -> Any:
    return [Rejected(b"no") for _ in batch]  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [_strings, _verdict_classes, _a_generator, _bytes_reasons])
async def test_a_store_answering_something_other_than_verdicts_is_an_internal_error(
    nursery: trio.Nursery, logs: EventList, answer: Any
) -> None:
    """A store whose answer is not one ``Verdict`` per message (a string, the ``Rejected``
    class itself, a generator, a reason in bytes) is a store bug: its messages are answered
    internal-error, it is logged as ``store_failed``, and the connection goes on. Before,
    the connection died without a reply (an AssertionError or a TypeError from the server's
    internals), and its ``connection_closed`` counted those messages as acked."""

    class WrongAnswers(ListStore):
        async def store(self, batch: Sequence[Message]) -> Sequence[Verdict] | None:
            if batch[0].payload == b"fine":
                return None
            return answer(batch)  # type: ignore[no-any-return]

    handler = AckHandler(ServerConfig(), store=WrongAnswers())
    client, replies = connect(nursery, handler)
    await client.send_all(b"a\nb\n")
    lines = await replies.lines(2)
    assert [line.split(b" ", 3)[:3] for line in lines] == [
        [b"ERR", b"1", b"internal-error"],
        [b"ERR", b"2", b"internal-error"],
    ]
    await client.send_all(b"fine\n")
    assert await replies.line() == ack_line(3, b"fine")[:-1]
    assert [e["event"] for e in logs if e["event"].startswith("store_")] == [
        "store_failed",
        "store_recovered",
    ]


async def test_connections_stop_reading_while_the_store_is_behind(nursery: trio.Nursery) -> None:
    """Past max_pending_store_bytes waiting for a commit, connections read nothing more:
    a slow store slows clients down instead of growing the server's memory."""
    store = ListStore()
    store.gate = trio.Event()
    handler = AckHandler(ServerConfig(max_pending_store_bytes=100), store=store)
    first, _ = connect(nursery, handler)
    await first.send_all(b"x" * 200 + b"\n")  # over the bound, now in the commit
    await store.commit_started.wait()
    second, second_replies = connect(nursery, handler)
    await second.send_all(b"waiting\n")
    await trio.testing.wait_all_tasks_blocked()
    # The second connection has not even read its message.
    assert sorted(c.bytes_received for c in handler._connections) == [0, 201]
    assert not store.batches
    store.gate.set()
    assert (await second_replies.line()).startswith(b"ACK 1 ")


async def test_shutdown_commits_and_answers_what_was_read(nursery: trio.Nursery) -> None:
    """A graceful shutdown during a commit still answers those messages with their ACKs,
    then says shutting-down: nothing read is lost."""
    store = ListStore()
    store.gate = trio.Event()
    handler = AckHandler(ServerConfig(), store=store)
    client, replies = connect(nursery, handler)
    await client.send_all(b"one\ntwo\n")
    await store.commit_started.wait()
    handler.begin_shutdown()
    store.gate.set()
    assert await replies.lines(3) == [
        ack_line(1, b"one")[:-1],
        ack_line(2, b"two")[:-1],
        b"ERR 0 shutting-down server is shutting down, retry later",
    ]
    assert store.payloads == [b"one", b"two"]


async def test_serve_with_a_store_over_tcp(nursery: trio.Nursery) -> None:
    """serve() runs the committer for its connections: a real socket's messages are stored
    before their ACKs, and the listening event names the store."""
    store = ListStore()
    with capture_logs() as events:
        server = await nursery.start(functools.partial(serve, ServerConfig(port=0), store=store))
    [listening] = [e for e in events if e["event"] == "listening"]
    assert listening["store"] == "list"
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"over tcp\n" * 3)
        assert len(await LineReader(stream).lines(3)) == 3
    assert store.payloads == [b"over tcp"] * 3
    server.shutdown()


def test_a_store_and_a_hook_together_are_refused() -> None:
    """A store and an on_message hook are two answers to one question: giving both is a
    usage error, not a silent choice."""

    async def hook(payload: bytes, context: MessageContext) -> None:
        pass

    with pytest.raises(ValueError, match="not both"):
        AckHandler(store=ListStore(), on_message=hook)


async def test_a_hook_past_its_timeout_is_unavailable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: EventList
) -> None:
    """A hook that never returns holds its message only hook_timeout long: the message is
    told unavailable (safe to resend) and the connection goes on."""

    async def stuck(payload: bytes, context: MessageContext) -> None:
        if payload == b"stuck":
            await trio.sleep_forever()

    handler = AckHandler(ServerConfig(hook_timeout=3.0), on_message=stuck)
    client, replies = connect(nursery, handler)
    await client.send_all(b"stuck\nnext\n")
    assert await replies.lines(2) == [
        b"ERR 1 unavailable the application did not answer within 3 s",
        ack_line(2, b"next")[:-1],
    ]
    assert [e["seq"] for e in logs if e["event"] == "on_message_timed_out"] == [1]


def _exits(payload: bytes) -> BaseException:
    return SystemExit(3)


def _rejects_in_bytes(payload: bytes) -> BaseException:
    return Reject(payload)  # type: ignore[arg-type]  # raises TypeError: what is tested


@pytest.mark.parametrize(
    ("failure", "logged"),
    [(_exits, SystemExit), (_rejects_in_bytes, TypeError)],
    ids=["system-exit", "reject-with-bytes"],
)
async def test_a_hook_failing_this_way_fails_its_message_only(
    nursery: trio.Nursery,
    logs: EventList,
    failure: Callable[[bytes], BaseException],
    logged: type[BaseException],
) -> None:
    """SystemExit from a hook is an application failure like any other, and ``Reject(b"...")``
    (bytes, as the payload is) is a TypeError raised where the hook makes it: either way that
    message is answered internal-error, the log points at the hook, and the connection goes
    on (Trio's Cancelled and KeyboardInterrupt still propagate). The bytes reason used to
    kill the connection without a reply, on a TypeError from the protocol module, counting
    the other messages of the read as acked."""

    async def hook(payload: bytes, context: MessageContext) -> None:
        if payload == b"no":
            raise failure(payload)

    handler = AckHandler(on_message=hook)
    client, replies = connect(nursery, handler)
    await client.send_all(b"no\nafter\n")
    lines = await replies.lines(2)
    assert lines[0].startswith(b"ERR 1 internal-error ")
    assert lines[1] == ack_line(2, b"after")[:-1]
    [failed] = [e for e in logs if e["event"] == "on_message_failed"]
    assert isinstance(failed["exc_info"], logged)


class _SlowToAnswer:
    """A parcel owner whose answer takes ``seconds`` (as writing many ACKs can)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.answered_parcels: list[Parcel] = []

    def answered(self, parcel: Parcel, now: float) -> None:
        time.sleep(self.seconds)
        self.answered_parcels.append(parcel)

    def lead(self, parcel: Parcel) -> bool:
        return False


async def test_commit_latency_is_the_stores_time_not_the_answers() -> None:
    """``ackservice_store_commit_seconds`` is for telling a slow disk or NATS: the answers the
    leader writes after the store returned are not in it (they once were)."""
    committer = GroupCommitter(ListStore(), timeout=5, max_pending_bytes=1 << 20)
    message = Message(b"x", zlib.crc32(b"x"), 0.0, "127.0.0.1:1", 1, 1)
    owner = _SlowToAnswer(0.05)
    leader = committer.enqueue([message], 1, owner)
    behind = committer.enqueue([message], 1, owner)
    await committer.lead(leader)
    assert owner.answered_parcels == [behind]
    assert sum(committer.latency.counts) == 1
    assert committer.latency.total < 0.05
