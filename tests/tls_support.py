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
"""

from __future__ import annotations

import functools
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
