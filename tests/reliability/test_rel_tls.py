"""Scenario 22, the reliability scenarios that make sense over TLS: SIGTERM under load, the
chaos proxy slicing TLS records, resets mid-handshake, mid-record and mid-message, a
half-close by close_notify, a client cut off mid-line without close_notify, and stalled
handshakes. The server is the recording server with the real CLI's TLS flags and the
certificates of tests/tls_support.py; every run is judged by the checker (lost 0)."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import ssl
from collections import Counter
from typing import Any

import pytest
import trio
from rel_checker import History, check, filler_block, make_payload, message_key
from rel_harness import (
    ClientRun,
    ServerUnderTest,
    WireTap,
    assert_drained_cleanly,
    deliver_all,
    open_stream,
    pick,
    poll_until,
    reference_frames,
    reference_replies,
    reset_socket,
    streaming_clients,
)
from rel_proxy import ChaosProxy, ChaosSettings

from ackservice.client import open_client
from ackservice.protocol import DEFAULT_MAX_MESSAGE_BYTES, Ack, message_line, parse_reply
from ackservice.server.tls import RecordBoundaries
from conftest import Report, StartServer
from tls_support import CLIENT_COMMON_NAME, TLSFiles

# What a connection's end may be called in the server's log when its client went away
# abruptly: a reset, or a reset (or truncation) before the handshake completed.
ABRUPT_ENDS = {"reset", "tls-handshake-failed"}


async def closed_connections(server: ServerUnderTest, count: int) -> list[dict[str, Any]]:
    """The server's ``connection_closed`` events once there are ``count`` besides the
    warm-up's (its log writer thread writes them a few ms after the fact)."""
    with trio.fail_after(5):
        await poll_until(lambda: server.count_events("connection_closed") >= count + 1)
    return server.events_named("connection_closed")[1:]


def server_ends(closed: list[dict[str, Any]]) -> Counter[str]:
    """How the server's connections ended, by reason."""
    return Counter(str(event["reason"]) for event in closed)


# -- SIGTERM under load -----------------------------------------------------------------------

SIGTERM_CONNECTIONS = pick(40, 200)
SIGTERM_GRACE = 10.0


@pytest.mark.slow
async def test_sigterm_with_tls_connections_streaming(
    start_server: StartServer, report: Report, tls_files: TLSFiles
) -> None:
    """SIGTERM while 40 TLS clients stream (paced as in scenario 5; full: 200), each having
    had ACKs: every client reads, through its ``SSLStream``, an ACK for every message the
    server read on its connection (per the server's own count), then ``ERR 0
    shutting-down``; none sees a reset. The process exits 0 within the grace period,
    unforced, with no traceback. The checker: nothing acknowledged was lost."""
    server = await start_server(
        recording=True, tls=tls_files, flags=["--shutdown-grace", str(SIGTERM_GRACE)]
    )
    history = History()
    runs: list[ClientRun] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await streaming_clients(
                server,
                history,
                runs,
                nursery,
                SIGTERM_CONNECTIONS,
                at_least=pick(1.0, 5.0),
                tls=server.client_tls,
            )
            signalled_at = trio.current_time()
            server.process.send_signal(signal.SIGTERM)
            code = await server.exited()
            exited_after = trio.current_time() - signalled_at

    assert exited_after < SIGTERM_GRACE
    verdict = assert_drained_cleanly(server, code, runs, history, SIGTERM_CONNECTIONS)
    report(
        connections=SIGTERM_CONNECTIONS,
        exited_after_s=round(exited_after, 2),
        **verdict.summary(),
    )


# -- the chaos proxy, slicing TLS records -------------------------------------------------------

CHAOS_CLIENTS = pick(10, 50)
CHAOS_MESSAGES = pick(100, 1_000)


