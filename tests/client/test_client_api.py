"""The library API (``open_client``, ``send``, ``deliver``, ``send_many``) against the real
server over loopback."""

from __future__ import annotations

import itertools
import sys
import zlib
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.lowlevel
from client_fakes import StartServer

from ackservice.client import (
    Ack,
    ConnectError,
    Err,
    MessageRejectedError,
    Receipt,
    open_client,
)
from ackservice.client.pipeline import YIELD_EVERY
from ackservice.errors import Reject
from ackservice.server import MessageContext, Server
from support import wait_until


async def test_send_returns_the_verified_ack(server: Server) -> None:
    """``send`` waits for the message's ACK and returns it, seq counted from 1."""
    async with open_client("127.0.0.1", server.port) as client:
        assert await client.send(b"hello") == Ack(1, 5, 0x3610A686)
        assert await client.send(b"") == Ack(2, 0, 0)


async def test_payload_ending_in_carriage_return_arrives_intact(server: Server) -> None:
    """A trailing ``\\r`` is payload: the client protects it from the server's CRLF rule."""
    async with open_client("127.0.0.1", server.port) as client:
        ack = await client.send(b"line\r")
    assert ack.nbytes == 5
    assert ack.crc32 == zlib.crc32(b"line\r")


async def test_payload_with_a_newline_is_refused_before_sending(server: Server) -> None:
    """A payload containing ``\\n`` would be two messages: ``ValueError``, nothing sent."""
    async with open_client("127.0.0.1", server.port) as client:
        with pytest.raises(ValueError, match="newline"):
            await client.send(b"two\nlines")
        assert await client.send(b"next") == Ack(1, 4, zlib.crc32(b"next"))
    # The server counts a connection's messages when it closes.
    await wait_until(lambda: server.handler.stats.messages == 1)


async def test_send_many_yields_receipts_in_order(server: Server) -> None:
    """Pipelined sending still hands back one receipt per payload, in input order."""
    payloads = [f"message {i}".encode() for i in range(2000)]
    async with open_client("127.0.0.1", server.port, window=64) as client:
        receipts = [receipt async for receipt in client.send_many(iter(payloads))]
    assert [r.payload for r in receipts] == payloads
    assert [r.index for r in receipts] == list(range(1, 2001))
    assert all(r.acked and r.attempts == 1 and r.rtt >= 0 for r in receipts)
    assert [r.reply.seq for r in receipts] == list(range(1, 2001))
    assert client.stats.acked == client.stats.sent == 2000


async def test_ready_receipts_come_without_a_turn_of_the_scheduler_each(server: Server) -> None:
    """Receipts already answered are handed out without yielding to Trio's scheduler for
    each (it cost more than the rest of a message's work), yet other tasks still run at
    least every ``YIELD_EVERY`` receipts."""
    turns = 0
    seen: list[int] = []

    async def spin() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    payloads = [b"%d" % i for i in range(20_000)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spin)
        async with open_client("127.0.0.1", server.port, window=512) as client:
            async for _ in client.send_many(payloads):
                seen.append(turns)
        nursery.cancel_scope.cancel()
    assert len(seen) == 20_000
    assert turns < len(seen) / 4  # one turn per receipt before
    # Trio runs a batch's tasks in any order: the spinner may run before the consumer in
    # one batch and after it in the next, so two stretches of receipts can pass between turns.
    longest_without_a_turn = max(len(list(run)) for _, run in itertools.groupby(seen))
    assert longest_without_a_turn <= 2 * (YIELD_EVERY + 1)


async def test_a_cancelled_consumer_stops_at_the_next_receipt(server: Server) -> None:
    """Receipts ready or not, each one handed out is a cancel point."""
    taken = 0
    async with open_client("127.0.0.1", server.port, window=512) as client:
        deliveries = client.send_many([b"%d" % i for i in range(5_000)])
        with trio.CancelScope() as scope:
            async for receipt in deliveries:
                taken += 1
                if receipt.index == 300:  # replies come in blocks: more are ready now
                    scope.cancel()
        await deliveries.aclose()
    assert taken == 300


async def test_large_pipelined_run_does_not_deadlock(server: Server) -> None:
    """A full window of maximum-size messages (16 MiB on the wire): writing and reading
    run as separate tasks, so neither side ends up blocked on a full socket buffer."""
    payloads = [bytes([65 + i % 26]) * 65536 for i in range(256)]
    async with open_client("127.0.0.1", server.port, window=256) as client:
        receipts = [r async for r in client.send_many(payloads)]
    expected = [Ack(seq, 65536, zlib.crc32(p)) for seq, p in enumerate(payloads, 1)]
    assert [r.reply for r in receipts] == expected


async def test_send_many_takes_an_async_iterable(server: Server) -> None:
    """Payloads may come from an async iterable (a file, a socket, another service)."""

    async def produce() -> AsyncIterator[bytes]:
        for i in range(10):
            await trio.lowlevel.checkpoint()
            yield b"%d" % i

    async with open_client("127.0.0.1", server.port) as client:
        receipts = [receipt async for receipt in client.send_many(produce())]
    assert [r.payload for r in receipts] == [b"%d" % i for i in range(10)]


