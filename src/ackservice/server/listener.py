"""The TCP listener: accepts connections, runs one handler task each, shuts down gracefully.

The shape follows Trio's own ``serve_listeners``, with two additions a daemon needs: a
graceful shutdown that lets every connection answer what it has read, and an accept loop
that survives running out of file descriptors without flooding the log.

On Linux the accept loop takes plain sockets straight from the listening socket, as many as
are waiting per wake-up, and hands them to the handler without wrapping each in a Trio
``SocketStream``: Trio's ``accept`` checkpoints twice per connection and its stream sets two
socket options, which profiling of connection churn put at ~15% of the server's CPU. The
options the server wants (no Nagle delay, keepalive) are set once on the listening socket,
from which Linux copies them.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import ssl

import structlog
import trio

from .. import __version__
from ..logconfig import log_events_dropped
from ..store.base import Store
from . import readiness
from .committing import GroupCommitter
from .config import ServerConfig
from .handler import AckHandler, MessageHook
from .readiness import ReadinessHub
from .sockets import ACCEPTED_SOCKETS_INHERIT_OPTIONS, configure_listening_socket, open_listeners

__all__ = ["Server", "serve"]

log = structlog.get_logger(__name__)

# accept() fails with these when the process or the system is out of a resource; the
# listening socket is fine, so wait for a connection to close and try again (as Trio does).
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_RESOURCE_RETRY_DELAY = 0.1
# One warning per this many seconds while accept keeps failing, with a count, so an
# exhausted process does not also exhaust the disk with the same line ten times a second.
_RESOURCE_LOG_INTERVAL = 10.0
# accept() fails with these when a connection died in the listen queue (reset, timed out,
# refused by a firewall, ...): take the next one. Exactly Trio's SocketListener list
# (trio/_highlevel_socket.py, ``_ignorable_accept_errno_names``; a test keeps them equal),
# as Linux passes the pending error of a dead connection to accept() and any of these then
# ending the accept loop would end the server.
_IGNORABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
# Accepting this many connections in a row is followed by a checkpoint, so a flood of
# connections cannot starve the ones already being served.
_ACCEPT_BATCH = 32
# At most this many queued connections are told at shutdown (Linux caps a listen queue at
# net.core.somaxconn, 4,096 by default).
_LISTEN_QUEUE_LIMIT = 65536
# Plain sockets go to the handler only where its socket loop serves them and the listener's
# options reach them.
_ACCEPT_PLAIN_SOCKETS = readiness.AVAILABLE and ACCEPTED_SOCKETS_INHERIT_OPTIONS


class Server:
    """A running server, as handed back by ``await nursery.start(serve, config)``.

    Attributes:
        handler: the ``AckHandler`` serving every connection (its ``stats`` are the totals).
        listeners: the bound listening sockets.
        addresses: the (host, port) pairs they are bound to (still known after closing).
    """

    def __init__(
        self,
        handler: AckHandler,
        listeners: list[trio.SocketListener],
        *,
        refuse_queued_at_shutdown: bool = False,
        start_up_fields: dict[str, object] | None = None,
    ) -> None:
        self.handler = handler
        self.listeners = listeners
        self.addresses = [_address(listener) for listener in listeners]
        self._shutdown_requested = trio.Event()
        # See serve(): whether connections still queued at shutdown are told, not reset.
        self._refuse_queued_at_shutdown = refuse_queued_at_shutdown
        self._extra_start_up_fields = start_up_fields or {}

    @property
    def port(self) -> int:
        """The port the server listens on (useful after asking for port 0)."""
        return self.addresses[0][1]

    def shutdown(self) -> None:
        """Start a graceful shutdown; ``serve`` returns once it completes."""
        self._shutdown_requested.set()

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        try:
            await self._serve_then_drain(task_status)
        finally:
            # Also when cancelled from outside, not only after a graceful shutdown; shielded,
            # or that cancellation would end the loop after the first listener (leaking the
            # others, e.g. the :: socket of --host '*').
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)

    async def _serve_then_drain(self, task_status: trio.TaskStatus[Server]) -> None:
        config = self.handler.config
        forced = True  # unless the connections nursery ends by itself, below
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for listener in self.listeners:
                        accepting.start_soon(self._accept_loop, listener, connections)
                    log.info("listening", **self._start_up_fields())
                    task_status.started(self)
                    await self._shutdown_requested.wait()
                    accepting.cancel_scope.cancel()
                log.info(
                    "shutdown_started",
                    active=self.handler.stats.active,
                    grace=config.shutdown_grace,
                )
                self.handler.begin_shutdown()
                # Connections already in the listen queue are told, not reset by the close.
                if self._refuse_queued_at_shutdown:
                    for listener in self.listeners:
                        self._refuse_listen_queue(listener, connections)
                # Closing the listening sockets refuses new connections at once.
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
                # Whatever is still running when the grace period ends is cancelled.
                connections.cancel_scope.deadline = trio.current_time() + config.shutdown_grace
            forced = connections.cancel_scope.cancelled_caught
        finally:
            # Also after a forced exit (a second signal cancels everything from outside):
            # by now every connection task has ended and logged, so the totals are whole.
            if self.handler.shutting_down or not forced:
                self._log_shutdown_complete(forced=forced)

    def _start_up_fields(self) -> dict[str, object]:
        """What the ``listening`` event says: where, the store, and the effective settings."""
        committer = self.handler.committer
        config = self.handler.config
        return {
            "host": self.addresses[0][0],
            "port": self.port,
            "addresses": [f"{host}:{port}" for host, port in self.addresses],
            "store": committer.store.description
            if isinstance(committer, GroupCommitter)
            else "none",
            "tls": _tls_mode(self.handler.tls),
            "version": __version__,
            "pid": os.getpid(),
            "settings": {
                field.name: getattr(config, field.name)
                for field in dataclasses.fields(config)
                if field.name not in ("host", "port")
            }
            # As an operator writes them (10.0.0.0/8), not the objects' repr.
            | {"allow": [str(network) for network in config.allow]},
            **self._extra_start_up_fields,
        }

    def _log_shutdown_complete(self, *, forced: bool) -> None:
        self.handler.flush_refusal_warnings()
        stats = self.handler.stats
        committer = self.handler.committer
        totals: dict[str, object] = {
            "connections": stats.connections,
            "messages": stats.messages,
            "acked": stats.acked,
            "errors": stats.errors,
            "refused_busy": stats.refused_busy,
            "refused_forbidden": stats.refused_forbidden,
            "forced": forced,
        }
        if isinstance(committer, GroupCommitter):
            totals["store_commits"] = committer.commits
        # 0 unless the CLI's logging (logconfig) dropped events it could not write.
        totals["log_events_dropped"] = log_events_dropped()
        log.info("shutdown_complete", **totals)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        if _ACCEPT_PLAIN_SOCKETS and isinstance(listener, trio.SocketListener):
            await self._accept_plain_sockets(listener, nursery)
            return
        failures = _AcceptFailures()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                await failures.survive(exc)
                continue
            nursery.start_soon(self.handler, stream)

    async def _accept_plain_sockets(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        listening = _plain_listening_socket(listener)
        failures = _AcceptFailures()
        handler = self.handler
        accepted = 0
        try:
            while True:
                if accepted >= _ACCEPT_BATCH or handler.must_refuse():
                    # At the connection limit, one accept per scheduling round, as with
                    # Trio's own accept: the connections already admitted get to run (and
                    # perhaps free their slot) before the next one is judged.
                    accepted = 0
                    await trio.lowlevel.checkpoint()
                try:
                    waiting = _accept_waiting(listening)
                except OSError as exc:
                    await failures.survive(exc)
                    continue
                if waiting is None:
                    accepted = 0
                    await trio.lowlevel.wait_readable(listening)
                    continue
                handler.start_socket(nursery, *waiting)
                accepted += 1
        finally:
            trio.lowlevel.notify_closing(listening)
            listening.close()

    def _refuse_listen_queue(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept what waits in ``listener``'s queue, for the shutting-down handler to refuse
        with ``ERR 0 shutting-down`` (tasks in ``nursery``), instead of a reset."""
        if not (_ACCEPT_PLAIN_SOCKETS and isinstance(listener, trio.SocketListener)):
            return  # Trio's accept would wait; those few still get a reset
        with _plain_listening_socket(listener) as listening:
            for _ in range(_LISTEN_QUEUE_LIMIT):
                try:
                    waiting = _accept_waiting(listening)
                except OSError:  # out of descriptors: the rest get the reset
                    return
                if waiting is None:
                    return
                self.handler.start_socket(nursery, *waiting)


