"""Server settings: one frozen value object shared by the handler, the listener and the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["ServerConfig"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every limit and timeout of the server, with production defaults.

    Attributes:
        host: address to listen on; loopback unless the operator opts in to more.
        port: TCP port; 0 picks a free one (``Server.port`` reports it).
        max_message_bytes: largest payload accepted; longer messages get ``ERR too-large``.
        max_connections: connections served at once; the next one gets ``ERR 0 busy``.
        idle_timeout: seconds without a complete message before ``ERR 0 idle-timeout``.
            Restarting only on complete messages also bounds a client that trickles bytes.
        send_timeout: seconds a client may leave its replies unread before it is dropped, so
            a client that never reads cannot pin server memory.
        shutdown_grace: seconds a graceful shutdown waits for connections to finish.
        drain_timeout: seconds spent reading and discarding after a final ``ERR 0`` line and
            a half-close, so unread client input does not make the kernel reset the
            connection and destroy that line in flight.
        tcp_keepalive: seconds of silence before TCP keepalive probes start (then every third
            of that, three probes, as Redis does); 0 leaves the system default (two hours).
        store_timeout: seconds one store commit may take; past it its messages are answered
            ``ERR <seq> unavailable`` (safe to resend). Shorter than the client's default
            ack timeout (10 s), so clients hear "unavailable" rather than time out.
        max_pending_store_bytes: payload bytes waiting for or in a store commit beyond which
            connections stop reading, so a slow store slows clients instead of filling memory.
        hook_timeout: seconds the ``on_message`` hook may take for one message before that
            message is answered ``unavailable``: a stuck application cannot hold connection
            slots forever.
    """

    host: str = "127.0.0.1"
    port: int = 9876
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connections: int = 10_000
    idle_timeout: float = 300.0
    send_timeout: float = 10.0
    shutdown_grace: float = 10.0
    drain_timeout: float = 2.0
    tcp_keepalive: int = 300
    store_timeout: float = 5.0
    max_pending_store_bytes: int = 64 * 1024 * 1024
    hook_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, got {self.port}")
        if self.max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {self.max_message_bytes}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_pending_store_bytes < 1:
            raise ValueError(
                f"max_pending_store_bytes must be >= 1, got {self.max_pending_store_bytes}"
            )
        if self.tcp_keepalive < 0:
            raise ValueError(f"tcp_keepalive must be >= 0, got {self.tcp_keepalive}")
        for field in fields(self):
            if field.type == "float":
                value = getattr(self, field.name)
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(f"{field.name} must be a positive number, got {value}")
