"""What every reliability scenario shares: the server as a real process (with its health
checks), clients that keep a ``History`` for the checker, and the run's scale.

Each scenario runs the server as its own process, so that the checks the issue asks of
every scenario are real: the process is alive, its log holds no traceback, and its open
file descriptors are back to the baseline within 2 s after the clients leave.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import trio
from rel_checker import (
    History,
    Recorded,
    check,
    filler_block,
    make_payload,
    message_key,
    read_records,
)

from ackservice.client import ClientStats, client_tls_context, open_client
from ackservice.client.tls import close_stream
from ackservice.protocol import (
    Ack,
    MessageFramer,
    Oversized,
    ack_line,
    message_line,
    parse_reply,
    too_large_line,
)
from support import LineReader
from tls_support import TLSFiles

RECORDING_SERVER = Path(__file__).with_name("recording_server.py")

# The normal suite runs every scenario scaled down; scripts/reliability.py --full sets this.
FULL = os.environ.get("RELIABILITY_SCALE", "quick") == "full"

# The issue: open descriptors back to the baseline within 2 s after the clients leave.
FD_SETTLE_SECONDS = 2.0

# A generous bound on starting a server process on a loaded 2-core machine.
START_TIMEOUT = 20.0

WARMUP_PREFIX = "warmup-"

# A raw client's writes carry the messages that fit in its window, up to about this much.
_MAX_WRITE_BYTES = 256 * 1024


T = TypeVar("T")


def pick(quick: T, full: T) -> T:
    """The scenario's figure for this run: the issue's (``full``) or the scaled-down one."""
    return full if FULL else quick


ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]
"""A test client's connection: plain TCP, or TLS over it (see ``open_stream``)."""


def loopback_address(sock: trio.socket.SocketType) -> str:
    """``host:port`` of a socket's own end, as the server names its peers."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def socket_of(stream: ClientStream) -> trio.socket.SocketType:
    """The TCP socket under a client's connection, TLS or not."""
    if isinstance(stream, trio.SSLStream):
        return stream.transport_stream.socket
    return stream.socket