async def test_send_many_streams_in_bounded_memory(server: Server) -> None:
    """An endless source is read at most two windows ahead of the receipts consumed."""
    taken = itertools.count()

    def endless() -> Iterator[bytes]:
        while True:
            yield b"%d" % next(taken)

    async with open_client("127.0.0.1", server.port, window=8) as client:
        deliveries = client.send_many(endless())
        async for receipt in deliveries:
            if receipt.index == 100:
                break
        await trio.sleep(0.05)  # give the feeder every chance to run ahead
        await deliveries.aclose()
    assert next(taken) <= 100 + 2 * 8 + 1


async def test_rejected_message_is_reported_and_never_resent(
    start_server: StartServer,
) -> None:
    """``ERR <seq> rejected``: ``send`` raises, ``send_many`` yields an ``Err``; the
    application saw each refused message exactly once."""
    seen: list[bytes] = []

    async def refuse_no(payload: bytes, context: MessageContext) -> None:
        seen.append(payload)
        if payload == b"no":
            raise Reject("not today")

    server = await start_server(on_message=refuse_no)
    async with open_client("127.0.0.1", server.port) as client:
        with pytest.raises(MessageRejectedError) as refused:
            await client.send(b"no")
        receipts = [r async for r in client.send_many([b"yes", b"no", b"yes"])]
    assert (refused.value.seq, refused.value.code, refused.value.detail) == (
        1,
        "rejected",
        "not today",
    )
    assert [r.acked for r in receipts] == [True, False, True]
    assert receipts[1].reply == Err(3, "rejected", "not today")
    assert seen == [b"no", b"yes", b"no", b"yes"]
    assert client.stats.rejected == 2


async def test_deliver_returns_the_receipt_instead_of_raising(
    start_server: StartServer,
) -> None:
    """``deliver`` is ``send`` for callers that want the receipt (rtt, attempts, refusal)."""

    async def refuse_all(payload: bytes, context: MessageContext) -> None:
        raise Reject("closed for today")

    server = await start_server(on_message=refuse_all)
    async with open_client("127.0.0.1", server.port) as client:
        receipt = await client.deliver(b"hi")
    assert receipt == Receipt(1, b"hi", Err(1, "rejected", "closed for today"), receipt.rtt, 1)


async def test_concurrent_senders_share_one_pipelined_connection(server: Server) -> None:
    """Many tasks may ``send`` at once; each gets its own message's ACK."""
    results: dict[int, Ack] = {}
    async with open_client("127.0.0.1", server.port) as client:

        async def send(i: int) -> None:
            results[i] = await client.send(b"task %d" % i)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(send, i)
    assert all(results[i].crc32 == zlib.crc32(b"task %d" % i) for i in range(100))
    assert sorted(ack.seq for ack in results.values()) == list(range(1, 101))
    assert server.handler.stats.connections == 1


async def test_source_error_is_raised_after_the_receipts_before_it(server: Server) -> None:
    """An exception from the payload source comes out in its place in the order."""

    def failing() -> Iterator[bytes]:
        yield b"one"
        yield b"two"
        raise OSError("disk gone")

    async with open_client("127.0.0.1", server.port) as client:
        deliveries = client.send_many(failing())
        received = [(await anext(deliveries)).payload for _ in range(2)]
        with pytest.raises(OSError, match="disk gone"):
            await anext(deliveries)
    assert received == [b"one", b"two"]


async def test_exceptions_from_the_body_are_not_wrapped(server: Server) -> None:
    """The client's background tasks stay invisible: the body's own exception comes out
    as itself, not inside an ``ExceptionGroup``."""
    with pytest.raises(KeyError):
        async with open_client("127.0.0.1", server.port):
            raise KeyError("mine")


async def test_client_is_unusable_after_the_block(server: Server) -> None:
    """Sending after ``async with`` ended is a usage error (``trio.ClosedResourceError``)."""
    async with open_client("127.0.0.1", server.port) as client:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"late")


async def test_unreachable_server_raises_connect_error(unused_port: int) -> None:
    """Nothing listening: ``open_client`` retries, then raises ``ConnectError`` saying why
    and how hard it tried."""
    with pytest.raises(ConnectError) as failure:
        async with open_client("127.0.0.1", unused_port, retries=2, backoff_base=0.01):
            pass  # pragma: no cover
    message = str(failure.value)
    assert message.startswith(f"cannot connect to 127.0.0.1:{unused_port}: connection refused")
    assert "(tried 3 times over " in message


@pytest.mark.parametrize(
    ("setting", "value"),
    [("window", 0), ("retries", -1), ("ack_timeout", 0.0), ("connect_timeout", float("inf"))],
)
async def test_settings_are_validated(setting: str, value: float) -> None:
    """An out-of-range setting is a ``ValueError`` naming it, before any connection."""
    with pytest.raises(ValueError, match=setting):
        async with open_client("127.0.0.1", 9, **{setting: value}):
            pass  # pragma: no cover


async def test_the_library_prints_nothing_when_logging_is_not_configured(server: Server) -> None:
    """An application that never configured structlog: the client library's routine events
    (connected, ...) do not reach its stdout or stderr; only what it prints itself does."""
    script = (
        "import sys, trio\n"
        "from ackservice.client import open_client\n"
        "async def main():\n"
        "    async with open_client('127.0.0.1', int(sys.argv[1])) as client:\n"
        "        await client.send(b'hello')\n"
        "    print('done')\n"
        "trio.run(main)\n"
    )
    with trio.fail_after(30):
        run = await trio.run_process(
            [sys.executable, "-c", script, str(server.port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"done\n"
    assert run.stderr == b""
