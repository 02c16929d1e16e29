"""The per-connection handler: the server's public embedding API.

``AckHandler`` is an async callable taking any ``trio.abc.Stream`` (TCP, TLS, in-memory), so
it drops straight into ``trio.serve_tcp(handler, port)`` or ``trio.serve_listeners`` in
another Trio application; ``ackservice.server.serve`` is the same handler behind a listener.
It admits or refuses each connection, picks its transport and keeps the totals;
``connection.py`` serves one.
"""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass

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
from .readiness import ReadinessHub, current_hub
from .sockets import enable_keepalive
from .transport import SocketTransport, StreamTransport, Transport

__all__ = ["AckHandler", "MessageContext", "MessageHook", "ServerStats"]

log = structlog.get_logger(__name__)

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

    Raises:
        ValueError: both a store and a hook were given.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: Store | None = None,
        on_message: MessageHook | None = None,
    ) -> None:
        self.config = ServerConfig() if config is None else config
        self.store = store
        self.on_message = on_message
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

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends; never raises except ``trio.Cancelled``."""
        conn_id = next(self._conn_ids)
        peer = _peer_name(stream)
        # Not bound_contextvars: its suspended generator would cost ~0.5 KiB per connection.
        tokens = structlog.contextvars.bind_contextvars(conn_id=conn_id, peer=peer)
        try:
            if self.must_refuse():
                await self._refuse(stream)
                return
            transport: Transport
            if isinstance(stream, trio.SocketStream):
                if not self._listener_sets_keepalive:
                    enable_keepalive(stream.socket, self.config.tcp_keepalive)
                if readiness.AVAILABLE:
                    transport = SocketTransport(self._readiness_hub(), stream=stream)
                else:
                    transport = StreamTransport(stream)
            else:
                transport = StreamTransport(stream)
            connection = Connection(self, conn_id, peer, transport)
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
            if self.must_refuse():
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                nursery.start_soon(self._refuse, stream)
                return
            transport = SocketTransport(self._readiness_hub(), sock=sock)
            connection = Connection(self, conn_id, peer, transport)
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
        if self._hub is None:
            # Used on its own (trio.serve_tcp): a hub for this Trio run, in a system task.
            self._hub = current_hub()
        return self._hub

    def _connection_started(self, connection: Connection) -> None:
        self._connections.add(connection)
        self.stats.connections += 1
        self.stats.active += 1

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        if self._shutting_down:
            self.stats.refused_shutting_down += 1
            code, detail = ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later"
        else:
            self.stats.refused_busy += 1
            code, detail = ErrorCode.BUSY, "server at its connection limit, retry later"
        log.warning("connection_refused", reason=code, limit=self.config.max_connections)
        try:
            await close_with_error(stream, code, detail, self.config.drain_timeout)
        finally:
            await trio.aclose_forcefully(stream)


def _peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return "unknown"
        return _format_address(stream.socket.family, address)
    return type(stream).__name__


def _format_address(family: int, address: object) -> str:
    if isinstance(address, tuple):
        if family == socket.AF_INET6:
            return f"[{address[0]}]:{address[1]}"
        return f"{address[0]}:{address[1]}"
    return str(address)