def _plain_listening_socket(listener: trio.SocketListener) -> socket.socket:
    """A non-blocking descriptor of our own for ``listener``'s socket, as Trio's socket object
    does not hand out the plain socket it wraps. Close it when done, or closing the listener
    will not stop the listening."""
    listening = socket.socket(fileno=os.dup(listener.socket.fileno()))
    listening.setblocking(False)
    return listening


def _accept_waiting(listening: socket.socket) -> tuple[socket.socket, tuple[str, int]] | None:
    """The next connection waiting on ``listening`` (non-blocking), or None when none waits.

    Skips connections that died in the queue; raises ``OSError`` for anything else (out of
    descriptors, a listener closed).
    """
    while True:
        try:
            sock, address = listening.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _IGNORABLE_ERRNOS:
                continue
            raise
        sock.setblocking(False)
        return sock, address


class _AcceptFailures:
    """What an accept loop does when accept fails for lack of a resource: wait and retry,
    logging one error per ``_RESOURCE_LOG_INTERVAL`` with the number of failures."""

    def __init__(self) -> None:
        self._failures = 0
        self._last_logged = -_RESOURCE_LOG_INTERVAL

    async def survive(self, exc: OSError) -> None:
        """Wait before the next accept (not at all after a connection that died in the
        queue); re-raise ``exc`` if it is neither about resources nor about that one
        connection."""
        if exc.errno in _IGNORABLE_ERRNOS:
            # Trio's own SocketListener skips these; another Listener may not.
            await trio.lowlevel.checkpoint()
            return
        if exc.errno not in _RESOURCE_ERRNOS:
            raise exc
        self._failures += 1
        now = trio.current_time()
        if now - self._last_logged >= _RESOURCE_LOG_INTERVAL:
            log.error(
                "accept_failed",
                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                detail=exc.strerror,
                failures=self._failures,
                hint="raise the open-file limit (ulimit -n) or lower --max-connections",
            )
            self._last_logged = now
            self._failures = 0
        await trio.sleep(_RESOURCE_RETRY_DELAY)


