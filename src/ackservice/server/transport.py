"""How a connection moves bytes: the plain-socket transport and the Trio-stream transport.

The connection loop (``connection.py``) is written once, against this small interface; each
transport owns its own I/O rules:

- ``SocketTransport``: a TCP socket on Linux, served with non-blocking ``os.read`` and
  ``os.write`` on its descriptor, waiting only in the readiness hub (one edge-triggered epoll
  set for all connections, whose waits carry the idle deadline). Trio's ``SocketStream`` adds
  a checkpoint sandwich and a conflict detector around every call, which profiling showed
  costing as much as the system calls themselves for small messages.
- ``StreamTransport``: any ``trio.abc.Stream`` (TLS, in-memory streams in tests, sockets where
  there is no epoll). Its wait is a ``receive_some`` under a cancel scope: a scope per read
  costs a little, but this is not the server's hot path.

The interface keeps the hot path free of coroutine frames: ``read_nowait`` and ``try_send``
are plain calls, and only waiting (``wait_readable``, ``send_rest``) suspends. A new transport
(a TLS one over the raw socket, say) is one more class with these methods.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Awaitable
from typing import Final, Protocol

import trio

from .readiness import Answerer, ReadinessHub
from .tls import TLSFailure, describe_ssl_error, looks_like_client_hello, peer_identity

try:
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # not Linux: progress is then each write that goes
    _TIOCOUTQ = None

__all__ = [
    "RECEIVE_SIZE",
    "STREAM_SEND_PIECE",
    "SocketTransport",
    "StreamTransport",
    "Transport",
    "send_with_progress",
]

# The bytes that tell a TLS ClientHello from a message (tls.looks_like_client_hello).
_HELLO_BYTES: Final = 6
# One read takes up to this much; the replies to everything in it leave in one write (unless
# they are many: see connection.py, REPLY_PIECE_BYTES).
RECEIVE_SIZE: Final = 65536
# While a write waits for a client that reads slowly, how often the socket's unsent queue is
# checked for progress (at most; a quarter of the send timeout if that is shorter). The kernel
# reports a socket writable only once a third of its send buffer drained, which at ~3.9 MB
# (loopback's autotuned maximum) and 100 kB/s is ~13 s: too late to tell a slow reader from a
# stuck one.
_PROGRESS_POLL: Final = 0.5
# A stream transport sends long replies in pieces this large; each piece that goes is progress
# (no unsent queue is visible through a Trio stream), so a client must read this much per send
# timeout to stay connected (6.4 kB/s at the default 10 s). As large as the reply pieces a
# connection builds (connection.REPLY_PIECE_BYTES), so each of them still leaves in one write.
STREAM_SEND_PIECE: Final = 65536


class Transport(Protocol):
    """What the connection loop needs from a connection's byte pipe."""

    needs_handshake: bool
    """Whether ``handshake`` must complete before anything is read or said (TLS)."""

    identity: str | None
    """The authenticated client (a TLS client certificate's subject), once known."""

    async def handshake(self, deadline: float) -> bool:
        """Establish the connection's security by ``deadline`` (Trio clock); False if
        ``wake`` ended the wait first (shutdown), and nothing may then be said on it.

        Raises:
            TLSFailure: the handshake failed or timed out (the peer was told what it can be).
        """
        ...

    may_have_more: bool
    """Whether more input may be waiting without a wait (the last read filled its buffer):
    the loop then lets other connections run before reading again. True while waiting (the
    wake is an edge, or a timeout): an answerer that keeps the wait going sets it again."""

    def read_nowait(self) -> bytes | None:
        """Input available now (``b""``: end of stream), or ``None`` if the loop must wait."""
        ...

    def wait_readable(self, deadline: float) -> Awaitable[int]:
        """Wait for input; a true value when there may be some, a false one when ``deadline``
        (Trio clock) passed or ``wake`` was called first."""
        ...

    def answer_while_waiting(self, answerer: Answerer) -> None:
        """Let ``answerer`` answer input that arrives during ``wait_readable`` without ending
        the wait, where the transport can (``ReadinessHub.set_answerer``); it reads with
        ``read_arrived``. Transports that cannot ignore this."""
        ...

    def read_arrived(self) -> bytes | None:
        """``read_nowait`` for an ``answerer``, when input was reported during a wait."""
        ...

    def wake(self) -> None:
        """End a wait in progress (for shutdown)."""
        ...

    def try_send(self, data: bytes) -> int:
        """Send what can go without waiting; return how many bytes went."""
        ...

    def unacknowledged(self) -> int | None:
        """Bytes sent that the peer has not acknowledged yet (its reader makes room for
        them); None where the transport cannot tell."""
        ...

    async def send_rest(self, data: bytes, sent: int, stall_timeout: float) -> None:
        """Send ``data[sent:]``, waiting for the peer as long as it keeps reading.

        Raises:
            trio.TooSlowError: the peer made no progress reading for ``stall_timeout`` seconds
                (a stall timeout, not a deadline: TooSlowError, like ``trio.fail_after``).
        """
        ...

    def as_stream(self) -> trio.abc.Stream:
        """The connection as a Trio stream, for the rare paths (a closing ``ERR 0`` line and
        its drain); the transport is not used for reading after this."""
        ...

    async def aclose(self, *, at_eof: bool, reset: bool = False) -> None:
        """Close the connection (``at_eof``: the peer ended it, nothing more to say;
        ``reset``: with a TCP reset, dropping what was not delivered)."""
        ...


