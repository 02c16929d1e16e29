"""The server's TLS (tls.py, tls_transport.py) over real loopback sockets with real
certificates (trustme, tests/tls_support.py): round trips, the half-close by close_notify,
the ERR 0 lines through TLS, mismatches, mutual TLS, the handshake timeout, access control."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import random
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from ackservice.protocol import ack_line
from ackservice.server import (
    AckHandler,
    MessageContext,
    Server,
    ServerConfig,
    serve,
    server_tls_context,
)
from ackservice.server.tls_transport import TLSTransport
from ackservice.store import open_reader, open_store
from support import LineReader
from tls_support import CLIENT_COMMON_NAME, OPENED_SOCKETS, BioClient, TLSFiles, client_context

pytestmark = pytest.mark.usefixtures("close_tls_test_sockets")

EventList = list[dict[str, Any]]


async def plain(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    OPENED_SOCKETS.append(stream.socket)
    return stream


def events_named(logs: EventList, name: str) -> EventList:
    return [e for e in logs if e["event"] == name]


async def start(
    nursery: trio.Nursery,
    files: TLSFiles,
    *,
    mutual: bool = False,
    tls: bool = True,
    **settings: Any,
) -> Server:
    context = None
    if tls:
        context = server_tls_context(
            files.server_cert, files.server_key, files.ca if mutual else None
        )
    return await nursery.start(  # type: ignore[no-any-return]
        functools.partial(serve, ServerConfig(port=0, **settings), tls=context)
    )


async def connect(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=False
    )
    OPENED_SOCKETS.append(stream.transport_stream.socket)
    await stream.do_handshake()
    return stream


@pytest.mark.usefixtures("info_level")
async def test_round_trip(nursery: trio.Nursery, tls_files: TLSFiles) -> None:
    server = await start(nursery, tls_files)
    stream = await connect(server.port, client_context(tls_files))
    await stream.send_all(b"hello\nsecond message\n\n")
    assert await LineReader(stream).lines(3) == [
        ack_line(1, b"hello")[:-1],
        ack_line(2, b"second message")[:-1],
        ack_line(3, b"")[:-1],
    ]
    await stream.aclose()


@pytest.mark.usefixtures("info_level")
async def test_close_notify_is_a_half_close_answered_in_full(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """Messages, an unterminated final one and close_notify in one write: every reply
    comes back, then the server's own close_notify."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    await client.sendall(client.encrypt(b"one\ntwo\nlast") + client.close_notify())
    with trio.fail_after(5):
        replies = await client.read_all()
    assert replies == ack_line(1, b"one") + ack_line(2, b"two") + ack_line(3, b"last")
    assert client.closed_cleanly


