"""One served connection: read, answer, write, until the connection ends.

Two read/write loops share every rule (limits, timeouts, shutdown, logging):

- the socket loop, for TCP sockets on Linux: non-blocking ``os.read``/``os.write`` on the
  socket's file descriptor, waiting only in the readiness hub, whose waits carry the idle
  deadline. Trio's ``SocketStream`` adds a checkpoint sandwich and a conflict detector around
  every call, which profiling showed costing as much as the system calls themselves for small
  messages. The server hands it plain accepted sockets (no ``SocketStream`` at all); an
  embedder's ``SocketStream`` is served the same way;
- the stream loop, for any other ``trio.abc.Stream`` (TLS, in-memory streams in tests, and
  sockets where there is no epoll). Its idle timeout is a cancel scope around each wait for
  input: a scope per read costs a little, but these are not the server's hot path.

In both, the idle deadline and the shutdown wake-up apply only while waiting for input, so
neither interrupts the application hook or the replies to what was read; those have their own
bounds (the grace period, ``send_timeout``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

import structlog
import trio

from ..errors import Reject
from ..protocol import (
    OVERSIZED,
    ErrorCode,
    MessageFramer,
    Oversized,
    ack_line,
    ack_lines,
    err_line,
    too_large_line,
)
from . import readiness
from .acknowledger import Acknowledger
from .closing import close_with_error
from .hook import MessageContext, MessageHook
from .readiness import WOKEN, current_hub

if TYPE_CHECKING:
    from .handler import AckHandler

__all__ = ["RECEIVE_SIZE", "Connection"]

log = structlog.get_logger(__name__)

# One read takes up to this much; the replies to everything in it leave in one write.
RECEIVE_SIZE = 65536
# A read or write failing with these means the peer is gone, like a reset.
_PEER_GONE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN")
    if hasattr(errno, name)
)


class _Ending(enum.Enum):
    """Why a read loop returned."""

    EOF = enum.auto()
    SHUTDOWN = enum.auto()
    IDLE = enum.auto()


class Connection:
    """The state of one served connection; ``run`` serves it and logs its summary."""

    __slots__ = (
        "_acknowledger",
        "_debug",
        "_fd",
        "_framer",
        "_handler",
        "_last_message",
        "_scope",
        "_socket",
        "_stream",
        "_waiting",
        "bytes_received",
        "conn_id",
        "errors",
        "messages",
        "peer",
    )

    def __init__(
        self,
        handler: AckHandler,
        conn_id: int,
        peer: str,
        *,
        stream: trio.abc.Stream | None = None,
        sock: socket.socket | None = None,
    ):
        """Serve ``stream``, or ``sock``: a non-blocking TCP socket that only the socket loop
        uses (the connection owns it and closes it)."""
        self._handler = handler
        self._stream = stream
        self._socket = sock
        # The descriptor the socket loop serves, or -1 for the stream loop.
        self._fd = -1
        if sock is not None:
            self._fd = sock.fileno()
        elif isinstance(stream, trio.SocketStream) and readiness.AVAILABLE:
            self._fd = stream.socket.fileno()
        elif stream is None:
            raise TypeError("Connection needs a stream or a socket")
        self.conn_id = conn_id
        self.peer = peer
        self.messages = 0
        """Messages answered so far (ACK or ERR)."""
        self.errors = 0
        self.bytes_received = 0
        limit = handler.config.max_message_bytes
        self._debug = _debug_enabled()
        # Without a hook (and without per-message debug events) nothing needs the payloads,
        # so the acknowledger answers from lengths and running checksums alone.
        self._framer: MessageFramer | None = None
        self._acknowledger: Acknowledger | None = None
        if handler.on_message is not None or self._debug:
            self._framer = MessageFramer(limit)
        else:
            self._acknowledger = Acknowledger(limit)
        self._scope: trio.CancelScope | None = None  # the stream loop's idle scope
        self._waiting = False
        self._last_message = 0.0

    @property
    def acked(self) -> int:
        return self.messages - self.errors

    def wake_for_shutdown(self) -> None:
        """Interrupt a wait for input; a read being answered is finished first."""
        if not self._waiting:
            return
        if self._fd >= 0:
            current_hub().wake(self._fd)
        elif self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Serve the connection until it ends, then close it and log its summary.

        Keep the call chain under it short: every coroutine frame here stays alive for the
        whole connection, and at thousands of idle connections frames are memory.
        """
        config = self._handler.config
        started = self._last_message = trio.current_time()
        log.info("connection_opened")
        reason = "internal-error"
        try:
            if self._fd >= 0:
                ending = await self._socket_loop(self._fd)
            else:
                assert self._stream is not None
                ending = await self._stream_loop(self._stream)
            if ending is _Ending.EOF:
                reason = "eof"
            else:
                if ending is _Ending.SHUTDOWN:
                    code, detail = ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later"
                else:
                    code = ErrorCode.IDLE_TIMEOUT
                    detail = f"no complete message for {config.idle_timeout:g} s"
                await close_with_error(self._as_stream(), code, detail, config.drain_timeout)
                reason = code  # the close reason in the log is the code the client was sent
        except (trio.BrokenResourceError, ConnectionError):
            reason = "reset"
        except OSError as exc:
            if exc.errno not in _PEER_GONE_ERRNOS:
                log.exception("connection_failed")
            else:  # e.g. keepalive probes unanswered: ETIMEDOUT from the read
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
            try:
                if self._socket is not None:
                    self._socket.close()  # no task waits on it now: no one to notify
                else:
                    assert self._stream is not None
                    # Raises Cancelled when cancelled from outside; the totals still count.
                    await trio.aclose_forcefully(self._stream)
            finally:
                self._handler._connection_ended(self)
                log.info(
                    "connection_closed",
                    reason=reason,
                    messages=self.messages,
                    acked=self.acked,
                    errors=self.errors,
                    bytes=self.bytes_received,
                    duration=round(trio.current_time() - started, 6),
                )

    def _as_stream(self) -> trio.abc.Stream:
        """The connection as a Trio stream, which then owns the socket (for the rare paths:
        a closing ``ERR 0`` and its drain)."""
        if self._socket is not None:
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._socket))
            self._socket = None
        assert self._stream is not None
        return self._stream

    async def _socket_loop(self, fd: int) -> _Ending:
        """Serve over the raw socket until the peer ends, shutdown, or the idle timeout."""
        handler = self._handler
        idle_timeout = handler.config.idle_timeout
        hub = current_hub()
        hub.register(fd)
        ending = None
        try:
            while True:
                if handler.shutting_down:
                    return _Ending.SHUTDOWN
                # After a short read the socket is drained: wait rather than make a read that
                # fails with EAGAIN. The wait is also this loop's checkpoint.
                self._waiting = True
                try:
                    events = await hub.wait_readable(fd, self._last_message + idle_timeout)
                finally:
                    self._waiting = False
                if events == WOKEN:
                    if handler.shutting_down:
                        return _Ending.SHUTDOWN
                    if trio.current_time() >= self._last_message + idle_timeout:
                        return _Ending.IDLE
                    continue
                # The end of the stream may have come with the data: then read to the end.
                end_pending = events & readiness.END_EVENTS
                while True:
                    try:
                        data = os.read(fd, RECEIVE_SIZE)
                    except BlockingIOError:
                        break
                    answered = self.messages
                    if self._acknowledger is not None:
                        replies = self._acknowledge(data)
                    else:
                        replies = await self._answer_each(data)
                    if replies:
                        if self.messages - answered > 1:
                            # A pipelining client. Write after every other ready connection
                            # has read: a write wakes the peer, and waking it once per batch
                            # of connections, not once each, costs the kernel far less
                            # (pipe: 0.25 -> 0.11 us of system time per ACK). Shielded: what
                            # was read is answered even if cancellation comes now.
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        # Inline, as almost every write takes it all: no coroutine per read.
                        try:
                            sent = os.write(fd, replies)
                        except BlockingIOError:
                            sent = 0
                        if sent < len(replies):
                            await self._send_rest_on_socket(fd, replies, sent)
                    if not data:
                        ending = _Ending.EOF
                        return ending
                    if (len(data) < RECEIVE_SIZE and not end_pending) or handler.shutting_down:
                        break
                    # More is likely waiting. Let other connections run first.
                    await trio.lowlevel.checkpoint()
        finally:
            if ending is _Ending.EOF and self._socket is not None:
                hub.forget(fd)  # closed next, and nobody else has it: no system call needed
            else:
                hub.unregister(fd)  # still open for a goodbye, or an embedder's stream

    async def _send_rest_on_socket(self, fd: int, replies: bytes, sent: int) -> None:
        # The client is not keeping up with its replies: wait, but only send_timeout long.
        view = memoryview(replies)
        with trio.fail_after(self._handler.config.send_timeout):
            while sent < len(replies):
                await trio.lowlevel.wait_writable(fd)
                with contextlib.suppress(BlockingIOError):  # woken, yet the buffer is full
                    sent += os.write(fd, view[sent:])

    async def _stream_loop(self, stream: trio.abc.Stream) -> _Ending:
        """Serve over any Trio stream until the peer ends, shutdown, or the idle timeout."""
        handler = self._handler
        idle_timeout = handler.config.idle_timeout
        while True:
            if handler.shutting_down:
                return _Ending.SHUTDOWN
            # The idle deadline and the shutdown wake-up apply to the wait for input only, so
            # neither can interrupt the hook or the replies to what was read.
            with trio.move_on_at(self._last_message + idle_timeout) as self._scope:
                self._waiting = True
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._waiting = False
            if self._scope.cancelled_caught:
                if handler.shutting_down:
                    return _Ending.SHUTDOWN
                return _Ending.IDLE
            if self._acknowledger is not None:
                replies = self._acknowledge(data)
            else:
                replies = await self._answer_each(data)
            if replies:
                with trio.fail_after(handler.config.send_timeout):
                    await stream.send_all(replies)
            if not data:
                return _Ending.EOF

    def _acknowledge(self, data: bytes | bytearray) -> bytes:
        """The replies to what ``data`` completes (``b""``: end of stream), without a hook.

        Not async, so the hot path makes no coroutine per read.
        """
        self.bytes_received += len(data)
        acknowledger = self._acknowledger
        assert acknowledger is not None
        replies = acknowledger.feed(data) if data else acknowledger.end_of_stream()
        if acknowledger.seq != self.messages:
            self.messages = acknowledger.seq
            self._last_message = trio.current_time()
            if acknowledger.oversized:
                for seq in acknowledger.oversized:
                    self._log_too_large(seq)
                acknowledger.oversized.clear()
        return replies

    async def _answer_each(self, data: bytes | bytearray) -> bytes:
        """The replies, message by message: with an application hook, or debug events."""
        self.bytes_received += len(data)
        assert self._framer is not None
        frames = self._framer.feed(data) if data else self._framer.end_of_stream()
        if not frames:
            return b""
        first_seq = self.messages + 1
        self.messages += len(frames)
        hook = self._handler.on_message
        if hook is None and OVERSIZED not in frames:
            payloads: list[bytes] = frames  # type: ignore[assignment]
            for seq, payload in enumerate(payloads, first_seq):
                log.debug("message_acked", seq=seq, nbytes=len(payload))
            self._last_message = trio.current_time()
            return ack_lines(first_seq, payloads)
        replies = []
        for seq, frame in enumerate(frames, first_seq):
            if isinstance(frame, Oversized):
                self._log_too_large(seq)
                replies.append(too_large_line(seq, self._handler.config.max_message_bytes))
            elif hook is None:
                replies.append(self._ack(seq, frame))
            else:
                replies.append(await self._call_hook(hook, seq, frame))
        # After the hook: a slow application is not an idle client.
        self._last_message = trio.current_time()
        return b"".join(replies)

    def _log_too_large(self, seq: int) -> None:
        self.errors += 1
        log.warning("message_too_large", seq=seq, limit=self._handler.config.max_message_bytes)

    async def _call_hook(self, hook: MessageHook, seq: int, payload: bytes) -> bytes:
        try:
            await hook(payload, MessageContext(self.conn_id, self.peer, seq))
        except Reject as rejection:
            self.errors += 1
            log.warning("message_rejected", seq=seq, reason=rejection.reason)
            return err_line(seq, ErrorCode.REJECTED, rejection.reason)
        except Exception:
            self.errors += 1
            log.exception("on_message_failed", seq=seq)
            return err_line(seq, ErrorCode.INTERNAL_ERROR, "the application failed on this message")
        return self._ack(seq, payload)

    def _ack(self, seq: int, payload: bytes) -> bytes:
        if self._debug:
            log.debug("message_acked", seq=seq, nbytes=len(payload))
        return ack_line(seq, payload)


def _debug_enabled() -> bool:
    """Whether debug events would be emitted, so per-message work can be skipped when not."""
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))
