"""The per-connection handler: the server's public embedding API.

``AckHandler`` is an async callable taking any ``trio.abc.Stream`` (TCP, TLS, in-memory), so
it drops straight into ``trio.serve_tcp(handler, port)`` or ``trio.serve_listeners`` in
another Trio application; ``ackservice.server.serve`` is the same handler behind a listener.

The framing and reply format come from the sans-IO ``ackservice.protocol``; this module only
moves bytes, keeps time and reports through structlog.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import trio

from ..errors import Reject
from ..protocol import (
    CONNECTION_SEQ,
    OVERSIZED,
    ErrorCode,
    MessageFramer,
    Oversized,
    ack_line,
    ack_lines,
    err_line,
)
from .config import ServerConfig

__all__ = ["AckHandler", "MessageContext", "MessageHook", "ServerStats"]

log = structlog.get_logger(__name__)

# One read takes up to this much; a full read of small messages is answered in one write.
RECEIVE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What the application hook learns about a message besides its payload."""

    conn_id: int
    peer: str
    seq: int


MessageHook = Callable[[bytes, MessageContext], Awaitable[None]]
"""``async def on_message(payload, context)``: return to accept (the ACK is sent after it
returns), raise ``Reject("reason")`` to refuse; any other exception is an internal error."""


@dataclass(slots=True)
class ServerStats:
    """Totals over the connections the handler has finished serving, plus ``active`` now."""

    connections: int = 0
    active: int = 0
    refused_busy: int = 0
    messages: int = 0
    acked: int = 0
    errors: int = 0
    bytes_received: int = 0


class AckHandler:
    """Serves the ack protocol on one stream per call; shared by all of a server's connections.

    Args:
        config: limits and timeouts (``host``/``port`` are not used here).
        on_message: optional application hook, awaited for each message before its ACK.
    """

    def __init__(
        self, config: ServerConfig | None = None, *, on_message: MessageHook | None = None
    ) -> None:
        self.config = ServerConfig() if config is None else config
        self.on_message = on_message
        self.stats = ServerStats()
        self._conn_ids = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._shutting_down = False

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
        with structlog.contextvars.bound_contextvars(conn_id=conn_id, peer=peer):
            if self._shutting_down or len(self._connections) >= self.config.max_connections:
                await self._refuse(stream)
                return
            connection = _Connection(self, stream, conn_id, peer)
            self._connections.add(connection)
            self.stats.connections += 1
            self.stats.active += 1
            try:
                await connection.run()
            finally:
                self._connections.discard(connection)
                self.stats.active -= 1

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        if self._shutting_down:
            code, detail = ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later"
        else:
            self.stats.refused_busy += 1
            code, detail = ErrorCode.BUSY, "server at its connection limit, retry later"
        log.warning("connection_refused", reason=code, limit=self.config.max_connections)
        try:
            await close_with_error(stream, code, detail, self.config.drain_timeout)
        finally:
            await trio.aclose_forcefully(stream)