@pytest.mark.usefixtures("info_level")
async def test_close_notify_after_a_whole_message_is_seen(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """One whole message and close_notify in one read: the message is answered and the
    close_notify is not left unread (no TCP end of stream follows it, so no edge would
    wake the connection again: the readiness hub's answerer must leave it to the task)."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    await client.sendall(client.encrypt(b"one\n"))
    assert await client.read_line() == ack_line(1, b"one")  # the connection now waits
    await client.sendall(client.encrypt(b"two\n") + client.close_notify())
    with trio.fail_after(5):
        replies = await client.read_all()
    assert replies == ack_line(2, b"two")
    assert client.closed_cleanly


@pytest.mark.usefixtures("info_level")
async def test_request_response_then_close_notify(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """Messages answered one at a time (in the readiness hub's dispatcher), then
    close_notify alone, TCP still open: the server's close_notify answers it."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    for seq in range(1, 6):
        await client.sendall(client.encrypt(b"message %d\n" % seq))
        assert await client.read_line() == ack_line(seq, b"message %d" % seq)
    await client.sendall(client.close_notify())
    with trio.fail_after(5):
        assert await client.read_all() == b""
    assert client.closed_cleanly


async def test_records_sliced_into_pieces_are_reassembled(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """Records (headers included) arriving a few bytes per read are decrypted whole."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    rng = random.Random(7)
    messages = [bytes([97 + i % 26]) * rng.randint(0, 3000) for i in range(40)]
    wire = b"".join(client.encrypt(m + b"\n") for m in messages) + client.close_notify()
    at = 0
    while at < len(wire):
        step = rng.choice((1, 2, 3, 5, 7, 700))
        await client.sendall(wire[at : at + step])
        at += step
        if rng.random() < 0.1:
            await trio.sleep(0.001)  # a separate read on the server
    with trio.fail_after(10):
        replies = await client.read_all()
    assert replies == b"".join(ack_line(i, m) for i, m in enumerate(messages, 1))


async def test_goodbye_lines_go_through_tls(nursery: trio.Nursery, tls_files: TLSFiles) -> None:
    """ERR 0 idle-timeout and ERR 0 shutting-down are read through TLS (an SSLStream
    cannot read plaintext), followed by the end of the stream."""
    server = await start(nursery, tls_files, idle_timeout=0.3)
    idle = await connect(server.port, client_context(tls_files))
    with trio.fail_after(5):
        line = await LineReader(idle).line()
    assert line.startswith(b"ERR 0 idle-timeout ")
    busy = await connect(server.port, client_context(tls_files))
    await busy.send_all(b"x\n")
    reader = LineReader(busy)
    assert await reader.line() == ack_line(1, b"x")[:-1]
    server.shutdown()
    with trio.fail_after(5):
        assert (await reader.line()).startswith(b"ERR 0 shutting-down ")
        assert await reader.at_eof()


async def test_a_stalled_handshake_is_dropped(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    server = await start(nursery, tls_files, tls_handshake_timeout=0.2)
    sock = trio.socket.socket()
    OPENED_SOCKETS.append(sock)
    await sock.connect(("127.0.0.1", server.port))
    with trio.fail_after(5):
        assert await sock.recv(100) == b""  # closed, without a word in plaintext
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-handshake-timeout"


async def test_plaintext_client_is_told_tls_is_required(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    server = await start(nursery, tls_files)
    stream = await plain(server.port)
    await stream.send_all(b"hello\n")
    with trio.fail_after(5):
        line = await LineReader(stream).line()
    assert line.startswith(b"ERR 0 tls-required ")
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-required"
    assert not events_named(logs, "connection_failed")


async def test_tls_client_on_a_plain_port_is_closed_and_logged(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    server = await start(nursery, tls_files, tls=False)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await connect(server.port, client_context(tls_files))
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-on-plain-port"
    assert "--tls-cert" in closed["detail"]


async def test_mutual_tls_identity_reaches_the_hook_and_the_log(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    seen: list[MessageContext] = []

    async def hook(payload: bytes, context: MessageContext) -> None:
        seen.append(context)

    context = server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    server: Server = await nursery.start(
        functools.partial(serve, ServerConfig(port=0), tls=context, on_message=hook)
    )
    client = client_context(tls_files, cert=tls_files.client_cert, key=tls_files.client_key)
    stream = await connect(server.port, client)
    await stream.send_all(b"signed\n")
    assert await LineReader(stream).line() == ack_line(1, b"signed")[:-1]
    await stream.aclose()
    assert len(seen) == 1
    assert seen[0].identity is not None
    assert seen[0].identity.endswith(f",CN={CLIENT_COMMON_NAME}")
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["identity"] == seen[0].identity


@pytest.mark.parametrize(
    ("certificate", "alert"),
    [(None, "CERTIFICATE_REQUIRED"), ("other", "UNKNOWN_CA")],
    ids=["no-certificate", "other-ca"],
)
async def test_mutual_tls_refuses_with_the_alert(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList, certificate: str | None, alert: str
) -> None:
    """The client hears why (the alert), not a bare reset; the server logs one line."""
    server = await start(nursery, tls_files, mutual=True)
    if certificate is None:
        context = client_context(tls_files)
    else:
        context = client_context(
            tls_files, cert=tls_files.other_client_cert, key=tls_files.other_client_key
        )
    with pytest.raises(trio.BrokenResourceError) as failure:
        await connect_and_send(server.port, context)
    cause = failure.value.__cause__
    assert isinstance(cause, ssl.SSLError)
    assert alert in (cause.reason or "")
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-handshake-failed"
    assert not events_named(logs, "connection_failed")


async def test_identity_is_stored_with_each_message(
    nursery: trio.Nursery, tls_files: TLSFiles, tmp_path: Path
) -> None:
    url = f"sqlite:{tmp_path / 'tls.db'}"
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    async with open_store(url) as store:
        server: Server = await nursery.start(
            functools.partial(serve, ServerConfig(port=0), tls=context, store=store)
        )
        client = client_context(tls_files, cert=tls_files.client_cert, key=tls_files.client_key)
        stream = await connect(server.port, client)
        await stream.send_all(b"kept\n")
        assert await LineReader(stream).line() == ack_line(1, b"kept")[:-1]
        await stream.aclose()
        server.shutdown()
    async with open_reader(url) as reader:
        stored = [message async for message in reader.messages()]
    assert [m.payload for m in stored] == [b"kept"]
    assert str(stored[0].identity).endswith(f",CN={CLIENT_COMMON_NAME}")


async def test_forbidden_address_is_told_through_tls(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    server = await start(nursery, tls_files, allow=(ipaddress.ip_network("10.0.0.0/8"),))
    stream = await connect(server.port, client_context(tls_files))
    reader = LineReader(stream)
    with trio.fail_after(5):
        assert (await reader.line()).startswith(b"ERR 0 forbidden ")
        assert await reader.at_eof()
    refused = await wait_for_event(logs, "connection_refused")
    assert refused["reason"] == "forbidden"


async def test_allowed_network_is_served(nursery: trio.Nursery, tls_files: TLSFiles) -> None:
    server = await start(
        nursery, tls_files, tls=False, allow=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    stream = await plain(server.port)
    await stream.send_all(b"in\n")
    assert await LineReader(stream).line() == ack_line(1, b"in")[:-1]


async def test_connections_per_address_are_limited(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    server = await start(nursery, tls_files, max_connections_per_ip=2)
    context = client_context(tls_files)
    held = [await connect(server.port, context) for _ in range(2)]
    for stream in held:
        await stream.send_all(b"a\n")
        assert await LineReader(stream).line() == ack_line(1, b"a")[:-1]
    third = await connect(server.port, context)
    with trio.fail_after(5):
        assert (await LineReader(third).line()).startswith(b"ERR 0 busy too many connections")
    await held[0].aclose()
    with trio.fail_after(5):
        while True:  # the server sees the close a moment later
            fourth = await connect(server.port, context)
            await fourth.send_all(b"b\n")
            line = await LineReader(fourth).line()
            if not line.startswith(b"ERR 0 busy"):
                break
            await trio.sleep(0.01)
    assert line == ack_line(1, b"b")[:-1]


async def connect_and_send(port: int, context: ssl.SSLContext) -> None:
    """Connect, send a line, read: with TLS 1.3 a refusal of the client's certificate
    comes after the client's side of the handshake completed."""
    stream = await connect(port, context)
    try:
        await stream.send_all(b"hello\n")
        await stream.receive_some(100)
    finally:
        await trio.aclose_forcefully(stream)


async def wait_for_event(logs: EventList, name: str, within: float = 5) -> dict[str, Any]:
    with trio.fail_after(within):
        while not events_named(logs, name):  # noqa: ASYNC110 - the server logs in its task
            await trio.sleep(0.01)
    return events_named(logs, name)[0]


def count_close_notifies(monkeypatch: pytest.MonkeyPatch) -> list[TLSTransport]:
    """The transports that made a close_notify from now on (one entry each time)."""
    made: list[TLSTransport] = []
    close_notify = TLSTransport.close_notify

    def counting_close_notify(self: TLSTransport) -> bytes:
        made.append(self)
        return close_notify(self)

    monkeypatch.setattr(TLSTransport, "close_notify", counting_close_notify)
    return made


async def test_a_tls_client_that_never_reads_is_dropped_after_the_send_timeout(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted replies the client leaves unread wait in the server only for the send
    timeout, as over plain TCP; and no close_notify follows the record that went only in
    part (the client would take it for the rest of that record)."""
    close_notifies = count_close_notifies(monkeypatch)
    server = await start(nursery, tls_files, send_timeout=0.5)
    client = await BioClient.connect(server.port, client_context(tls_files))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.move_on_after(10), contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(100):  # the server stops reading once its writes block
            # ~300 kB of replies to each 16 kB of input
            await client.sendall(client.encrypt(b"\n" * 16000))
    closed = await wait_for_event(logs, "connection_closed", within=10)
    assert closed["reason"] == "send-timeout"
    assert close_notifies == []


@pytest.mark.usefixtures("info_level")
async def test_a_tls_client_that_stops_reading_and_sending_is_reset_after_the_send_timeout(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS client sends a burst whose encrypted replies the server's kernel takes in full
    but its own cannot, then neither reads nor sends: no write of the server waits, yet it
    is dropped as send-timeout (not kept until the idle timeout), with a reset and without
    a close_notify (it could not be delivered behind the stuck replies)."""
    close_notifies = count_close_notifies(monkeypatch)
    server = await start(nursery, tls_files, send_timeout=0.5, idle_timeout=60)
    client = await BioClient.connect(server.port, client_context(tls_files), receive_buffer=1)
    await client.sendall(client.encrypt(b"".join(b"message %04d\n" % i for i in range(400))))
    closed = await wait_for_event(logs, "connection_closed", within=5)
    assert closed["reason"] == "send-timeout"
    assert closed["messages"] == 400
    assert 0.5 <= closed["duration"] < 5
    assert close_notifies == []
    with trio.fail_after(5), pytest.raises(ConnectionResetError):
        await _read_to_the_end(client.sock)


@pytest.mark.usefixtures("info_level")
async def test_an_embedders_ssl_stream_client_that_stops_reading_and_sending_is_reset(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    """Served through an embedder's trio.serve_ssl_over_tcp (AckHandler given a
    trio.SSLStream over a SocketStream), a client that sends a burst and then neither reads
    nor sends is dropped as send-timeout with a reset, as on the server's own TLS: the send
    queue of the socket under the SSLStream is looked at."""
    context = server_tls_context(tls_files.server_cert, tls_files.server_key, None)
    handler = AckHandler(ServerConfig(send_timeout=0.5, idle_timeout=60))
    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    client = await BioClient.connect(port, client_context(tls_files), receive_buffer=1)
    await client.sendall(client.encrypt(b"".join(b"message %04d\n" % i for i in range(400))))
    closed = await wait_for_event(logs, "connection_closed", within=5)
    assert closed["reason"] == "send-timeout"
    assert closed["messages"] == 400
    with trio.fail_after(5), pytest.raises(ConnectionResetError):
        await _read_to_the_end(client.sock)


async def _read_to_the_end(sock: trio.socket.SocketType) -> None:
    while await sock.recv(65536):
        pass


async def test_a_record_that_does_not_decrypt_ends_the_connection_with_the_alert(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    """A complete message and a forged record in one read: OpenSSL encrypts nothing after
    the failure, so the message is not acknowledged (the client will resend it); the client
    is told why with the alert, and the server logs one line."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    good = client.encrypt(b"ok\n")
    forged = bytes([23, 3, 3, 0, 20]) + b"\x00" * 20  # an application record, bad tag
    await client.sendall(good + forged)
    with trio.fail_after(5):
        replies = await client.read_all()
    assert replies == b""
    assert client.alert == "SSLV3_ALERT_BAD_RECORD_MAC"
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-error"


async def test_a_record_that_does_not_decrypt_alone_in_a_read_ends_the_connection(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    """A forged record that is a read of its own (the path that takes exactly one whole
    record) fails like one among others: the alert, and one line."""
    server = await start(nursery, tls_files)
    client = await BioClient.connect(server.port, client_context(tls_files))
    await client.sendall(client.encrypt(b"ok\n"))
    assert await client.read_line() == ack_line(1, b"ok")
    await client.sendall(bytes([23, 3, 3, 0, 20]) + b"\x00" * 20)
    with trio.fail_after(5):
        assert await client.read_all() == b""
    assert client.alert == "SSLV3_ALERT_BAD_RECORD_MAC"
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-error"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_key_update_between_messages_is_answered(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """A client's TLS 1.3 KeyUpdate that asks for ours (a record of its own, between two
    messages: no data in it) gets the server's KeyUpdate back, and the messages on either
    side are acknowledged under the new keys. Python's ssl cannot send one: ``openssl
    s_client`` does (its ``K`` command)."""
    server = await start(nursery, tls_files)
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}"]
    command += ["-CAfile", str(tls_files.ca), "-tls1_3", "-msg"]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None
    assert process.stdout is not None
    output = b""

    async def read_until(wanted: bytes) -> None:
        nonlocal output
        assert process.stdout is not None
        with trio.fail_after(10):
            while wanted not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output.decode(errors="replace")
                output += chunk

    try:
        await process.stdin.send_all(b"hello\n")
        await read_until(ack_line(1, b"hello"))
        await process.stdin.send_all(b"K\n")  # s_client's command: a KeyUpdate, ours asked
        await read_until(b">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
        await trio.sleep(0.2)  # so it reaches the server as a read of its own
        await process.stdin.send_all(b"world\n")
        await read_until(ack_line(2, b"world"))
        # OpenSSL sends the KeyUpdate asked of it with its next record, ahead of the ACK.
        assert b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate" in output
    finally:
        process.kill()
        await process.wait()
        await process.stdin.aclose()
        await process.stdout.aclose()


async def test_a_split_client_hello_on_a_plain_port_is_still_recognised(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    server = await start(nursery, tls_files, tls=False)
    hello = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    stream = await plain(server.port)
    await stream.send_all(client_hello[:3])
    await trio.sleep(0.05)  # a read of its own on the server
    await stream.send_all(client_hello[3:])
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed, no ACK for the bytes
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "tls-on-plain-port"
    assert closed["messages"] == 0


async def test_shutdown_does_not_wait_for_a_stalled_handshake(
    nursery: trio.Nursery, tls_files: TLSFiles, logs: EventList
) -> None:
    """Neither an admitted connection nor a refused one (over the per-address limit) that
    stalls in its handshake holds a graceful shutdown up."""
    server = await start(nursery, tls_files, max_connections_per_ip=1, tls_handshake_timeout=30)
    stalled = []
    for _ in range(2):  # the first is admitted, the second refused
        sock = trio.socket.socket()
        OPENED_SOCKETS.append(sock)
        await sock.connect(("127.0.0.1", server.port))
        stalled.append(sock)
    await wait_for_event(logs, "connection_refused")
    with trio.fail_after(5):
        server.shutdown()
        await wait_for_event(logs, "shutdown_complete")


async def test_refused_clients_cannot_hold_many_descriptors(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """Refusals count against no connection limit, so how many are being told at once is
    bounded (64): beyond that a refused connection is closed at once, without a handshake."""
    server = await start(nursery, tls_files, max_connections_per_ip=1, drain_timeout=5)
    admitted = await connect(server.port, client_context(tls_files))
    flood = []
    for _ in range(70):  # silent: each refusal would wait for a handshake
        sock = trio.socket.socket()
        OPENED_SOCKETS.append(sock)
        await sock.connect(("127.0.0.1", server.port))
        flood.append(sock)

    ended: list[bool] = []

    async def closed_soon(sock: trio.socket.SocketType) -> None:
        with trio.move_on_after(1):
            try:
                ended.append(await sock.recv(100) == b"")
            except ConnectionResetError:
                ended.append(True)

    async with trio.open_nursery() as watching:
        for sock in flood:
            watching.start_soon(closed_soon, sock)
    assert sum(ended) == 70 - 64
    await admitted.send_all(b"still served\n")
    assert await LineReader(admitted).line() == ack_line(1, b"still served")[:-1]


async def test_a_shutdown_before_the_handshake_began_does_not_wait_for_it(
    tls_files: TLSFiles, logs: EventList
) -> None:
    """Admitted, then the shutdown begins before the connection's task first runs: nothing
    was waiting to be woken, and the handshake must not be begun at all."""
    handler = AckHandler(
        ServerConfig(), tls=server_tls_context(tls_files.server_cert, tls_files.server_key)
    )
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with theirs, trio.fail_after(2):  # the handshake timeout is 10 s
        async with trio.open_nursery() as nursery:
            handler.start_socket(nursery, ours, ("127.0.0.1", 1))
            handler.begin_shutdown()
    closed = await wait_for_event(logs, "connection_closed")
    assert closed["reason"] == "shutting-down"
