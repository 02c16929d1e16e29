"""The Trio load generator: connections, windows, closed and open loop, churn.

One ``LoadGenerator`` drives the connections of one process. ``connect`` opens them (or,
for churn, checks that one can be opened), then ``run`` loads the server for the warm-up and
the measurement window and returns a ``LoadResult``; results of several processes merge.

Closed loop (the default) keeps ``window`` messages in flight per connection: each read of
replies is answered by one write that tops the window up again, so the server is as busy as
it can be and the throughput is its maximum. A message's latency runs from its send.

Open loop (``rate``) sends on a fixed schedule whatever the server does, and measures each
latency from the message's *scheduled* send time, as wrk2 does. In closed loop a server that
stalls for a second delays only the messages in flight (the load generator politely waits
with it: "coordinated omission"), so the stall barely shows beyond the maximum; in open
loop every message that should have been sent during the stall carries the wait it suffered.
The window still bounds what is in flight: messages due while the window is full queue in
the client, and their latency keeps counting from their schedule.

Over TLS (``spec.tls``) each connection is a ``trio.SSLStream``, its handshake inside the
connect timeout. TLS cannot half-close (see ``StreamTransport``), so a TLS connection ends
once every reply is in, with close_notify, instead of the half-close and the wait for the
server's close of plain TCP.

Every loop here ends by itself: sending stops at the end of the window (or when the message
budget is spent), every message must be answered within the reply timeout (a watchdog drops
connections that miss it), and the whole run sits under a hard deadline.
"""

from __future__ import annotations

import contextlib
import math
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from ..client.tls import client_tls_context, start_tls
from ..errors import ConnectError, ProtocolError, TLSError
from .payload import PayloadPool
from .result import LoadResult, Progress, Snapshot
from .spec import MAX_RUN_SECONDS, LoadSpec
from .transport import StreamTransport, Transport, open_socket_stream, open_tcp
from .verify import ReplyChecker, Tally

__all__ = ["LoadGenerator", "OpenStream", "raise_open_file_limit", "run_load"]

# Descriptors a process needs besides its connections (stdio, Trio's epoll and wake-up fds,
# pipes to worker processes).
_RESERVED_FDS: Final = 64
# Replies are ~20 bytes; one read takes the replies to many windows at once.
_RECEIVE_BYTES: Final = 65536
# How often the watchdog looks for overdue replies; a timeout fires at most this late.
_WATCHDOG_INTERVAL: Final = 0.1
# Connections opened at once while setting up: enough to be quick, few enough not to
# overflow a listen backlog (Linux somaxconn is 4096) and wait for SYN retries.
_CONNECTING_AT_ONCE: Final = 256
# After a failed connection attempt in churn mode, so a dead server is not hammered in a
# tight loop (each failure is counted).
_CHURN_RETRY_DELAY: Final = 0.01
# Extra time the run may take beyond warm-up + duration for the last replies (each bounded
# by the reply timeout) and the closing handshake (bounded by it too).
_FINISH_MARGIN: Final = 5.0
# A connection attempt that failed: refused, timed out, reset in the TLS handshake, or TLS
# refused (the last is final for the whole run only when no connection opens at all).
_OPEN_FAILURES: Final = (OSError, trio.TooSlowError, trio.BrokenResourceError, TLSError)

OpenStream = Callable[[], Awaitable[trio.abc.Stream]]
"""Opens one connection to the server (tests pass memory streams)."""


class _Connection:
    """One connection of a stream (non-churn) run."""

    __slots__ = (
        "answered",
        "checker",
        "closing_since",
        "failure",
        "index",
        "salt",
        "scope",
        "space",
        "transport",
    )

    def __init__(self, transport: Transport, tally: Tally, index: int) -> None:
        self.transport = transport
        self.checker = ReplyChecker(tally)
        self.index = index  # among every process's connections
        # Different connections walk the payload pool from different points.
        self.salt = index * 7919
        self.scope = trio.CancelScope()
        self.failure: str | None = None
        self.closing_since: float | None = None  # when we sent our end of stream
        self.space: trio.Event | None = None  # open loop: the sender waits for window space
        self.answered: trio.Event | None = None  # open loop: the sender waits for the last reply


