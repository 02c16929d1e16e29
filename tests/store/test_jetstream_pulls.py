"""How the JetStream reader pulls: bounded by bytes as well as by count, and handing a
follower what arrives at once; against a real nats-server (from the venv) on loopback, and
the pull accounting by itself."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import trio

from ackservice.store import Message, StoredMessage
from ackservice.store.jetstream import JetStreamStore
from ackservice.store.jetstream_reader import (
    DEFAULT_MAX_PULL_BYTES,
    PULL_BATCH,
    JetStreamReader,
    _Consumer,
)
from ackservice.store.url import JetStreamURL, parse_store_url
from nats_support import NatsServer


def stream_url(server: NatsServer) -> JetStreamURL:
    parsed = parse_store_url(f"{server.url}/ACKS")
    assert isinstance(parsed, JetStreamURL)
    return parsed


@pytest.fixture
async def store(nats_server: NatsServer) -> AsyncIterator[JetStreamStore]:
    opened = await JetStreamStore.open(stream_url(nats_server), ack_timeout=10.0)
    yield opened
    await opened.aclose()


def messages_of(sizes: list[int], first_seq: int = 1) -> list[Message]:
    """One message per size, each payload distinct (its seq in every byte, mod 251)."""
    batch = []
    for seq, size in enumerate(sizes, first_seq):
        payload = bytes([seq % 251]) * size
        batch.append(Message(payload, zlib.crc32(payload), time.time(), "127.0.0.1:1", 1, seq))
    return batch


async def read_all(
    reader: JetStreamReader, *, follow: bool = False, last: int = 0
) -> list[StoredMessage]:
    """Every message (with ``follow``, up to id ``last``)."""
    got: list[StoredMessage] = []
    async with aclosing(reader.messages(follow=follow)) as messages:
        async for message in messages:
            got.append(message)
            if follow and message.id == last:
                break
    return got


def record_hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[list[StoredMessage]]:
    """What each ``_Consumer.take`` hands over to Trio, in order: what the reader holds."""
    taken: list[list[StoredMessage]] = []
    original = _Consumer.take

    def take(self: _Consumer) -> list[StoredMessage]:
        chunk = original(self)
        taken.append(chunk)
        return chunk

    monkeypatch.setattr(_Consumer, "take", take)
    return taken


async def test_large_messages_come_at_most_max_pull_bytes_at_a_time(
    nats_server: NatsServer, store: JetStreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 messages of 900 kB (18 MB): the reader asks for 16 MiB at a time by default, so it
    never holds more than that of them, and reads them all, whole and in order. It asked
    for PULL_BATCH messages whatever their size: all 18 MB at once (500 MB for 500 of NATS's
    largest)."""
    sent = messages_of([900_000] * 20)
    with trio.fail_after(20):
        await store.store(sent)
    taken = record_hand_overs(monkeypatch)
    reader = await JetStreamReader.open(stream_url(nats_server), nats_wait=1.0)
    try:
        with trio.fail_after(20):
            got = await read_all(reader)
    finally:
        await reader.aclose()
    assert [message.payload for message in got] == [message.payload for message in sent]
    held = [sum(len(message.payload) for message in chunk) for chunk in taken]
    assert max(held) <= DEFAULT_MAX_PULL_BYTES, held
    assert len([size for size in held if size]) >= 2


@pytest.mark.parametrize("follow", [False, True])
async def test_a_message_larger_than_a_pull_comes_alone(
    nats_server: NatsServer, store: JetStreamStore, follow: bool
) -> None:
    """With ``max_pull_bytes`` of 64 kB, messages of 200 and 300 kB among small ones: nats-server
    ends each pull they do not fit with ``409 Message Size Exceeds MaxBytes`` (for ever, for
    one larger than the whole pull). That means pull again, and a message that fits no pull
    is asked for alone; every message comes once, in order, the export ends and the follower
    goes on, each within moments (a pull taken for NATS gone silent would take 1.5 s)."""
    sizes = [100, 200_000, 100, 100, 300_000, 300_000, 40_000, 40_000, 100]
    sent = messages_of(sizes)
    await store.store(sent)
    reader = await JetStreamReader.open(
        stream_url(nats_server), nats_wait=0.5, max_pull_bytes=64 * 1024
    )
    try:
        with trio.fail_after(1.2):
            got = await read_all(reader, follow=follow, last=len(sizes))
        requests = reader._client.stats["out_msgs"]
    finally:
        await reader.aclose()
    assert [message.id for message in got] == list(range(1, len(sizes) + 1))
    assert [message.payload for message in got] == [message.payload for message in sent]
    # Per large message: the pull it ends, the one refused at once, the one that takes it.
    assert requests <= 2 + 3 * 3 + 3


