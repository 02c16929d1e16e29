"""Socket options the server sets."""

from __future__ import annotations

import contextlib
import socket
import sys

import trio

__all__ = ["ACCEPTED_SOCKETS_INHERIT_OPTIONS", "configure_listening_socket", "enable_keepalive"]

# Linux copies TCP_NODELAY, SO_KEEPALIVE and the TCP_KEEP* settings of a listening socket to
# the sockets it accepts, which saves five system calls per connection; elsewhere they are set
# on each (Trio's SocketStream sets TCP_NODELAY).
ACCEPTED_SOCKETS_INHERIT_OPTIONS = sys.platform == "linux"


def configure_listening_socket(sock: trio.socket.SocketType, keepalive_idle: int) -> None:
    """Set what accepted sockets should have: no Nagle delay (each reply leaves at once) and
    keepalive (see ``enable_keepalive``)."""
    with contextlib.suppress(OSError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    enable_keepalive(sock, keepalive_idle)


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
