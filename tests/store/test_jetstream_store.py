"""The JetStream store against a real nats-server (from the venv) on loopback."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import nats.errors
import pytest
import trio
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from ackservice.store import Message, StoredMessage, StoreError, StoreUnavailable, open_store
from ackservice.store.jetstream import JetStreamStore
from ackservice.store.jetstream_reader import (
    DEFAULT_MAX_PULL_BYTES,
    PULL_BATCH,
    JetStreamReader,
    _Consumer,
    _delivery_fields,
    _Pull,
    _ReaderClient,
)
from ackservice.store.url import JetStreamURL, parse_store_url
from nats_support import (
    NatsServer,
    create_stream,
    delete_consumers,
    free_port,
    publish,
    stream_info,
)


def jetstream_url(server_url: str, stream: str = "ACKS", query: str = "") -> JetStreamURL:
    parsed = parse_store_url(f"{server_url}/{stream}{query}")
    assert isinstance(parsed, JetStreamURL)
    return parsed


@pytest.fixture
async def store(nats_server: NatsServer) -> AsyncIterator[JetStreamStore]:
    opened = await JetStreamStore.open(jetstream_url(nats_server.url), ack_timeout=2.0)
    yield opened
    await opened.aclose()


@pytest.fixture
async def reader(nats_server: NatsServer, store: JetStreamStore) -> AsyncIterator[JetStreamReader]:
    opened = await JetStreamReader.open(jetstream_url(nats_server.url))
    yield opened
    await opened.aclose()


def make_batch(count: int, *, conn_id: int = 1, first_seq: int = 1) -> list[Message]:
    batch = []
    for seq in range(first_seq, first_seq + count):
        payload = f"message {conn_id}/{seq}".encode()
        batch.append(
            Message(
                payload=payload,
                crc32=zlib.crc32(payload),
                received_at=time.time(),
                peer="127.0.0.1:40000",
                conn_id=conn_id,
                seq=seq,
            )
        )
    return batch


async def read_all(reader: JetStreamReader, after: int = 0) -> list[StoredMessage]:
    with trio.fail_after(20):
        return [message async for message in reader.messages(after=after)]


async def test_round_trip_keeps_every_field(store: JetStreamStore, reader: JetStreamReader) -> None:
    """A stored message reads back with its payload and every field, identity included,
    with the stream sequence as its id."""
    payload = b"\x00binary\r\npayload\xff"
    sent = [
        Message(payload, zlib.crc32(payload), 1733050000.123456, "[::1]:5000", 7, 41, "CN=alice"),
        Message(b"", 0, 1733050001.5, "127.0.0.1:6000", 8, 1),
    ]
    assert await store.store(sent) is None
    got = await read_all(reader)
    assert got == [
        StoredMessage(1, 1733050000.123456, "[::1]:5000", 7, 41, zlib.crc32(payload), payload,
                      "CN=alice"),
        StoredMessage(2, 1733050001.5, "127.0.0.1:6000", 8, 1, 0, b"", None),
    ]  # fmt: skip


async def test_stream_is_created_for_atomic_batches_on_file_storage(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """Opening creates the missing stream with atomic batch publish allowed, file storage,
    the URL's subject and replicas, and a duplicate window."""
    info = await trio.to_thread.run_sync(stream_info, nats_server.url, "ACKS")
    config = info["config"]
    assert config["allow_atomic"] is True
    assert config["storage"] == "file"
    assert config["subjects"] == ["ackservice.ACKS"]
    assert config["num_replicas"] == 1
    assert config["duplicate_window"] == 120 * 10**9
    assert store.description == f"{nats_server.url}/ACKS"


async def test_large_batch_is_stored_whole_and_in_order(
    store: JetStreamStore, reader: JetStreamReader
) -> None:
    """2,500 messages (three atomic batches, in flight together) are all stored, in the
    order given."""
    batch = make_batch(2500)
    with trio.fail_after(20):
        await store.store(batch)
    got = await read_all(reader)
    assert [message.id for message in got] == list(range(1, 2501))
    assert [message.seq for message in got] == list(range(1, 2501))
    assert [message.payload for message in got] == [message.payload for message in batch]