async def test_a_pull_whose_bytes_run_out_exactly_is_over(
    nats_server: NatsServer, store: JetStreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull whose ``max_bytes`` the messages it delivered use up exactly ends without a
    word from nats-server (no status: it had all it asked for). The reader counts each
    message as the server does, so it knows: the export goes on at once instead of waiting
    for an answer that never comes and failing after ``nats_wait``."""
    await store.store(messages_of([1000] * 6))
    sizes: list[int] = []
    original = _Consumer.deliver

    def deliver(
        self: _Consumer, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        sizes.append(len(subject) + len(reply) + len(headers or b"") + len(data))
        original(self, subject, reply, data, headers)

    # A first read tells how large each delivery is (a second consumer's are as large: same
    # stream sequences, times and pending counts, a name as long).
    monkeypatch.setattr(_Consumer, "deliver", deliver)
    reader = await JetStreamReader.open(stream_url(nats_server))
    try:
        await read_all(reader)
    finally:
        await reader.aclose()
    monkeypatch.undo()
    taken = record_hand_overs(monkeypatch)
    reader = await JetStreamReader.open(
        stream_url(nats_server), nats_wait=0.5, max_pull_bytes=sizes[0] + sizes[1]
    )
    try:
        with trio.fail_after(1.2):
            got = await read_all(reader)
    finally:
        await reader.aclose()
    assert [message.id for message in got] == [1, 2, 3, 4, 5, 6]
    assert [message.id for message in taken[0]] == [1, 2]


@pytest.mark.timing
async def test_a_follower_yields_each_new_message_at_once(
    nats_server: NatsServer, store: JetStreamStore
) -> None:
    """A follower that has caught up yields a message stored meanwhile within 0.3 s (here
    each of five, 0.2 s apart), not when its pull ends: a pull ended only at PULL_BATCH
    messages or its 1 s expiry, so a trickle came up to 1 s late. Its pulls still end at
    their expiry, so following costs about one request a second, no more."""
    await store.store(messages_of([10] * 3))
    reader = await JetStreamReader.open(stream_url(nats_server), nats_wait=1.0)
    stored_at: dict[int, float] = {}
    seen_at: dict[int, float] = {}
    started = trio.current_time()

    async def trickle() -> None:
        for seq in range(4, 9):
            await trio.sleep(0.2)
            await store.store(messages_of([10], first_seq=seq))
            stored_at[seq] = trio.current_time()

    try:
        with trio.fail_after(5):
            async with (
                trio.open_nursery() as nursery,
                aclosing(reader.messages(follow=True)) as messages,
            ):
                async for message in messages:
                    seen_at[message.id] = trio.current_time()
                    if message.id == 3:
                        nursery.start_soon(trickle)
                    if message.id == 8:
                        break
            await trio.sleep(1.0)  # idle: pulls at their expiry, not in a loop
        requests = reader._client.stats["out_msgs"]
        followed = trio.current_time() - started
    finally:
        await reader.aclose()
    late = {seq: seen_at[seq] - stored_at[seq] for seq in range(4, 9)}
    assert max(late.values()) < 0.3, late
    # STREAM.INFO, CONSUMER.CREATE, CONSUMER.DELETE and a pull a second (about 2.2 s here).
    assert requests <= 3 + followed + 1, (requests, followed)


def test_a_status_of_a_pull_already_over_does_not_end_the_next() -> None:
    """nats-server sends ``409 Batch Completed`` after the last message of a pull that had
    bytes to spare, when the reader has ended that pull and begun the next; statuses go to
    each pull's own reply subject, so it cannot end the next one (which would be taken for
    an error). Only a status to the pull under way ends it."""

    async def scenario() -> None:
        consumer = _Consumer("c1", pending=PULL_BATCH + 10, max_pull_bytes=1 << 20)
        consumer.inbox = "_INBOX.abc"
        first, _ = consumer.start_pull(follow=False)
        for seq in range(1, PULL_BATCH + 1):
            consumer.deliver(*_delivery(seq, PULL_BATCH + 10 - seq))
        assert not consumer.pulling
        assert [message.id for message in consumer.take()] == list(range(1, PULL_BATCH + 1))
        second, _ = consumer.start_pull(follow=False)
        consumer.deliver(first.encode(), b"", b"", b"NATS/1.0 409 Batch Completed\r\n\r\n")
        assert consumer.pulling
        assert consumer.ended_by is None
        consumer.deliver(second.encode(), b"", b"", b"NATS/1.0 408 Request Timeout\r\n\r\n")
        assert not consumer.pulling
        assert consumer.ended_by == b"408"

    asyncio.run(scenario())


def test_after_a_message_too_large_for_any_pull_the_next_pull_asks_for_it_alone() -> None:
    """A pull refused with ``409 Message Size Exceeds MaxBytes`` before it delivered anything
    means the next message is larger than ``max_pull_bytes``: the next request asks for one
    message without a byte limit, and the one after for a full pull again."""

    async def scenario() -> None:
        consumer = _Consumer("c1", pending=3, max_pull_bytes=1000)
        consumer.inbox = "_INBOX.abc"
        reply, request = consumer.start_pull(follow=True)
        assert (request["batch"], request["max_bytes"]) == (PULL_BATCH, 1000)
        exceeds = b"NATS/1.0 409 Message Size Exceeds MaxBytes\r\n\r\n"
        consumer.deliver(reply.encode(), b"", b"", exceeds)
        assert (consumer.pulling, consumer.pull_again) == (False, True)
        reply, request = consumer.start_pull(follow=True)
        assert request["batch"] == 1
        assert "max_bytes" not in request
        consumer.deliver(*_delivery(1, 2, size=5000))
        assert not consumer.pulling  # it had its one message
        _, request = consumer.start_pull(follow=True)
        assert (request["batch"], request["max_bytes"]) == (PULL_BATCH, 1000)

    asyncio.run(scenario())


def _delivery(stream_seq: int, pending: int, size: int = 10) -> tuple[bytes, bytes, bytes, None]:
    reply = f"$JS.ACK.ACKS.c1.1.{stream_seq}.{stream_seq}.1796170867443472963.{pending}"
    return b"ackservice.ACKS", reply.encode(), b"x" * size, None
