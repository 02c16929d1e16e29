"""Scenario 19, the server's own log output fails: standard error is a pipe whose reader has
exited, a pipe nobody reads, or a file on a full disk. The server keeps answering (every
message sent is acknowledged, judged by the checker with the recording hook), never dies,
handles SIGTERM promptly, and counts the log events it could not write."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from rel_checker import History, check, read_records
from rel_harness import RECORDING_SERVER, START_TIMEOUT, pick, pipelined_client

from conftest import Report, StartServer
from support import poll_until, server_process, small_tmpfs

# Lines each log output holds (--log-queue; 10,000 by default): smaller, so that overflowing
# it takes a tenth of the connections.
LOG_QUEUE = 1_000
# Connections that each send one message: two info events each (connection_opened,
# connection_closed), so 1,000 of them overflow the writer's queue.
CHURN = 1_000
# Clients that pipeline many messages on one connection beside them.
STREAMS = 8
STREAM_MESSAGES = pick(500, 5_000)


class LoggingServer:
    """``python -m ackservice.server --store none`` (or the recording server, for the
    checker) as a process whose standard error is ``stderr_fd``, given by the scenario."""

    def __init__(self, workdir: Path, stderr_fd: int, *, recording: bool) -> None:
        self.record_path = workdir / "records"
        if recording:
            command = [sys.executable, str(RECORDING_SERVER), "--record", str(self.record_path)]
        else:
            command = [sys.executable, "-m", "ackservice.server", "--store", "none"]
        command += ["--port", "0", "--log-format", "json", "--log-level", "info"]
        command += ["--log-queue", str(LOG_QUEUE)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_fd,
            env=env,
            cwd=workdir,
        )
        self.recording = recording
        self.port = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def exited(self, within: float) -> tuple[int, float]:
        """The exit code, and how long it took, waiting at most ``within`` seconds."""
        started = time.monotonic()
        with trio.fail_after(within):
            while self.alive:  # noqa: ASYNC110 - another process's exit
                await trio.sleep(0.01)
        return self.process.returncode, time.monotonic() - started

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait(10)


class PipeReader:
    """The reading end of the server's standard error, read by a thread that the scenario
    pauses (a stalled log reader) and resumes."""

    def __init__(self, read_fd: int) -> None:
        self.read_fd = read_fd
        self.data = bytearray()
        self._reading = threading.Event()
        self._reading.set()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done:
            if not self._reading.wait(0.05):
                continue
            if select.select([self.read_fd], [], [], 0.05)[0]:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    return
                self.data += chunk

    def pause(self) -> None:
        self._reading.clear()
        time.sleep(0.1)  # a read in progress finishes

    def resume(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._done = True
        self._thread.join(5)
        os.close(self.read_fd)

    def events(self) -> list[dict[str, Any]]:
        return parse_events(bytes(self.data))


def parse_events(data: bytes) -> list[dict[str, Any]]:
    """The complete JSON lines of a log (a torn line is left out: see ``torn_lines``)."""
    events = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def torn_lines(data: bytes) -> list[bytes]:
    return [line for line in data.splitlines() if line and not _is_json(line)]


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def dropped_reported(events: Sequence[dict[str, Any]]) -> int:
    return sum(e["count"] for e in events if e["event"] == "log_events_dropped")


async def wait_for(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {within} s"
        await trio.sleep(0.02)


async def run_clients(port: int, history: History, tag: str) -> tuple[int, float]:
    """``STREAMS`` pipelining clients and ``CHURN`` one-message connections (16 at a time)
    at once; every message must be acknowledged. Returns (replies, seconds)."""
    acked = 0
    started = time.monotonic()

    async def stream(number: int) -> None:
        nonlocal acked
        payloads = [
            b"@%s-s%d-%d|log scenario" % (tag.encode(), number, i) for i in range(STREAM_MESSAGES)
        ]
        run = await pipelined_client(port, payloads, history)
        assert run.acked == STREAM_MESSAGES, run
        acked += run.acked

    async def churn(worker: int) -> None:
        nonlocal acked
        for i in range(worker, CHURN, 16):
            run = await pipelined_client(port, [b"@%s-c%d|one" % (tag.encode(), i)], history)
            assert run.acked == 1, run
            acked += 1

    async with trio.open_nursery() as nursery:
        for number in range(STREAMS):
            nursery.start_soon(stream, number)
        for worker in range(16):
            nursery.start_soon(churn, worker)
    return acked, time.monotonic() - started


def judge(server: LoggingServer, history: History) -> dict[str, int]:
    """With the recording hook, the checker's verdict on what was acknowledged."""
    if not server.recording:
        return {"acked": len(history.acks)}
    verdict = check(history, read_records(server.record_path))
    verdict.assert_valid()
    return verdict.summary()


