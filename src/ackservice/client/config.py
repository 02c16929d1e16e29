"""Client settings: one frozen value object shared by the connection and the CLI."""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass

__all__ = ["ClientConfig"]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where to connect and how long to wait, with the CLI's defaults.

    Attributes:
        host: server address.
        port: server TCP port.
        connect_timeout: seconds one connection attempt may take.
        ack_timeout: seconds the oldest unacknowledged message may wait for its reply.
            It bounds a server that accepts messages but never answers; when it expires
            the client gives up (``AckTimeoutError``) rather than reconnect, because a
            server that is alive but silent is not helped by more load.
        retries: connection attempts allowed after a failed one, counted over consecutive
            failures (any reply on a connection starts the count over), and resends allowed
            for one message answered ``unavailable``; ``None``: as many as ``retry_for``
            allows.
        retry_for: seconds a run of failures may last: from the first failed connection
            attempt (or the first ``unavailable`` answer to a message) no retry starts
            after this long. ``0`` never retries. The default rides out a server restart
            or a store outage of up to 30 s.
        window: messages written but not yet answered, at most.
        backoff_base: first backoff bound in seconds; it doubles after each failure.
        backoff_cap: largest backoff bound in seconds.
        tls: connect over TLS with this context (``client_tls_context`` makes one);
            ``None``: plain TCP.
        tls_server_name: the name the server's certificate must carry, also sent as SNI;
            ``None``: ``host``. For connecting by address to a server whose certificate
            names it otherwise.
    """

    host: str = "127.0.0.1"
    port: int = 9876
    connect_timeout: float = 5.0
    ack_timeout: float = 10.0
    retries: int | None = None
    retry_for: float = 30.0
    window: int = 256
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    tls: ssl.SSLContext | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be from 1 to 65535, got {self.port}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries must be >= 0 or None, got {self.retries}")
        if not (self.retry_for >= 0 and math.isfinite(self.retry_for)):
            raise ValueError(f"retry_for must be a number >= 0, got {self.retry_for}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.tls_server_name is not None:
            if self.tls is None:
                raise ValueError("tls_server_name applies only with tls")
            if not self.tls_server_name:
                raise ValueError("tls_server_name must not be empty")
        for name in ("connect_timeout", "ack_timeout", "backoff_base", "backoff_cap"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")

    @property
    def address(self) -> str:
        """``host:port`` as people write it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