class _Connection:
    """The state of one served connection."""

    __slots__ = (
        "_acked",
        "_bytes",
        "_conn_id",
        "_debug",
        "_errors",
        "_handler",
        "_messages",
        "_peer",
        "_receive_scope",
        "_stream",
    )

    def __init__(
        self, handler: AckHandler, stream: trio.abc.Stream, conn_id: int, peer: str
    ) -> None:
        self._handler = handler
        self._stream = stream
        self._conn_id = conn_id
        self._peer = peer
        self._debug = _debug_enabled()
        self._receive_scope: trio.CancelScope | None = None
        self._messages = 0
        self._acked = 0
        self._errors = 0
        self._bytes = 0

    def wake_for_shutdown(self) -> None:
        """Interrupt a wait for input; a batch being answered is finished first."""
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        started = trio.current_time()
        if isinstance(self._stream, trio.SocketStream):
            _enable_keepalive(self._stream, self._handler.config.tcp_keepalive)
        log.info("connection_opened")
        reason = "internal-error"
        try:
            reason = await self._serve()
        except trio.BrokenResourceError:
            reason = "reset"
        except trio.ClosedResourceError:
            reason = "closed"
        except trio.TooSlowError:
            reason = "send-timeout"
        except trio.Cancelled:
            reason = "cancelled"
            raise
        except Exception:
            # A bug here must end this connection only, never the accept loop.
            log.exception("connection_failed")
        finally:
            await trio.aclose_forcefully(self._stream)
            stats = self._handler.stats
            stats.messages += self._messages
            stats.acked += self._acked
            stats.errors += self._errors
            stats.bytes_received += self._bytes
            log.info(
                "connection_closed",
                reason=reason,
                messages=self._messages,
                acked=self._acked,
                errors=self._errors,
                bytes=self._bytes,
                duration=round(trio.current_time() - started, 6),
            )

    async def _serve(self) -> str:
        """Answer messages until the connection ends; return why it ended."""
        handler = self._handler
        config = handler.config
        stream = self._stream
        framer = MessageFramer(config.max_message_bytes)
        idle_deadline = trio.current_time() + config.idle_timeout
        while True:
            if handler.shutting_down:
                await close_with_error(
                    stream, ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later",
                    config.drain_timeout,
                )  # fmt: skip
                return "shutting-down"
            with trio.CancelScope(deadline=idle_deadline) as scope:
                self._receive_scope = scope
                data = await stream.receive_some(RECEIVE_SIZE)
            self._receive_scope = None
            if scope.cancelled_caught:
                if handler.shutting_down:
                    continue
                await close_with_error(
                    stream, ErrorCode.IDLE_TIMEOUT,
                    f"no complete message for {config.idle_timeout:g} s",
                    config.drain_timeout,
                )  # fmt: skip
                return "idle-timeout"
            self._bytes += len(data)
            frames = framer.feed(data) if data else framer.end_of_stream()
            if frames:
                replies = await self._answer(frames)
                idle_deadline = trio.current_time() + config.idle_timeout
                # Replies for the whole read go out in one write; until it completes nothing
                # more is read, so a client that does not read its replies stops being read.
                with trio.fail_after(config.send_timeout):
                    await stream.send_all(replies)
            if not data:
                return "eof"

    async def _answer(self, frames: list[bytes | Oversized]) -> bytes:
        """The reply lines for one read's messages, in order."""
        first_seq = self._messages + 1
        self._messages += len(frames)
        hook = self._handler.on_message
        if hook is None and OVERSIZED not in frames:
            # The hot path: no application and nothing oversized, one join for the batch.
            self._acked += len(frames)
            payloads: list[bytes] = frames  # type: ignore[assignment]
            if self._debug:
                for seq, payload in enumerate(payloads, first_seq):
                    log.debug("message_acked", seq=seq, nbytes=len(payload))
            return ack_lines(first_seq, payloads)
        replies = []
        for seq, frame in enumerate(frames, first_seq):
            if isinstance(frame, Oversized):
                replies.append(self._too_large(seq))
            elif hook is None:
                replies.append(self._ack(seq, frame))
            else:
                replies.append(await self._call_hook(hook, seq, frame))
        return b"".join(replies)

    def _too_large(self, seq: int) -> bytes:
        self._errors += 1
        limit = self._handler.config.max_message_bytes
        log.warning("message_too_large", seq=seq, limit=limit)
        return err_line(seq, ErrorCode.TOO_LARGE, f"message exceeds {limit} bytes; it was dropped")

    async def _call_hook(self, hook: MessageHook, seq: int, payload: bytes) -> bytes:
        try:
            await hook(payload, MessageContext(self._conn_id, self._peer, seq))
        except Reject as rejection:
            self._errors += 1
            log.warning("message_rejected", seq=seq, reason=rejection.reason)
            return err_line(seq, ErrorCode.REJECTED, rejection.reason)
        except Exception:
            self._errors += 1
            log.exception("on_message_failed", seq=seq)
            return err_line(seq, ErrorCode.INTERNAL_ERROR, "the application failed on this message")
        return self._ack(seq, payload)

    def _ack(self, seq: int, payload: bytes) -> bytes:
        self._acked += 1
        if self._debug:
            log.debug("message_acked", seq=seq, nbytes=len(payload))
        return ack_line(seq, payload)


async def close_with_error(
    stream: trio.abc.Stream, code: str, detail: str, drain_timeout: float
) -> None:
    """Send ``ERR 0 <code> <detail>`` so that the peer really receives it, then stop.

    Closing a socket that still has unread input makes the kernel send a reset, which can
    destroy replies still in flight. So: send the line, half-close, then read and discard
    until the peer closes too or ``drain_timeout`` passes. The caller closes the stream.
    """
    with trio.move_on_after(drain_timeout):
        try:
            await stream.send_all(err_line(CONNECTION_SEQ, code, detail))
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _debug_enabled() -> bool:
    """Whether debug events would be emitted, so per-message work can be skipped when not."""
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


def _peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return "unknown"
        if stream.socket.family == socket.AF_INET6:
            return f"[{address[0]}]:{address[1]}"
        if isinstance(address, tuple):
            return f"{address[0]}:{address[1]}"
        return str(address)
    return type(stream).__name__


def _enable_keepalive(stream: trio.SocketStream, idle: int) -> None:
    """Probe silent peers after ``idle`` s (then every idle/3 s, 3 probes), as Redis does."""
    if idle <= 0:
        return
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        # Not every socket family takes these options (e.g. a Unix socket); keepalive is
        # a safety net, and the idle timeout still bounds a dead peer.
        pass
