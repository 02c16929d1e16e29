"""The ackservice client: send messages and get verified acknowledgments back.

::

    async with open_client("127.0.0.1", 9876) as client:
        ack = await client.send(b"hello")            # Ack(seq=1, nbytes=5, crc32=...)
        async for receipt in client.send_many(lines):  # pipelined, in order
            ...

Over TLS: ``open_client(host, port, tls=client_tls_context(ca="ca.pem"))``.

Delivery is at-least-once: after a reconnect every unacknowledged message is sent again,
so the server may receive some twice. ``python -m ackservice.client`` is the command line.
"""

from __future__ import annotations

from ..errors import (
    AckMismatchError,
    AckServiceError,
    AckTimeoutError,
    ConnectError,
    ConnectionLostError,
    MessageRejectedError,
    ProtocolError,
    ServerRefusedError,
    TLSError,
)
from ..protocol import Ack, Err
from .config import ClientConfig
from .connection import Client, StreamOpener, open_client
from .message import ClientStats, Receipt
from .pipeline import Deliveries
from .tls import client_tls_context

__all__ = [
    "Ack",
    "AckMismatchError",
    "AckServiceError",
    "AckTimeoutError",
    "Client",
    "ClientConfig",
    "ClientStats",
    "ConnectError",
    "ConnectionLostError",
    "Deliveries",
    "Err",
    "MessageRejectedError",
    "ProtocolError",
    "Receipt",
    "ServerRefusedError",
    "StreamOpener",
    "TLSError",
    "client_tls_context",
    "open_client",
]