async def test_outage_is_unavailable_then_recovers_without_reopening(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """With nats-server SIGKILLed, ``store`` raises StoreUnavailable within its timeout; once
    the server is back on the same port and directory, the same store stores again and the
    messages stored before the outage are still there."""
    await store.store(make_batch(10))
    nats_server.kill()
    with trio.fail_after(3), pytest.raises(StoreUnavailable):
        await store.store(make_batch(5, first_seq=11))
    nats_server.restart()
    with trio.fail_after(15):
        while True:
            try:
                await store.store(make_batch(5, first_seq=11))
                break
            except StoreUnavailable:
                await trio.sleep(0.2)
    reader = await JetStreamReader.open(jetstream_url(nats_server.url))
    try:
        got = await read_all(reader)
    finally:
        await reader.aclose()
    assert [message.seq for message in got] == list(range(1, 16))


async def test_the_start_up_wait_for_nats_is_the_servers_setting() -> None:
    """``open_store(url, connect_timeout=)`` (the server's ``--store-connect-timeout``) waits
    that long for a NATS that is not there, then returns a store that is unavailable: not
    the store's own 2 s, which had no setting."""
    url = f"nats://127.0.0.1:{free_port()}/ACKS"  # nothing listens there
    started = trio.current_time()
    with trio.fail_after(1.5):
        async with open_store(url, commit_timeout=1.0, connect_timeout=0.2) as store:
            assert store is not None
            assert not store.available  # type: ignore[attr-defined]
            assert trio.current_time() - started >= 0.2


async def test_nats_down_at_start_up_is_unavailable_until_it_comes(tmp_path: Path) -> None:
    """With nothing listening at start-up, ``open`` still returns (after its short wait),
    batches are unavailable, and once nats-server starts the store creates the stream and
    stores."""
    port = free_port()
    url = jetstream_url(f"nats://127.0.0.1:{port}")
    with trio.fail_after(5):
        store = await JetStreamStore.open(url, connect_wait=0.5)
    server = NatsServer(tmp_path / "nats", port=port)
    try:
        with pytest.raises(StoreUnavailable, match="NATS not connected"):
            await store.store(make_batch(1))
        server.start()
        with trio.fail_after(15):
            while True:
                try:
                    await store.store(make_batch(3))
                    break
                except StoreUnavailable:
                    await trio.sleep(0.2)
    finally:
        await store.aclose()
        server.stop()


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"subjects": ["ackservice.ACKS"], "storage": "file"}, "allow_atomic"),
        ({"subjects": ["other.subject"], "storage": "file", "allow_atomic": True}, "subject"),
        ({"subjects": ["ackservice.ACKS"], "storage": "memory", "allow_atomic": True}, "file"),
    ],
)
async def test_stream_with_conflicting_settings_is_refused(
    nats_server: NatsServer, config: dict[str, object], complaint: str
) -> None:
    """An existing stream without atomic batches, without the subject, or in memory makes
    ``open`` fail with a StoreError that names the setting to change."""
    await trio.to_thread.run_sync(create_stream, nats_server.url, {"name": "ACKS", **config})
    with pytest.raises(StoreError, match=complaint):
        await JetStreamStore.open(jetstream_url(nats_server.url))


async def test_missing_stream_without_create_is_refused(nats_server: NatsServer) -> None:
    """With ``create=false`` a missing stream is a StoreError, not created."""
    with pytest.raises(StoreError, match="does not exist"):
        await JetStreamStore.open(jetstream_url(nats_server.url, query="?create=false"))


async def test_follow_sees_later_messages(store: JetStreamStore, reader: JetStreamReader) -> None:
    """``messages(follow=True)`` yields what is stored and then what is stored later."""
    await store.store(make_batch(2))
    seen: list[int] = []
    with trio.fail_after(10):
        async with aclosing(reader.messages(after=1, follow=True)) as messages:
            async for message in messages:
                seen.append(message.seq)
                if message.seq == 2:
                    await store.store(make_batch(2, first_seq=3))
                if message.seq == 4:
                    break
    assert seen == [2, 3, 4]


async def test_reading_after_the_end_yields_nothing(
    store: JetStreamStore, reader: JetStreamReader
) -> None:
    """Without ``follow``, reading past the last message ends at once."""
    await store.store(make_batch(3))
    assert await read_all(reader, after=3) == []
    assert [message.seq for message in await read_all(reader, after=2)] == [3]


async def test_reading_spans_several_pulls_and_resumes_after_any_id(
    store: JetStreamStore, reader: JetStreamReader
) -> None:
    """More messages than one pull asks for (``PULL_BATCH``) come back whole and in order,
    from the start and after any id, one at a pull's end included."""
    count = 2 * PULL_BATCH + 34
    with trio.fail_after(20):
        await store.store(make_batch(count))
    for after in (0, PULL_BATCH, count - 1):
        got = await read_all(reader, after=after)
        assert [message.id for message in got] == list(range(after + 1, count + 1))
        assert [message.seq for message in got] == list(range(after + 1, count + 1))


