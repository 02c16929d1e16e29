"""TLS inside the server's own socket loop: OpenSSL through memory BIOs, the socket through
the readiness hub, exactly as the plain ``SocketTransport`` moves bytes.

Why not ``trio.SSLStream``: profiled under load, its retry loop (inner checkpoints, a lock,
an ``SSLWantReadError`` raised and caught on every receive) and a cancel scope per call were
~80% of the server's time over TLS, OpenSSL itself ~5%. Here a read is one ``os.read``; the
records it completes are decrypted one ``SSLObject.read`` each, and no read is tried without
a complete record waiting (the transport follows the record boundaries in the bytes it
feeds, five-byte headers with the length), so no exception is raised per read; a read that is
exactly one whole record (request/response's every read) is decrypted at once, without that
bookkeeping. The replies to everything read are encrypted and leave in one ``write``.

The connection loop sees decrypted bytes and nothing else: the handshake (bounded by the
handshake timeout), a client's close_notify (end of stream, answered like a half-close:
every reply, then our own close_notify), and a closing ``ERR 0`` line (encrypted, then
close_notify, then the drain) all happen here. A TCP stream that ends without close_notify
was cut short (a killed client, or someone in between): the messages it completed are
answered, but it is not an end of stream, so an unterminated last line is not taken as a
message (``tls-truncated``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl

import trio

from ..protocol import ErrorCode
from .closing import close_with_error
from .readiness import ReadinessHub
from .tls import RecordBoundaries, TLSFailure, describe_ssl_error, peer_identity
from .transport import RECEIVE_SIZE, SocketTransport, send_with_progress

__all__ = ["TLSTransport"]

_TLS_HANDSHAKE_RECORD = 0x16
_RECORD_HEADER = 5  # content type, version (2 bytes), length (2 bytes)
# The largest plaintext one TLS record carries (2^14): one read takes a whole record.
_RECORD_PLAINTEXT_MAX = 16384


class TLSTransport(SocketTransport):
    """A TLS server connection over a non-blocking TCP socket served through ``hub``.

    Args:
        hub, sock, stream: as for ``SocketTransport``.
        context: the server's ``ssl.SSLContext``.
        drain_timeout: how long the ``ERR 0 tls-required`` line for a plaintext client is
            given to arrive (see ``close_with_error``).
    """

    __slots__ = (
        "_drain_timeout",
        "_established",
        "_incoming",
        "_notified",
        "_outgoing",
        "_peer_ended",
        "_records",
        "_tls",
        "_truncated",
        "_unsent",
        "_woken",
        "identity",
        "needs_handshake",
    )

    def __init__(
        self,
        hub: ReadinessHub,
        context: ssl.SSLContext,
        *,
        drain_timeout: float,
        sock: socket.socket | None = None,
        stream: trio.SocketStream | None = None,
    ) -> None:
        super().__init__(hub, sock=sock, stream=stream)
        self._first = None  # the plain port's ClientHello check: not here
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._drain_timeout = drain_timeout
        self.needs_handshake = True
        self.identity: str | None = None
        self._established = False
        self._notified = False  # our close_notify was sent
        self._peer_ended = False  # the client's close_notify
        self._truncated = False  # the end of the TCP stream, without close_notify
        self._unsent = b""  # encrypted replies the socket did not take yet
        self._woken = False  # wake() was called: a handshake in progress gives up
        self._records = RecordBoundaries()  # in what was fed to OpenSSL

    async def handshake(self, deadline: float) -> bool:
        tls = self._tls
        first = True
        while True:
            raw = SocketTransport.read_nowait(self)
            if raw:
                if first and raw[0] != _TLS_HANDSHAKE_RECORD:
                    await self._tell_plaintext_client()
                    raise TLSFailure(
                        ErrorCode.TLS_REQUIRED,
                        "the client sent plaintext to this TLS port; it was told to use TLS",
                    )
                first = False
                self._feed(raw)
            elif raw == b"":
                raise TLSFailure(
                    "tls-handshake-failed", "the client closed the connection during the handshake"
                )
            # Only with new bytes: without them OpenSSL can only say it wants more, and
            # saying so (an exception) costs more than not asking.
            if raw is not None:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush_handshake(deadline)
                    if self.may_have_more:
                        continue
                except ssl.SSLError as exc:
                    # Tell the client why (the alert OpenSSL wrote), without waiting for it.
                    with contextlib.suppress(OSError):
                        os.write(self._fd, self._outgoing.read())
                    raise TLSFailure("tls-handshake-failed", describe_ssl_error(exc)) from None
            if trio.current_time() >= deadline:
                raise _handshake_timeout() from None
            if self._woken:
                return False  # the server is shutting down
            if not await self.wait_readable(deadline):
                if trio.current_time() >= deadline:
                    raise _handshake_timeout() from None
                return False  # woken: the server is shutting down
        self._established = True
        await self._flush_handshake(deadline)  # the last flight, the session tickets
        self.identity = peer_identity(tls.getpeercert())
        return True

    def read_nowait(self) -> bytes | None:
        # The raw read of SocketTransport.read_nowait, inlined: this is the hot path of
        # request/response over TLS, where each call costs as much as decrypting a record.
        incoming = self._incoming
        records = self._records
        while True:
            raw = data = None
            if self.may_have_more:
                try:
                    raw = os.read(self._fd, RECEIVE_SIZE)
                except BlockingIOError:
                    self.may_have_more = False
                else:
                    size = len(raw)
                    if not size:
                        # A client that closes TCP without close_notify: what it sent in
                        # complete records is still answered (its replies may not reach it).
                        self._truncated = True
                    else:
                        if size < RECEIVE_SIZE and self._fd not in self._ended:
                            self.may_have_more = False
                        incoming.write(raw)
                        # Bytes before these (part of a record, a record that came
                        # with the handshake's last flight), or not one whole record:
                        # the general path, which follows the boundaries.
                        if (
                            records.tail
                            or incoming.pending != size
                            or size <= _RECORD_HEADER
                            or size != _RECORD_HEADER + (raw[3] << 8 | raw[4])
                        ):
                            records.feed(raw)
                        else:
                            # Exactly one whole record with nothing before it: every read
                            # of request/response, and of a client that pipelines a record
                            # per batch. Decrypted here, without following its boundaries
                            # or looping: its plaintext is shorter than the record, so one
                            # read of that size takes it all (and allocates no more).
                            try:
                                data = self._tls.read(size)
                            except ssl.SSLError as exc:
                                data = b""
                                self._read_failed(exc)
                            else:
                                if not data:
                                    self._read_failed(None)
            # More bytes waiting than the incomplete last record holds: a record is complete.
            # (Nothing decrypted is ever left inside OpenSSL: a read takes a whole record.)
            if data is None and incoming.pending > records.tail:
                data = self._decrypt()
            if data is not None:
                if self._outgoing.pending:  # OpenSSL answered the client (an alert, a key update)
                    self._send_aside()
                if data:
                    if incoming.pending > records.tail:
                        # _decrypt stopped before a complete record: read on without waiting
                        # (no edge may come for bytes already read).
                        self.may_have_more = True
                    return data
            if self._peer_ended:
                return b""
            if self._truncated:
                # Not b"": that would make an unterminated last line a message, and TLS
                # knows this stream was cut (in a line, perhaps), unlike plain TCP's FIN.
                raise TLSFailure(
                    "tls-truncated",
                    "the client closed the connection without close_notify; "
                    "an unterminated last line, if any, was dropped",
                )
            if raw is None or not self.may_have_more:
                return None

    def try_send(self, data: bytes) -> int:
        """Encrypt ``data`` and send what goes now: ``len(data)`` if every record left,
        else 0, and ``send_rest`` sends the records still waiting."""
        self._tls.write(data)
        records = self._outgoing.read()
        if self._unsent:  # records OpenSSL wrote while reading go first
            records, self._unsent = self._unsent + records, b""
        try:
            sent = os.write(self._fd, records)
        except BlockingIOError:
            sent = 0
        if sent == len(records):
            return len(data)
        self._unsent = records[sent:]
        return 0

    async def send_rest(self, data: bytes, sent: int, stall_timeout: float) -> None:
        # What is left is in _unsent (try_send kept the encrypted records), not data[sent:].
        # Kept there until it all went: after a send timeout, aclose must see that a record
        # went only in part, and send no close_notify after it.
        await send_with_progress(self._fd, self._unsent, 0, stall_timeout)
        self._unsent = b""

    def as_stream(self) -> trio.abc.Stream:
        return _TLSGoodbye(self, SocketTransport.as_stream(self))

    def wake(self) -> None:
        self._woken = True
        super().wake()

    async def aclose(self, *, at_eof: bool, reset: bool = False) -> None:
        # Not after a record that went only in part (a send timeout): it would be garbage.
        if self._established and not self._notified and not self._unsent and not reset:
            # Best effort, without waiting: the client has had every reply already.
            with contextlib.suppress(OSError):
                os.write(self._fd, self.close_notify())
        await super().aclose(at_eof=at_eof, reset=reset)

    def close_notify(self) -> bytes:
        """Our close_notify alert, encrypted, to be sent (once)."""
        self._notified = True
        with contextlib.suppress(ssl.SSLError):  # waiting for the client's: not needed
            self._tls.unwrap()
        return self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        self._tls.write(data)
        return self._outgoing.read()

    def _feed(self, raw: bytes) -> None:
        self._incoming.write(raw)
        self._records.feed(raw)

    def _decrypt(self) -> bytes:
        """The plaintext of every complete record fed so far (``b""``: none)."""
        tls = self._tls
        incoming = self._incoming
        records = self._records
        chunks: list[bytes] = []
        while incoming.pending > records.tail:
            try:
                chunk = tls.read(_RECORD_PLAINTEXT_MAX)
            except ssl.SSLError as exc:
                self._read_failed(exc)
                break
            if not chunk:
                self._read_failed(None)
                break
            chunks.append(chunk)
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_failed(self, exc: ssl.SSLError | None) -> None:
        """Take note of a record that gave no plaintext (``exc``: what ``SSLObject.read``
        raised, None for its ``b""``): the reading of records stops there.

        Raises:
            TLSFailure: the record did not decrypt.
        """
        if isinstance(exc, ssl.SSLWantReadError):
            return  # the record was a key update, not data
        if exc is not None and not isinstance(exc, ssl.SSLZeroReturnError):
            # OpenSSL refuses to encrypt anything after this, so messages decrypted
            # before it in this read cannot be acknowledged: the client resends them.
            # The alert OpenSSL wrote goes out with the close (aclose).
            raise TLSFailure("tls-error", describe_ssl_error(exc)) from None
        # How Python reports the client's close_notify (b"" or SSLZeroReturnError): its
        # half-close. Read again without waiting (no edge may ever come): that read says so.
        self._peer_ended = True
        self.may_have_more = True

    def _send_aside(self) -> None:
        """Send what OpenSSL wrote while reading (an alert refusing renegotiation, the answer
        to a key update) now, not with the next reply, which may never come."""
        records = self._outgoing.read()
        if self._unsent:
            self._unsent += records  # behind replies still waiting: in order
            return
        try:
            sent = os.write(self._fd, records)
        except BlockingIOError:
            sent = 0
        self._unsent = records[sent:]

    async def _flush_handshake(self, deadline: float) -> None:
        records = self._outgoing.read()
        if not records:
            return
        try:
            sent = os.write(self._fd, records)
        except BlockingIOError:
            sent = 0
        if sent < len(records):
            try:
                await send_with_progress(
                    self._fd, records, sent, max(0.001, deadline - trio.current_time())
                )
            except trio.TooSlowError:
                raise _handshake_timeout() from None

    async def _tell_plaintext_client(self) -> None:
        """``ERR 0 tls-required`` in plaintext, the only thing a plaintext client can read."""
        with contextlib.suppress(OSError):
            await close_with_error(
                SocketTransport.as_stream(self),
                ErrorCode.TLS_REQUIRED,
                # Generic words: the reader may be nc or another client, not ours
                # (ours adds its own flags, and said them twice when this named them too).
                "this port serves TLS only; reconnect with TLS",
                self._drain_timeout,
            )


def _handshake_timeout() -> TLSFailure:
    return TLSFailure("tls-handshake-timeout", "the TLS handshake did not complete in time")


class _TLSGoodbye(trio.abc.HalfCloseableStream):
    """The connection's last moments over TLS, as ``close_with_error`` uses them: an
    encrypted line, close_notify with the half-close, and a drain that discards whatever
    arrives (still encrypted: nobody reads it)."""

    def __init__(self, transport: TLSTransport, raw: trio.abc.Stream) -> None:
        self._transport = transport
        self._raw = raw

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._raw.send_all(self._transport.encrypt(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self._raw.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._raw.send_all(self._transport.close_notify())
        if isinstance(self._raw, trio.abc.HalfCloseableStream):
            await self._raw.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._raw.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._raw.aclose()
