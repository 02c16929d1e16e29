"""The addresses the server listens on, and the socket options it sets."""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
from typing import Any

import trio

__all__ = [
    "ACCEPTED_SOCKETS_INHERIT_OPTIONS",
    "EVERY_INTERFACE",
    "bind_sockets",
    "configure_listening_socket",
    "enable_keepalive",
    "format_address",
    "listen_addresses",
    "open_listeners",
    "parse_hosts",
]

# The --host value meaning "every interface, IPv4 and IPv6": one socket on 0.0.0.0 and one
# on :: with IPV6_V6ONLY (what Trio and nginx do for a wildcard), rather than one dual-stack
# socket, whose IPv4 peers would appear as ::ffff:a.b.c.d and which some systems disable.
# "0.0.0.0" alone is IPv4 only and "::" alone IPv6 only, as everywhere else.
EVERY_INTERFACE = "*"
# The listen backlog asked for, as Trio asks: the kernel lowers it to its own maximum
# (net.core.somaxconn); more than 65535 overflows a 16-bit field on some systems.
_BACKLOG = 0xFFFF

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


def parse_hosts(text: str) -> tuple[str, ...]:
    """The addresses in a ``--host`` value: comma-separated; IPv6 ones may be bracketed
    (``[::1]``); ``*`` means every interface.

    Raises:
        ValueError: the value (or one of its items) is empty, or a bracket is unmatched.
    """
    hosts = []
    for item in text.split(","):
        host = item.strip()
        if host.startswith("[") or host.endswith("]"):
            if not (host.startswith("[") and host.endswith("]")) or ":" not in host:
                raise ValueError(f"expected an address such as [::1], got {host!r}")
            host = host[1:-1].strip()
        if not host:
            if not text.strip():
                raise ValueError("expected a host name or address, got an empty string")
            if not text.replace(",", "").strip():
                raise ValueError(f"expected a host name or address, got {text!r}")
            raise ValueError(f"an empty address between commas in {text!r}; remove the comma")
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


async def listen_addresses(hosts: tuple[str, ...], port: int) -> list[tuple[Any, ...]]:
    """The ``(family, type, proto, sockaddr)`` of every socket ``hosts`` mean, in order,
    without duplicates: a name may resolve to several addresses, ``*`` to 0.0.0.0 and ::.

    Raises:
        socket.gaierror: a name does not resolve.
    """
    found: list[tuple[Any, ...]] = []
    for host in hosts:
        infos = await trio.socket.getaddrinfo(
            None if host == EVERY_INTERFACE else host,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        for family, type_, proto, _, sockaddr in infos:
            entry = (family, type_, proto, tuple(sockaddr))
            if entry not in found:
                found.append(entry)
    return found


async def open_listeners(
    host: str, port: int, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """Listen on every address ``host`` means (see ``parse_hosts``), all on one port.

    With port 0 the first socket gets a free port and the others take the same one, so a
    server on ``*`` or on ``127.0.0.1,::1`` has one port to tell (Trio's own
    ``open_tcp_listeners`` would give each socket a port of its own).

    ``reuse_port``: set ``SO_REUSEPORT``, so that sibling worker processes listen on the same
    port, each with its own queue (the kernel spreads connections over them).

    Raises:
        OSError: an address cannot be resolved or bound; none is left listening then.
    """
    sockets = await bind_sockets(host, port, reuse_port=reuse_port, listen=True)
    return [trio.SocketListener(sock) for sock in sockets]


async def bind_sockets(
    host: str, port: int, *, reuse_port: bool, listen: bool
) -> list[trio.socket.SocketType]:
    """Bind a socket to every address ``host`` means, all on one port, listening or not (a
    supervisor holds its workers' port with ``SO_REUSEPORT`` sockets that never listen, so
    the kernel gives them no connections).

    Raises:
        OSError: an address cannot be resolved or bound; none is left open then.
    """
    listeners: list[trio.socket.SocketType] = []
    unsupported: OSError | None = None
    try:
        for family, type_, proto, sockaddr in await listen_addresses(parse_hosts(host), port):
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:  # no IPv6 here: the others will do
                    raise
                unsupported = exc
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # :: must not also take IPv4, which 0.0.0.0 beside it serves.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if listeners and port == 0:
                    sockaddr = (sockaddr[0], listeners[0].getsockname()[1], *sockaddr[2:])
                try:
                    await sock.bind(sockaddr)
                except OSError as exc:
                    # Which address, as Python names the file of a file error: the
                    # library's callers see "[Errno 98] Address already in use" otherwise,
                    # with nothing to say where.
                    where = format_address(sockaddr)
                    raise OSError(exc.errno, exc.strerror, where) from None
                if listen:
                    sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(sock)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    if not listeners:
        raise unsupported or OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    return listeners


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``host:port``, IPv6 in brackets."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
