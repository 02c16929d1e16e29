"""The per-connection handler: the server's public embedding API.

``AckHandler`` is an async callable taking any ``trio.abc.Stream`` (TCP, TLS, in-memory), so
it drops straight into ``trio.serve_tcp(handler, port)`` or ``trio.serve_listeners`` in
another Trio application; ``ackservice.server.serve`` is the same handler behind a listener.
It admits or refuses each connection, picks its transport and keeps the totals;
``connection.py`` serves one.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import ssl
from dataclasses import dataclass
from typing import NamedTuple

import structlog
import trio

from ..protocol import ErrorCode
from ..store.base import Store
from . import readiness
from .closing import close_with_error
from .committing import Committer, GroupCommitter
from .config import ServerConfig
from .connection import Connection
from .hook import HookCommitter, MessageContext, MessageHook
from .ratelimit import WarningLimiter
from .readiness import ReadinessHub, current_hub
from .sockets import enable_keepalive
from .tls import TLSFailure
from .tls_transport import TLSTransport
from .transport import SocketTransport, StreamTransport, Transport

__all__ = ["AckHandler", "MessageContext", "MessageHook", "ServerStats"]

log = structlog.get_logger(__name__)

# Refused connections being told why at once, at most, when the refusal is about the client
# (--allow, --max-connections-per-ip). Each holds a descriptor for up to a TLS handshake and a
# drain, and one client could open them without end: beyond this, such refusals are closed
# without a word, rather than use up the descriptors the served clients need. (Refusals for
# the server's own state, at its connection limit or shutting down, are bounded by the
# listen queue and keep being told.)
_MAX_REFUSING = 64


class _Refusal(NamedTuple):
    """Why a connection is refused: the ``ERR 0`` code and detail it is told."""

    code: str
    detail: str
    one_client: bool = False
    """Refused for who the client is, not for the server's state (see _MAX_REFUSING)."""


# Given to each connection's task: without a name, Trio builds one string per task.
_TASK_NAME = "ackservice connection"


@dataclass(slots=True)
class ServerStats:
    """Totals over the connections the handler has finished serving, plus ``active`` now.

    ``errors`` is split by kind: ``too_large``, ``rejected``, ``unavailable``,
    ``internal_error``.
    """

    connections: int = 0
    active: int = 0
    refused_busy: int = 0
    refused_forbidden: int = 0
    refused_shutting_down: int = 0
    messages: int = 0
    acked: int = 0
    errors: int = 0
    bytes_received: int = 0
    too_large: int = 0
    rejected: int = 0
    unavailable: int = 0
    internal_error: int = 0


