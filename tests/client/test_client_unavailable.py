"""``ERR <seq> unavailable`` and the retry time budget, in the library.

The server answers ``unavailable`` when its store cannot take a message (it was not kept,
sending it again later is safe). The client writes such a message again after a backoff,
on the same connection, and gives up on it only when ``retry_for`` has passed. Fake
servers run over in-memory streams on Trio's ``autojump_clock``, so backoffs and budgets
play out in virtual time.
"""

from __future__ import annotations

import math
import socket
import zlib
from collections.abc import Callable

import pytest
import trio
import trio.testing
from client_fakes import FlakyStore, MemoryServer, Replies, ack_everything

from ackservice.client import (
    Ack,
    ConnectError,
    ConnectionLostError,
    Err,
    MessageRejectedError,
    open_client,
)
from ackservice.protocol import err_line

MakeServer = Callable[..., MemoryServer]


def every_seventh(payload: bytes) -> bool:
    return int(payload) % 7 == 3


async def test_unavailable_messages_are_resent_until_acked_and_receipted_once(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Some messages are ``unavailable`` for their first three writes: ``send_many``
    still yields exactly one receipt per payload, in input order, every one acknowledged;
    the flaky ones were written four times, on the one connection, and counted as
    ``retried`` (the server kept no copy), not ``resent`` (possible duplicates)."""
    store = FlakyStore(every_seventh, times=3)
    fake = memory_server(store.handle)
    payloads = [b"%d" % i for i in range(100)]
    flaky = [p for p in payloads if every_seventh(p)]
    async with open_client(connect=fake.connect, window=16) as client:
        receipts = [r async for r in client.send_many(payloads)]
    assert [r.payload for r in receipts] == payloads
    assert [r.index for r in receipts] == list(range(1, 101))
    assert all(r.acked for r in receipts)
    assert {r.payload: r.attempts for r in receipts if r.attempts > 1} == dict.fromkeys(flaky, 4)
    assert sorted(store.acked) == sorted(payloads)  # each stored exactly once
    assert fake.connections == 1
    stats = client.stats
    assert (stats.sent, stats.acked, stats.rejected, stats.unavailable) == (100, 100, 0, 0)
    assert (stats.retried, stats.resent) == (3 * len(flaky), 0)


async def test_a_resent_message_gets_a_new_seq_and_its_receipt_keeps_its_place(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Message 5 is ``unavailable`` once while 6 to 10 are acknowledged: 5 is written again
    (the server sees it after 10 and gives it seq 11), but its receipt still comes fifth."""
    store = FlakyStore(lambda payload: payload == b"5", times=1)
    payloads = [b"%d" % i for i in range(1, 11)]
    async with open_client(connect=memory_server(store.handle).connect) as client:
        receipts = [r async for r in client.send_many(payloads)]
    assert [r.payload for r in receipts] == payloads
    assert [r.reply.seq for r in receipts] == [1, 2, 3, 4, 11, 6, 7, 8, 9, 10]
    assert store.acked == payloads[:4] + payloads[5:] + [b"5"]


async def test_send_retries_unavailable_and_returns_the_ack(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """``send`` waits through ``unavailable`` answers and returns the eventual ACK."""
    store = FlakyStore(lambda payload: True, times=5)
    async with open_client(connect=memory_server(store.handle).connect) as client:
        assert await client.send(b"hello") == Ack(6, 5, zlib.crc32(b"hello"))
    assert store.writes == {b"hello": 6}


async def test_unavailable_past_retry_for_is_reported_not_dropped(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A store that stays down: after ``retry_for`` seconds from its first ``unavailable``
    answer a message is given up on. ``send_many`` yields it as a receipt carrying that
    ``unavailable`` answer (not acknowledged, and not counted as rejected); ``send`` raises
    ``MessageRejectedError`` with the code; the other messages are acknowledged."""
    store = FlakyStore(lambda payload: payload.startswith(b"down"), times=math.inf)
    payloads = [b"ok 1", b"down 1", b"ok 2", b"down 2"]
    async with open_client(connect=memory_server(store.handle).connect, retry_for=3.0) as client:
        started = trio.current_time()
        receipts = [r async for r in client.send_many(payloads)]
        assert trio.current_time() - started <= 3.0 + 0.1
        with pytest.raises(MessageRejectedError) as given_up:
            await client.send(b"down 3")
    assert [r.acked for r in receipts] == [True, False, True, False]
    assert all(isinstance(r.reply, Err) and r.reply.code == "unavailable" for r in receipts[1::2])
    assert receipts[1].attempts > 3
    assert given_up.value.code == "unavailable"
    stats = client.stats
    assert (stats.acked, stats.rejected, stats.unavailable) == (2, 0, 3)


async def test_retries_also_caps_resends_of_one_message(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """With ``retries=2`` a message answered ``unavailable`` is written three times at
    most, however much of ``retry_for`` is left."""
    store = FlakyStore(lambda payload: True, times=math.inf)
    async with open_client(connect=memory_server(store.handle).connect, retries=2) as client:
        receipt = await client.deliver(b"x")
    assert not receipt.acked
    assert receipt.attempts == 3
    assert store.writes == {b"x": 3}


@pytest.mark.parametrize("code", ["rejected", "too-large", "internal-error", "no-such-code"])
async def test_final_refusals_are_never_resent(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock, code: str
) -> None:
    """Only ``unavailable`` is retried: ``rejected``, ``too-large``, ``internal-error`` and
    codes the client does not know are final answers, each message written once."""
    seen: list[bytes] = []

    async def refuse_all(stream: trio.abc.Stream) -> None:
        replies = Replies()
        while data := await stream.receive_some():
            for payload in replies.frames(data):
                seen.append(payload)
                replies.seq += 1
                await stream.send_all(err_line(replies.seq, code, "no"))

    async with open_client(connect=memory_server(refuse_all).connect) as client:
        receipts = [r async for r in client.send_many([b"a", b"b", b"c"])]
        await trio.sleep(60)  # nothing is written later either
    assert [r.reply for r in receipts] == [
        Err(1, code, "no"),
        Err(2, code, "no"),
        Err(3, code, "no"),
    ]
    assert seen == [b"a", b"b", b"c"]
    assert (client.stats.rejected, client.stats.retried, client.stats.unavailable) == (3, 0, 0)


async def test_an_outage_pauses_the_writer(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """While messages wait for their backoff, nothing else is written: during a store
    outage of 20 s only the first window of messages goes back and forth (the rest are
    first written once it is over), and everything is acknowledged once it is back."""
    back_at = trio.current_time() + 20.0
    store = FlakyStore(lambda payload: trio.current_time() < back_at, times=math.inf)
    payloads = [b"%d" % i for i in range(200)]
    async with open_client(connect=memory_server(store.handle).connect, window=8) as client:
        receipts = [r async for r in client.send_many(payloads)]
    assert all(r.acked for r in receipts)
    assert trio.current_time() >= back_at
    assert [p for p, writes in store.writes.items() if writes > 1] == payloads[:8]
    assert client.stats.retried == sum(store.writes.values()) - 200


async def test_a_server_down_for_twenty_seconds_is_reached_with_the_defaults(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Refused connections are retried for ``retry_for`` (30 s by default), however many
    attempts that takes: a server back after 20 s is reached."""
    refusing_until = trio.current_time() + 20.0
    attempts = 0

    async def connect() -> trio.abc.Stream:
        nonlocal attempts
        attempts += 1
        if trio.current_time() < refusing_until:
            raise ConnectionRefusedError(111, "Connection refused")
        return await fake.connect()

    fake = memory_server(ack_everything)
    async with open_client(connect=connect) as client:
        assert await client.send(b"x") == Ack(1, 1, zlib.crc32(b"x"))
    assert attempts > 4


async def test_nothing_listening_is_given_up_on_after_retry_for(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """The last attempt starts when ``retry_for`` ends, not a backoff later; then
    ``ConnectError``."""
    fake = memory_server(None)
    started = trio.current_time()
    with pytest.raises(ConnectError, match=r"connection refused \(tried \d+ times over 12.0 s\)"):
        async with open_client(connect=fake.connect, retry_for=12.0):
            pass  # pragma: no cover
    assert trio.current_time() - started == pytest.approx(12.0)


async def test_busy_is_retried_like_a_refused_connection(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """``ERR 0 busy`` on every connection for 10 s: retried within the time budget, then
    the message is delivered."""
    busy_until = trio.current_time() + 10.0

    async def busy_for_a_while(stream: trio.abc.Stream) -> None:
        if trio.current_time() < busy_until:
            await stream.send_all(err_line(0, "busy", "server at its connection limit"))
            return
        await ack_everything(stream)

    fake = memory_server(busy_for_a_while)
    async with open_client(connect=fake.connect) as client:
        assert await client.send(b"x") == Ack(1, 1, zlib.crc32(b"x"))
    assert fake.connections > 2


async def test_busy_past_retry_for_is_a_lost_connection(
    memory_server: MakeServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that stays at its limit: ``ConnectionLostError("busy")`` once ``retry_for``
    has passed."""

    async def busy(stream: trio.abc.Stream) -> None:
        await stream.send_all(err_line(0, "busy", "server at its connection limit"))

    async with open_client(connect=memory_server(busy).connect, retry_for=5.0) as client:
        with pytest.raises(ConnectionLostError) as lost:
            await client.send(b"x")
    assert lost.value.reason == "busy"
    assert trio.current_time() <= 5.0 + 0.1


async def test_an_unresolvable_host_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    """A host name that does not resolve fails the first connection at once: one attempt,
    no backoff, ``ConnectError`` saying so."""
    attempts = 0

    async def unresolvable() -> trio.abc.Stream:
        nonlocal attempts
        attempts += 1
        await trio.lowlevel.checkpoint()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ConnectError, match="cannot resolve host") as failure:
        async with open_client("no-such-host", connect=unresolvable):
            pass  # pragma: no cover
    assert attempts == 1
    assert trio.current_time() == 0
    assert "tried" not in str(failure.value)
