"""The async client: ``open_client`` opens a connection, ``Client`` sends over it.

Two tasks share each connection: one writes messages (up to ``window`` unanswered), the
other reads replies, verifies them against what was written and completes the waiting
callers. Keeping them apart means a large pipelined run cannot deadlock with both peers
blocked writing. A supervising task reconnects after a loss and puts every unanswered
message back at the front of the queue, so delivery is at-least-once. A message the server
answers ``ERR <seq> unavailable`` (not acknowledged, try later) is held back and written again
after a backoff, on whatever connection is up then.

Replies are framed and parsed by the sans-IO ``ackservice.protocol``; this module only
moves bytes and keeps time. With TLS the handshake is part of opening a connection (inside
the connect timeout), so a certificate that does not verify is reported at connect; every
TLS failure, like ``ERR 0 forbidden`` and ``ERR 0 tls-required``, is final (``client/tls.py``
says where each one surfaces).
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import structlog
import trio

from ..errors import (
    AckMismatchError,
    AckServiceError,
    AckTimeoutError,
    ConnectError,
    ConnectionLostError,
    MessageRejectedError,
    ProtocolError,
    ServerRefusedError,
    TLSError,
)
from ..protocol import (
    MAX_REPLY_LINE_BYTES,
    Ack,
    Err,
    ErrorCode,
    MessageFramer,
    Oversized,
    parse_reply,
)
from .config import ClientConfig
from .message import ClientStats, Outgoing, Receipt
from .pipeline import Deliveries
from .retry import RetryBudget, backoff_delay, describe_connect_error
from .tls import close_stream, is_truncated, start_tls, tls_refusal
from .wakeup import Wakeup

__all__ = ["Client", "StreamOpener", "open_client"]

log = structlog.get_logger(__name__)


def _log_event(level: str, event: str, **fields: object) -> None:
    """Log through structlog once the application has configured it, and not before.

    Unconfigured, structlog prints every event, debug included, to stdout, which belongs to
    the application: a library must not write there on its own (the stdlib's
    ``NullHandler`` convention). Routine events are debug; only possible duplicates warn.
    """
    if structlog.is_configured():
        getattr(log, level)(event, **fields)


StreamOpener = Callable[[], Awaitable[trio.abc.Stream]]
"""``async def connect() -> trio.abc.Stream``: opens one connection to the server."""

# One read takes up to this much; at ~20 bytes per reply that is thousands of replies.
RECEIVE_SIZE = 65536
# One write carries at most about this much, so a window of large messages is not first
# copied into one huge buffer.
MAX_WRITE_BYTES = 256 * 1024

# ``ERR 0`` codes after which no reconnect can succeed: the server refuses this client's
# address, or wants TLS and was spoken to in plaintext. Every other ``ERR 0`` (``busy``,
# ``shutting-down``, ``idle-timeout``, and codes added later) ends only this connection.
_FINAL_CONNECTION_CODES = {
    ErrorCode.FORBIDDEN: "the server's --allow does not admit this client's address",
    ErrorCode.TLS_REQUIRED: "connect with --tls (or --tls-ca)",
}


@asynccontextmanager
async def open_client(
    host: str = "127.0.0.1",
    port: int = 9876,
    *,
    connect_timeout: float = 5.0,
    ack_timeout: float = 10.0,
    retries: int | None = None,
    retry_for: float = 30.0,
    window: int = 256,
    backoff_base: float = 0.1,
    backoff_cap: float = 5.0,
    tls: ssl.SSLContext | None = None,
    tls_server_name: str | None = None,
    connect: StreamOpener | None = None,
) -> AsyncIterator[Client]:
    """Connect to an ackservice server; the ``Client`` is usable inside the ``async with``.

    The connection is opened before the body runs (with the same retries as a reconnect),
    so an unreachable server is reported here, not at the first send. Leaving the block
    closes the connection; messages still unanswered then are abandoned.

    Args:
        host, port: the server's address.
        connect_timeout: seconds one connection attempt may take.
        ack_timeout: seconds the oldest unanswered message may wait for its reply.
        retries: further connection attempts after a failed one (consecutive failures;
            a reply on a connection starts the count over), and resends of one message
            answered ``unavailable``; ``None`` (the default): as many as ``retry_for``
            allows.
        retry_for: seconds a run of failures may last before the client gives up: from
            the first failed connection attempt, or from a message's first ``unavailable``
            answer. ``0`` never retries.
        window: messages written but not yet answered, at most.
        backoff_base, backoff_cap: the exponential backoff with full jitter between
            attempts starts at ``backoff_base`` seconds and never exceeds ``backoff_cap``.
        tls: connect over TLS with this context, e.g. ``client_tls_context(ca="ca.pem")``
            (which verifies the server's certificate, TLS 1.2 at least). The handshake
            completes within ``connect_timeout``, before the body runs.
        tls_server_name: the name the server's certificate must carry (also sent as SNI);
            by default ``host``. For connecting by address to a certificate issued for
            a name.
        connect: opens the stream instead of ``trio.open_tcp_stream(host, port)`` (with
            ``tls``, TLS then runs over that stream); ``host``/``port`` then only name the
            server in messages.

    Raises:
        TLSError: the server's certificate did not verify, the handshake failed, or the
            port does not serve TLS (never retried).
        ConnectError: no connection could be opened within the retry budget (or the host
            name does not resolve: that is not retried).
        ValueError: a setting is out of range.

    A server's refusal that arrives after the connection opened (``ERR 0 forbidden``,
    ``ERR 0 tls-required``, a TLS alert rejecting the client certificate) fails every
    message with ``ServerRefusedError`` or ``TLSError``; neither is retried.
    """
    config = ClientConfig(
        host=host,
        port=port,
        connect_timeout=connect_timeout,
        ack_timeout=ack_timeout,
        retries=retries,
        retry_for=retry_for,
        window=window,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        tls=tls,
        tls_server_name=tls_server_name,
    )
    client = Client(config, connect=connect)
    stream = await client._connect()
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            nursery.start_soon(client._maintain, stream)
            nursery.start_soon(client._release_held)
            try:
                yield client
            finally:
                client._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our background tasks never raise (failures are handed to the callers that wait
        # for them), so a group of one is the body's own exception: give it back as is,
        # rather than make every caller unwrap a nursery they cannot see.
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise
    finally:
        await close_stream(stream)


def _retrying(budget: RetryBudget) -> dict[str, object]:
    """How long (and how many times) a run of failed attempts goes on, for its warning."""
    fields: dict[str, object] = {}
    remaining = budget.remaining(trio.current_time())
    if math.isfinite(remaining):
        fields["retrying_for"] = round(max(0.0, remaining), 1)
    if budget.retries is not None:
        fields["retries_left"] = max(0, budget.retries - budget.failures + 1)
    return fields


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` without making the group it came out of its context (as
    trio-websocket's ``open_websocket`` does, for the same reason)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


class Client:
    """A connection to an ackservice server that survives reconnects; use ``open_client``.

    ``send`` and ``send_many`` may be used from any number of tasks at once: everything
    goes out on one connection, in submission order, at most ``config.window`` messages
    unanswered at a time.

    Every ``ACK`` is verified (its ``seq`` is the next one, its length and CRC-32 match the
    payload sent); anything else ends the client with ``AckMismatchError``. After a lost
    connection, or ``ERR 0 shutting-down``, the client reconnects and sends every
    unanswered message again: delivery is at-least-once, so the server may see a message
    twice. A message answered ``ERR <seq> unavailable`` (the server did not keep it) is
    written again after a backoff, until the retry budget runs out; any other refusal
    (``ERR <seq>``) is final and the message is never sent again.

    Attributes:
        config: the settings in use.
        stats: running totals (messages sent, resent, acknowledged, rejected, ...).
    """

    def __init__(self, config: ClientConfig, *, connect: StreamOpener | None = None) -> None:
        self.config = config
        self.stats = ClientStats()
        self._open_stream: StreamOpener = connect or partial(
            trio.open_tcp_stream, config.host, config.port
        )
        self._rng = random.Random()
        self._budget = RetryBudget(config.retries, config.retry_for)
        self._unsent: deque[Outgoing] = deque()
        self._in_flight: deque[Outgoing] = deque()
        self._work = Wakeup()  # messages to send, or room in the window
        # Messages answered ``unavailable``, waiting for the backoff to end at _resume_at.
        # While any wait, the writer sends nothing at all: the server's store is in
        # trouble, and new messages would only come back ``unavailable`` too.
        self._held: list[Outgoing] = []
        self._held_arrived = Wakeup()
        self._resume_at = -math.inf
        self._unavailable_streak = 0  # backoffs since the last ACK: the backoff exponent
        self._reply_wait: trio.CancelScope | None = None
        self._failure: AckServiceError | None = None
        self._closed = False
        self._nursery: trio.Nursery | None = None

    @property
    def in_flight(self) -> int:
        """Messages written on the current connection and not yet answered."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Messages waiting to be written (new ones, or ones to resend after a reconnect
        or an ``unavailable`` answer)."""
        return len(self._unsent) + len(self._held)

    async def send(self, payload: bytes) -> Ack:
        """Send one message and wait for its verified acknowledgment.

        If the call is cancelled before the message was written, it is not sent; once
        written it may still reach the server.

        Raises:
            MessageRejectedError: the server answered ``ERR <seq> <code> <detail>``; for
                ``unavailable``, only once the retry budget ran out.
            AckTimeoutError, AckMismatchError, ConnectError, ConnectionLostError,
            ProtocolError: the client failed (see ``Client``); it cannot be used further.
            ValueError: the payload contains a newline.
        """
        reply = (await self.deliver(payload)).reply
        if isinstance(reply, Err):
            raise MessageRejectedError(reply.seq, reply.code, reply.detail)
        return reply

    async def deliver(self, payload: bytes) -> Receipt:
        """Like ``send``, but a refusal is returned in the receipt instead of raised.

        The receipt also tells the round-trip time and how often the message was written.

        Raises:
            AckServiceError: the client failed, as for ``send`` (but never
                ``MessageRejectedError``).
            ValueError: the payload contains a newline.
        """
        message = self._submit(payload)
        try:
            await message.wait()
        finally:
            if not message.done:
                self._withdraw(message)
        return message.receipt()

    def send_many(self, payloads: Iterable[bytes] | AsyncIterable[bytes]) -> Deliveries:
        """Send every payload, pipelined, and iterate over their ``Receipt``\\ s in order.

        Payloads are taken from the iterable only as fast as receipts are consumed (at
        most two windows ahead), so an endless or huge source streams in bounded memory.
        A plain iterable must not block; read files or sockets through an async iterable.

        A refused message yields a receipt whose ``reply`` is an ``Err``; the iteration
        goes on. If the client fails, the receipts of the messages answered before the
        failure come first, then the error is raised. An exception from the source (or a
        payload containing a newline) is raised in its place in the order.

        Stopping early (``break``): call ``aclose()`` on the iterator (or use
        ``contextlib.aclosing``) to stop taking payloads; the ones already taken may still
        be delivered.

        Every receipt is a cancel point; one already answered comes without a turn of
        Trio's scheduler, except every ``YIELD_EVERY``-th (64), so draining a large window
        is not a scheduler turn per message.
        """
        return Deliveries(self, payloads, self.config.window)

    # -- used by Deliveries -----------------------------------------------------------------

    def _submit(self, payload: bytes) -> Outgoing:
        """Queue ``payload`` for sending; the returned record completes with its reply."""
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        payload = _checked_payload(payload)
        self.stats.submitted += 1
        message = Outgoing(self.stats.submitted, payload)
        if self._failure is not None:
            message.fail(self._failure)
        else:
            self._unsent.append(message)
            if len(self._in_flight) < self.config.window:
                self._work.set()  # the writer has room; when it has none, a reply wakes it
        return message

    def _start_soon(self, task: Callable[[], Awaitable[object]]) -> None:
        if self._closed or self._nursery is None:
            raise trio.ClosedResourceError("the client is closed")
        self._nursery.start_soon(task)

    # -- internals -------------------------------------------------------------------------

    def _withdraw(self, message: Outgoing) -> None:
        """Take back a message nobody waits for any more, if it was not written yet."""
        # Already written if it is not there: its reply will be read and dropped.
        with contextlib.suppress(ValueError):
            self._unsent.remove(message)
        # One the server did not keep (``unavailable``) is not written again either.
        with contextlib.suppress(ValueError):
            self._held.remove(message)

    def _close(self) -> None:
        self._closed = True
        self._fail(ConnectionLostError("closed", "the client was closed before the reply"))

    def _fail(self, failure: AckServiceError) -> None:
        """Give up: every unanswered message, and every later one, fails with ``failure``."""
        if self._failure is None:
            self._failure = failure
        for message in self._in_flight:
            message.fail(self._failure)
        for message in self._unsent:
            message.fail(self._failure)
        for message in self._held:
            message.fail(self._failure)
        self._in_flight.clear()
        self._unsent.clear()
        self._held.clear()

    async def _connect(self, lost: ConnectionLostError | None = None) -> trio.abc.Stream:
        """Open a connection, retrying within the budget with backoff between attempts.

        Args:
            lost: why the previous connection ended; ``None`` for the first connection,
                which is tried at once (a reconnect backs off first).

        Raises:
            ConnectError: the budget ran out.
        """
        config = self.config
        budget = self._budget
        immediately = lost is None
        said = False
        while True:
            if not immediately:
                # The first retry's bound is backoff_base, then it doubles; the last one
                # is cut short so that it starts when retry_for ends, not after.
                retry = max(0, budget.failures - 1)
                delay = backoff_delay(retry, config.backoff_base, config.backoff_cap, self._rng)
                await trio.sleep(max(0.0, min(delay, budget.remaining(trio.current_time()))))
            immediately = False
            budget.attempt_starting(trio.current_time())
            handshaking = False
            try:
                with trio.fail_after(config.connect_timeout):
                    stream = await self._open_stream()
                    if config.tls is not None:
                        handshaking = True
                        server_name = config.tls_server_name or config.host
                        stream = await start_tls(stream, config.tls, server_name)
            except trio.TooSlowError as exc:
                cause: BaseException = exc
                reason = f"timed out after {config.connect_timeout:g} s"
                if handshaking:
                    # A plaintext server that got a ClientHello without a newline in it
                    # waits for the rest of the "message"; so does a stalled TLS server.
                    reason += " in the TLS handshake (is the port serving TLS?)"
            except TLSError as exc:
                # Another attempt would meet the same certificates: say so at once.
                raise TLSError(f"cannot connect to {config.address}: {exc}", exc.reason) from exc
            except trio.BrokenResourceError as exc:
                cause = exc
                reason = "connection reset during the TLS handshake"
            except OSError as exc:
                cause = exc
                reason = describe_connect_error(exc)
                if lost is None and isinstance(exc, socket.gaierror):
                    # A name that never resolved is most likely wrong: waiting retry_for
                    # would only delay saying so. After a reconnect the name did resolve
                    # before, so a failure then is a DNS hiccup, retried like a refusal.
                    raise ConnectError(f"cannot connect to {config.address}: {reason}") from exc
            else:
                self.stats.connections += 1
                _log_event(
                    "debug", "connected", server=config.address, connection=self.stats.connections
                )
                return stream
            if not budget.failed(trio.current_time()):
                summary = budget.summary(trio.current_time())
                if lost is None:
                    failure = f"cannot connect to {config.address}: {reason} ({summary})"
                else:
                    failure = (
                        f"lost the connection to {config.address} ({lost.reason}) and "
                        f"cannot reconnect: {reason} ({summary})"
                    )
                raise ConnectError(failure) from cause
            # Said once per run of failures (a warning, shown by default), so a user whose
            # server is down is not left looking at silence for up to retry_for; each
            # further attempt is a debug event.
            _log_event(
                "warning" if not said else "debug",
                "connect_failed",
                server=config.address,
                reason=reason,
                failures=budget.failures,
                **({} if said else _retrying(budget)),
            )
            said = True

    async def _maintain(self, stream: trio.abc.Stream) -> None:
        """Serve connection after connection until the client fails or is closed."""
        while True:
            link = await self._serve(stream)
            if self._failure is not None or link.lost is None:
                return
            lost = link.lost
            if link.replies == 0 and not self._budget.failed(trio.current_time()):
                summary = self._budget.summary(trio.current_time())
                detail = f"{lost.detail} ({summary})" if lost.detail else summary
                self._fail(ConnectionLostError(lost.reason, detail))
                return
            resending = sum(1 for message in self._unsent if message.attempts)
            _log_event(
                "warning" if resending else "debug",
                "connection_lost",
                server=self.config.address,
                reason=lost.reason,
                detail=lost.detail,
                resending=resending,
            )
            # Reconnect only when there is something to send: an idle client that the
            # server closed (idle-timeout) does not keep opening connections. (Messages
            # held after ``unavailable`` count once their backoff ends.)
            while not self._unsent:
                await self._work.wait()
            try:
                stream = await self._connect(lost)
            except ConnectError as exc:
                self._fail(exc)
                return

    async def _serve(self, stream: trio.abc.Stream) -> _Link:
        """Run the writer and the reader on one connection until it ends."""
        try:
            async with trio.open_nursery() as nursery:
                link = _Link(stream, nursery.cancel_scope)
                nursery.start_soon(self._write_loop, link)
                nursery.start_soon(self._read_loop, link)
        finally:
            # Every unanswered message goes back to the front of the queue, in order.
            self._unsent.extendleft(reversed(self._in_flight))
            self._in_flight.clear()
            await close_stream(stream)
        return link

    async def _write_loop(self, link: _Link) -> None:
        # On a broken connection the writer just stops: the reader is about to see the
        # end too, with the server's reason if it gave one (ERR 0 ...), so it decides
        # how the connection ended.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._write_messages(link.stream)

    async def _write_messages(self, stream: trio.abc.Stream) -> None:
        unsent = self._unsent
        in_flight = self._in_flight
        window = self.config.window
        stats = self.stats
        held = self._held
        while True:
            while not unsent or len(in_flight) >= window or held:
                await self._work.wait()
            now = trio.current_time()
            was_idle = not in_flight
            chunks = []
            size = 0
            while unsent and len(in_flight) < window and size < MAX_WRITE_BYTES:
                message = unsent.popleft()
                message.attempts += 1
                message.sent_at = now
                if message.attempts == 1:
                    stats.sent += 1
                elif message.retry_pending:
                    stats.retried += 1
                else:
                    stats.resent += 1
                message.retry_pending = False
                in_flight.append(message)
                chunk = message.wire()
                chunks.append(chunk)
                size += len(chunk)
            if was_idle and self._reply_wait is not None:
                # The reader is waiting without a deadline; the ack timeout starts now.
                self._reply_wait.deadline = now + self.config.ack_timeout
            await stream.send_all(b"".join(chunks))

    async def _read_loop(self, link: _Link) -> None:
        try:
            await self._read_replies(link)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            refusal = tls_refusal(exc, self.config.address)
            if refusal is not None:
                # A fatal alert, typically the server rejecting the client certificate
                # (with TLS 1.3 it arrives after the client's handshake completed).
                self._fail(refusal)
                link.scope.cancel()
            elif is_truncated(exc):
                detail = "the server closed the TLS connection without close_notify"
                if link.replies == 0:
                    # What a server that rejects the client certificate without sending
                    # its alert looks like; a crashed one looks the same, so it is retried.
                    detail += " before any reply (if it requires a client certificate: --tls-cert)"
                link.lose("closed", detail)
            else:
                link.lose("reset", "the connection was reset")
        except AckServiceError as exc:
            # A silent server, a reply that does not match, a malformed line: reconnecting
            # would not make the server trustworthy again, so the client gives up.
            self._fail(exc)
            link.scope.cancel()

    async def _read_replies(self, link: _Link) -> None:
        framer = MessageFramer(MAX_REPLY_LINE_BYTES)
        stream = link.stream
        ack_timeout = self.config.ack_timeout
        while True:
            in_flight = self._in_flight
            deadline = in_flight[0].sent_at + ack_timeout if in_flight else math.inf
            with trio.CancelScope(deadline=deadline) as reply_wait:
                self._reply_wait = reply_wait
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._reply_wait = None
            if reply_wait.cancelled_caught:
                raise AckTimeoutError(
                    f"no reply to message {self._in_flight[0].index} within {ack_timeout:g} s"
                )
            if not data:
                # A partial line before EOF is a reply cut off mid-way: its message is
                # unanswered and will be resent.
                link.lose("closed", "the server closed the connection")
                return
            now = trio.current_time()
            for line in framer.feed(data):
                if isinstance(line, Oversized):
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE_BYTES} bytes")
                reply = parse_reply(line)
                if isinstance(reply, Err) and reply.is_connection_error:
                    if reply.code in _FINAL_CONNECTION_CODES:
                        raise self._refused(reply)
                    link.lose(reply.code, reply.detail)
                    return
                self._take_reply(link, reply, now)
            self._work.set()  # answered messages made room in the window

    def _refused(self, reply: Err) -> ServerRefusedError:
        """The final error for ``ERR 0 forbidden`` or ``ERR 0 tls-required``."""
        said = f"{reply.code}: {reply.detail}" if reply.detail else reply.code
        return ServerRefusedError(
            f"{self.config.address} refused this client ({said}); "
            f"{_FINAL_CONNECTION_CODES[reply.code]}",
            reply.code,
            reply.detail,
        )

    def _take_reply(self, link: _Link, reply: Ack | Err, now: float) -> None:
        """Match ``reply`` to the oldest unanswered message and complete it."""
        in_flight = self._in_flight
        expected = link.replies + 1
        if not in_flight:
            raise AckMismatchError(f"reply with seq {reply.seq} to a message that was not sent")
        message = in_flight[0]
        if reply.seq != expected:
            raise AckMismatchError(
                f"message {message.index}: reply with seq {reply.seq}, expected seq {expected}"
            )
        if isinstance(reply, Ack):
            if reply.nbytes != len(message.payload) or reply.crc32 != message.crc32:
                raise AckMismatchError(
                    f"message {message.index}: acknowledged as {reply.nbytes} bytes with crc32 "
                    f"{reply.crc32:08x}, but {len(message.payload)} bytes with crc32 "
                    f"{message.crc32:08x} were sent"
                )
            self.stats.acked += 1
            self._unavailable_streak = 0
        elif reply.code != ErrorCode.UNAVAILABLE:
            self.stats.rejected += 1
        in_flight.popleft()
        link.replies = expected
        if expected == 1:
            # Progress, even for ``unavailable``: the connection works, the store does not.
            self._budget.succeeded()
        if isinstance(reply, Err) and reply.code == ErrorCode.UNAVAILABLE:
            self._hold(message, reply, now)
        else:
            message.complete(reply, now)

    def _hold(self, message: Outgoing, reply: Err, now: float) -> None:
        """``unavailable``: keep ``message`` to write again after a backoff, or give up on
        it (complete it with this answer) once its retry budget is spent."""
        config = self.config
        message.unavailable_answers += 1
        if message.first_unavailable_at is None:
            message.first_unavailable_at = now
        deadline = message.first_unavailable_at + config.retry_for
        if now >= deadline or (
            config.retries is not None and message.unavailable_answers > config.retries
        ):
            self.stats.unavailable += 1
            message.complete(reply, now)
            return
        message.retry_pending = True
        self._held.append(message)
        if len(self._held) == 1:
            # The first answer of an outage starts the backoff; the rest of the window,
            # answered ``unavailable`` in the same breath, joins it instead of stacking up
            # backoffs (which would reach the cap after one window).
            delay = backoff_delay(
                self._unavailable_streak, config.backoff_base, config.backoff_cap, self._rng
            )
            self._unavailable_streak += 1
            self._resume_at = now + min(delay, deadline - now)
            self._held_arrived.set()

    async def _release_held(self) -> None:
        """When the backoff ends, put the held messages back at the front of the queue."""
        while True:
            while not self._held:
                await self._held_arrived.wait()
            await trio.sleep_until(self._resume_at)
            if not self._held or trio.current_time() < self._resume_at:
                continue  # all withdrawn (or the client failed), or a newer backoff began
            # In input order, together with any resends from a lost connection (which
            # are at the front of the queue too), ahead of every message not yet sent.
            unsent = self._unsent
            again = list(self._held)
            self._held.clear()  # in place: the writer watches this very list
            while unsent and unsent[0].attempts:
                again.append(unsent.popleft())
            again.sort(key=lambda message: message.index)
            unsent.extendleft(reversed(again))
            self._work.set()


class _Link:
    """One connection: its stream, how many replies it carried, and why it ended."""

    __slots__ = ("lost", "replies", "scope", "stream")

    def __init__(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        self.stream = stream
        self.scope = scope
        self.replies = 0
        self.lost: ConnectionLostError | None = None

    def lose(self, reason: str, detail: str) -> None:
        """The connection ended (the first reason given is kept); stop both tasks."""
        if self.lost is None:
            self.lost = ConnectionLostError(reason, detail)
        self.scope.cancel()


def _checked_payload(payload: bytes) -> bytes:
    if not isinstance(payload, bytes):
        if not isinstance(payload, bytearray | memoryview):
            raise TypeError(f"a payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
    if b"\n" in payload:
        raise ValueError(
            "a payload cannot contain a newline: the protocol ends each message at b'\\n'"
        )
    return payload