class AckHandler:
    """Serves the ack protocol on one stream per call; shared by all of a server's connections.

    Args:
        config: limits and timeouts (``host``/``port`` are not used here).
        store: where every message is kept before its ACK; the handler's connections share
            one group commit. ``None`` keeps nothing (ACK on receipt).
        on_message: the simple alternative to a store: an application hook awaited for each
            message before its ACK.
        tls: serve TLS with this server context (``server_tls_context`` makes one) on the
            TCP connections given to the handler, its own fast TLS path; a stream that is
            already a ``trio.SSLStream`` is served as it is either way. Every connection
            then completes its handshake within ``config.tls_handshake_timeout``.

    Raises:
        ValueError: both a store and a hook were given.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Store | None = None,
        on_message: MessageHook | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = ServerConfig() if config is None else config
        self.store = store
        self.on_message = on_message
        self.tls = tls
        if store is not None and on_message is not None:
            raise ValueError("give a store or an on_message hook, not both")
        self.committer: Committer | None = None
        if store is not None:
            self.committer = GroupCommitter(
                store,
                timeout=self.config.store_timeout,
                max_pending_bytes=self.config.max_pending_store_bytes,
            )
        elif on_message is not None:
            self.committer = HookCommitter(on_message, timeout=self.config.hook_timeout)
        self.stats = ServerStats()
        self._hub: ReadinessHub | None = None
        self._conn_ids = itertools.count(1)
        self._connections: set[Connection] = set()
        self._shutting_down = False
        # Set by serve() when its listening sockets pass keepalive on to accepted ones.
        self._listener_sets_keepalive = False
        # Connections per client address, kept only when they are limited.
        self._per_ip: dict[str, int] | None = {} if self.config.max_connections_per_ip else None
        self._refusals = WarningLimiter()  # a flood of refused clients is not a flood of lines
        self._refusals_flush_scheduled = False
        self._refusals_flush_scope: trio.CancelScope | None = None
        # Refused connections still being told why (a TLS handshake, the line, the drain).
        self._refusing: set[Transport] = set()

    @property
    def shutting_down(self) -> bool:
        """Whether ``begin_shutdown`` has been called."""
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Ask every connection to finish gracefully.

        Each one replies to every message it has already read, sends ``ERR 0 shutting-down``
        and closes; idle connections close at once. Connections arriving later are refused
        the same way. Bounding how long this may take is the caller's job (a cancel scope).
        """
        self._shutting_down = True
        for connection in self._connections:
            connection.wake_for_shutdown()
        for refused in self._refusing:
            refused.wake()  # a refusal's handshake must not hold the shutdown up
        if self._refusals_flush_scope is not None:
            self._refusals_flush_scope.cancel()  # not to hold the shutdown up
        self._refusals.flush()

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends; never raises except ``trio.Cancelled``."""
        conn_id = next(self._conn_ids)
        peer = _peer_name(stream)
        # Not bound_contextvars: its suspended generator would cost ~0.5 KiB per connection.
        tokens = structlog.contextvars.bind_contextvars(conn_id=conn_id, peer=peer)
        try:
            client_ip = _peer_ip(stream)
            refusal = self._refusal(client_ip)
            if refusal is not None:
                self._log_refusal(refusal, None)
                if self._must_shed(refusal):
                    await trio.aclose_forcefully(stream)
                    return
                await self._refuse(self._stream_transport(stream), refusal)
                return
            transport = self._stream_transport(stream)
            connection = Connection(self, conn_id, peer, transport, self._ip_to_count(client_ip))
            self._connection_started(connection)
            await connection.run()
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def start_socket(
        self, nursery: trio.Nursery, sock: socket.socket, address: tuple[str, int]
    ) -> None:
        """Serve a socket the server just accepted, in a task of its own in ``nursery``.

        The server's fast path: ``sock`` is a plain non-blocking socket whose options came
        from the listener. The connection is admitted here, before its task exists, and its
        task starts in a copy of this context, with ``conn_id`` and ``peer`` bound.
        """
        conn_id = next(self._conn_ids)
        peer = _format_address(sock.family, address)
        tokens = structlog.contextvars.bind_contextvars(conn_id=conn_id, peer=peer)
        try:
            client_ip = address[0] if isinstance(address, tuple) else None
            refusal = self._refusal(client_ip)
            if refusal is not None:
                self._log_refusal(refusal, nursery)
                if self._must_shed(refusal):
                    sock.close()
                    return
            transport: Transport
            if self.tls is None:
                transport = SocketTransport(self._readiness_hub(), sock=sock)
            else:
                transport = TLSTransport(
                    self._readiness_hub(),
                    self.tls,
                    sock=sock,
                    drain_timeout=self.config.drain_timeout,
                )
            if refusal is not None:
                self._refusing.add(transport)
                nursery.start_soon(self._refuse, transport, refusal)
                return
            connection = Connection(self, conn_id, peer, transport, self._ip_to_count(client_ip))
            self._connection_started(connection)
            try:
                nursery.start_soon(connection.run, name=_TASK_NAME)
            except BaseException:
                self.connection_closed(connection)
                raise
        except BaseException:
            sock.close()  # no task owns it
            raise
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def must_refuse(self) -> bool:
        """Whether a new connection would be refused now (shutting down, or at the limit)."""
        return self._shutting_down or len(self._connections) >= self.config.max_connections

    def connection_closed(self, connection: Connection) -> None:
        """Called by a connection once it is closed: its counts join the totals."""
        self._connections.discard(connection)
        if connection.client_ip is not None and self._per_ip is not None:
            left = self._per_ip.pop(connection.client_ip, 1) - 1
            if left:
                self._per_ip[connection.client_ip] = left
        stats = self.stats
        stats.active -= 1
        stats.messages += connection.messages
        stats.acked += connection.acked
        stats.errors += connection.errors
        stats.bytes_received += connection.bytes_received
        kinds = connection.error_kinds
        if kinds is not None:
            stats.too_large += kinds[0]
            stats.rejected += kinds[1]
            stats.unavailable += kinds[2]
            stats.internal_error += kinds[3]

    def _readiness_hub(self) -> ReadinessHub:
        if self._hub is not None:  # serve()'s own, for the run it serves in
            return self._hub
        # Used on its own (trio.serve_tcp): the hub of the current Trio run, in a system
        # task. Not kept here: a handler may outlive its run (a module-level one, a test
        # fixture), and the hub of an earlier run has closed its epoll.
        return current_hub()

    def _stream_transport(self, stream: trio.abc.Stream) -> Transport:
        """How a stream given to ``__call__`` is served."""
        if isinstance(stream, trio.SocketStream):
            if not self._listener_sets_keepalive:
                enable_keepalive(stream.socket, self.config.tcp_keepalive)
            if readiness.AVAILABLE:
                if self.tls is None:
                    return SocketTransport(self._readiness_hub(), stream=stream)
                return TLSTransport(
                    self._readiness_hub(),
                    self.tls,
                    stream=stream,
                    drain_timeout=self.config.drain_timeout,
                )
        if self.tls is not None and not isinstance(stream, trio.SSLStream):
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        return StreamTransport(stream)

    def _refusal(self, client_ip: str | None) -> _Refusal | None:
        """Why a connection from ``client_ip`` is refused now (code, detail), if it is."""
        config = self.config
        if self._shutting_down:
            self.stats.refused_shutting_down += 1
            return _Refusal(ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later")
        if config.allow and client_ip is not None and not _allowed(client_ip, config.allow):
            self.stats.refused_forbidden += 1
            return _Refusal(
                ErrorCode.FORBIDDEN, "this server does not serve your address", one_client=True
            )
        if len(self._connections) >= config.max_connections:
            self.stats.refused_busy += 1
            return _Refusal(ErrorCode.BUSY, "server at its connection limit, retry later")
        per_ip = self._per_ip
        counted = self._ip_to_count(client_ip)
        if per_ip is not None and per_ip.get(counted or "", 0) >= config.max_connections_per_ip:
            self.stats.refused_busy += 1
            return _Refusal(
                ErrorCode.BUSY,
                "too many connections from your address, retry later",
                one_client=True,
            )
        return None

    def _must_shed(self, refusal: _Refusal) -> bool:
        """Whether a refused connection is closed without a word (see _MAX_REFUSING)."""
        return refusal.one_client and len(self._refusing) >= _MAX_REFUSING

    def _ip_to_count(self, client_ip: str | None) -> str | None:
        if self._per_ip is None or client_ip is None:
            return None
        # An IPv4 client reaching an IPv6 socket is the same client as over IPv4.
        return client_ip.removeprefix("::ffff:") if "." in client_ip else client_ip

    def _connection_started(self, connection: Connection) -> None:
        self._connections.add(connection)
        if connection.client_ip is not None and self._per_ip is not None:
            self._per_ip[connection.client_ip] = self._per_ip.get(connection.client_ip, 0) + 1
        self.stats.connections += 1
        self.stats.active += 1

    def flush_refusal_warnings(self) -> None:
        """Log how many refusals were counted but not logged (``warnings_suppressed``)."""
        self._refusals.flush()

    def _log_refusal(self, refusal: _Refusal, nursery: trio.Nursery | None) -> None:
        """A ``connection_refused`` warning, at most a few a second; the rest are counted and
        the count logged within a second (by a short task in ``nursery``, if given)."""
        code, detail = refusal.code, refusal.detail
        self._refusals.warn(log.warning, "connection_refused", reason=code, detail=detail)
        if (
            nursery is not None
            and self._refusals.suppressing
            and not self._refusals_flush_scheduled
            and not self._shutting_down  # the shutdown summary flushes them
        ):
            self._refusals_flush_scheduled = True
            nursery.start_soon(self._flush_refusals_later)

    async def _flush_refusals_later(self) -> None:
        structlog.contextvars.clear_contextvars()  # not the refused connection's conn_id
        with trio.CancelScope() as self._refusals_flush_scope:
            try:
                while self._refusals.suppressing and not self._shutting_down:
                    await trio.sleep_until(self._refusals.window_ends)
                    self._refusals.flush()
            finally:
                self._refusals_flush_scheduled = False

    async def _refuse(self, transport: Transport, refusal: _Refusal) -> None:
        """Tell a refused client why (through TLS on a TLS port) and close."""
        code, detail = refusal.code, refusal.detail
        config = self.config
        self._refusing.add(transport)
        try:
            if transport.needs_handshake:
                try:
                    # A refusal is worth a short wait, not a connection slot's.
                    timeout = min(config.tls_handshake_timeout, config.drain_timeout)
                    if not await transport.handshake(trio.current_time() + timeout):
                        return
                except TLSFailure:
                    return
            await close_with_error(transport.as_stream(), code, detail, config.drain_timeout)
        except OSError:
            pass  # the client is gone: nobody to tell
        finally:
            self._refusing.discard(transport)
            await transport.aclose(at_eof=False)


def _peer_name(stream: trio.abc.Stream) -> str:
    address = _peer_address(stream)
    if address is None:
        return "unknown" if _socket_stream(stream) is not None else type(stream).__name__
    return _format_address(*address)


def _peer_ip(stream: trio.abc.Stream) -> str | None:
    address = _peer_address(stream)
    return str(address[1][0]) if address is not None and isinstance(address[1], tuple) else None


def _peer_address(stream: trio.abc.Stream) -> tuple[int, object] | None:
    """The family and peer address of the socket under ``stream``, if it has one."""
    sock = _socket_stream(stream)
    if sock is None:
        return None
    try:
        return sock.socket.family, sock.socket.getpeername()
    except OSError:
        return None


def _socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream if isinstance(stream, trio.SocketStream) else None


def _allowed(
    client_ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether ``client_ip`` is in one of ``networks`` (an IPv4-mapped IPv6 address counts as
    its IPv4 address)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _format_address(family: int, address: object) -> str:
    if isinstance(address, tuple):
        if family == socket.AF_INET6:
            return f"[{address[0]}]:{address[1]}"
        return f"{address[0]}:{address[1]}"
    return str(address)