@pytest.mark.slow
async def test_tls_records_sliced_by_a_chaotic_network(
    start_server: StartServer, report: Report, nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """``ackservice.client`` clients with client certificates (mutual TLS) send through the
    chaos proxy of scenario 14: the ciphertext, handshakes included, arrives delayed and cut
    into 1-7 byte pieces (record headers split too), one connection in two reset after up
    to 20,000 bytes, some in the handshake. Every message ends acknowledged and verified;
    the checker finds nothing lost or unexpected; the server stays healthy: every
    connection ended cleanly (close_notify), by a reset or a handshake cut short, never a
    record that failed to decrypt or a traceback; each identified its client."""
    server = await start_server(recording=True, tls=tls_files, mutual_tls=True)
    # Scenario 14's network, with more resets, spread over more bytes (a mutual TLS
    # handshake alone is ~1.5 KB from the client).
    proxy = ChaosProxy(server.port, ChaosSettings(reset_chance=0.5, reset_within=20_000), seed=22)
    proxy_port: int = await nursery.start(proxy.run)
    filler = filler_block()
    history = History()
    connections = 0
    resent = 0

    async def one_client(client: int) -> None:
        nonlocal connections, resent
        rng = random.Random(client)
        payloads = [
            make_payload(f"s{client}-{i}", rng.randint(16, 600), filler, rng.randrange(1 << 20))
            for i in range(CHAOS_MESSAGES)
        ]

        async def connect() -> trio.abc.Stream:
            # TLS under the tap, so that the tap sees what the client sends and reads.
            return WireTap(await open_stream(proxy_port, server.client_tls), history)

        stats = await deliver_all(
            proxy_port,
            payloads,
            connect,
            window=rng.randint(1, 64),
            # A record (up to 16 KiB: a whole window) is answered only once all of it has
            # come through the proxy, a few bytes at a time, shared with every other client:
            # at the full scale that took over the default 10 s.
            ack_timeout=60.0,
            retries=10,
            backoff_base=0.02,
            backoff_cap=0.2,
        )
        connections += stats.connections
        resent += stats.resent

    with trio.fail_after(pick(60, 600)):
        async with trio.open_nursery() as clients:
            for client in range(CHAOS_CLIENTS):
                clients.start_soon(one_client, client)

    assert proxy.stats.resets > 0
    await server.assert_healthy()
    closed = await closed_connections(server, proxy.stats.connections)
    ends = server_ends(closed)
    assert set(ends) <= {"eof", *ABRUPT_ENDS}, ends
    clean = [e for e in closed if e["reason"] == "eof"]
    assert all(e["identity"].endswith(f",CN={CLIENT_COMMON_NAME}") for e in clean), clean
    verdict = check(history, server.records())
    verdict.assert_valid()
    assert verdict.acked == CHAOS_CLIENTS * CHAOS_MESSAGES
    report(
        clients=CHAOS_CLIENTS,
        connections=connections,
        resets=proxy.stats.resets,
        fragments=proxy.stats.fragments,
        resent=resent,
        resets_in_handshake=sum(e["reason"] in ABRUPT_ENDS and "identity" not in e for e in closed),
        server_ends=dict(ends),
        **verdict.summary(),
    )


# -- resets mid-handshake, mid-record, mid-message ------------------------------------------------


def cut_inside_a_record(data: bytes, rng: random.Random) -> int:
    """A random offset in ``data`` (whole TLS records) that falls inside a record, header
    included, never between two: where the server is left with part of a record."""
    while True:
        cut = rng.randrange(1, len(data))
        records = RecordBoundaries()  # the server's own record following
        records.feed(data[:cut])
        if records.tail:
            return cut


class ResetInWrite(trio.abc.Stream):
    """A client's TCP stream under its TLS, that resets itself (SO_LINGER 0) in the middle
    of a record of its ``write``-th write: write 1 is the ClientHello, write 2 the client's
    last handshake flight (Finished), later ones records of messages. The bytes before the
    cut go out first."""

    def __init__(self, stream: trio.SocketStream, write: int, rng: random.Random) -> None:
        self.socket = stream.socket
        self._stream = stream
        self._write = write
        self._rng = rng
        self._writes = 0
        self.was_cut = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._writes += 1
        if self._writes == self._write:
            data = bytes(data)
            await self._stream.send_all(data[: cut_inside_a_record(data, self._rng)])
            await trio.sleep(0.01)  # the server reads the piece before the reset
            reset_socket(self.socket)
            self.was_cut = True
            raise trio.BrokenResourceError("connection reset by the test")
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


RESET_CLIENTS = 32
RESET_MESSAGES = 40
# Where each resetting client's first connection is cut: a write (see ResetInWrite), or a
# byte of the plaintext (WireTap: the message is cut, the record carrying it is whole).
RESET_KINDS = ("client-hello", "finished", "record", "message")
RESETS_PER_KIND = 4


@pytest.mark.slow
async def test_tls_connections_reset_mid_handshake_record_and_message(
    start_server: StartServer, report: Report, tls_files: TLSFiles
) -> None:
    """32 ``ackservice.client`` clients over TLS; 16 have their first connection reset
    (SO_LINGER 0): 4 in the middle of the ClientHello, 4 in the middle of their Finished
    flight, 4 in the middle of a record of messages (after the handshake), 4 in the middle
    of a message whose record went out whole. Each reconnects and resends: every message
    ends acknowledged and verified, the checker finds nothing lost or unexpected, the
    server logs one abrupt end per reset and no traceback, and its descriptors return to
    the baseline."""
    server = await start_server(recording=True, tls=tls_files)
    filler = filler_block()
    history = History()
    kinds = random.Random(22).sample(
        [kind for kind in RESET_KINDS for _ in range(RESETS_PER_KIND)]
        + [""] * (RESET_CLIENTS - len(RESET_KINDS) * RESETS_PER_KIND),
        RESET_CLIENTS,
    )
    cuts: dict[int, ResetInWrite] = {}
    taps: dict[int, list[WireTap]] = {client: [] for client in range(RESET_CLIENTS)}
    acked = 0

    async def one_client(client: int) -> None:
        nonlocal acked
        rng = random.Random(client)
        payloads = [
            make_payload(f"x{client}-{i}", rng.randint(16, 400), filler, rng.randrange(1 << 20))
            for i in range(RESET_MESSAGES)
        ]
        wire_bytes = sum(len(message_line(payload)) for payload in payloads)
        kind = kinds[client]

        async def connect() -> trio.abc.Stream:
            first = client not in cuts and not taps[client]
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            transport: trio.abc.Stream = tcp
            if first and kind in ("client-hello", "finished", "record"):
                write = {"client-hello": 1, "finished": 2}.get(kind, rng.randint(3, 4))
                transport = cuts[client] = ResetInWrite(tcp, write, rng)
            assert server.client_tls is not None
            stream = trio.SSLStream(transport, server.client_tls, server_hostname="127.0.0.1")
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            reset_after = rng.randrange(1, wire_bytes) if first and kind == "message" else None
            tap = WireTap(stream, history, reset_after)
            taps[client].append(tap)
            return tap

        await deliver_all(
            server.port,
            payloads,
            connect,
            window=rng.randint(1, 32),
            retries=5,
            backoff_base=0.05,
            backoff_cap=0.5,
        )
        acked += len(payloads)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for client in range(RESET_CLIENTS):
                nursery.start_soon(one_client, client)

    assert acked == RESET_CLIENTS * RESET_MESSAGES
    resetting = [client for client in range(RESET_CLIENTS) if kinds[client]]
    for client in resetting:
        assert taps[client][0].was_reset == (kinds[client] == "message")
        # A connection cut in its handshake never got as far as a tap.
        assert len(taps[client]) == (1 if kinds[client] in ("client-hello", "finished") else 2)
    assert all(cut.was_cut for cut in cuts.values())
    await server.assert_healthy()
    ends = server_ends(await closed_connections(server, RESET_CLIENTS + len(resetting)))
    assert ends["eof"] == RESET_CLIENTS, ends
    assert sum(ends[end] for end in ABRUPT_ENDS) == len(resetting), ends
    verdict = check(history, server.records())
    verdict.assert_valid()
    report(
        connections=sum(ends.values()),
        resets=dict(Counter(kinds[client] for client in resetting)),
        server_ends=dict(ends),
        **verdict.summary(),
    )


# -- a half-close by close_notify --------------------------------------------------------------


async def exchange_then_end(
    port: int, context: ssl.SSLContext, pieces: list[bytes], *, close_notify: bool
) -> tuple[bytes, bool, str]:
    """Over a TLS client made of ``ssl.MemoryBIO`` (Trio's ``SSLStream`` cannot half-close):
    handshake, send ``pieces`` one record each, then end the sending side, with
    close_notify or (as the kernel does for a killed process) with a bare FIN, and go on
    reading.

    Returns:
        every byte of plaintext read, whether the server's close_notify ended it (rather
        than a bare end of the TCP stream), and the local address.
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")

    async def flush() -> None:
        if data := outgoing.read():
            await tcp.send_all(data)

    async def fill() -> None:
        data = await tcp.receive_some(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()

    async with tcp:
        local = "{}:{}".format(*tcp.socket.getsockname()[:2])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await flush()
                await fill()
        await flush()
        for piece in pieces:
            tls.write(piece)
            await flush()
        if close_notify:
            with contextlib.suppress(ssl.SSLWantReadError):  # the server's is still to come
                tls.unwrap()
            await flush()
        else:
            await tcp.send_eof()
        replies = bytearray()
        while True:
            try:
                data = tls.read(65536)
            except ssl.SSLWantReadError:
                await fill()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                return bytes(replies), False, local
            if not data:
                return bytes(replies), True, local
            replies += data


@pytest.mark.slow
async def test_close_notify_half_close_answers_the_unterminated_final_message(
    start_server: StartServer, report: Report, tls_files: TLSFiles
) -> None:
    """A TLS client sends 200 messages and a final one without its newline, in records cut
    at random points (mid-message), then close_notify, and keeps reading: it gets an ACK
    for every message, the unterminated one included, exactly what the reference framer
    answers to the stream, then the server's own close_notify (a clean end, not a
    truncation). The server logs the end as ``eof``; the checker finds nothing lost."""
    server = await start_server(recording=True, tls=tls_files)
    assert server.client_tls is not None
    filler = filler_block()
    rng = random.Random(22)
    payloads = [
        make_payload(f"h-{i}", rng.randint(16, 3000), filler, rng.randrange(1 << 20))
        for i in range(201)
    ]
    stream = b"".join(map(message_line, payloads))[:-1]  # the last newline left out
    cuts = sorted(rng.sample(range(1, len(stream)), 60))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    with trio.fail_after(20):
        replies, clean_end, local = await exchange_then_end(
            server.port, server.client_tls, pieces, close_notify=True
        )
    assert replies == reference_replies(stream, DEFAULT_MAX_MESSAGE_BYTES)
    assert clean_end
    history = History()
    frames = reference_frames(stream, DEFAULT_MAX_MESSAGE_BYTES)
    for seq, (frame, line) in enumerate(zip(frames, replies.splitlines(), strict=True), 1):
        assert isinstance(frame, bytes)
        key = message_key(frame, local, seq)
        history.written(key, frame)
        reply = parse_reply(line)
        assert isinstance(reply, Ack)
        history.acked(key, reply.nbytes, reply.crc32)
    [closed] = await closed_connections(server, 1)
    assert closed["reason"] == "eof"
    assert closed["messages"] == len(payloads)
    await server.assert_healthy()
    verdict = check(history, server.records())
    verdict.assert_valid()
    assert verdict.acked == len(payloads)
    report(records=len(pieces), **verdict.summary())


@pytest.mark.slow
async def test_tls_client_killed_mid_line_leaves_no_torn_message(
    start_server: StartServer, report: Report, tls_files: TLSFiles
) -> None:
    """A TLS client that stops in the middle of a line and ends TCP without close_notify
    (what the kernel does for a killed process) gets an ACK for each message it completed,
    and its cut line is not taken as a message: unlike a FIN over plain TCP (finding 3),
    a TLS stream without close_notify is known to be cut short. Nothing torn recorded,
    nothing lost; the server logs the truncation, no traceback."""
    server = await start_server(recording=True, tls=tls_files)
    assert server.client_tls is not None
    filler = filler_block()
    rng = random.Random(23)
    payloads = [
        make_payload(f"k-{i}", rng.randint(100, 3000), filler, rng.randrange(1 << 20))
        for i in range(50)
    ]
    whole = b"".join(map(message_line, payloads))
    cut = len(whole) - len(payloads[-1]) // 2  # inside the last payload, after its id
    stream = whole[:cut]
    pieces = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    with trio.fail_after(20):
        replies, _, local = await exchange_then_end(
            server.port, server.client_tls, pieces, close_notify=False
        )
    complete = stream[: stream.rindex(b"\n") + 1]
    assert replies == reference_replies(complete, DEFAULT_MAX_MESSAGE_BYTES)
    history = History()
    for seq, payload in enumerate(payloads, 1):
        history.written(message_key(payload, local, seq), payload)
    for line in replies.splitlines():
        reply = parse_reply(line)
        assert isinstance(reply, Ack)
        history.acked(
            message_key(payloads[reply.seq - 1], local, reply.seq), reply.nbytes, reply.crc32
        )
    [closed] = await closed_connections(server, 1)
    assert closed["reason"] == "tls-truncated"
    assert closed["messages"] == len(payloads) - 1
    await server.assert_healthy()
    verdict = check(history, server.records())
    verdict.assert_valid()
    assert verdict.acked == len(payloads) - 1
    report(**verdict.summary())


# -- slowloris in the handshake ------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 1.0
STALLED = 20


async def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight a client with ``context`` sends: its ClientHello record."""
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.slow
async def test_stalled_handshakes_are_dropped_at_the_handshake_timeout(
    start_server: StartServer, report: Report, tls_files: TLSFiles
) -> None:
    """With ``--tls-handshake-timeout 1`` (and the idle timeout at 30 s), 10 connections
    that trickle their ClientHello a byte per 0.1 s and 10 that send nothing are each
    dropped between 1 and 2 s after connecting (``tls-handshake-timeout``), not held for
    the idle timeout, while 4 TLS clients beside them send 200 messages each: all
    acknowledged and verified, lost 0."""
    server = await start_server(
        recording=True,
        tls=tls_files,
        flags=["--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT), "--idle-timeout", "30"],
    )
    assert server.client_tls is not None
    hello = await client_hello(server.client_tls)
    filler = filler_block()
    history = History()
    dropped_after: list[float] = []

    async def stalled(trickle: bool) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        connected_at = trio.current_time()
        async with stream:
            try:
                if trickle:
                    for byte in hello:  # 517 bytes: 50 s at this pace
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.1)
                else:
                    assert await stream.receive_some(1024) == b""
            except trio.BrokenResourceError:
                pass  # the server closed it with our bytes unread: a reset
            dropped_after.append(trio.current_time() - connected_at)

    async def normal(client: int) -> None:
        rng = random.Random(client)
        payloads = [
            make_payload(f"n{client}-{i}", rng.randint(16, 400), filler, rng.randrange(1 << 20))
            for i in range(200)
        ]

        async def connect() -> trio.abc.Stream:
            return WireTap(await open_stream(server.port, server.client_tls), history)

        async with open_client("127.0.0.1", server.port, connect=connect, window=4) as api:
            receipts = [receipt async for receipt in api.send_many(payloads)]
        assert all(receipt.acked for receipt in receipts)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index in range(STALLED):
                nursery.start_soon(stalled, index % 2 == 0)
            for client in range(4):
                nursery.start_soon(normal, client)

    assert len(dropped_after) == STALLED
    assert max(dropped_after) < HANDSHAKE_TIMEOUT + 1.0
    await server.assert_healthy()
    closed = await closed_connections(server, STALLED + 4)
    ends = server_ends(closed)
    assert ends == {"tls-handshake-timeout": STALLED, "eof": 4}, ends
    # The server's own count: not before the timeout.
    held = [e["duration"] for e in closed if e["reason"] == "tls-handshake-timeout"]
    assert min(held) >= HANDSHAKE_TIMEOUT
    verdict = check(history, server.records())
    verdict.assert_valid()
    assert verdict.acked == 4 * 200
    report(
        stalled=STALLED,
        held_s=f"{min(held):.3f} to {max(held):.3f}",
        dropped_after_s=f"{min(dropped_after):.2f} to {max(dropped_after):.2f}",
        **verdict.summary(),
    )