class LoadGenerator:
    """Loads one server with the connections of one process.

    Args:
        spec: what to send and for how long.
        open_stream: opens a connection; by default a TCP connection to ``spec.host``,
            ``spec.port`` (resolved once, in ``connect``). With ``spec.tls``, TLS runs over
            the stream it returns.

    Raises:
        ValueError: ``spec.tls`` names files that cannot serve (``client_tls_context``).
    """

    def __init__(self, spec: LoadSpec, *, open_stream: OpenStream | None = None) -> None:
        self.spec = spec
        self._tls_context = None
        if spec.tls is not None:
            self._tls_context = client_tls_context(spec.tls.ca, spec.tls.cert, spec.tls.key)
        self.tally = Tally()
        self._pool = PayloadPool(spec.size)
        self._open_stream = open_stream
        self._address: tuple[Any, ...] | None = None
        self._connections: list[_Connection] = []
        self._budget = spec.messages
        self._stopped = trio.Event()
        self._interrupted = False
        self._start = math.inf
        self._window_end_wait: trio.CancelScope | None = None
        self._cpu_start: float | None = None
        self._cpu_end: float | None = None
        self._ended_at: float | None = None

    # -- setting up -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open every connection (churn: check that one opens), before the load starts.

        Connections that fail count as ``connect`` errors.

        Raises:
            ConnectError: not a single connection could be opened.
        """
        spec = self.spec
        if self._open_stream is None:
            try:
                infos = await trio.socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ConnectError(f"cannot resolve host {spec.host!r}: {exc.strerror}") from exc
            family, kind, proto, _, address = infos[0]
            self._address = (family, kind, proto, address)
        first_failure: BaseException | None = None
        if spec.churn:
            try:
                transport = await self._open()
            except _OPEN_FAILURES as exc:
                raise ConnectError(self._describe(exc)) from exc
            await transport.aclose()
            return
        opened: list[_Connection | None] = [None] * spec.connections
        limiter = trio.CapacityLimiter(_CONNECTING_AT_ONCE)

        async def open_one(slot: int) -> None:
            nonlocal first_failure
            async with limiter:
                try:
                    transport = await self._open()
                except _OPEN_FAILURES as exc:
                    self.tally.errors["connect"] += 1
                    first_failure = first_failure or exc
                    return
            self.tally.connections += 1
            opened[slot] = _Connection(transport, self.tally, spec.first_connection + slot)

        async with trio.open_nursery() as nursery:
            for slot in range(spec.connections):
                nursery.start_soon(open_one, slot)
        self._connections = [conn for conn in opened if conn is not None]
        if not self._connections:
            assert first_failure is not None
            raise ConnectError(self._describe(first_failure)) from first_failure

    async def _open(self) -> Transport:
        with trio.fail_after(self.spec.connect_timeout):
            if self._tls_context is None:
                if self._open_stream is not None:
                    return StreamTransport(await self._open_stream())
                assert self._address is not None, "connect() resolves the address first"
                return await open_tcp(*self._address)
            if self._open_stream is not None:
                stream: trio.abc.Stream = await self._open_stream()
            else:
                assert self._address is not None, "connect() resolves the address first"
                stream = await open_socket_stream(*self._address)
            assert self.spec.tls is not None
            server_name = self.spec.tls.server_name or self.spec.host
            return StreamTransport(await start_tls(stream, self._tls_context, server_name))

    def _describe(self, exc: BaseException) -> str:
        where = f"{self.spec.host}:{self.spec.port}"
        if isinstance(exc, trio.TooSlowError):
            return f"cannot connect to {where}: no answer within {self.spec.connect_timeout:g} s"
        if isinstance(exc, TLSError):
            return f"cannot connect to {where}: {exc}"
        if isinstance(exc, trio.BrokenResourceError):
            return f"cannot connect to {where}: connection reset during the TLS handshake"
        if isinstance(exc, ConnectionRefusedError):
            return (
                f"cannot connect to {where}: connection refused "
                "(is the server running? --spawn starts one)"
            )
        if isinstance(exc, OSError):
            return f"cannot connect to {where}: {exc.strerror or exc}"
        return f"cannot connect to {where}: {exc}"

    # -- running ----------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` has been called."""
        return self._interrupted

    def stop(self) -> None:
        """End the measurement now (Ctrl-C): stop sending, collect the replies, report."""
        self._interrupted = True
        tally = self.tally
        tally.window_end = min(tally.window_end, max(trio.current_time(), tally.window_start))
        self._stopped.set()
        if self._window_end_wait is not None:
            self._window_end_wait.cancel()

    async def run(
        self,
        start: float | None = None,
        *,
        on_progress: Progress | None = None,
        progress_interval: float = 1.0,
    ) -> LoadResult:
        """Load the server: warm-up, then the measurement window; return what was measured.

        Args:
            start: when to begin (``trio.current_time()`` scale), so that processes begin
                together; now by default.
            on_progress: called about every ``progress_interval`` seconds with live counters.
        """
        spec = self.spec
        tally = self.tally
        now = trio.current_time()
        self._start = now if start is None else max(now, start)
        tally.window_start = self._start + spec.warmup
        tally.window_end = min(
            tally.window_end,
            tally.window_start + (spec.duration if spec.duration is not None else MAX_RUN_SECONDS),
        )
        if self._interrupted:  # stopped while connecting: measure nothing, just close
            tally.window_end = tally.window_start
        if self._start > now:
            await trio.sleep_until(self._start)
        hard_deadline = tally.window_end + 2 * spec.reply_timeout + _FINISH_MARGIN
        with trio.CancelScope(deadline=hard_deadline):
            async with trio.open_nursery() as helpers:
                helpers.start_soon(self._mark_window)
                if not spec.churn:
                    helpers.start_soon(self._watchdog)
                if on_progress is not None:
                    helpers.start_soon(self._report_progress, on_progress, progress_interval)
                async with trio.open_nursery() as load:
                    if spec.churn:
                        for slot in range(spec.connections):
                            load.start_soon(self._churn_slot, spec.first_connection + slot)
                    else:
                        body = self._closed_loop if spec.rate is None else self._open_loop
                        for conn in self._connections:
                            load.start_soon(self._serve, conn, body)
                helpers.cancel_scope.cancel()
        return self._result()

    def _result(self) -> LoadResult:
        tally = self.tally
        now = trio.current_time()
        # A --duration window is measured whole, even if every connection died early (the
        # server delivered nothing after that); --messages closes it with its last reply.
        ended = tally.window_end
        if self._budget == 0 and tally.acks:
            ended = min(ended, tally.last_ack)
        elif self.spec.duration is None:
            ended = min(ended, now)
        cpu_end = self._cpu_end if self._cpu_end is not None else time.process_time()
        cpu_span_end = self._ended_at if self._ended_at is not None else now
        return LoadResult(
            histogram=tally.histogram,
            elapsed=max(0.0, ended - tally.window_start),
            acks=tally.acks,
            replies=tally.replies,
            sent=tally.sent,
            connections=tally.connections,
            errors=dict(tally.errors),
            err_codes=dict(tally.err_codes),
            cpu=[cpu_end - self._cpu_start if self._cpu_start is not None else 0.0],
            cpu_elapsed=[max(0.0, cpu_span_end - tally.window_start)],
            size=self.spec.size,
            interrupted=self._interrupted,
        )

    async def _mark_window(self) -> None:
        """Note the CPU time at both ends of the window (to tell if we were the bottleneck)."""
        tally = self.tally
        await trio.sleep_until(tally.window_start)
        self._cpu_start = time.process_time()
        while trio.current_time() < tally.window_end:
            with trio.CancelScope() as self._window_end_wait:
                await trio.sleep_until(tally.window_end)
        self._cpu_end = time.process_time()
        self._ended_at = trio.current_time()

    async def _report_progress(self, on_progress: Progress, interval: float) -> None:
        tally = self.tally
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            on_progress(
                Snapshot(
                    elapsed=now - self._start,
                    measuring=tally.window_start <= now < tally.window_end,
                    replies=tally.replies,
                    errors=tally.error_total,
                )
            )

    async def _watchdog(self) -> None:
        """Drop connections whose oldest reply, or whose close, is overdue."""
        timeout = self.spec.reply_timeout
        errors = self.tally.errors
        while True:
            await trio.sleep(min(_WATCHDOG_INTERVAL, timeout / 4))
            now = trio.current_time()
            for conn in self._connections:
                if conn.failure is not None:
                    continue
                sent_at = conn.checker.oldest_sent_at
                if sent_at is not None:
                    if now - sent_at > timeout:
                        conn.failure = "timeout"
                        errors["timeout"] += conn.checker.abandon()
                        conn.scope.cancel()
                elif conn.closing_since is not None and now - conn.closing_since > timeout:
                    conn.failure = "noclose"
                    errors["noclose"] += 1
                    conn.scope.cancel()

    def _take(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` messages may be sent now (the --messages budget)."""
        budget = self._budget
        if budget is None or now < self.tally.window_start:
            return wanted
        granted = wanted if wanted < budget else budget
        self._budget = budget - granted
        return granted

    async def _wait_until(self, when: float) -> None:
        """Sleep until ``when``, or until ``stop()``."""
        with trio.move_on_at(when):
            await self._stopped.wait()

    # -- connections ------------------------------------------------------------------------

    async def _serve(
        self, conn: _Connection, body: Callable[[_Connection], Awaitable[None]]
    ) -> None:
        """Run one connection's load; whatever goes wrong ends this connection only."""
        try:
            with conn.scope:
                await self._guard(conn, body)
        finally:
            # Anything still unanswered here was cut off by the run's hard deadline.
            self.tally.errors["timeout"] += conn.checker.abandon()
            self._connections.remove(conn)
            await conn.transport.aclose()

    async def _guard(
        self, conn: _Connection, body: Callable[[_Connection], Awaitable[None]]
    ) -> None:
        """Run ``body`` on ``conn``, turning a broken connection into counted errors."""
        try:
            await body(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(conn, "connection")
        except ProtocolError:
            self._fail(conn, "format")

    def _fail(self, conn: _Connection, kind: str) -> None:
        if conn.failure is None:
            conn.failure = kind
            errors = self.tally.errors
            errors[kind] += 1
            errors["lost"] += conn.checker.abandon()
        conn.scope.cancel()

    def _server_closed(self, conn: _Connection) -> None:
        """The server ended the stream before we did (or before answering everything)."""
        checker = conn.checker
        checker.at_eof()
        if conn.closing_since is not None and not checker.outstanding:
            return  # the clean end: we finished, the server answered all and closed
        if checker.closed_by_server is not None:
            # It said why (ERR 0 ..., already counted); what it did not answer is lost.
            self.tally.errors["lost"] += checker.abandon()
            conn.failure = conn.failure or "closed"
            conn.scope.cancel()
        else:
            self._fail(conn, "connection")

    async def _closed_loop(self, conn: _Connection) -> None:
        """Keep ``window`` messages in flight; each read of replies is answered by one write."""
        transport = conn.transport
        checker = conn.checker
        pool = self._pool
        tally = self.tally
        window = self.spec.window
        salt = conn.salt
        receive = transport.receive_some
        send = transport.send_all
        now = trio.current_time()
        count = self._take(window, now)
        sending = count > 0
        sent = 0
        if count:
            checker.expect(pool.expected(1, count, salt), count, now, now)
            tally.sent += count
            sent = count
            await send(pool.wire(1, count, salt))
        while sending or checker.outstanding:
            data = await receive(_RECEIVE_BYTES)
            if not data:
                self._server_closed(conn)
                return
            now = trio.current_time()
            checker.absorb(data, now)
            if not sending:
                continue
            if now >= tally.window_end or checker.closed_by_server is not None:
                sending = False
                continue
            count = window - checker.outstanding
            if count > 0:
                count = self._take(count, now)
                if not count:
                    sending = False
                    continue
                checker.expect(pool.expected(sent + 1, count, salt), count, now, now)
                tally.sent += count
                await send(pool.wire(sent + 1, count, salt))
                sent += count
        if checker.closed_by_server is None:
            await self._finish(conn)

    async def _finish(self, conn: _Connection) -> None:
        """Everything is answered: half-close, and expect the server to close with nothing
        more to say (the watchdog bounds the wait). Over TLS, which cannot half-close,
        ``_serve`` just closes (close_notify), the replies all being in."""
        transport = conn.transport
        if not transport.can_half_close:
            return
        conn.closing_since = trio.current_time()
        await transport.send_eof()
        while data := await transport.receive_some(_RECEIVE_BYTES):
            conn.checker.absorb(data, trio.current_time())  # anything now is unexpected
        self._server_closed(conn)

    async def _open_loop(self, conn: _Connection) -> None:
        """Send on schedule while a second task checks the replies."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, conn, self._receive_replies)
            await self._guard(conn, self._send_on_schedule)
            nursery.cancel_scope.cancel()

    async def _send_on_schedule(self, conn: _Connection) -> None:
        spec = self.spec
        assert spec.rate is not None
        tally = self.tally
        checker = conn.checker
        pool = self._pool
        transport = conn.transport
        window = spec.window
        salt = conn.salt
        # This connection sends every `interval` seconds; connections are staggered evenly
        # over one interval, so the whole load is as smooth as `rate` messages per second.
        interval = spec.connections / spec.rate
        first = self._start + interval * conn.index / spec.all_connections
        scheduled = 0  # messages of the schedule sent so far
        while True:
            due_at = first + scheduled * interval
            if due_at >= tally.window_end or checker.closed_by_server is not None:
                break
            now = trio.current_time()
            if due_at > now:
                await self._wait_until(due_at)
                continue
            room = window - checker.outstanding
            if room <= 0:
                conn.space = trio.Event()
                await conn.space.wait()
                conn.space = None
                continue
            # Every message whose time has come, within the window: a server that fell
            # behind gets them in one write, each still timed from its own schedule.
            due = int((now - first) / interval) + 1 - scheduled
            before_end = math.ceil((tally.window_end - first) / interval) - scheduled
            count = self._take(max(1, min(due, room, before_end)), now)
            if not count:
                break
            checker.expect(pool.expected(scheduled + 1, count, salt), count, due_at, now, interval)
            tally.sent += count
            await transport.send_all(pool.wire(scheduled + 1, count, salt))
            scheduled += count
        while checker.outstanding:
            conn.answered = trio.Event()
            await conn.answered.wait()
        conn.answered = None
        if checker.closed_by_server is None:
            if not transport.can_half_close:
                return  # TLS: every reply is in; _serve closes with close_notify
            conn.closing_since = trio.current_time()
            await transport.send_eof()
            await trio.sleep_forever()  # the receiving task sees the close and ends us

    async def _receive_replies(self, conn: _Connection) -> None:
        transport = conn.transport
        checker = conn.checker
        window = self.spec.window
        while True:
            data = await transport.receive_some(_RECEIVE_BYTES)
            if not data:
                self._server_closed(conn)
                conn.scope.cancel()
                return
            checker.absorb(data, trio.current_time())
            if conn.space is not None and checker.outstanding < window:
                conn.space.set()
            if conn.answered is not None and not checker.outstanding:
                conn.answered.set()

    # -- churn ------------------------------------------------------------------------------

    async def _churn_slot(self, slot: int) -> None:
        """Connect, send one message, check its reply, close; again until the end."""
        spec = self.spec
        tally = self.tally
        interval = None if spec.rate is None else spec.connections / spec.rate
        first = self._start
        if interval is not None:
            first += interval * slot / spec.all_connections
        for cycle in range(1 << 62):  # bounded in practice by the window's end
            now = trio.current_time()
            if interval is None:
                origin = now
            else:
                origin = first + cycle * interval
                if origin > now:
                    await self._wait_until(origin)
                    now = trio.current_time()
            if origin >= tally.window_end or now >= tally.window_end + spec.reply_timeout:
                return
            if not self._take(1, now):
                return
            await self._churn_once(origin, salt=cycle * spec.all_connections + slot)

    async def _churn_once(self, origin: float, salt: int) -> None:
        tally = self.tally
        errors = tally.errors
        try:
            transport = await self._open()
        except _OPEN_FAILURES:
            errors["connect"] += 1
            await self._wait_until(trio.current_time() + _CHURN_RETRY_DELAY)
            return
        tally.connections += 1
        checker = ReplyChecker(tally)
        pool = self._pool
        try:
            with trio.move_on_after(self.spec.reply_timeout) as scope:
                checker.expect(pool.expected(1, 1, salt), 1, origin, trio.current_time())
                tally.sent += 1
                await transport.send_all(pool.wire(1, 1, salt))
                while checker.outstanding and checker.closed_by_server is None:
                    data = await transport.receive_some(_RECEIVE_BYTES)
                    if not data:
                        checker.at_eof()
                        if checker.closed_by_server is None:
                            errors["connection"] += 1
                        errors["lost"] += checker.abandon()
                        return
                    checker.absorb(data, trio.current_time())
            if scope.cancelled_caught:
                errors["timeout"] += checker.abandon()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            errors["connection"] += 1
            errors["lost"] += checker.abandon()
        except ProtocolError:
            errors["format"] += 1
            errors["lost"] += checker.abandon()
        finally:
            errors["lost"] += checker.abandon()  # after an ERR 0 with the message unanswered
            await transport.aclose()


async def run_load(
    spec: LoadSpec, *, open_stream: OpenStream | None = None, on_progress: Progress | None = None
) -> LoadResult:
    """Connect, then load the server as ``spec`` says; the in-process, one-call API.

    Raises:
        ConnectError: no connection could be opened.
    """
    generator = LoadGenerator(spec, open_stream=open_stream)
    await generator.connect()
    return await generator.run(on_progress=on_progress)


def raise_open_file_limit(connections: int) -> None:
    """Raise the soft open-file limit as far as ``connections`` need and the hard limit
    allows (a failing connection is then counted as a ``connect`` error, not a crash)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _RESERVED_FDS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