async def test_messages_other_clients_published_read_back_with_defaults(
    nats_server: NatsServer, store: JetStreamStore, reader: JetStreamReader
) -> None:
    """Messages another NATS client put on the stream's subject read back too. Without
    headers every field has its default: the stream's time as ``received_at``, the
    payload's CRC-32; with only some headers (one unreadable), the others' defaults."""
    await store.store(make_batch(1))
    subject = "ackservice.ACKS"
    started = time.time()
    await trio.to_thread.run_sync(publish, nats_server.url, subject, b"bare", None)
    headers = {"Ackservice-Peer": "10.0.0.9:9", "Ackservice-Seq": "x", "Other": "y"}
    await trio.to_thread.run_sync(publish, nats_server.url, subject, b"some", headers)
    published = time.time()
    ours, bare, some = await read_all(reader)
    assert (ours.id, ours.seq) == (1, 1)
    assert bare == StoredMessage(2, bare.received_at, "", 0, 0, zlib.crc32(b"bare"), b"bare")
    assert started - 0.01 <= bare.received_at <= published + 0.01
    assert some == StoredMessage(
        3, some.received_at, "10.0.0.9:9", 0, 0, zlib.crc32(b"some"), b"some"
    )
    assert bare.received_at <= some.received_at <= published + 0.01


def test_the_nats_py_internals_the_reader_takes_deliveries_from_are_there() -> None:
    """The reader overrides nats-py's private ``Client._process_msg`` and keys deliveries by
    ``Subscription._id`` (``_ReaderClient``). A nats-py that renamed or reshaped them would
    leave the reader waiting for deliveries that went elsewhere: this says so at once."""
    parameters = list(inspect.signature(Client._process_msg).parameters)
    assert parameters == ["self", "sid", "subject", "reply", "data", "headers"], parameters
    assert "self._id = id" in inspect.getsource(Subscription.__init__)