async def serve(
    config: ServerConfig | None = None,
    *,
    store: Store | None = None,
    on_message: MessageHook | None = None,
    listeners: list[trio.SocketListener] | None = None,
    refuse_queued_at_shutdown: bool | None = None,
    tls: ssl.SSLContext | None = None,
    start_up_fields: dict[str, object] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``config.host``:``config.port`` and serve the ack protocol until shut down.

    Use ``server = await nursery.start(serve, config)`` to get the running ``Server`` (its
    ``port``, its ``shutdown()``); ``serve`` returns after a graceful shutdown completes.

    Args:
        config: address, limits and timeouts.
        store: where every message is kept before its ACK (group commit); ``None`` keeps
            nothing. The caller opens and closes it (``ackservice.store.open_store``).
        on_message: the per-message hook instead of a store, awaited before each ACK.
        listeners: already-bound listeners to serve instead of binding ``config.host`` and
            ``config.port`` (for socket activation, or to bind before dropping privileges).
        refuse_queued_at_shutdown: whether connections still waiting in the listen queues
            at shutdown are accepted and told ``ERR 0 shutting-down`` (Linux) rather than
            left to the listening sockets' close, which resets them. By default only when
            ``serve`` bound the listeners itself: a socket handed in may be shared (socket
            activation, sibling workers), and its queue then belongs to whoever remains.
        tls: serve TLS with this context (``ackservice.server.server_tls_context``): every
            connection, the refused ones included, speaks TLS.
        start_up_fields: more fields for the ``listening`` event (the CLI says where its
            sockets came from).

    Raises:
        OSError: the address could not be bound (in use, not resolvable, not permitted).
        ValueError: both a store and an ``on_message`` hook were given.
    """
    config = ServerConfig() if config is None else config
    if refuse_queued_at_shutdown is None:
        refuse_queued_at_shutdown = listeners is None
    if listeners is None:
        listeners = await open_listeners(config.host, config.port)
    for listener in listeners:
        configure_listening_socket(listener.socket, config.tcp_keepalive)
    handler = AckHandler(config, store=store, on_message=on_message, tls=tls)
    handler._listener_sets_keepalive = ACCEPTED_SOCKETS_INHERIT_OPTIONS
    server = Server(
        handler,
        listeners,
        refuse_queued_at_shutdown=refuse_queued_at_shutdown,
        start_up_fields=start_up_fields,
    )
    if not readiness.AVAILABLE:
        await server._run(task_status)
        return
    # The readiness hub outlives every connection: started first, stopped last.
    async with trio.open_nursery() as services:
        handler._hub = ReadinessHub()
        services.start_soon(handler._hub.dispatch, name="ackservice readiness hub")
        await server._run(task_status)
        services.cancel_scope.cancel()


def _tls_mode(context: ssl.SSLContext | None) -> str:
    if context is None:
        return "off"
    return "mutual" if context.verify_mode == ssl.CERT_REQUIRED else "on"


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port, *_ = listener.socket.getsockname()
    if listener.socket.family == socket.AF_INET6:
        host = f"[{host}]"
    return str(host), int(port)
