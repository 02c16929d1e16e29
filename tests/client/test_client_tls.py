"""The library over TLS, with real certificates (trustme) and real TLS servers on loopback
(the server users run, and the library's AckHandler behind Trio's SSLStream): a verified
round trip, and every TLS failure final, clear and never retried."""

from __future__ import annotations

import os
import re
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from client_fakes import StartFake, StartServer
from structlog.testing import capture_logs

from ackservice.client import (
    Ack,
    ClientConfig,
    ConnectError,
    ConnectionLostError,
    ServerRefusedError,
    TLSError,
    client_tls_context,
    open_client,
)
from ackservice.protocol import err_line
from ackservice.server import Server, server_tls_context
from tls_support import TLSFiles, serve_ack_tls

# Retries that would show within a test's time if anything were retried by mistake.
FAST_RETRY = {"retry_for": 5.0, "backoff_base": 0.01, "backoff_cap": 0.05}


@pytest.fixture
async def tls_port(nursery: trio.Nursery, tls_files: TLSFiles) -> int:
    """The library's AckHandler over TLS (trio.serve_ssl_over_tcp)."""
    return await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key)
    )


@pytest.fixture
async def mutual_server(start_server: StartServer, tls_files: TLSFiles) -> Server:
    """The real server requiring a client certificate from ``tls_files.ca``; it sends its
    alert when it refuses one."""
    return await start_server(
        tls=server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    )


