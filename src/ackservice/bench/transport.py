"""The load generator's connections: TCP sockets driven with ``trio.lowlevel``, or any Stream.

``trio.SocketStream`` is built for correctness in every use: each successful ``send_all``
ends with a trip through the scheduler (``cancel_shielded_checkpoint``) and every call goes
through conflict detection and error translation. A load generator pays that on every
message; in request/response mode that is several microseconds of client CPU per message,
enough to make the client the bottleneck. ``SocketTransport`` keeps Trio's guarantees where
they matter and drops the rest:

- a receive makes exactly one scheduler trip: it waits for readability when nothing is
  there, and otherwise yields once anyway, so a connection whose replies are always ready
  cannot starve the others or miss a cancellation;
- a send the kernel takes whole makes none (every send is followed by a receive, which
  yields); only a full socket buffer makes it wait for writability.

``StreamTransport`` adapts any ``trio.abc.Stream`` (memory streams in tests, ``trio.SSLStream``
for TLS) to the same methods. Both raise ``trio.BrokenResourceError`` when the connection
breaks.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Final, Protocol

import trio

__all__ = [
    "CLOSE_TIMEOUT",
    "SocketTransport",
    "StreamTransport",
    "Transport",
    "open_socket_stream",
    "open_tcp",
]

# A graceful close (close_notify) is one small write: it waits only for a peer that stopped
# reading, and then there is no clean end to be had.
CLOSE_TIMEOUT: Final = 1.0


class Transport(Protocol):
    """What the load generator needs from a connection."""

    @property
    def can_half_close(self) -> bool:
        """Whether ``send_eof`` ends our direction only, the replies still to come."""
        ...

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


async def open_tcp(family: int, kind: int, proto: int, address: Any) -> SocketTransport:
    """Connect a non-blocking TCP socket to ``address`` (already resolved).

    Raises:
        OSError: the connection failed (refused, unreachable, ...).
    """
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if family in (socket.AF_INET, socket.AF_INET6):
            # Replies must not wait for Nagle's algorithm; trio.SocketStream does the same.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(address)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
        else:
            await trio.lowlevel.checkpoint()
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return SocketTransport(sock)


async def open_socket_stream(family: int, kind: int, proto: int, address: Any) -> trio.SocketStream:
    """Connect a Trio socket to ``address`` (already resolved): the transport under TLS,
    where ``trio.SSLStream`` needs a ``trio.abc.Stream``.

    Raises:
        OSError: the connection failed.
    """
    sock = trio.socket.socket(family, kind, proto)
    try:
        await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class SocketTransport:
    """A connected non-blocking TCP socket, driven with ``trio.lowlevel`` waits."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @property
    def can_half_close(self) -> bool:
        """Always: TCP's ``shutdown(SHUT_WR)``."""
        return True

    async def send_all(self, data: bytes) -> None:
        """Send every byte of ``data``."""
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        if sent == len(data):
            return
        with memoryview(data) as view:
            remaining = view[sent:]
            while remaining:
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent = sock.send(remaining)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                remaining = remaining[sent:]

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at the end of the stream."""
        sock = self._sock
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(max_bytes)
                except BlockingIOError:
                    continue  # a spurious wake-up
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        await trio.lowlevel.checkpoint()  # data was ready at once: yield anyway, see above
        return data

    async def send_eof(self) -> None:
        """Half-close: the server sees the end of our stream and may still reply."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"shutdown failed: {exc}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close at once, whatever is in flight (never blocks, never raises)."""
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


class StreamTransport:
    """Any ``trio.abc.Stream`` as a ``Transport``.

    A ``trio.SSLStream`` cannot half-close: TLS 1.3 could in principle, but Trio's
    ``SSLStream`` has no ``send_eof``, and its ``aclose`` sends close_notify and closes the
    socket at once. So over TLS the load generator waits for every reply, then closes.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    @property
    def can_half_close(self) -> bool:
        """Whether the stream is a ``trio.abc.HalfCloseableStream``."""
        return isinstance(self._stream, trio.abc.HalfCloseableStream)

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        """Half-close if the stream can; otherwise there is nothing to signal."""
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        """Close gracefully (TLS: close_notify first) within ``CLOSE_TIMEOUT``, else at
        once; never raises a broken-connection error."""
        with (
            trio.move_on_after(CLOSE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self._stream.aclose()
        await trio.aclose_forcefully(self._stream)
