"""Socket options the server sets."""

from __future__ import annotations

import socket
import sys

import trio

__all__ = ["ACCEPTED_SOCKETS_INHERIT_KEEPALIVE", "enable_keepalive"]

# Linux copies SO_KEEPALIVE and the TCP_KEEP* settings of a listening socket to the sockets it
# accepts, which saves four system calls per connection; elsewhere they are set on each.
ACCEPTED_SOCKETS_INHERIT_KEEPALIVE = sys.platform == "linux"


def enable_keepalive(sock: trio.socket.SocketType, idle: int) -> None:
    """Probe silent peers after ``idle`` s (then every idle/3 s, 3 probes), as Redis does.

    Linux's default of two hours before the first probe is useless for finding dead peers.
    ``idle`` 0 leaves the system default.
    """
    if idle <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        # Not every socket family takes these options (e.g. a Unix socket); keepalive is
        # a safety net, and the idle timeout still bounds a dead peer.
        pass
