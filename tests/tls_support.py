"""Real certificates for the TLS tests, and the embedding path's TLS server.

``write_tls_files(directory)`` makes, with trustme, a CA, a server certificate for
``127.0.0.1``, ``::1`` and ``localhost``, a client certificate, and an unrelated second CA
with a client certificate of its own, all as PEM files; the ``tls_files`` fixture (in
tests/conftest.py) writes them once per test session. The library's
``ackservice.server.server_tls_context(files.server_cert, files.server_key, files.ca)``
turns them into a server context (without the CA: no client certificate required).

Tests of clients run against two servers:

- the server users run: ``serve(config, tls=context)`` (``start_server(tls=...)`` in
  tests/client/conftest.py). It sends OpenSSL's alert when a handshake fails
  (``certificate required``, ``unknown ca``), and close_notify when it closes.
- ``serve_ack_tls`` (here): the library's ``AckHandler`` behind
  ``trio.serve_ssl_over_tcp``, the embedding API's TLS, which takes any stream. Trio's
  ``SSLStream`` does not send the alert when its handshake fails, so its clients see only a
  truncated connection: the case of a server that refuses without saying why.

``BioClient`` is a TLS client over memory BIOs, for tests that choose exactly which bytes go
out when (close_notify as a half-close, records in slices), and ``client_context`` the
client side of ``write_tls_files``'s CA.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
import trustme

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


async def serve_ack_tls(
    nursery: trio.Nursery, context: ssl.SSLContext, handler: AckHandler | None = None
) -> int:
    """Serve ``AckHandler`` (no store) over TLS on 127.0.0.1 in ``nursery``; return the port."""
    handler = handler or AckHandler(ServerConfig(), store=None)
    listeners: list[trio.SSLListener[trio.SocketStream]] = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    return int(listeners[0].transport_listener.socket.getsockname()[1])


OPENED_SOCKETS: list[trio.socket.SocketType] = []
"""Client sockets the TLS tests opened; closed after each test (conftest.py)."""


def client_context(
    files: TLSFiles, *, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class BioClient:
    """A TLS client over a blocking-free Trio socket with memory BIOs, so a test controls
    exactly which bytes go out when: close_notify as a half-close, records in slices."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.closed_cleanly = False
        self.alert: str | None = None

    @classmethod
    async def connect(
        cls, port: int, context: ssl.SSLContext, *, receive_buffer: int | None = None
    ) -> BioClient:
        """Connect and complete the handshake (``receive_buffer``: SO_RCVBUF, set before
        connecting so that the window it allows is the one the server sees)."""
        sock = trio.socket.socket()
        OPENED_SOCKETS.append(sock)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(sock, context)
        while True:
            try:
                client.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client.flush()
                client.incoming.write(await sock.recv(65536))
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.sendall(data)

    async def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    def encrypt(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's comes later
            self.tls.unwrap()
        return self.outgoing.read()

    async def read_line(self) -> bytes:
        """The next reply line (with its newline), when the server sends one at a time."""
        received = b""
        with trio.fail_after(5):
            while not received.endswith(b"\n"):
                self.incoming.write(await self.sock.recv(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    received += self.tls.read(65536)
        return received

    async def read_all(self) -> bytes:
        """Everything the server sends until its close_notify (``closed_cleanly``) or the
        end of the TCP stream."""
        received = b""
        while True:
            data = await self.sock.recv(65536)
            if not data:
                return received
            self.incoming.write(data)
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    chunk = b""
                except ssl.SSLError as exc:  # the server's alert
                    self.alert = exc.reason
                    return received
                if not chunk:
                    self.closed_cleanly = True
                    return received
                received += chunk