async def open_stream(port: int, tls: ssl.SSLContext | None = None) -> ClientStream:
    """A connection to 127.0.0.1:``port``; with ``tls``, a ``trio.SSLStream`` over it, its
    handshake done (``https_compatible=False``: closing sends close_notify, and a server
    that closes without one is a truncation, not an end)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if tls is None:
        return stream
    tls_stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
    try:
        await tls_stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls_stream)
        raise
    return tls_stream


def reset_socket(sock: trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0, so the kernel sends a reset (RST) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


async def poll_until(condition: Callable[[], bool], interval: float = 0.01) -> None:
    """Wait until ``condition()`` holds, for state that has no event to wait on (another
    process's logs, descriptors, exit); bound it with a cancel scope."""
    while not condition():  # noqa: ASYNC110 - polls another process's state
        await trio.sleep(interval)


def reference_frames(stream: bytes, limit: int) -> list[bytes | Oversized]:
    """The messages of a whole client stream (ending in EOF), by the sans-IO framer."""
    framer = MessageFramer(limit)
    return framer.feed(stream) + framer.end_of_stream()


def reference_replies(stream: bytes, limit: int) -> bytes:
    """What the server must answer to a whole client stream that ends in EOF."""
    return b"".join(
        too_large_line(seq, limit) if isinstance(frame, Oversized) else ack_line(seq, frame)
        for seq, frame in enumerate(reference_frames(stream, limit), 1)
    )


# -- the server process -------------------------------------------------------------------


class ServerUnderTest:
    """The server as a real process, JSON logs in a file, records (if recording) in another.

    Args:
        workdir: where the log and record files go.
        recording: run ``recording_server.py`` (an application hook that records every
            message for the checker) instead of the plain ``python -m ackservice.server``
            (no hook: the acknowledger's fast path).
        flags: more server flags (``--idle-timeout 1`` ...).
        nofile: run under this RLIMIT_NOFILE (soft and hard).
        port: 0 for a free one; a fixed one to restart a server where clients expect it.
        boot: this run's number in a record file shared across restarts.
        hook_delay: (recording) seconds the application takes per message.
        reject_prefix: (recording) the application refuses payloads that start so.
        tls: serve TLS only, with the server certificate of these files (``--tls-cert``,
            ``--tls-key``); ``client_tls`` is then the context its clients connect with.
        mutual_tls: (with ``tls``) also require a client certificate signed by the files'
            CA (``--tls-client-ca``); ``client_tls`` presents one.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        recording: bool = True,
        flags: Sequence[str] = (),
        nofile: int | None = None,
        port: int = 0,
        boot: int = 1,
        log_level: str = "info",
        hook_delay: float = 0.0,
        reject_prefix: str | None = None,
        tls: TLSFiles | None = None,
        mutual_tls: bool = False,
    ) -> None:
        self.recording = recording
        self.record_path = workdir / "records"
        self.log_path = workdir / f"server-{'rec' if recording else 'plain'}-{boot}.log"
        command = [sys.executable]
        if recording:
            command += [str(RECORDING_SERVER), "--record", str(self.record_path)]
            command += ["--boot", str(boot)]
            if nofile is not None:
                command += ["--nofile", str(nofile)]
            if hook_delay:
                command += ["--hook-delay", str(hook_delay)]
            if reject_prefix is not None:
                command += ["--reject-prefix", reject_prefix]
        else:
            if nofile is not None:
                # Set the limit, then become the server (same pid): the CLI fits itself to it.
                command += ["-c", _SET_NOFILE_THEN_EXEC, str(nofile)]
            command += ["-m", "ackservice.server"]
        command += ["--port", str(port), "--log-format", "json", "--log-level", log_level]
        command += list(flags)
        self.client_tls: ssl.SSLContext | None = None
        if tls is not None:
            command += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
            if mutual_tls:
                command += ["--tls-client-ca", str(tls.ca)]
            client_cert = tls.client_cert if mutual_tls else None
            client_key = tls.client_key if mutual_tls else None
            self.client_tls = client_tls_context(tls.ca, client_cert, client_key)
        self._log_file = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=env,
            cwd=workdir,  # the default store (sqlite:ackservice.db) goes there
        )
        self.port = 0
        self.baseline_fds = 0
        self.baseline_rss = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def started(self) -> ServerUnderTest:
        """Wait until it listens; then one warm-up exchange, then measure the baselines."""
        event = await self.wait_for_event("listening", START_TIMEOUT)
        self.port = int(event["port"])
        await self.warm_up()
        self.baseline_fds = self.fds()
        self.baseline_rss = self.rss()
        return self

    async def warm_up(self) -> None:
        """One connection with one message, closed and logged, so lazily created state
        (and descriptors) exist before the baselines are taken."""
        closed_before = self.count_events("connection_closed")
        stream = await open_stream(self.port, self.client_tls)
        async with stream:
            await stream.send_all(b"@%s%d|warm up\n" % (WARMUP_PREFIX.encode(), time.time_ns()))
            line = await LineReader(stream).line()
            assert line.startswith(b"ACK 1 "), line
        with trio.fail_after(10):
            await poll_until(lambda: self.count_events("connection_closed") > closed_before)

    # -- observing it --

    def fds(self) -> int:
        return psutil.Process(self.pid).num_fds()

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_rss(self) -> int:
        """The highest RSS since the process started or ``reset_peak_rss``."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def memory_status(self) -> dict[str, int]:
        """The kernel's memory figures for the process (``VmRSS``, ``RssAnon``, ...) in bytes."""
        status = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                status[key] = int(value.split()[0]) * 1024
        return status

    def log_lines(self) -> list[str]:
        """The complete lines of the server's log so far. An unterminated last line is still
        being written (the log writer thread may be mid-write as this reads: a write is not
        atomic for a reader of a regular file), not a crash: it is left for the next read."""
        text = self.log_path.read_text(errors="replace")
        return text[: text.rfind("\n") + 1].splitlines()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events so far (lines that are not JSON are skipped here; see
        ``log_problems``)."""
        events = []
        for line in self.log_lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == name]

    def count_events(self, name: str) -> int:
        return len(self.events_named(name))

    def count_refusals(self, reason: str | None = None) -> int:
        """Connections refused, logged or counted in ``warnings_suppressed`` (the server
        logs a few refusals a second and counts the rest)."""
        logged = [
            e
            for e in self.events_named("connection_refused")
            if reason is None or e["reason"] == reason
        ]
        suppressed = sum(
            e["count"]
            for e in self.events_named("warnings_suppressed")
            if e["suppressed_event"] == "connection_refused"
        )
        return len(logged) + suppressed

    async def wait_for_event(
        self, name: str, within: float = 10.0, count: int = 1
    ) -> dict[str, Any]:
        """The ``count``-th event called ``name``, waiting up to ``within`` seconds for it."""
        deadline = time.monotonic() + within
        while True:
            found = self.events_named(name)
            if len(found) >= count:
                return found[count - 1]
            if not self.alive:
                raise AssertionError(f"server exited ({self.process.returncode}) before {name!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} #{count} within {within} s: {self.log_path}")
            await trio.sleep(0.02)

    def records(self) -> list[Recorded]:
        """What the application accepted (the warm-up messages left out)."""
        return [
            record
            for record in read_records(self.record_path)
            if not (record.pid or "").startswith(WARMUP_PREFIX)
        ]

    def log_problems(self, allowed_errors: Iterable[str] = ()) -> list[str]:
        """Log lines that show a crash: not JSON (a bare traceback), an ``exception`` field,
        or an error-level event that the scenario did not expect."""
        allowed = set(allowed_errors)
        problems = []
        for line in self.log_lines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                problems.append(line)
                continue
            crashed = not isinstance(event, dict) or "exception" in event or "Traceback" in line
            unexpected_error = (
                isinstance(event, dict)
                and event.get("level") in ("error", "critical")
                and event.get("event") not in allowed
            )
            if crashed or unexpected_error:
                problems.append(line)
        return problems

    # -- the checks every scenario makes --

    async def assert_healthy(self, allowed_errors: Iterable[str] = ()) -> float:
        """Alive, no traceback, descriptors back to the baseline within 2 s of now (call it
        once the clients have left). Returns how long the descriptors took to settle."""
        assert self.alive, f"server died with {self.process.returncode}: {self.log_path}"
        started = time.monotonic()
        while (fds := self.fds()) > self.baseline_fds:
            waited = time.monotonic() - started
            assert waited < FD_SETTLE_SECONDS, (
                f"{fds} descriptors open {waited:.1f} s after the clients left, "
                f"baseline {self.baseline_fds}"
            )
            await trio.sleep(0.02)
        problems = self.log_problems(allowed_errors)
        assert not problems, "server log shows a crash:\n" + "\n".join(problems[:5])
        assert self.alive
        return time.monotonic() - started

    async def stop(self) -> int:
        """Graceful stop (SIGTERM); returns the exit code (bound it with a cancel scope)."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        return await self.exited()

    async def exited(self) -> int:
        """Wait for the process to end; its exit code (bound it with a cancel scope)."""
        await poll_until(lambda: not self.alive)
        self._log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, if still running (test teardown, or a scenario's crash)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()


_SET_NOFILE_THEN_EXEC = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


# -- clients --------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientRun:
    """What one raw client saw: replies by kind, how the connection ended, round trips."""

    written: int = 0
    acked: int = 0
    refused: int = 0
    end: str = ""
    """``eof``, ``reset``, or the code of the server's ``ERR 0`` line."""
    rtts: list[float] = field(default_factory=list)
    """Seconds from each message's write to its reply, in order."""
    replied_at: list[float] = field(default_factory=list)
    """``trio.current_time()`` of each reply, in order."""
    local: str = ""


async def pipelined_client(
    port: int,
    payloads: Iterable[bytes],
    history: History,
    *,
    window: int = 64,
    half_close: bool = True,
    pause: float = 0.0,
    stream: ClientStream | None = None,
    tls: ssl.SSLContext | None = None,
) -> ClientRun:
    """Send ``payloads`` on one connection, at most ``window`` unanswered, and check every
    reply as it comes: seq in order, ACK length and CRC-32 those of the message sent.

    Every message written and every ACK read goes into ``history``. Returns when the
    server ends the connection (after a half-close by this client once everything is
    sent and answered, if ``half_close``), by ``ERR 0``, EOF or a reset. ``pause`` paces
    a streaming client: seconds to wait after each write. With ``tls`` the connection is
    TLS (``open_stream``), and every reply is read through it; ``half_close`` is then not
    possible (Trio's ``SSLStream`` has no ``send_eof``).
    """
    if stream is None:
        stream = await open_stream(port, tls)
    if half_close and isinstance(stream, trio.SSLStream):
        await trio.aclose_forcefully(stream)
        raise ValueError("a TLS connection cannot half-close here: pass half_close=False")
    run = ClientRun(local=loopback_address(socket_of(stream)))
    in_flight: deque[tuple[str, bytes, float]] = deque()
    room = trio.Semaphore(window)
    source = iter(payloads)

    async def write() -> None:
        seq = 0
        pending = next(source, None)
        while pending is not None:
            await room.acquire()
            batch: list[bytes] = []
            size = 0
            while pending is not None:
                seq += 1
                key = message_key(pending, run.local, seq)
                history.written(key, pending)
                in_flight.append((key, pending, trio.current_time()))
                line = message_line(pending)
                batch.append(line)
                size += len(line)
                pending = next(source, None)
                if pending is None or size >= _MAX_WRITE_BYTES:
                    break
                try:
                    room.acquire_nowait()  # one more message fits in the window
                except trio.WouldBlock:
                    break
            run.written += len(batch)
            await stream.send_all(b"".join(batch))
            if pause:
                await trio.sleep(pause)
        if half_close:
            await stream.send_eof()  # not TLS: refused above

    async def read() -> None:
        reader = LineReader(stream)
        expected_seq = 0
        while True:
            try:
                line = await reader.line()
            except EOFError:
                run.end = "eof"
                return
            reply = parse_reply(line)
            if reply.seq == 0:
                run.end = reply.code  # type: ignore[union-attr]
                return
            expected_seq += 1
            assert reply.seq == expected_seq, f"{run.local}: {line!r}, expected {expected_seq}"
            assert in_flight, f"{run.local}: reply {line!r} to nothing sent"
            key, payload, written_at = in_flight.popleft()
            if isinstance(reply, Ack):
                assert reply.matches(payload), f"{run.local}: {line!r} for {payload[:40]!r}"
                history.acked(key, reply.nbytes, reply.crc32)
                run.acked += 1
            else:
                history.refused_by_server(key)
                run.refused += 1
            now = trio.current_time()
            run.rtts.append(now - written_at)
            run.replied_at.append(now)
            room.release()

    try:
        async with trio.open_nursery() as nursery:

            async def write_until_broken() -> None:
                # On a broken connection the reader sees how it ended.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await write()

            nursery.start_soon(write_until_broken)
            try:
                await read()
            except trio.BrokenResourceError:
                run.end = "reset"
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    return run


class WireTap(trio.abc.HalfCloseableStream):
    """A client's TCP stream, observed: every complete message written and every ACK read
    go into a ``History``, independently of the client's own bookkeeping.

    With ``reset_after`` it also plays the network failing: once that many bytes have been
    written it writes up to that byte (often mid-message) and resets the connection
    (SO_LINGER 0, so the server sees a reset, not an end of stream).

    Over TLS (``stream`` a ``trio.SSLStream``) it observes the plaintext, and a reset cuts
    the plaintext: the bytes up to the cut go out as whole records, then the reset.
    Closing it sends close_notify first, as the client does on its own TLS connections.
    """

    def __init__(
        self, stream: ClientStream, history: History, reset_after: int | None = None
    ) -> None:
        self._stream = stream
        self._history = history
        self._reset_after = reset_after
        self._local = loopback_address(socket_of(stream))
        self._out = MessageFramer(1 << 30)
        self._in = MessageFramer(4096)
        self._keys: list[str] = []
        self.bytes_written = 0
        self.was_reset = False

    def _observe_written(self, data: bytes) -> None:
        for frame in self._out.feed(data):
            assert isinstance(frame, bytes)
            key = message_key(frame, self._local, len(self._keys) + 1)
            self._keys.append(key)
            self._history.written(key, frame)

    def _observe_read(self, data: bytes) -> None:
        for line in self._in.feed(data) if data else self._in.end_of_stream():
            if isinstance(line, Oversized):
                continue
            reply = parse_reply(line)
            if reply.seq == 0:
                continue
            if reply.seq > len(self._keys):
                self._history.bad_acks.append(f"{self._local}: {line!r} to nothing written")
            elif isinstance(reply, Ack):
                self._history.acked(self._keys[reply.seq - 1], reply.nbytes, reply.crc32)
            else:
                self._history.refused_by_server(self._keys[reply.seq - 1])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self._reset_after is not None and self.bytes_written + len(data) >= self._reset_after:
            cut = data[: self._reset_after - self.bytes_written]
            # Noted as written before it is: a message must never reach the server
            # unknown to the history (the checker would call it unexpected).
            self._observe_written(cut)
            await self._stream.send_all(cut)
            self.bytes_written += len(cut)
            self.reset()
            raise trio.BrokenResourceError("connection reset by the test")
        self._observe_written(data)
        await self._stream.send_all(data)
        self.bytes_written += len(data)

    def reset(self) -> None:
        self._reset_after = None
        self.was_reset = True
        reset_socket(socket_of(self._stream))

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        assert not isinstance(self._stream, trio.SSLStream), "TLS here cannot half-close"
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self._observe_read(bytes(data))
        return data

    async def aclose(self) -> None:
        # Over TLS, close_notify first, as the client closes its own TLS streams (it closes
        # others, such as this tap, forcefully: without close_notify).
        await close_stream(self._stream)


async def deliver_all(
    port: int,
    payloads: list[bytes],
    connect: Callable[[], Any],
    **settings: Any,
) -> ClientStats:
    """Send ``payloads`` with the library client over ``connect``'s streams (a tap, a proxy,
    TLS) and require every one acknowledged, in order; the client's totals (connections,
    resends). ``settings`` go to ``open_client`` (window, retries, backoff, timeouts)."""
    async with open_client("127.0.0.1", port, connect=connect, **settings) as client:
        receipts = [receipt async for receipt in client.send_many(payloads)]
    assert [receipt.payload for receipt in receipts] == payloads
    assert all(receipt.acked for receipt in receipts)
    return client.stats


# -- paced streaming clients, and what a graceful shutdown under them must leave ------------

# Each client writes up to a window of messages, then pauses: with the SIGTERM scenario's 200
# connections, about 200 x 8 / 0.05 = 32,000 messages/s offered in all, a steady load rather
# than a saturating one.
WINDOW = 8
PAUSE = 0.05
# Bounds every streaming client; shutdown comes long before.
MAX_MESSAGES_PER_CLIENT = 100_000


def stream_of_payloads(client: int, filler: bytes) -> Iterator[bytes]:
    """Client ``client``'s payloads: distinct, checkable, of 16 to 300 bytes."""
    rng = random.Random(client)
    for index in range(MAX_MESSAGES_PER_CLIENT):
        yield make_payload(f"t{client}-{index}", rng.randint(16, 300), filler, index * 7919)


async def streaming_clients(
    server: ServerUnderTest,
    history: History,
    runs: list[ClientRun],
    nursery: trio.Nursery,
    count: int,
    *,
    window: int = WINDOW,
    at_least: float,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Start ``count`` paced streaming clients (over TLS with ``tls``); return once each has
    had an ACK and ``at_least`` seconds have passed."""
    filler = filler_block()
    histories = [History() for _ in range(count)]

    async def one(client: int) -> None:
        run = await pipelined_client(
            server.port,
            stream_of_payloads(client, filler),
            histories[client],
            window=window,
            pause=PAUSE,
            half_close=tls is None,  # never reached: they stream until the shutdown
            tls=tls,
        )
        history.merge(histories[client])
        runs.append(run)

    for client in range(count):
        nursery.start_soon(one, client)
    await trio.sleep(at_least)
    await poll_until(lambda: all(h.acks for h in histories), 0.05)


def assert_drained_cleanly(
    server: ServerUnderTest, code: int, runs: list[ClientRun], history: History, connections: int
) -> Any:
    """What a graceful shutdown under load must leave: exit 0, not forced, no problem in the
    log, every client told ``shutting-down`` after exactly the replies the server counted
    for it, and the checker's verdict valid (lost 0); the verdict, for the report."""
    assert code == 0
    [complete] = server.events_named("shutdown_complete")
    assert complete["forced"] is False
    assert not server.log_problems()
    assert len(runs) == connections
    assert {run.end for run in runs} == {"shutting-down"}
    answered_by_peer = {
        event["peer"]: event["messages"]
        for event in server.events_named("connection_closed")
        if event["reason"] == "shutting-down"
    }
    for run in runs:
        assert run.acked + run.refused == answered_by_peer[run.local]
    verdict = check(history, server.records())
    verdict.assert_valid()
    return verdict
