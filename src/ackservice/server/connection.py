"""One served connection: read, answer, write, until the connection ends.

One loop serves every kind of connection; how bytes move is the transport's business
(``transport.py``: raw sockets through the readiness hub, or any Trio stream). How messages
are answered depends on what the server keeps:

- nothing (no store, no hook): the ``Acknowledger`` answers from lengths and running
  checksums alone, without keeping payloads (the fastest path);
- a store or an ``on_message`` hook: the framer hands out payloads, which go to the
  committer, and each message is answered with the store's verdict once it is in.

The idle deadline and the shutdown wake-up apply only while waiting for input, so neither
interrupts a commit or the replies to what was read; those have their own bounds (the store
timeout, ``send_timeout``, the grace period).

Memory per connection is bounded whatever the client sends: a read is answered in pieces
whose replies stay under ``REPLY_PIECE_BYTES`` (64 KiB of empty lines would otherwise make
~1.4 MB of replies), and nothing more is read while a write waits for the client.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import time
from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol

import structlog
import trio

from ..protocol import (
    ACK_FORMAT,
    OVERSIZED,
    ErrorCode,
    MessageFramer,
    Oversized,
    ack_lines,
    crc32,
    err_line,
    too_large_line,
)
from ..store.base import Failed, Message, Rejected, Unavailable, Verdict
from ..store.batch import MessageRun
from .ack_block import ack_block
from .acknowledger import Acknowledger
from .closing import close_with_error
from .committing import Committer, GroupCommitter, Parcel
from .config import ServerConfig
from .ratelimit import WarningLimiter
from .readiness import Answerer
from .tls import TLSFailure
from .transport import RECEIVE_SIZE, Transport

__all__ = ["REPLY_PIECE_BYTES", "Connection", "ConnectionOwner"]

log = structlog.get_logger(__name__)

# A read or write failing with these means the peer is gone, like a reset.
_PEER_GONE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN")
    if hasattr(errno, name)
)


REPLY_PIECE_BYTES: Final = 65536
"""Reply bytes a connection builds before writing them. With the read itself (64 KiB), this
bounds what a client that never reads pins in the server: a read of empty lines would
otherwise be answered by ~1.4 MB of ACKs held while the write waits."""
# An ACK is at most ~32 bytes for any realistic seq (16 + its digits, for an empty message),
# so input this short is answered within REPLY_PIECE_BYTES whatever it holds; and a piece
# with no more messages than this has no more than that many replies.
_MIN_PIECE: Final = REPLY_PIECE_BYTES // 32
_MAX_MESSAGES_PER_PIECE: Final = REPLY_PIECE_BYTES // 32
# Indices into Connection.error_kinds (ServerStats has a total of each).
TOO_LARGE: Final = 0
REJECTED: Final = 1
UNAVAILABLE: Final = 2
INTERNAL_ERROR: Final = 3

# What a message waiting for a commit costs besides its payload (its Message, its place in
# the batch), counted against max_pending_store_bytes: a flood of empty messages is not free.
_MESSAGE_OVERHEAD_BYTES: Final = 128


class ConnectionOwner(Protocol):
    """What a connection needs from whoever admitted it (``AckHandler``)."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def committer(self) -> Committer | None: ...

    def connection_closed(self, connection: Connection) -> None:
        """Called once, when the connection is closed: its counts join the totals."""
        ...


class _Ending(enum.Enum):
    """Why the loop returned."""

    EOF = enum.auto()
    SHUTDOWN = enum.auto()
    IDLE = enum.auto()
    UNSAID = enum.auto()
    """Shutdown before the TLS handshake completed: the client cannot be told."""


class _UnsentReplies(NamedTuple):
    replies: bytes
    sent: int


class _QueuedRead:
    """A read the dispatcher queued for a commit (``_queue_waiting``) while the connection's
    task went on waiting, until it is answered."""

    __slots__ = ("parcel", "run", "unread_edge", "waiter")

    def __init__(self, parcel: Parcel, run: MessageRun) -> None:
        self.parcel = parcel
        self.run = run
        """The read's messages (``parcel.messages``)."""
        self.unread_edge = False
        """Input arrived meanwhile and was left unread: its edge will not come again."""
        self.waiter: trio.lowlevel.Task | None = None
        """The connection's task, when it waits for the answer (``_wait_queued``)."""