async def wait_for_events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The captured events called ``name``, once there is one (the server logs in its own
    task, a few ms after the client is done)."""
    with trio.fail_after(5):
        while not (events := [e for e in logs if e["event"] == name]):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return events


async def test_round_trip_over_tls(tls_port: int, tls_files: TLSFiles) -> None:
    """With the private CA, messages go through TLS and come back verified, one by one
    and pipelined."""
    context = client_tls_context(ca=tls_files.ca)
    async with open_client("127.0.0.1", tls_port, tls=context) as client:
        assert await client.send(b"hello") == Ack(1, 5, 0x3610A686)
        receipts = [r async for r in client.send_many(b"m%d" % i for i in range(500))]
    assert all(receipt.acked for receipt in receipts)
    assert client.stats.acked == 501
    assert client.stats.connections == 1


async def test_server_name_is_what_the_certificate_must_carry(
    tls_port: int, tls_files: TLSFiles
) -> None:
    """Connecting by address, ``tls_server_name`` names the certificate to expect
    (``localhost`` is in the server's certificate)."""
    context = client_tls_context(ca=tls_files.ca)
    async with open_client(
        "127.0.0.1", tls_port, tls=context, tls_server_name="localhost"
    ) as client:
        assert (await client.send(b"x")).seq == 1


async def test_unknown_ca_fails_at_connect_without_retrying(
    start_server: StartServer, tls_files: TLSFiles
) -> None:
    """A server certificate from a CA the client does not trust: ``TLSError`` from
    ``open_client`` on the first attempt, saying what failed and what to check."""
    server = await start_server(tls=server_tls_context(tls_files.server_cert, tls_files.server_key))
    port = server.port
    with pytest.raises(TLSError) as caught:
        async with open_client(
            "127.0.0.1", port, tls=client_tls_context(ca=tls_files.other_ca), **FAST_RETRY
        ):
            pytest.fail("connected with an untrusted certificate")
    message = str(caught.value)
    assert message.startswith(f"cannot connect to 127.0.0.1:{port}: TLS handshake failed:")
    assert "certificate did not verify: unable to get local issuer certificate" in message
    assert "check --tls-ca" in message
    assert "\n" not in message
    assert caught.value.reason == "CERTIFICATE_VERIFY_FAILED"
    assert isinstance(caught.value, ConnectError)
    assert server.handler.stats.connections == 1


async def test_wrong_server_name_fails_at_connect(tls_port: int, tls_files: TLSFiles) -> None:
    """A certificate for other names: the error says to check the server name."""
    with pytest.raises(TLSError, match=r"Hostname mismatch.*check --tls-server-name"):
        async with open_client(
            "127.0.0.1",
            tls_port,
            tls=client_tls_context(ca=tls_files.ca),
            tls_server_name="elsewhere.example",
            **FAST_RETRY,
        ):
            pytest.fail("connected to a certificate for another name")


async def test_mutual_tls_accepts_a_client_certificate_from_its_ca(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """A server requiring client certificates acknowledges a client that has one, given as
    separate files or as one combined file."""
    port = await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    )
    for context in (
        client_tls_context(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key),
        client_tls_context(ca=tls_files.ca, cert=tls_files.client_combined),
    ):
        async with open_client("127.0.0.1", port, tls=context) as client:
            assert (await client.send(b"mutual")).nbytes == 6


@pytest.mark.parametrize(
    ("with_certificate", "alert", "reason"),
    [
        (False, "tlsv13 alert certificate required", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        (True, "tlsv1 alert unknown ca", "TLSV1_ALERT_UNKNOWN_CA"),
    ],
)
async def test_refused_client_certificate_is_final_and_names_the_alert(
    mutual_server: Server,
    tls_files: TLSFiles,
    with_certificate: bool,
    alert: str,
    reason: str,
) -> None:
    """With TLS 1.3 the server checks the client certificate after the client's handshake
    completed, so its alert arrives with the first read: every message fails with a
    ``TLSError`` naming the alert (not a reset), and the client does not reconnect."""
    port = mutual_server.port
    cert = tls_files.other_client_cert if with_certificate else None
    key = tls_files.other_client_key if with_certificate else None
    context = client_tls_context(ca=tls_files.ca, cert=cert, key=key)
    async with open_client("127.0.0.1", port, tls=context, **FAST_RETRY) as client:
        with pytest.raises(TLSError) as caught:
            await client.send(b"hello")
        with pytest.raises(TLSError):
            await client.send(b"again")
    message = str(caught.value)
    assert message.startswith(f"127.0.0.1:{port} refused the TLS connection: {alert};")
    assert "--tls-cert" in message
    assert caught.value.reason == reason
    assert mutual_server.handler.stats.connections == client.stats.connections == 1


@pytest.mark.parametrize(
    ("plain_server", "openssl_says"),
    [
        ("closes", "EOF occurred in violation of protocol"),
        ("answers in plaintext", "wrong version number"),
    ],
)
async def test_tls_client_on_a_plain_port_is_told_so(
    start_fake: StartFake, tls_files: TLSFiles, plain_server: str, openssl_says: str
) -> None:
    """A plaintext server that closes at the ClientHello, or answers it in plaintext:
    the handshake fails at once with a line saying the port does not serve TLS."""

    async def closes(stream: trio.abc.Stream) -> None:
        await stream.receive_some()

    async def answers(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(err_line(0, "busy", "too many connections"))

    port = await start_fake(closes if plain_server == "closes" else answers)
    with pytest.raises(TLSError) as caught:
        async with open_client(
            "127.0.0.1", port, tls=client_tls_context(ca=tls_files.ca), **FAST_RETRY
        ):
            pytest.fail("a plaintext server passed for TLS")
    message = str(caught.value)
    assert "the server did not answer in TLS" in message
    assert openssl_says in message
    assert message.endswith("is the port serving TLS? (if not, connect without --tls and --tls-ca)")


@pytest.mark.parametrize("code", ["forbidden", "tls-required"])
async def test_final_connection_errors_are_not_retried(start_fake: StartFake, code: str) -> None:
    """``ERR 0 forbidden`` and ``ERR 0 tls-required`` end the client with
    ``ServerRefusedError`` after one connection; ``busy`` stays retried (other tests)."""
    connections = 0

    async def refuse(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await stream.send_all(err_line(0, code, "go away"))

    port = await start_fake(refuse)
    async with open_client("127.0.0.1", port, **FAST_RETRY) as client:
        with pytest.raises(ServerRefusedError) as caught:
            await client.send(b"hello")
    assert caught.value.code == code
    assert caught.value.detail == "go away"
    assert str(caught.value).startswith(f"127.0.0.1:{port} refused this client ({code}: go away);")
    assert connections == 1


async def test_truncation_after_the_handshake_is_retried_and_explained(
    nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """A server that refuses a missing client certificate without sending the alert (Trio's
    own SSLStream, here behind the library's AckHandler): the client sees a TLS connection
    closed without close_notify, the same as a crashed server, so it retries; when the
    budget runs out the error says what it saw and points at the client certificate."""
    port = await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    )
    context = client_tls_context(ca=tls_files.ca)
    async with open_client(
        "127.0.0.1", port, tls=context, retry_for=0.3, backoff_base=0.01, backoff_cap=0.05
    ) as client:
        with pytest.raises(ConnectionLostError) as caught:
            await client.send(b"hello")
    assert caught.value.reason == "closed"
    assert "closed the TLS connection without close_notify before any reply" in str(caught.value)
    assert "--tls-cert" in str(caught.value)
    assert client.stats.connections > 1


async def test_client_ends_a_tls_connection_with_close_notify(
    start_server: StartServer, tls_files: TLSFiles
) -> None:
    """Leaving ``open_client`` sends close_notify: the server reads a clean end of the
    stream (``eof``), not a truncation (``tls-truncated``)."""
    server = await start_server(tls=server_tls_context(tls_files.server_cert, tls_files.server_key))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        context = client_tls_context(ca=tls_files.ca)
        async with open_client("127.0.0.1", server.port, tls=context) as client:
            await client.send(b"bye")
        (closed,) = await wait_for_events(logs, "connection_closed")
    assert closed["reason"] == "eof"
    assert closed["acked"] == 1


async def test_tls_runs_over_the_stream_connect_opens(
    start_fake: StartFake, nursery: trio.Nursery, tls_files: TLSFiles
) -> None:
    """With ``connect=``, TLS wraps whatever stream the opener returns."""
    port = await serve_ack_tls(
        nursery, server_tls_context(tls_files.server_cert, tls_files.server_key)
    )
    opened = 0

    async def connect() -> trio.abc.Stream:
        nonlocal opened
        opened += 1
        return await trio.open_tcp_stream("127.0.0.1", port)

    context = client_tls_context(ca=tls_files.ca)
    async with open_client("localhost", 9, tls=context, connect=connect) as client:
        assert (await client.send(b"wrapped")).seq == 1
    assert opened == 1


def test_server_name_without_tls_is_a_usage_error() -> None:
    """``tls_server_name`` alone would silently do nothing: it is refused."""
    with pytest.raises(ValueError, match="tls_server_name applies only with tls"):
        ClientConfig(tls_server_name="example.org")


class TestContext:
    """``client_tls_context``: files that cannot serve are one-line ``ValueError``s naming
    the file."""

    def test_verifies_with_tls_1_2_at_least(self, tls_files: TLSFiles) -> None:
        context = client_tls_context(ca=tls_files.ca)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.pem"
        with pytest.raises(ValueError, match=re.escape(f"cannot read the TLS CA file '{missing}'")):
            client_tls_context(ca=missing)

    def test_a_fifo_is_refused_at_once(self, tmp_path: Path) -> None:
        """Opening a FIFO nobody writes to would block until someone does: in a thread, so
        that such a hang fails the test instead of holding the suite."""
        fifo = tmp_path / "ca.fifo"
        os.mkfifo(fifo)
        errors: list[BaseException] = []

        def load() -> None:
            try:
                client_tls_context(ca=fifo)
            except ValueError as exc:
                errors.append(exc)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        loader.join(10)
        assert not loader.is_alive(), "still opening the FIFO"
        [error] = errors
        assert f"cannot read the TLS CA file '{fifo}'" in str(error)
        assert "FIFO" in str(error)

    def test_not_pem(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        with pytest.raises(
            ValueError,
            match=re.escape(f"no PEM certificate in the TLS client certificate '{junk}'"),
        ):
            client_tls_context(cert=junk)

    def test_key_that_does_not_match(self, tls_files: TLSFiles) -> None:
        with pytest.raises(ValueError, match="does not match the certificate"):
            client_tls_context(cert=tls_files.client_cert, key=tls_files.other_client_key)

    def test_certificate_without_key(self, tls_files: TLSFiles) -> None:
        with pytest.raises(ValueError, match="no private key in the TLS client certificate"):
            client_tls_context(cert=tls_files.client_cert)

    def test_key_without_certificate(self, tls_files: TLSFiles) -> None:
        with pytest.raises(ValueError, match="needs its certificate"):
            client_tls_context(key=tls_files.client_key)