class SocketTransport:
    """A non-blocking TCP socket served through ``hub`` (Linux).

    Args:
        hub: the readiness hub whose dispatcher runs for this Trio run.
        sock: a socket the transport owns and closes; or None with ``fd`` of a socket owned
            by an embedder's ``SocketStream`` (closed through that stream).
        stream: that ``SocketStream``, if any.
    """

    __slots__ = ("_ended", "_fd", "_first", "_hub", "_sock", "_stream", "may_have_more")

    needs_handshake = False
    identity: str | None = None

    def __init__(
        self,
        hub: ReadinessHub,
        *,
        sock: socket.socket | None = None,
        stream: trio.SocketStream | None = None,
    ) -> None:
        self._hub = hub
        self._sock = sock
        self._stream = stream
        if sock is not None:
            self._fd = sock.fileno()
        elif stream is not None:
            self._fd = stream.socket.fileno()
        else:
            raise TypeError("SocketTransport needs a socket or a SocketStream")
        # Edge-triggered: after a short read the socket is drained, and reading again would
        # only fail with EAGAIN; the hub's next edge says when to read. A plain attribute,
        # not a property: it is read once per message in request/response.
        self.may_have_more = True
        # The connection's first bytes, held until they show whether a TLS client reached
        # this plain port; None once that is known.
        self._first: bytes | None = b""
        self._ended = hub.ended_fds
        hub.register(self._fd)

    async def handshake(self, deadline: float) -> bool:
        return True

    def _first_bytes(self, data: bytes) -> bytes | None:
        """The connection's first input, once it shows it is not a TLS ClientHello (which
        takes 6 bytes to tell: a start of one is held back, and None returned, until then)."""
        assert self._first is not None
        data = self._first + data
        if (
            len(data) < _HELLO_BYTES
            and data != self._first  # not the end of the stream
            and data[0] == 0x16
            and (len(data) < 2 or data[1] == 0x03)
        ):
            self._first = data  # perhaps a split ClientHello: wait for the rest
            return None
        self._first = None
        if looks_like_client_hello(data):
            raise TLSFailure(
                "tls-on-plain-port",
                "the client began a TLS handshake on a port without TLS; "
                "connect without TLS, or serve TLS with --tls-cert",
            )
        return data

    def read_nowait(self) -> bytes | None:
        if not self.may_have_more:
            return None
        try:
            data = os.read(self._fd, RECEIVE_SIZE)
        except BlockingIOError:
            self.may_have_more = False
            return None
        # A short read drained the socket, unless the end of the stream came with the data
        # (one edge for both): then keep reading until the end is seen.
        if len(data) < RECEIVE_SIZE and data and self._fd not in self._ended:
            self.may_have_more = False
        if self._first is not None:
            return self._first_bytes(data)
        return data

    def wait_readable(self, deadline: float) -> Awaitable[int]:
        self.may_have_more = True
        return self._hub.wait_readable(self._fd, deadline)

    def answer_while_waiting(self, answerer: Answerer) -> None:
        self._hub.set_answerer(self._fd, answerer)

    def read_arrived(self) -> bytes | None:
        self.may_have_more = True  # the edge that was reported
        return self.read_nowait()

    def wake(self) -> None:
        self._hub.wake(self._fd)

    def try_send(self, data: bytes) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    def unacknowledged(self) -> int | None:
        return _send_queue_bytes(self._fd)

    async def send_rest(self, data: bytes, sent: int, stall_timeout: float) -> None:
        await send_with_progress(self._fd, data, sent, stall_timeout)

    def as_stream(self) -> trio.abc.Stream:
        self._hub.unregister(self._fd)  # still open for a goodbye: a system call is needed
        if self._stream is None:
            assert self._sock is not None
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
            self._sock = None
        return self._stream

    async def aclose(self, *, at_eof: bool, reset: bool = False) -> None:
        if reset:
            _reset_on_close(self._sock if self._sock is not None else self._stream)
        if self._sock is not None:
            if at_eof:
                self._hub.forget(self._fd)  # closed next and nobody else has it: no syscall
            else:
                self._hub.unregister(self._fd)
            self._sock.close()  # no task waits on it now: no one to notify
            return
        if self._stream is not None:
            self._hub.unregister(self._fd)  # an embedder's stream: it may outlive us
            await trio.aclose_forcefully(self._stream)