class _QueueTurn(enum.Enum):
    """What ``_held`` tells the task about its queued read."""

    LEAD = enum.auto()
    """Its turn to lead the commit (``GroupCommitter.lead``)."""
    ANSWERED = enum.auto()
    """Answered, with verdicts to reply to (and log) in the task."""


def _abort_queued_wait(queued: _QueuedRead, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    # A forced exit: the read stays queued and is answered to nobody (_withdraw_queued).
    # The task is rescheduled (with Cancelled) now, but runs later: until then nothing may
    # reschedule it again (a commit's leader answering it, or handing it the lead), which
    # Trio refuses with an AssertionError in the leader's task.
    queued.waiter = None
    return trio.lowlevel.Abort.SUCCEEDED


class Connection:
    """The state of one served connection; ``run`` serves it and logs its summary."""

    __slots__ = (
        "_acknowledger",
        "_checked_for",
        "_committer",
        "_debug",
        "_first_wait",
        "_framer",
        "_held",
        "_last_message",
        "_owner",
        "_piece_bytes",
        "_queued",
        "_told",
        "_transport",
        "_unread",
        "_waiting",
        "_warnings",
        "bytes_received",
        "client_ip",
        "conn_id",
        "error_kinds",
        "errors",
        "identity",
        "messages",
        "peer",
    )

    def __init__(
        self,
        owner: ConnectionOwner,
        conn_id: int,
        peer: str,
        transport: Transport,
        client_ip: str | None = None,
    ):
        self._owner = owner
        self._transport = transport
        self.conn_id = conn_id
        self.peer = peer
        self.client_ip = client_ip
        """The client's address, when the owner counts connections per address."""
        self.identity: str | None = None
        """The authenticated client (TLS client certificate subject), after the handshake."""
        self.messages = 0
        """Messages answered so far (ACK or ERR)."""
        self.errors = 0
        self.error_kinds: list[int] | None = None
        """``errors`` by kind (``TOO_LARGE``, ``REJECTED``, ...); made on the first error,
        so the error path alone pays for it."""
        self.bytes_received = 0
        limit = owner.config.max_message_bytes
        self._debug = _debug_enabled()
        self._committer = owner.committer
        # Without a store (and without per-message debug events) nothing needs the payloads,
        # so the acknowledger answers from lengths and running checksums alone.
        self._framer: MessageFramer | None = None
        self._acknowledger: Acknowledger | None = None
        if self._committer is not None or self._debug:
            self._framer = MessageFramer(limit)
        else:
            self._acknowledger = Acknowledger(limit)
        self._waiting = False
        # What answer_waiting read or could not finish, for the task: input to answer, replies
        # partly sent, or the exception to raise.
        self._held: bytes | _UnsentReplies | Exception | _QueueTurn | None = None
        # A read the dispatcher queued for a commit, until answered (stores only).
        self._queued: _QueuedRead | None = None
        self._last_message = 0.0
        # A wait for input ends by itself at the idle deadline, or first send_timeout after
        # the last message, to look at the replies the client has not acknowledged
        # (_replies_stuck); _checked_for is the _last_message that look was for, and
        # _unread (bytes, since when) what it found while they stay.
        config = owner.config
        self._first_wait = min(config.idle_timeout, config.send_timeout)
        self._checked_for = -1.0
        self._unread: tuple[int, float] | None = None
        # Input answered at a time; lowered for a client whose replies outgrow its input
        # (tiny messages), raised again when they no longer do.
        self._piece_bytes = RECEIVE_SIZE
        # Made on the first warning: most connections never need one.
        self._warnings: WarningLimiter | None = None
        self._told = ""  # the code of the final ERR 0 line, once it was sent

    @property
    def acked(self) -> int:
        return self.messages - self.errors

    def wake_for_shutdown(self) -> None:
        """Interrupt a wait for input; a read being answered is finished first."""
        if self._waiting:
            self._transport.wake()

    def _wait_deadline(self) -> float:
        """When a wait for input ends by itself: ``send_timeout`` after the last message
        (to look at the replies, see ``_replies_stuck``), and after that look the idle
        deadline, or the next look while replies stay unacknowledged."""
        last = self._last_message
        if self._checked_for != last:
            return last + self._first_wait
        idle = last + self._owner.config.idle_timeout
        unread = self._unread
        if unread is None:
            return idle
        return min(idle, unread[1] + self._owner.config.send_timeout)

    def _replies_stuck(self, now: float) -> bool:
        """Whether replies the client was sent have stayed unacknowledged for the send
        timeout, while it completed no message either (bytes that complete none do not
        count as progress).

        A write that waits for the client has its own timeout (``send_rest``); this is the
        case where every reply went into the kernel's send buffer (megabytes, on loopback)
        and the client then stopped reading and sending alike: a hung client, or one whose
        TCP is wedged. The connection would otherwise hold those buffers until the idle
        timeout. Progress is the socket's send queue shrinking, as for ``send_rest``.
        """
        if self._checked_for != self._last_message:  # a message since: start over
            self._checked_for = self._last_message
            self._unread = None
        queued = self._transport.unacknowledged()
        if not queued:  # nothing waits (or the system cannot tell): the idle timeout applies
            self._unread = None
            return False
        unread = self._unread
        if unread is None or queued < unread[0]:  # first seen, or the client took some
            self._unread = (queued, now)
            return False
        # The same sum as _wait_deadline's, not now - since: in floating point that can fall
        # short of send_timeout at exactly the deadline, which would be re-armed as it is,
        # already passed (a busy loop under a clock that does not move by itself, MockClock).
        return now >= unread[1] + self._owner.config.send_timeout

    async def run(self) -> None:
        """Serve the connection until it ends, then close it and log its summary.

        Keep the call chain under it short: every coroutine frame here stays alive for the
        whole connection, and at thousands of idle connections frames are memory.
        """
        config = self._owner.config
        started = self._last_message = trio.current_time()
        log.info("connection_opened")
        reason = "internal-error"
        detail = ""
        at_eof = False
        identity_token = None
        try:
            transport = self._transport
            if transport.needs_handshake:
                # A shutdown wakes the handshake too; one that began before this task ran
                # is seen here (nothing could wake a handshake not yet waiting).
                established = False
                if not self._owner.shutting_down:
                    self._waiting = True
                    try:
                        established = await transport.handshake(
                            started + config.tls_handshake_timeout
                        )
                    finally:
                        self._waiting = False
                self.identity = transport.identity
                if self.identity is not None:
                    identity_token = structlog.contextvars.bind_contextvars(identity=self.identity)
                ending = await self._serve() if established else _Ending.UNSAID
            else:
                ending = await self._serve()
            if ending is _Ending.UNSAID:
                reason = ErrorCode.SHUTTING_DOWN  # nothing can be said before the handshake
            elif ending is _Ending.EOF:
                reason = "eof"
                at_eof = True
            else:
                if ending is _Ending.SHUTDOWN:
                    code, words = ErrorCode.SHUTTING_DOWN, "server is shutting down, retry later"
                else:
                    code = ErrorCode.IDLE_TIMEOUT
                    words = f"no complete message for {config.idle_timeout:g} s"
                stream = self._transport.as_stream()
                # Not a closure: its cells would be allocated with this frame, for every
                # connection, idle or not.
                told = functools.partial(setattr, self, "_told", code)
                await close_with_error(stream, code, words, config.drain_timeout, on_sent=told)
                reason = code  # the close reason in the log is the code the client was sent
        except TLSFailure as exc:
            reason, detail = exc.reason, exc.detail
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
            # A forced exit during the drain: the client was told all the same.
            reason = self._told or "cancelled"
            raise
        except Exception:
            # A bug here must end this connection only, never the accept loop.
            log.exception("connection_failed")
        finally:
            self._withdraw_queued()
            try:
                # Raises Cancelled when cancelled from outside; the totals still count.
                await self._transport.aclose(at_eof=at_eof, reset=reason == "send-timeout")
            finally:
                if self._warnings is not None:
                    self._warnings.flush()
                self._owner.connection_closed(self)
                log.info(
                    "connection_closed",
                    reason=reason,
                    messages=self.messages,
                    acked=self.acked,
                    errors=self.errors,
                    bytes=self.bytes_received,
                    duration=round(trio.current_time() - started, 6),
                    **({"detail": detail} if detail else {}),
                )
                if identity_token is not None:
                    structlog.contextvars.reset_contextvars(**identity_token)

    async def _serve(self) -> _Ending:
        """Read, answer and write until the peer ends, shutdown, or the idle timeout."""
        owner = self._owner
        transport = self._transport
        idle_timeout = owner.config.idle_timeout
        send_timeout = owner.config.send_timeout
        committer = self._committer
        acknowledge = self._acknowledger is not None
        if acknowledge or (isinstance(committer, GroupCommitter) and not self._debug):
            transport.answer_while_waiting(self)
        count_from = _MIN_PIECE
        while True:
            if committer is not None and self._held is None and not committer.has_room():
                # The store is behind: read nothing more yet. (Not with something held: it
                # may be this connection's turn to lead the commit that makes room.)
                await committer.wait_for_room()
            if self._held is None:
                data = transport.read_nowait()
            else:
                data = await self._take_held()
                if data is None and self._held is None:
                    data = transport.read_nowait()  # what came meanwhile, if any
            if data is None:
                if owner.shutting_down:
                    return _Ending.SHUTDOWN
                self._waiting = True
                try:
                    ready = await transport.wait_readable(self._wait_deadline())
                finally:
                    self._waiting = False
                if self._queued is not None and self._held is None:
                    # Woken (shutdown, the end of the stream, a timer) while a read waits for
                    # its commit: answer it first, whatever comes next.
                    await self._wait_queued()
                if not ready and self._held is None:  # (held: send_later woke it, to finish)
                    if owner.shutting_down:
                        return _Ending.SHUTDOWN
                    now = trio.current_time()
                    if now >= self._last_message + idle_timeout:
                        return _Ending.IDLE
                    if self._replies_stuck(now):
                        raise trio.TooSlowError  # as a write waiting that long would
                continue
            answered = self.messages
            if acknowledge:
                # None: the replies would be too many at once (see REPLY_PIECE_BYTES).
                replies = self._acknowledge(data) if len(data) <= self._piece_bytes else None
            elif len(data) > count_from and data.count(b"\n") > _MAX_MESSAGES_PER_PIECE:
                replies = None  # a read's messages are committed (and answered) in pieces
            else:
                replies = await self._answer_each(data)
            if replies is None:
                await self._answer_in_pieces(data)
            elif replies:
                if self.messages - answered > 1:
                    # A pipelining client. Write after every other ready connection has
                    # read: a write wakes the peer, and waking it once per batch of
                    # connections, not once each, costs the kernel far less (pipe: 0.25 ->
                    # 0.11 us of system time per ACK). Shielded: what was read is answered
                    # even if cancellation comes now.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                # Inline, as almost every write takes it all: no coroutine per read.
                sent = transport.try_send(replies)
                if sent < len(replies):
                    # The client is not keeping up with its replies: wait while it reads
                    # (TooSlowError once it made no progress for send_timeout).
                    await transport.send_rest(replies, sent, send_timeout)
            if not data:
                return _Ending.EOF
            if owner.shutting_down:
                return _Ending.SHUTDOWN
            if transport.may_have_more:
                await trio.lowlevel.checkpoint()  # let other connections run first

    def answer_waiting(self, later: list[Answerer]) -> float | None:
        """The readiness hub's answerer (``readiness.Answerer``): a read of whole messages
        acknowledged and answered in the hub's dispatcher while this connection's task goes
        on waiting, which saves its wake-up. One message (request/response) is answered at
        once; several (a pipelining client) after every other ready socket was read
        (``send_later``), as the task does. Anything else ends the wait, with what was read
        or went wrong held for the task (``_take_held``): more input than one read took,
        a partial line, the end of the stream.

        Nothing is logged here (the dispatcher has none of the connection's log context), so
        only whole lines within the size limit are answered here: none can be too large.
        """
        transport = self._transport
        try:
            if self._owner.shutting_down:
                return None
            if self._acknowledger is None:
                return self._queue_waiting()
            data = transport.read_arrived()
            if data is None:  # nothing complete yet (part of a TLS record)
                transport.may_have_more = True
                return self._wait_deadline()
            acknowledger = self._acknowledger
            reply = acknowledger.answer_whole(data) if not transport.may_have_more else None
            if reply is None:
                if (
                    transport.may_have_more
                    or data[-1:] != b"\n"
                    or len(data) > self._owner.config.max_message_bytes
                    or not acknowledger.at_message_start
                ):
                    self._held = data  # the task's work
                    return None
                replies = self._acknowledge(data)  # whole lines, none too large
                if replies is None:  # too many replies at once: the task answers in pieces
                    self._held = data
                    return None
                self._held = _UnsentReplies(replies, 0)
                later.append(self)
                transport.may_have_more = True  # still waiting: the next wake-up is an edge
                return self._wait_deadline()
            self.bytes_received += len(data)
            self.messages = acknowledger.seq
            self._last_message = trio.current_time()
            sent = transport.try_send(reply)
            if sent < len(reply):
                self._held = _UnsentReplies(reply, sent)
                return None
            transport.may_have_more = True  # still waiting: the next wake-up is an edge
        except Exception as exc:  # the task's to handle, as if it had read and written
            self._held = exc
            return None
        return self._last_message + self._first_wait  # a message just now

    def send_later(self) -> None:
        """Write the replies ``answer_waiting`` put off; what the socket does not take now,
        or an error, is left to the task, woken for it."""
        held = self._held
        if not isinstance(held, _UnsentReplies):
            return  # the task took it already
        transport = self._transport
        try:
            sent = transport.try_send(held.replies)
        except Exception as exc:  # the task's to handle, as if it had written
            self._held = exc
            transport.wake()
            return
        if sent < len(held.replies):
            self._held = _UnsentReplies(held.replies, sent)
            transport.wake()
            return
        self._held = None

    def _queue_waiting(self) -> float | None:
        """``answer_waiting`` with a store: a read of whole messages is queued for the next
        commit (``GroupCommitter.enqueue``) while the task goes on waiting; the commit's
        leader writes the ACKs (``answered``), so the task never wakes for a message that
        commits. Anything else wakes the task as in ``answer_waiting``: input it must frame
        itself, no room in the store's queue, this read's turn to lead the commit."""
        transport = self._transport
        config = self._owner.config
        queued = self._queued
        if queued is not None:  # one read at a time waits for a commit
            queued.unread_edge = True
            return self._wait_deadline()
        committer = self._committer
        assert isinstance(committer, GroupCommitter)
        if not committer.has_room():
            transport.may_have_more = True  # this edge is spent: the task reads, in time
            return None
        data = transport.read_arrived()
        if data is None:  # nothing complete yet (part of a TLS record)
            transport.may_have_more = True
            return self._wait_deadline()
        framer = self._framer
        assert framer is not None
        if (
            transport.may_have_more
            or data[-1:] != b"\n"
            or len(data) > config.max_message_bytes
            or not framer.at_message_start
            or (len(data) > _MIN_PIECE and data.count(b"\n") > _MAX_MESSAGES_PER_PIECE)
        ):
            self._held = data  # the task's work
            return None
        if b"\r" in data or type(data) is not bytes:
            payloads: list[bytes] = framer.feed(data)  # type: ignore[assignment]  # whole lines
            pending = sum(map(len, payloads))
        else:
            # Whole lines, none too long, no "\r" to strip: the framer would only split them
            # (and keep nothing), at twice the cost of a split (0.7 against 0.3 us).
            payloads = data[:-1].split(b"\n")
            pending = len(data) - len(payloads)  # the newlines are not payload
        self.bytes_received += len(data)
        first_seq = self.messages + 1
        crc32s = list(map(crc32, payloads))
        messages = MessageRun(
            payloads, crc32s, time.time(), self.peer, self.conn_id, first_seq, self.identity
        )
        pending += len(payloads) * _MESSAGE_OVERHEAD_BYTES
        parcel = committer.enqueue(messages, pending, self)
        self._queued = _QueuedRead(parcel, messages)
        self._last_message = trio.current_time()  # waiting for a store is not idling
        transport.may_have_more = True  # still waiting: the next wake-up is an edge
        if committer.leading is parcel:
            self._held = _QueueTurn.LEAD
            return None
        return self._last_message + self._first_wait  # a message just now

    def answered(self, parcel: Parcel, now: float) -> None:
        """The commit holding the queued read is done (``ParcelOwner``; called in the
        leader's task): write the ACKs now, or leave the task what needs it (verdicts to
        log, replies the socket did not take, an error)."""
        queued = self._queued
        if queued is None or queued.parcel is not parcel:  # withdrawn: the connection is gone
            return
        transport = self._transport
        if parcel.verdicts is not None or queued.waiter is not None:
            self._held = _QueueTurn.ANSWERED
            self._wake_for_queued(queued)
            return
        self._queued = None
        run = queued.run
        count = len(run.payloads)  # not len(run): a Python call
        self.messages += count
        self._last_message = now
        if count == 1:
            replies = ACK_FORMAT % (run.first_seq, len(run.payloads[0]), run.crc32s[0])
        else:
            replies = ack_block(run.first_seq, list(map(len, run.payloads)), run.crc32s)
        try:
            sent = transport.try_send(replies)
        except Exception as exc:  # the task's to handle, as if it had written
            self._held = exc
            transport.wake()
            return
        if sent < len(replies):
            self._held = _UnsentReplies(replies, sent)
            transport.wake()
        elif queued.unread_edge:
            transport.may_have_more = True
            transport.wake()  # the task reads what came meanwhile

    def lead(self, parcel: Parcel) -> bool:
        """The queued read's turn to lead the commit (``ParcelOwner``): wake the task."""
        queued = self._queued
        if queued is None or queued.parcel is not parcel:  # withdrawn: the connection is gone
            return False
        self._held = _QueueTurn.LEAD
        self._wake_for_queued(queued)
        return True

    def _wake_for_queued(self, queued: _QueuedRead) -> None:
        waiter, queued.waiter = queued.waiter, None  # a task is rescheduled once
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)
        else:
            self._transport.wake()

    async def _wait_queued(self) -> None:
        """Wait until the queued read is answered, or is to lead its commit."""
        queued = self._queued
        assert queued is not None
        queued.waiter = trio.lowlevel.current_task()
        try:
            await trio.lowlevel.wait_task_rescheduled(functools.partial(_abort_queued_wait, queued))
        finally:
            queued.waiter = None

    async def _answer_queued(self, turn: _QueueTurn) -> None:
        """Reply to the queued read, after leading its commit if it is its turn."""
        queued = self._queued
        assert queued is not None
        parcel = queued.parcel
        if turn is _QueueTurn.LEAD:
            committer = self._committer
            assert isinstance(committer, GroupCommitter)
            verdicts = await committer.lead(parcel)
        else:
            verdicts = parcel.verdicts
        self._queued = None
        replies = self._after_commit(
            queued.run.first_seq, queued.run.payloads, queued.run, verdicts, queued.run.crc32s
        )
        transport = self._transport
        sent = transport.try_send(replies)
        if sent < len(replies):
            await transport.send_rest(replies, sent, self._owner.config.send_timeout)
        if queued.unread_edge:
            transport.may_have_more = True

    def _withdraw_queued(self) -> None:
        """The connection is closing: a read still queued is answered to nobody (its socket,
        and the socket's number, may soon be another connection's)."""
        queued, self._queued = self._queued, None
        if queued is not None:
            committer = self._committer
            assert isinstance(committer, GroupCommitter)
            committer.withdraw(queued.parcel)

    async def _take_held(self) -> bytes | None:
        """What ``answer_waiting`` left: input to answer, or None once its replies are sent.

        Raises:
            Exception: what reading or writing raised there.
        """
        held, self._held = self._held, None
        if isinstance(held, Exception):
            raise held
        if isinstance(held, _QueueTurn):
            await self._answer_queued(held)
            return None
        if isinstance(held, _UnsentReplies):
            send_timeout = self._owner.config.send_timeout
            await self._transport.send_rest(held.replies, held.sent, send_timeout)
            return None  # that read drained the socket: wait for more
        return held

    async def _answer_in_pieces(self, data: bytes) -> None:
        """Answer ``data`` a piece at a time, writing each piece's replies before the next
        is answered: what a client that does not read holds stays under REPLY_PIECE_BYTES."""
        transport = self._transport
        send_timeout = self._owner.config.send_timeout
        acknowledge = self._acknowledger is not None
        start = 0
        while start < len(data):
            size = self._piece_bytes
            piece = data[start : start + size]
            if acknowledge:
                replies = self._acknowledge(piece)
                if replies is None:
                    continue  # too many replies at once: _acknowledge lowered the size
            elif len(piece) > _MIN_PIECE and piece.count(b"\n") > _MAX_MESSAGES_PER_PIECE:
                self._piece_bytes = max(_MIN_PIECE, size // 2)
                continue
            else:
                replies = await self._answer_each(piece)
            start += len(piece)
            if len(replies) < REPLY_PIECE_BYTES // 4 and size == len(piece) < RECEIVE_SIZE:
                self._piece_bytes = min(RECEIVE_SIZE, size * 2)  # the messages grew again
            if replies:
                sent = transport.try_send(replies)
                if sent < len(replies):
                    await transport.send_rest(replies, sent, send_timeout)

    def _acknowledge(self, data: bytes) -> bytes | None:
        """The replies to what ``data`` completes (``b""``: end of stream), keeping nothing;
        None (and nothing consumed) if they would exceed ``REPLY_PIECE_BYTES``.

        Not async, so the hot path makes no coroutine per read.
        """
        acknowledger = self._acknowledger
        assert acknowledger is not None
        if len(data) > _MIN_PIECE:
            # Judge by the newlines of the first _MIN_PIECE bytes (counting them all would
            # scan every read: ~4% of the CPU of a pipelined read): a flood of tiny messages
            # goes to pieces at once, without building all its replies first (megabytes of
            # temporaries that fragment the heap, for every such read).
            sampled = data.count(b"\n", 0, _MIN_PIECE)
            if sampled * len(data) > _MAX_MESSAGES_PER_PIECE * _MIN_PIECE:
                fits = _MIN_PIECE * _MAX_MESSAGES_PER_PIECE // sampled // 2
                self._piece_bytes = max(_MIN_PIECE, min(fits, len(data) // 2))
                return None
            # Answer first and check after, undoing it if the replies came out too large
            # (the newlines were not evenly spread): a snapshot of a few integers.
            state = acknowledger.state()
            replies = acknowledger.feed(data)
            if len(replies) > REPLY_PIECE_BYTES:
                acknowledger.restore(state)
                shrunk = len(data) * REPLY_PIECE_BYTES // len(replies) // 2
                self._piece_bytes = max(_MIN_PIECE, min(shrunk, len(data) // 2))
                return None
        else:
            replies = acknowledger.feed(data) if data else acknowledger.end_of_stream()
        self.bytes_received += len(data)
        if acknowledger.seq != self.messages:
            self.messages = acknowledger.seq
            self._last_message = trio.current_time()
            if acknowledger.oversized:
                for seq in acknowledger.oversized:
                    self._log_too_large(seq)
                acknowledger.oversized.clear()
        return replies

    async def _answer_each(self, data: bytes) -> bytes:
        """The replies, message by message: through the committer, or with debug events."""
        self.bytes_received += len(data)
        assert self._framer is not None
        frames = self._framer.feed(data) if data else self._framer.end_of_stream()
        if not frames:
            return b""
        first_seq = self.messages + 1
        committer = self._committer
        if committer is None:  # debug events, nothing kept
            self.messages += len(frames)
            return self._answer_unkept(first_seq, frames)
        received_at = time.time()
        crc32s: list[int] | None = None  # when every frame is a message
        if OVERSIZED not in frames:
            payloads: list[bytes] = frames  # type: ignore[assignment]
            crc32s = list(map(crc32, payloads))
            messages: Sequence[Message] = MessageRun(
                payloads, crc32s, received_at, self.peer, self.conn_id, first_seq, self.identity
            )
            nbytes = sum(map(len, payloads))
        else:
            messages = []
            nbytes = 0
            peer, conn_id, identity = self.peer, self.conn_id, self.identity
            for seq, frame in enumerate(frames, first_seq):
                if frame is not OVERSIZED:
                    payload: bytes = frame  # type: ignore[assignment]
                    messages.append(
                        Message(payload, crc32(payload), received_at, peer, conn_id, seq, identity)
                    )
                    nbytes += len(payload)
        pending = nbytes + len(messages) * _MESSAGE_OVERHEAD_BYTES
        verdicts = await committer.commit(messages, pending, self._limiter()) if messages else None
        return self._after_commit(first_seq, frames, messages, verdicts, crc32s)

    def _after_commit(
        self,
        first_seq: int,
        frames: Sequence[bytes | Oversized],
        messages: Sequence[Message],
        verdicts: Sequence[Verdict] | None,
        crc32s: list[int] | None,
    ) -> bytes:
        """Count a read's messages answered; their replies (``crc32s``: every frame is one
        of the messages, in order, with these CRCs)."""
        # Counted once answered, with their errors in the same step: a metrics scrape during
        # the commit must never see them acked and then some of them not (a counter going down).
        self.messages += len(frames)
        # After the commit: a slow store is not an idle client.
        self._last_message = trio.current_time()
        if self._debug:
            self._log_acked(messages, verdicts)
        if verdicts is None and crc32s is not None:
            if len(messages) == 1:
                return ACK_FORMAT % (first_seq, len(messages[0].payload), crc32s[0])
            payloads: list[bytes] = frames  # type: ignore[assignment]
            return ack_block(first_seq, list(map(len, payloads)), crc32s)
        replies = []
        stored = iter(messages)
        verdict_of = iter(verdicts) if verdicts is not None else None
        for seq, frame in enumerate(frames, first_seq):
            if frame is OVERSIZED:
                self._log_too_large(seq)
                replies.append(too_large_line(seq, self._owner.config.max_message_bytes))
                continue
            message = next(stored)
            verdict = None if verdict_of is None else next(verdict_of)
            if verdict is None:
                replies.append(ACK_FORMAT % (seq, len(message.payload), message.crc32))
                continue
            if isinstance(verdict, Rejected):
                self._count_error(REJECTED)
                self._limiter().warn(
                    log.warning, "message_rejected", seq=seq, reason=verdict.reason
                )
                replies.append(err_line(seq, ErrorCode.REJECTED, verdict.reason))
            elif isinstance(verdict, Unavailable):
                self._count_error(UNAVAILABLE)
                replies.append(err_line(seq, ErrorCode.UNAVAILABLE, verdict.detail))
            else:
                assert isinstance(verdict, Failed)
                self._count_error(INTERNAL_ERROR)
                replies.append(err_line(seq, ErrorCode.INTERNAL_ERROR, verdict.detail))
        return b"".join(replies)

    def _answer_unkept(self, first_seq: int, frames: list[bytes | Oversized]) -> bytes:
        """ACK every message (too-large ERR where due), with a debug event each."""
        self._last_message = trio.current_time()
        if OVERSIZED not in frames:
            payloads: list[bytes] = frames  # type: ignore[assignment]
            for seq, payload in enumerate(payloads, first_seq):
                log.debug("message_acked", seq=seq, nbytes=len(payload))
            return ack_lines(first_seq, payloads)
        replies = []
        for seq, frame in enumerate(frames, first_seq):
            if frame is OVERSIZED:
                self._log_too_large(seq)
                replies.append(too_large_line(seq, self._owner.config.max_message_bytes))
            else:
                assert isinstance(frame, bytes)
                log.debug("message_acked", seq=seq, nbytes=len(frame))
                replies.append(ACK_FORMAT % (seq, len(frame), crc32(frame)))
        return b"".join(replies)

    @staticmethod
    def _log_acked(messages: Sequence[Message], verdicts: Sequence[Verdict] | None) -> None:
        for index, message in enumerate(messages):
            if verdicts is None or verdicts[index] is None:
                log.debug("message_acked", seq=message.seq, nbytes=len(message.payload))

    def _count_error(self, kind: int) -> None:
        self.errors += 1
        kinds = self.error_kinds
        if kinds is None:
            kinds = self.error_kinds = [0, 0, 0, 0]
        kinds[kind] += 1

    def _log_too_large(self, seq: int) -> None:
        self._count_error(TOO_LARGE)
        limit = self._owner.config.max_message_bytes
        self._limiter().warn(log.warning, "message_too_large", seq=seq, limit=limit)

    def _limiter(self) -> WarningLimiter:
        if self._warnings is None:
            self._warnings = WarningLimiter()
        return self._warnings


def _debug_enabled() -> bool:
    """Whether debug events would be emitted, so per-message work can be skipped when not."""
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))
