"""What a load generator run is asked to do: ``LoadSpec``, and the limits on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

__all__ = ["MAX_CONNECTIONS", "MAX_RUN_SECONDS", "MAX_SIZE", "MAX_WINDOW", "LoadSpec", "TLSSpec"]

MAX_CONNECTIONS: Final = 10_000
MAX_WINDOW: Final = 65_536
MAX_SIZE: Final = 4 << 20
# No run is longer than this, whatever the settings (a --messages run without --duration
# stops here too).
MAX_RUN_SECONDS: Final = 3600.0


@dataclass(frozen=True, slots=True)
class TLSSpec:
    """Connect over TLS: file names rather than a context, so that a spec travels to
    ``--procs`` workers (an ``ssl.SSLContext`` cannot be pickled); each process makes its
    own context with ``client_tls_context``.

    Attributes:
        ca: PEM file of a private CA; ``None``: the system's CAs.
        cert, key: the client certificate and its key (the key may be in ``cert``).
        server_name: the name the server's certificate must carry; ``None``: the host.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send, how, and for how long (one process's share of it, with ``--procs``).

    Attributes:
        host, port: the server; the only address this load generator ever connects to.
        connections: connections of this process (churn: connection slots, each opening
            one connection per message).
        window: messages in flight per connection (1 = request/response).
        size: payload bytes per message.
        duration: seconds of measurement; ``None`` only with ``messages``.
        messages: stop after this many messages sent in the measurement window.
        warmup: seconds of load before the measurement window, excluded from the stats.
        churn: connect, send one message, read its reply, close; repeat.
        rate: open loop at this many messages per second (``None``: closed loop).
        reply_timeout: seconds a message may wait for its reply.
        connect_timeout: seconds a connection attempt may take (with TLS, the handshake
            included).
        tls: connect over TLS with these settings; ``None``: plain TCP.
        first_connection, total_connections: this process's place among all connections
            (for payload salts and open-loop schedules spread over every process).
    """

    host: str = "127.0.0.1"
    port: int = 9876
    connections: int = 16
    window: int = 1
    size: int = 64
    duration: float | None = 5.0
    messages: int | None = None
    warmup: float = 0.0
    churn: bool = False
    rate: float | None = None
    reply_timeout: float = 10.0
    connect_timeout: float = 5.0
    tls: TLSSpec | None = None
    first_connection: int = 0
    total_connections: int = 0  # 0: the same as `connections`

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be from 1 to {MAX_CONNECTIONS}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be from 1 to {MAX_WINDOW}")
        if self.churn and self.window != 1:
            raise ValueError("churn sends one message per connection; window must be 1")
        if not 0 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be from 0 to {MAX_SIZE}")
        if self.duration is None and self.messages is None:
            raise ValueError("a run needs a duration or a message count")
        run_seconds = self.warmup + (self.duration or 0.0)
        if not (self.warmup >= 0 and run_seconds <= MAX_RUN_SECONDS):
            raise ValueError(f"warm-up plus duration must be at most {MAX_RUN_SECONDS:g} s")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if self.messages is not None and self.messages < 0:
            raise ValueError("messages must be >= 0")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of messages per second")
        if not (self.reply_timeout > 0 and self.connect_timeout > 0):
            raise ValueError("timeouts must be positive")

    @property
    def all_connections(self) -> int:
        """Connections over every process."""
        return self.total_connections or self.connections

    def split(self, parts: int) -> list[LoadSpec]:
        """This load spread over ``parts`` processes: connections, messages and rate."""
        if not 1 <= parts <= self.connections:
            raise ValueError(f"cannot spread {self.connections} connections over {parts}")
        total = self.connections
        shares = [total // parts + (i < total % parts) for i in range(parts)]
        specs = []
        first = 0
        given = 0
        for share in shares:
            messages = None
            if self.messages is not None:
                # Cumulative rounding, so the shares add up to exactly `messages`.
                messages = self.messages * (first + share) // total - given
                given += messages
            specs.append(
                replace(
                    self,
                    connections=share,
                    messages=messages,
                    rate=None if self.rate is None else self.rate * share / total,
                    first_connection=first,
                    total_connections=total,
                )
            )
            first += share
        return specs