async def send_with_progress(fd: int, data: bytes, sent: int, stall_timeout: float) -> None:
    """Send ``data[sent:]`` on the non-blocking socket ``fd``, waiting for the peer as long as
    it keeps reading (``Transport.send_rest``).

    Raises:
        trio.TooSlowError: the peer took nothing for ``stall_timeout`` seconds.
    """
    # Progress is the peer acknowledging bytes, which it does as its reader makes room,
    # seen as the socket's send queue shrinking (SIOCOUTQ), not the socket becoming
    # writable again: see _PROGRESS_POLL.
    view = memoryview(data)
    queued = _send_queue_bytes(fd)
    poll = min(_PROGRESS_POLL, stall_timeout / 4)
    deadline = trio.current_time() + stall_timeout
    while sent < len(data):
        now = trio.current_time()
        if now >= deadline:
            raise trio.TooSlowError
        with trio.move_on_at(min(deadline, now + poll)):
            await trio.lowlevel.wait_writable(fd)
        wrote = 0
        with contextlib.suppress(BlockingIOError):  # woken, yet the buffer is full
            wrote = os.write(fd, view[sent:])
        sent += wrote
        queued_now = _send_queue_bytes(fd)
        if queued_now is None or queued is None:
            progressed = wrote > 0
        else:
            progressed = queued_now < queued + wrote  # the peer took some
        queued = queued_now
        if progressed:
            deadline = trio.current_time() + stall_timeout


def _reset_on_close(sock: socket.socket | trio.SocketStream | None) -> None:
    """Make closing ``sock`` a TCP reset (SO_LINGER 0), which drops its unsent data.

    For a client that left its replies unread for the send timeout: they cannot be
    delivered, and a plain close leaves the kernel trying for minutes (an orphaned socket
    holding up to its whole send buffer, megabytes each), while the client, if it is
    still there, hears nothing until then.
    """
    if sock is not None:
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _send_queue_bytes(fd: int) -> int | None:
    """Bytes in the socket's send queue, not yet acknowledged by the peer (Linux SIOCOUTQ);
    None where the system cannot tell."""
    if _TIOCOUTQ is None:
        return None
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, _TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return None


class StreamTransport:
    """Any ``trio.abc.Stream``: waiting for input is receiving it.

    A ``trio.SSLStream`` (an embedder's ``trio.serve_ssl_over_tcp``) gets its handshake done
    under the handshake timeout, and its client certificate's subject as ``identity``.
    """

    __slots__ = ("_received", "_scope", "_stream", "identity", "may_have_more", "needs_handshake")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._received: bytes | None = None
        self._scope: trio.CancelScope | None = None
        # Every read is a receive_some, itself a checkpoint: no extra yield is needed.
        self.may_have_more = False
        self.needs_handshake = isinstance(stream, trio.SSLStream)
        self.identity: str | None = None

    async def handshake(self, deadline: float) -> bool:
        stream = self._stream
        if not isinstance(stream, trio.SSLStream):
            return True
        done = False
        with trio.move_on_at(deadline) as self._scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                detail = describe_ssl_error(cause) if isinstance(cause, ssl.SSLError) else None
                raise TLSFailure(
                    "tls-handshake-failed", detail or "the client closed during the handshake"
                ) from None
            done = True
        self._scope = None
        if not done:
            if trio.current_time() >= deadline:
                raise TLSFailure("tls-handshake-timeout", "no complete TLS handshake in time")
            return False  # woken for shutdown
        self.identity = peer_identity(stream.getpeercert())
        return True

    def read_nowait(self) -> bytes | None:
        data, self._received = self._received, None
        return data

    async def wait_readable(self, deadline: float) -> int:
        # The scope covers only the receive: a shutdown just as input arrives cannot lose it.
        with trio.move_on_at(deadline) as self._scope:
            self._received = bytes(await self._stream.receive_some(RECEIVE_SIZE))
        self._scope = None
        return 1 if self._received is not None else 0

    def answer_while_waiting(self, answerer: Answerer) -> None:
        pass  # every wait is a receive_some: what arrives ends it

    def read_arrived(self) -> bytes | None:
        return self.read_nowait()

    def wake(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def try_send(self, data: bytes) -> int:
        return 0

    def unacknowledged(self) -> int | None:
        # A stream shows no unsent queue, but a TCP socket under it does: an embedder's
        # SocketStream (no epoll) or trio.SSLStream over one (trio.serve_ssl_over_tcp),
        # whose send_all returns once the kernel took the records.
        sock = _socket_under(self._stream)
        return None if sock is None else _send_queue_bytes(sock.socket.fileno())

    async def send_rest(self, data: bytes, sent: int, stall_timeout: float) -> None:
        # No unsent queue is visible through a stream: each piece that goes is progress.
        if len(data) - sent <= STREAM_SEND_PIECE:
            with trio.fail_after(stall_timeout):
                await self._stream.send_all(memoryview(data)[sent:] if sent else data)
            return
        view = memoryview(data)
        for start in range(sent, len(data), STREAM_SEND_PIECE):
            with trio.fail_after(stall_timeout):
                await self._stream.send_all(view[start : start + STREAM_SEND_PIECE])

    def as_stream(self) -> trio.abc.Stream:
        return self._stream

    async def aclose(self, *, at_eof: bool, reset: bool = False) -> None:
        if reset:
            _reset_on_close(_socket_under(self._stream))
        await trio.aclose_forcefully(self._stream)


def _socket_under(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The TCP stream ``stream`` is, or a ``trio.SSLStream`` runs over; None for others."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream if isinstance(stream, trio.SocketStream) else None