async def test_a_nats_py_that_no_longer_calls_process_msg_is_refused_at_open(
    nats_server: NatsServer, store: JetStreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nats-py>=2.16,<3`` lets a newer nats-py in, whose read loop may deliver another
    way: the reader's deliveries would then go to a queue nobody reads, and an export wait
    forever. Opening says so in one line instead."""
    monkeypatch.setattr(_ReaderClient, "_process_msg", Client._process_msg)
    with trio.fail_after(20), pytest.raises(StoreError, match="no longer delivers messages"):
        await JetStreamReader.open(jetstream_url(nats_server.url))


@pytest.mark.parametrize(
    ("reply", "fields"),
    [
        ("$JS.ACK.ACKS.c1.1.42.7.1796170867443472963.5", (42, 1796170867443472963, 5)),
        # With a JetStream domain: domain and account hash first, then a random token.
        (
            "$JS.ACK.hub.AHASH.ACKS.c1.1.42.7.1796170867443472963.5.r4nd",
            (42, 1796170867443472963, 5),
        ),
        ("$JS.ACK.hub.AHASH.ACKS.c1.1.42.7.1796170867443472963.0", (42, 1796170867443472963, 0)),
    ],
)
def test_a_deliverys_reply_subject_gives_its_sequence_time_and_pending(
    reply: str, fields: tuple[int, int, int]
) -> None:
    """Both reply subject layouts nats-py reads as ``msg.metadata`` (nats-server 2.15 sends
    the first even with a domain, so only this test sees the second)."""
    assert _delivery_fields(reply) == fields


@pytest.mark.parametrize(
    "reply", ["", "_INBOX.abc.def", "$JS.ACK.ACKS.c1.1.42.7.5", "$JS.NAK.ACKS.c1.1.42.7.1.5"]
)
def test_a_reply_subject_that_is_no_delivery_is_refused(reply: str) -> None:
    """As nats-py's ``msg.metadata`` refused it."""
    with pytest.raises(nats.errors.NotJSMessageError):
        _delivery_fields(reply)


async def test_stats_and_prune(store: JetStreamStore, reader: JetStreamReader) -> None:
    """``stats`` reports count and first/last; ``prune(before_id=)`` purges below that id,
    ``prune(older_than=)`` what the stream stored before the cutoff; each returns how many
    it removed."""
    old = make_batch(5)
    await store.store(old)
    stats = await reader.stats()
    assert (stats.messages, stats.first_id, stats.last_id) == (5, 1, 5)
    assert stats.first_received_at == old[0].received_at
    assert stats.last_received_at == old[-1].received_at

    assert await reader.prune(before_id=3) == 2
    assert [message.id for message in await read_all(reader)] == [3, 4, 5]

    await trio.sleep(1.0)
    await store.store(make_batch(2, first_seq=6))
    assert await reader.prune(older_than=0.5) == 3
    assert [message.seq for message in await read_all(reader)] == [6, 7]
    assert await reader.prune(older_than=3600) == 0
    stats = await reader.stats()
    assert (stats.messages, stats.first_id, stats.last_id) == (2, 6, 7)


async def test_stored_messages_are_not_duplicated_when_a_batch_is_stored_again(
    store: JetStreamStore, reader: JetStreamReader
) -> None:
    """Storing the same messages again (as a retry after a lost PubAck would) stores only
    the new ones: the server refuses the atomic batch for its duplicate ids, and the store
    falls back to one-by-one publishes that the duplicate window drops."""
    batch = make_batch(4)
    await store.store(batch[:2])
    await store.store(batch)
    assert [message.seq for message in await read_all(reader)] == [1, 2, 3, 4]


async def test_cancelled_store_call_returns_at_once(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """A ``store`` call cancelled while NATS does not answer (the server's store timeout)
    returns at once, and the store keeps working once NATS answers again."""
    assert nats_server.process is not None
    os.kill(nats_server.process.pid, signal.SIGSTOP)
    try:
        started = trio.current_time()
        with trio.move_on_after(0.3):
            await store.store(make_batch(10))
        assert trio.current_time() - started < 1.0
    finally:
        os.kill(nats_server.process.pid, signal.SIGCONT)
    with trio.fail_after(10):
        await store.store(make_batch(2, first_seq=11))


async def test_the_pubacks_wait_follows_the_servers_store_timeout(
    nats_server: NatsServer,
) -> None:
    """Opened as the server opens it, with its ``--store-timeout`` (here 8 s), a batch
    waits that long for its PubAck: the store's own 5 s default must not answer
    ``unavailable`` first, which made any --store-timeout above 5 s a dead setting."""
    assert nats_server.process is not None
    async with open_store(f"{nats_server.url}/ACKS", commit_timeout=8.0) as store:
        assert store is not None
        await store.store(make_batch(1))
        os.kill(nats_server.process.pid, signal.SIGSTOP)
        try:
            with trio.move_on_after(5.5) as still_waiting:
                await store.store(make_batch(1, first_seq=2))
            assert still_waiting.cancelled_caught
        finally:
            os.kill(nats_server.process.pid, signal.SIGCONT)


async def test_export_ends_when_what_it_had_left_is_purged_meanwhile(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """A purge (``prune``) of every message an export has not read yet: without ``follow``
    the export ends with what it read. It used to pull forever, waiting for the messages
    its consumer had last said were pending: every pull only got ``404 No Messages``."""
    count = PULL_BATCH + 100
    await store.store(make_batch(count))
    reader = await JetStreamReader.open(jetstream_url(nats_server.url), nats_wait=1.0)
    seen: list[int] = []
    try:
        with trio.fail_after(5):
            async with aclosing(reader.messages()) as messages:
                async for message in messages:
                    if not seen:  # the first pull (PULL_BATCH messages) is in
                        assert await reader.prune(before_id=count + 1) == count
                    seen.append(message.id)
    finally:
        await reader.aclose()
    assert seen == list(range(1, PULL_BATCH + 1))


@pytest.mark.parametrize("follow", [False, True])
async def test_reading_goes_on_when_its_consumer_is_deleted(
    nats_server: NatsServer, store: JetStreamStore, follow: bool
) -> None:
    """The server deletes the reader's ephemeral consumer (as it does after 60 s without a
    pull: an export blocked writing to a slow pipe). Reading goes on from a new consumer
    after the last message it yielded, without a gap or a duplicate, and without
    ``follow`` still ends; it used to pull the deleted consumer forever (``503``)."""
    count = PULL_BATCH + 100
    await store.store(make_batch(count))
    reader = await JetStreamReader.open(jetstream_url(nats_server.url), nats_wait=1.0)
    seen: list[int] = []
    try:
        with trio.fail_after(5):
            async with aclosing(reader.messages(follow=follow)) as messages:
                async for message in messages:
                    if not seen:
                        deleted = await trio.to_thread.run_sync(
                            delete_consumers, nats_server.url, "ACKS"
                        )
                        assert deleted == 1
                    seen.append(message.id)
                    if follow and message.id == count:
                        break
    finally:
        await reader.aclose()
    assert seen == list(range(1, count + 1))


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_export_fails_within_its_wait_when_nats_stops_answering(
    nats_server: NatsServer, store: JetStreamStore, how: str
) -> None:
    """nats-server frozen (SIGSTOP: the connection stays, nothing answers) or killed in the
    middle of an export without ``follow``: after what it read, the export raises
    StoreError within its ``nats_wait``, saying which. It used to pull again and again,
    silently, forever."""
    assert nats_server.process is not None
    pid = nats_server.process.pid
    count = PULL_BATCH + 100
    await store.store(make_batch(count))
    reader = await JetStreamReader.open(jetstream_url(nats_server.url), nats_wait=0.5)
    seen: list[int] = []

    async def export() -> None:
        async with aclosing(reader.messages()) as messages:
            async for message in messages:
                if not seen:
                    if how == "stopped":
                        os.kill(pid, signal.SIGSTOP)
                    else:
                        nats_server.kill()
                seen.append(message.id)

    complaint = "did not answer within 0.5s" if how == "stopped" else "lost the connection"
    try:
        with trio.fail_after(5), pytest.raises(StoreError, match=complaint):
            await export()
    finally:
        if how == "stopped":
            os.kill(pid, signal.SIGCONT)
        await reader.aclose()
    assert seen == list(range(1, PULL_BATCH + 1))


async def follow_until(
    reader: JetStreamReader,
    *,
    after: int,
    at: int,
    start: Callable[[], Awaitable[None]],
    last: int,
    within: float,
) -> list[int]:
    """Follow the stream after ``after``, starting ``start`` (an outage, say) beside it once
    message ``at`` came, until message ``last``; the sequence numbers read. Closes ``reader``."""
    seen: list[int] = []
    try:
        with trio.fail_after(within):
            async with (
                trio.open_nursery() as nursery,
                aclosing(reader.messages(after=after, follow=True)) as messages,
            ):
                async for message in messages:
                    seen.append(message.seq)
                    if message.seq == at:
                        nursery.start_soon(start)
                    if message.seq == last:
                        break
    finally:
        await reader.aclose()
    return seen


async def store_when_back(store: JetStreamStore, batch: list[Message]) -> None:
    """Store ``batch`` as soon as NATS takes it again (within 10 s)."""
    with trio.fail_after(10):
        while True:
            try:
                await store.store(batch)
                return
            except StoreUnavailable:
                await trio.sleep(0.1)


async def test_follow_goes_on_after_nats_restarts(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """A following reader whose nats-server is killed and started again (its in-memory
    consumer gone with it) waits meanwhile and then yields what is stored afterwards:
    from the message after the last it yielded, without a gap or a duplicate. It used to
    follow nothing forever, pulling the vanished consumer in a busy loop."""
    await store.store(make_batch(3))
    reader = await JetStreamReader.open(jetstream_url(nats_server.url), nats_wait=0.5)

    async def outage() -> None:
        nats_server.kill()
        await trio.sleep(1.5)  # the follower's pulls meet the outage
        await trio.to_thread.run_sync(nats_server.start)
        await store_when_back(store, make_batch(2, first_seq=4))

    seen = await follow_until(reader, after=1, at=3, start=outage, last=5, within=15)
    assert seen == [2, 3, 4, 5]


@pytest.mark.parametrize("follow", [False, True])
async def test_pulls_the_server_refuses_end_an_export_and_slow_a_follower(
    tmp_path: Path, follow: bool
) -> None:
    """A nats-server whose ``max_request_batch`` is below ``PULL_BATCH`` answers every pull
    with ``409 Exceeded MaxRequestBatch``. An export fails with that in its one line (it
    said ``NATS status b'409'``); a follower says so once and retries once a second: it
    replaced its consumer in a busy loop, thousands of API requests a second, silently."""
    server = NatsServer(tmp_path / "nats", jetstream_config="limits { max_request_batch: 100 }")
    server.start()
    try:
        async with open_store(f"{server.url}/ACKS", connect_timeout=5) as store:
            assert store is not None
            await store.store(make_batch(3))
        notices: list[str] = []
        reader = await JetStreamReader.open(
            jetstream_url(server.url), nats_wait=0.5, notice=notices.append
        )
        try:
            with trio.move_on_after(2) as waited:
                async with aclosing(reader.messages(follow=follow)) as messages:
                    if not follow:
                        with pytest.raises(StoreError, match="409 Exceeded MaxRequestBatch"):
                            await messages.__anext__()
                        return
                    async for _ in messages:
                        raise AssertionError("a refused pull yielded a message")
            assert waited.cancelled_caught
            requests = reader._client.stats["out_msgs"]
        finally:
            await reader.aclose()
    finally:
        server.stop()
    assert requests < 20
    assert len(notices) == 1
    assert "409 Exceeded MaxRequestBatch" in notices[0]


async def test_a_follower_whose_new_consumer_worked_replaces_it_quietly_again(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """A follower's consumer deleted twice (an admin, the server's inactivity limit), with
    pulls that worked between: no "at once" notice or wait, as for a refused pull; only a
    consumer gone before any of its pulls worked is that."""
    await store.store(make_batch(3))
    notices: list[str] = []
    reader = await JetStreamReader.open(
        jetstream_url(nats_server.url), nats_wait=0.5, notice=notices.append
    )

    async def delete_twice() -> None:
        for _ in range(2):
            assert await trio.to_thread.run_sync(delete_consumers, nats_server.url, "ACKS") == 1
            await trio.sleep(1.5)  # the new consumer's first pull expires: a 408, it works
        await store.store(make_batch(1, first_seq=4))

    seen = await follow_until(reader, after=0, at=3, start=delete_twice, last=4, within=8)
    assert seen == [1, 2, 3, 4]
    assert notices == []


class _PullsByHand:
    """Stands in for the reader's connection in ``_fetch``: each pull request published
    runs ``on_pull`` (which delivers what the test wants, as the read loop would)."""

    def __init__(self, on_pull: Callable[[], None], api_timeout: float) -> None:
        self.nc = self
        self.api_timeout = api_timeout
        self.on_pull = on_pull

    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        self.on_pull()


def _delivery(stream_seq: int, pending: int) -> tuple[bytes, bytes, bytes, None]:
    reply = f"$JS.ACK.ACKS.c1.1.{stream_seq}.{stream_seq}.1796170867443472963.{pending}"
    return b"ackservice.ACKS", reply.encode(), b"payload %d" % stream_seq, None


def test_deliveries_that_came_after_a_pull_was_given_up_are_read() -> None:
    """A pull given up after ``api_timeout`` without a delivery (NATS slow for that long)
    keeps its messages coming: they wait for the next fetch. When the last of them (pending
    0) came before that fetch, it must still hand them over, not end without them (which
    it did: exit 0, the export short of its last messages)."""
    url = jetstream_url("nats://127.0.0.1:4222")

    async def scenario() -> tuple[list[int], list[int]]:
        consumer = _Consumer("c1", pending=2, max_pull_bytes=DEFAULT_MAX_PULL_BYTES)
        # The pull's first message comes at once; its second only after the reader gave up.
        connection = _PullsByHand(lambda: consumer.deliver(*_delivery(1, 1)), api_timeout=0.05)
        reader = JetStreamReader(url, None, connection, None)  # type: ignore[arg-type]
        first, pull = await reader._fetch(consumer, follow=False)
        assert pull is _Pull.SILENT  # the reader decides: an export fails, a follower waits
        consumer.deliver(*_delivery(2, 0))
        second, pull = await reader._fetch(consumer, follow=False)
        assert pull is _Pull.END
        return [m.id for m in first], [m.id for m in second]

    assert asyncio.run(scenario()) == ([1], [2])


def test_a_delivery_that_is_no_stored_message_is_one_store_error() -> None:
    """Something another client published to the reader's inbox (no JetStream reply subject,
    or a mangled one) ends the read with a StoreError, which the export CLI says in one line;
    nats-py's NotJSMessageError or a ValueError was a traceback."""

    async def scenario() -> None:
        for reply in (b"", b"$JS.ACK.ACKS.c1.1.x.1.1796170867443472963.0"):
            consumer = _Consumer("c1", pending=1, max_pull_bytes=DEFAULT_MAX_PULL_BYTES)
            consumer.start_pull(False)
            consumer.deliver(b"_INBOX.x", reply, b"injected", None)
            with pytest.raises(StoreError, match="c1 is not a stored message"):
                consumer.take()

    asyncio.run(scenario())
