"""Server settings: one frozen value object shared by the handler, the listener and the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Network

from ..protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["LIMITS", "ServerConfig"]

# The range of each numeric setting, inclusive; the CLI checks the same ones (README table).
# Why these bounds:
# - max_message_bytes: the framer may hold this much per connection; 1 GiB is past any use.
# - max_connections: each costs a file descriptor; a million is past any open-file limit.
# - tcp_keepalive: Linux refuses TCP_KEEPIDLE above 32767 s (MAX_TCP_KEEPIDLE).
# - max_pending_store_bytes: memory held for the store; 16 GiB is past any sane setting.
# - seconds: above 0 and finite; a day at most (idle: a week), so a typo such as 3e9 is
#   refused instead of meaning "never".
LIMITS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "max_message_bytes": (0, 1 << 30),
    "max_connections": (1, 1_000_000),
    "tcp_keepalive": (0, 32767),
    "max_pending_store_bytes": (1, 1 << 34),
    "idle_timeout": (0, 604_800),
    "send_timeout": (0, 86_400),
    "shutdown_grace": (0, 86_400),
    "drain_timeout": (0, 86_400),
    "store_timeout": (0, 86_400),
    "hook_timeout": (0, 86_400),
    "tls_handshake_timeout": (0, 86_400),
    "max_connections_per_ip": (0, 1_000_000),
}


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
        tls_handshake_timeout: seconds a TLS client has to complete its handshake, so one
            that connects and stalls does not hold a slot for the idle timeout.
        allow: the client networks served (``ipaddress`` networks); empty: everyone.
            Others are told ``ERR 0 forbidden``.
        max_connections_per_ip: connections one client address may hold at once (0: no
            limit); beyond it its new ones are told ``ERR 0 busy``.
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
    tls_handshake_timeout: float = 10.0
    allow: tuple[IPv4Network | IPv6Network, ...] = ()
    max_connections_per_ip: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name not in LIMITS:
                continue
            lowest, highest = LIMITS[field.name]
            value = getattr(self, field.name)
            if field.type == "float":
                # Durations: above 0 (lowest is exclusive), finite, at most highest.
                if not (lowest < value <= highest and math.isfinite(value)):
                    raise ValueError(
                        f"{field.name} must be above {lowest} and at most {highest}, got {value}"
                    )
            elif not lowest <= value <= highest:
                raise ValueError(f"{field.name} must be from {lowest} to {highest}, got {value}")