async def connection_refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def started_on_pipe(server: LoggingServer, reader: PipeReader) -> None:
    listening: list[dict[str, Any]] = []

    def found() -> bool:
        assert server.alive, f"server exited with {server.process.returncode}"
        listening[:] = [e for e in reader.events() if e["event"] == "listening"]
        return bool(listening)

    await wait_for(found, START_TIMEOUT, "listening event")
    server.port = int(listening[0]["port"])


@pytest.fixture(params=[False, True], ids=["no-hook", "hook"])
def recording(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.slow
async def test_log_reader_gone(tmp_path: Path, recording: bool, report: Report) -> None:
    """Standard error is a pipe whose reader has exited (EPIPE on every log write): the
    server serves every client, every message is acknowledged, and SIGTERM ends it with
    exit 0 (today the first log write after the reader left ended the server with exit 1)."""
    read_fd, write_fd = os.pipe()
    server = LoggingServer(tmp_path, write_fd, recording=recording)
    os.close(write_fd)
    reader = PipeReader(read_fd)
    try:
        await started_on_pipe(server, reader)
        reader.close()  # the reader exits
        history = History()
        with trio.fail_after(120):
            acked, seconds = await run_clients(server.port, history, "gone")
        assert server.alive
        verdict = judge(server, history)
        server.process.send_signal(signal.SIGTERM)
        code, exit_seconds = await server.exited(within=10)
        assert code == 0
        report(
            replies=acked,
            replies_per_s=round(acked / seconds),
            exit_s=round(exit_seconds, 2),
            **verdict,
        )
    finally:
        server.kill()


@pytest.mark.slow
async def test_log_reader_stalled(tmp_path: Path, recording: bool, report: Report) -> None:
    """Standard error is a pipe nobody reads (it fills after ~64 KiB): the server answers
    clients at the speed it does with a reader (at least half of it, on a busy 2-core
    machine), handles SIGTERM promptly (new connections refused within 1 s), and once the
    reader comes back reports every event it dropped (``log_events_dropped``); nothing is
    both written and counted. Today the event loop froze at the first blocked write."""
    read_fd, write_fd = os.pipe()
    server = LoggingServer(tmp_path, write_fd, recording=recording)
    os.close(write_fd)
    reader = PipeReader(read_fd)
    try:
        await started_on_pipe(server, reader)
        history = History()
        with trio.fail_after(120):
            read_acked, read_seconds = await run_clients(server.port, history, "read")
        reader.pause()
        with trio.fail_after(120):
            stalled_acked, stalled_seconds = await run_clients(server.port, history, "stalled")
        read_rate = read_acked / read_seconds
        stalled_rate = stalled_acked / stalled_seconds
        assert stalled_rate > 0.5 * read_rate, (read_rate, stalled_rate)
        assert server.alive
        verdict = judge(server, history)

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(1.0):
            while not await connection_refused(server.port):  # noqa: ASYNC110 - polls a port
                await trio.sleep(0.01)
        refused_after = time.monotonic() - signalled
        reader.resume()
        code, _ = await server.exited(within=10)
        assert code == 0

        events = reader.events()
        dropped = dropped_reported(events)
        assert dropped > 0
        # Every event logged is written or counted: 2 per connection, and the rest.
        connection_events = [
            e for e in events if e["event"] in ("connection_opened", "connection_closed")
        ]
        connections = 2 * (STREAMS + CHURN)
        assert len(connection_events) + dropped >= 2 * connections
        assert not torn_lines(bytes(reader.data))
        report(
            replies_per_s_read=round(read_rate),
            replies_per_s_stalled=round(stalled_rate),
            sigterm_to_refused_ms=round(refused_after * 1000),
            log_events_dropped=dropped,
            **verdict,
        )
    finally:
        server.kill()
        with contextlib.suppress(OSError):
            reader.close()


def fill(disk: Path) -> Path:
    """A file that takes every free byte of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler


@pytest.mark.slow
async def test_log_disk_full(tmp_path: Path, recording: bool, report: Report) -> None:
    """Standard error is a file on a full 64 KiB tmpfs (ENOSPC): every message is still
    acknowledged and the server stays up; when space is freed, the next write reports the
    dropped events, a line cut short by the full disk is ended so later lines stay whole
    JSON, and ``shutdown_complete`` carries the same ``log_events_dropped`` total."""
    with small_tmpfs(tmp_path / "logdisk", "64k") as disk:
        log_path = disk / "server.log"
        with log_path.open("ab") as log_file:
            server = LoggingServer(tmp_path, log_file.fileno(), recording=recording)
        try:

            def listening() -> list[dict[str, Any]]:
                assert server.alive, f"server exited with {server.process.returncode}"
                return [e for e in parse_events(log_path.read_bytes()) if e["event"] == "listening"]

            await wait_for(lambda: bool(listening()), START_TIMEOUT, "listening event")
            server.port = int(listening()[0]["port"])
            filler = fill(disk)
            history = History()
            with trio.fail_after(120):
                acked, seconds = await run_clients(server.port, history, "full")
            assert server.alive
            verdict = judge(server, history)
            full_size = log_path.stat().st_size

            filler.unlink()  # space again: the next write succeeds and reports
            with trio.fail_after(30):
                await run_clients_small(server.port, history)
                await wait_for(
                    lambda: dropped_reported(parse_events(log_path.read_bytes())) > 0,
                    10,
                    "log_events_dropped",
                )
            server.process.send_signal(signal.SIGTERM)
            code, _ = await server.exited(within=10)
            assert code == 0
            data = log_path.read_bytes()
            events = parse_events(data)
            (complete,) = [e for e in events if e["event"] == "shutdown_complete"]
            assert complete["log_events_dropped"] == dropped_reported(events) > 0
            # At most the one line the full disk cut short, ended by the next write.
            assert len(torn_lines(data)) <= 1
            report(
                replies=acked,
                replies_per_s=round(acked / seconds),
                log_bytes_when_full=full_size,
                log_events_dropped=complete["log_events_dropped"],
                **verdict,
            )
        finally:
            server.kill()


async def run_clients_small(port: int, history: History) -> None:
    for i in range(5):
        run = await pipelined_client(port, [b"@after-%d|space again" % i], history)
        assert run.acked == 1


async def test_client_cli_with_its_log_reader_gone(start_server: StartServer) -> None:
    """The client CLI logs through the same queue: at debug level (an event per connection
    and per message) with standard error a pipe whose reader exited, it still sends every
    message and exits 0 (previously the first log write raised and it exited 1)."""
    server = await start_server(recording=False)
    command = [sys.executable, "-m", "ackservice.client", "--port", str(server.port)]
    command += ["--log-level", "debug", "--quiet", "one", "two", "three"]
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        with trio.fail_after(30):
            result = await trio.run_process(
                command,
                stderr=write_fd,
                capture_stdout=True,
                check=False,
            )
    finally:
        os.close(write_fd)
    assert result.returncode == 0
    closed = await server.wait_for_event("connection_closed", count=2)  # after the warm-up
    assert closed["messages"] == 3


def test_server_started_with_standard_error_closed(tmp_path: Path) -> None:
    """Started with descriptor 2 closed (``2>&-``; Python then sets sys.stderr to None), the
    server logs to its --log-file, acknowledges, and exits 0 on SIGTERM (previously the
    logging set-up failed on sys.stderr being None: exit 1 before listening, without a word)."""
    log_path = tmp_path / "server.log"
    close_stderr = ["sh", "-c", 'exec "$@" 2>&-', "sh"]
    with server_process(
        log_path, "--store", "none", "--log-file", str(log_path), prefix=close_stderr
    ) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"@closed-stderr|hello\n")
            assert client.makefile("rb").readline().startswith(b"ACK 1 ")
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert server.wait_for_event("shutdown_complete")["acked"] == 1


def test_log_file_gets_every_line_while_standard_error_is_stalled(tmp_path: Path) -> None:
    """Standard error a pipe nobody reads, with --log-file: the file still gets every event,
    SIGHUP still reopens it (logrotate), and SIGTERM ends the server with exit 0. Previously one
    writer thread served both outputs, so once the pipe was full (~64 KiB) it blocked there and
    the file got nothing more: not the connections, the reopen, nor shutdown_complete."""
    log_path = tmp_path / "server.log"
    port_file = tmp_path / "port"
    read_fd, write_fd = os.pipe()  # nobody reads read_fd: the stall
    command = [sys.executable, "-m", "ackservice.server", "--store", "none", "--port", "0"]
    command += ["--log-format", "json", "--log-file", str(log_path), "--port-file", str(port_file)]
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_fd
    )
    os.close(write_fd)

    def events(path: Path) -> list[dict[str, Any]]:
        return parse_events(path.read_bytes()) if path.exists() else []

    def closed_connections(path: Path) -> int:
        return sum(e["event"] == "connection_closed" for e in events(path))

    try:
        poll_until(lambda: port_file.exists() and port_file.read_text().endswith("\n"), 15)
        port = int(port_file.read_text().split()[0].rsplit(":", 1)[1])
        # ~250 bytes per event, 2 per connection: 400 connections overfill a 64 KiB pipe.
        connections = 400
        for number in range(connections):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"@stalled-%d|hello\n" % number)
                assert client.makefile("rb").readline().startswith(b"ACK 1 ")
        poll_until(lambda: closed_connections(log_path) == connections, 15, "every event")

        log_path.rename(tmp_path / "server.log.1")
        server.send_signal(signal.SIGHUP)
        poll_until(
            lambda: any(e["event"] == "log_file_reopened" for e in events(log_path)), 15, "reopen"
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        assert [e for e in events(log_path) if e["event"] == "shutdown_complete"]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        os.close(read_fd)


def test_a_stalled_standard_error_is_told_to_the_log_file_and_its_exit_loss_counted(
    tmp_path: Path,
) -> None:
    """Standard error a pipe nobody reads, with --log-file, at debug level (an event per
    message): once standard error's queue overflows, the file says so at once
    (``log_output_stalled``, once); at exit, standard error still cannot drain, and the file's
    last line is a ``log_events_dropped`` for it (``at_exit``: lines given up then). Every
    event meant for standard error is in it or counted in the file's reports for it.
    Previously the overflow went unsaid while it lasted, and what the pipe still held at exit
    was neither written nor counted anywhere."""
    log_path = tmp_path / "server.log"
    port_file = tmp_path / "port"
    read_fd, write_fd = os.pipe()  # nobody reads read_fd until the server has exited
    command = [sys.executable, "-m", "ackservice.server", "--store", "none", "--port", "0"]
    command += ["--log-format", "json", "--log-level", "debug", "--log-file", str(log_path)]
    command += ["--port-file", str(port_file)]
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_fd
    )
    os.close(write_fd)

    def events() -> list[dict[str, Any]]:
        return parse_events(log_path.read_bytes()) if log_path.exists() else []

    def stalls() -> list[dict[str, Any]]:
        return [e for e in events() if e["event"] == "log_output_stalled"]

    try:
        poll_until(lambda: port_file.exists() and port_file.read_text().endswith("\n"), 15)
        port = int(port_file.read_text().split()[0].rsplit(":", 1)[1])
        # 15,000 message_acked events overfill standard error's 10,000-line queue; sent in
        # steps, the next once the file holds the last one's events, so that the file's
        # queue never overflows (answered was not enough: on a busy host its writer thread
        # fell 10,000 events behind, and the file counted drops of its own).
        step = 1_000

        def acked_in_file() -> int:
            return log_path.read_bytes().count(b'"message_acked"')

        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            replies = client.makefile("rb")
            for first in range(0, 15_000, step):
                client.sendall(b"".join(b"@m%d|x\n" % n for n in range(first, first + step)))
                for _ in range(step):
                    assert replies.readline().startswith(b"ACK ")
                written = first + step
                poll_until(lambda n=written: acked_in_file() >= n, 15, "the file")
        poll_until(lambda: bool(stalls()), 15, "log_output_stalled")
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        stderr = bytearray()
        os.set_blocking(read_fd, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 1 << 20):
                stderr += chunk
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        os.close(read_fd)

    logged = events()
    assert [(e["output"], e["level"]) for e in stalls()] == [("stderr", "warning")]
    *meant_for_both, final = [e for e in logged if e["event"] != "log_output_stalled"]
    assert (final["event"], final["output"]) == ("log_events_dropped", "stderr")
    assert final["at_exit"] > 0
    assert [e for e in meant_for_both if e["event"] == "shutdown_complete"]
    # The file lost nothing: everything meant for standard error is there, or counted.
    assert not [e for e in meant_for_both if e["event"] == "log_events_dropped"]
    on_stderr = parse_events(bytes(stderr))
    assert not torn_lines(bytes(stderr))
    assert not [e for e in on_stderr if e["event"] == "log_output_stalled"]
    assert len(on_stderr) + final["count"] == len(meant_for_both)
