"""Real certificates for the TLS tests, and TLS servers to test clients against.

``write_tls_files(directory)`` makes, with trustme, a CA, a server certificate for
``127.0.0.1``, ``::1`` and ``localhost``, a client certificate, and an unrelated second CA
with a client certificate of its own, all as PEM files; the ``tls_files`` fixture (in
tests/conftest.py) writes them once per test session. ``server_tls_context`` turns them into
a server context, with or without client-certificate checking (mutual TLS).

Two servers for tests of clients:

- ``serve_ack_tls``: the library's ``AckHandler`` behind ``trio.serve_ssl_over_tcp``,
  the embedding API's TLS, which takes any stream.
- ``AlertingTLSServer``: a small ack server doing TLS with ``ssl.MemoryBIO`` that, unlike
  Trio's ``SSLStream``, sends the alert OpenSSL writes when the handshake fails
  (``certificate required``, ``unknown ca``) before closing, as a TLS server should. Trio's
  ``SSLStream`` drops it, so its clients see only a truncated connection.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
import trustme

from ackservice.protocol import MessageFramer, Oversized, ack_line
from ackservice.server import AckHandler, ServerConfig

SERVER_NAMES = ("127.0.0.1", "::1", "localhost")
CLIENT_COMMON_NAME = "ackservice-test-client"
"""The subject CN of both client certificates (``CN=ackservice-test-client``)."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files made by ``write_tls_files``.

    Attributes:
        ca: the CA that signed the server and client certificates.
        server_cert, server_key: the server's chain (for 127.0.0.1, ::1, localhost) and key.
        client_cert, client_key: a client certificate signed by ``ca``, and its key.
        client_combined: the same client key and certificate in one file.
        other_ca: an unrelated CA, which signed nothing the server presents.
        other_client_cert, other_client_key: a client certificate signed by ``other_ca``.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def write_tls_files(directory: Path) -> TLSFiles:
    """Make the CAs and certificates (ECDSA P-256) and write them into ``directory``."""
    ca = trustme.CA()
    other_ca = trustme.CA()
    server = ca.issue_cert(*SERVER_NAMES)
    client = ca.issue_cert("client.example", common_name=CLIENT_COMMON_NAME)
    other_client = other_ca.issue_cert("client.example", common_name=CLIENT_COMMON_NAME)
    files = TLSFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_combined=directory / "client-combined.pem",
        other_ca=directory / "other-ca.pem",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    other_ca.cert_pem.write_to_path(str(files.other_ca))
    for leaf, cert_path, key_path in (
        (server, files.server_cert, files.server_key),
        (client, files.client_cert, files.client_key),
        (other_client, files.other_client_cert, files.other_client_key),
    ):
        leaf.private_key_pem.write_to_path(str(key_path))
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    combined = files.client_key.read_bytes() + files.client_cert.read_bytes()
    files.client_combined.write_bytes(combined)
    return files


def server_tls_context(files: TLSFiles, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context presenting ``files.server_cert``; with ``client_ca``, a client
    certificate signed by that CA is required (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.server_cert, files.server_key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


async def serve_ack_tls(
    nursery: trio.Nursery, context: ssl.SSLContext, handler: AckHandler | None = None
) -> int:
    """Serve ``AckHandler`` (no store) over TLS on 127.0.0.1 in ``nursery``; return the port."""
    handler = handler or AckHandler(ServerConfig(), store=None)
    listeners: list[trio.SSLListener[trio.SocketStream]] = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    return int(listeners[0].transport_listener.socket.getsockname()[1])


class AlertingTLSServer:
    """An ack server over TLS that sends its alert when a handshake fails (see above).

    Attributes:
        connections: connections accepted.
        handshake_failures: OpenSSL's reasons for the handshakes it refused, in order.
        clean_ends: connections the client ended with close_notify.
        ended: set when the first connection has ended.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.connections = 0
        self.handshake_failures: list[str] = []
        self.clean_ends = 0
        self.ended = trio.Event()

    async def start(self, nursery: trio.Nursery) -> int:
        """Listen on 127.0.0.1 in ``nursery``; the port."""
        listeners: list[trio.SocketListener] = await nursery.start(
            functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1")
        )
        return int(listeners[0].socket.getsockname()[1])

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)

        async def flush() -> None:
            if data := outgoing.read():
                await stream.send_all(data)

        async def fill() -> None:
            data = await stream.receive_some(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()

        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await flush()
                    await fill()
                except ssl.SSLError as exc:
                    self.handshake_failures.append(exc.reason or str(exc))
                    await flush()  # the alert: what Trio's SSLStream leaves unsent
                    return
            await flush()
            framer = MessageFramer()
            seq = 0
            while True:
                try:
                    data = tls.read(65536)
                except ssl.SSLWantReadError:
                    await flush()
                    await fill()
                    continue
                if not data:  # close_notify (a bare TCP close raises SSLEOFError instead)
                    self.clean_ends += 1
                    return
                replies = []
                for frame in framer.feed(data):
                    assert not isinstance(frame, Oversized)
                    seq += 1
                    replies.append(ack_line(seq, frame))
                if replies:
                    tls.write(b"".join(replies))
                    await flush()
        except (ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self.ended.set()
