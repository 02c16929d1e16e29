"""The CLI's log output: a bounded queue and one writer thread, so that logging never blocks
or fails the program; what does not fit, or cannot be written, is dropped and counted."""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import os
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog

from ackservice import logconfig
from ackservice.logconfig import (
    bind_process_fields,
    configure_logging,
    flush_logging,
    log_events_dropped,
    reopen_log_file,
)
from support import poll_until


@dataclass
class LogPipe:
    """A pipe standing for standard error: the test decides whether anyone reads it."""

    read_fd: int
    stream: TextIO

    def close_reader(self) -> None:
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def read_events(
        self, until: str | Callable[[list[dict[str, Any]]], bool], within: float = 5.0
    ) -> list[dict[str, Any]]:
        """Read JSON lines until an event called ``until`` arrives, or ``until(events)``
        holds (or ``within`` passes)."""
        data = b""
        deadline = time.monotonic() + within
        os.set_blocking(self.read_fd, False)
        while time.monotonic() < deadline:
            try:
                data += os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
            events = [json.loads(line) for line in data.splitlines() if line.endswith(b"}")]
            if until(events) if callable(until) else any(e["event"] == until for e in events):
                return events
        raise AssertionError(f"no {until!r} within {within} s; got {data[-500:]!r}")


@pytest.fixture
def log_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogPipe]:
    read_fd, write_fd = os.pipe()
    pipe = LogPipe(read_fd, os.fdopen(write_fd, "w"))
    monkeypatch.setattr(logconfig, "_sink", None)
    yield pipe
    pipe.close_reader()  # a writer blocked on the pipe gets EPIPE and finishes
    flush_logging(2.0)
    pipe.stream.close()
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def test_events_and_stdlib_records_reach_the_descriptor(log_pipe: LogPipe) -> None:
    """Through the writer thread, structlog events and stdlib records (Trio's) come out as
    JSON lines, in the order they were logged."""
    configure_logging("info", "json", stream=log_pipe.stream)
    structlog.get_logger().info("first", n=1)
    logging.getLogger("trio.serve_listeners").error("accept returned %s", "EMFILE")
    structlog.get_logger().warning("last")
    events = log_pipe.read_events(until="last")
    assert [e["event"] for e in events] == ["first", "accept returned EMFILE", "last"]
    assert events[1]["logger"] == "trio.serve_listeners"
    assert log_events_dropped() == 0


def test_a_full_queue_drops_and_counts_without_waiting(log_pipe: LogPipe) -> None:
    """Nobody reads the output: once the pipe and the queue are full, further events are
    dropped and counted, and logging goes on at full speed (never waits for the writer).
    When the output drains, one ``log_events_dropped`` event reports the count."""
    configure_logging("info", "json", stream=log_pipe.stream, max_queued_events=100)
    started = time.monotonic()
    events = 5_000  # ~700 KB of JSON lines: ten times what a pipe holds
    for n in range(events):
        structlog.get_logger().info("filler", n=n, padding="x" * 80)
    assert time.monotonic() - started < 2.0
    dropped = log_events_dropped()
    assert dropped > events - 100 - 1_000  # at most the queue and the pipe's ~64 KiB

    def reported(events: list[dict[str, Any]]) -> int:
        return sum(e["count"] for e in events if e["event"] == "log_events_dropped")

    # Reported as soon as a write succeeds after drops, so possibly in several reports.
    seen = log_pipe.read_events(until=lambda events: reported(events) == log_events_dropped())
    assert all(e["level"] == "warning" for e in seen if e["event"] == "log_events_dropped")
    written = [e["n"] for e in seen if e["event"] == "filler"]
    # Every event is either written or counted, never both; reports are never dropped.
    assert len(written) + log_events_dropped() == events
    assert written == sorted(written)


def test_a_failing_write_is_counted_not_raised(log_pipe: LogPipe) -> None:
    """The reader has exited (EPIPE on every write): logging raises nothing, every event is
    counted as dropped, and flushing at exit does not wait for the output."""
    configure_logging("info", "json", stream=log_pipe.stream)
    log_pipe.close_reader()
    for n in range(50):
        structlog.get_logger().error("lost", n=n)
        logging.getLogger("trio").warning("also lost")
    started = time.monotonic()
    flush_logging(2.0)
    assert time.monotonic() - started < 1.0
    # The final report (its write fails too) counts itself.
    assert log_events_dropped() in (100, 101)


def test_exit_flush_is_bounded_on_a_stuck_output(log_pipe: LogPipe) -> None:
    """A pipe that never drains: flushing gives up after its timeout instead of hanging."""
    configure_logging("info", "json", stream=log_pipe.stream)
    for n in range(2_000):
        structlog.get_logger().info("filler", n=n, padding="x" * 80)
    started = time.monotonic()
    flush_logging(0.2)
    # It waits (part of the time is kept for reporting the loss to another output), then
    # gives up.
    assert 0.1 < time.monotonic() - started < 1.0


def bytes_in_pipe(read_fd: int) -> int:
    pending = bytearray(4)
    fcntl.ioctl(read_fd, termios.FIONREAD, pending)
    return int.from_bytes(pending, "little")


def read_exactly(read_fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += os.read(read_fd, size - len(data))
    return data


def file_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_lines_a_stalled_output_holds_at_exit_are_counted_and_told_to_the_log_file(
    log_pipe: LogPipe, tmp_path: Path
) -> None:
    """Standard error is a pipe nobody reads, with a log file: at exit, standard error cannot
    drain, and what it still holds (queued, or in the write it is stuck in) is counted as
    dropped, so that every event is written or counted; the log file, which drained, gets one
    last ``log_events_dropped`` naming standard error, with that count (``at_exit``). A second
    flush (the client CLI flushes before its summary, then at exit) waits no more for it."""
    path = tmp_path / "server.log"
    configure_logging("info", "json", stream=log_pipe.stream, log_file=path)
    events = 1_000  # ~300 KB of JSON lines, the pipe holds 64 KiB: all queued, none dropped
    for n in range(events):
        structlog.get_logger().info("filler", n=n, padding="x" * 200)
    flush_logging(1.0)
    # Only what was written before exit gave up: reading more would let the abandoned
    # writer's stuck write through, after it was counted (at exit, the process ends first).
    written = read_exactly(log_pipe.read_fd, bytes_in_pipe(log_pipe.read_fd)).splitlines()
    lost = events - len(written)
    assert lost > 0
    assert log_events_dropped() == lost
    logged = file_events(path)
    assert [e["n"] for e in logged[:-1]] == list(range(events))
    final = logged[-1]
    assert (final["event"], final["level"], final["output"]) == (
        "log_events_dropped",
        "warning",
        "stderr",
    )
    assert final["count"] == final["at_exit"] == lost
    started = time.monotonic()
    flush_logging(1.0)
    assert time.monotonic() - started < 0.5  # not another wait for the stuck writer
    assert log_events_dropped() == lost


def test_a_full_queue_is_told_at_once_to_the_other_output(
    log_pipe: LogPipe, tmp_path: Path
) -> None:
    """Standard error a pipe nobody reads: its writes never fail, they block. The first
    event its full queue drops is told to the log file at once (``log_output_stalled``,
    naming it), once however many follow; standard error itself never gets it, and says what
    it lost once drained (``log_events_dropped``). A new stall after that is told anew."""
    path = tmp_path / "server.log"
    configure_logging("info", "json", stream=log_pipe.stream, log_file=path, max_queued_events=100)
    logged = 0

    def stalls() -> list[dict[str, Any]]:
        return [e for e in file_events(path) if e["event"] == "log_output_stalled"]

    def fillers_in_file(count: int) -> Callable[[], bool]:
        return lambda: sum(e["event"] == "filler" for e in file_events(path)) == count

    def log_until(stalls_told: int) -> None:
        """Log in steps the file's writer keeps up with (its queue never fills), until the
        file has been told of ``stalls_told`` stalls; and a few steps more."""
        nonlocal logged
        steps_after = 5
        for _ in range(100):
            for _ in range(50):
                structlog.get_logger().info("filler", n=logged, padding="x" * 500)
                logged += 1
            poll_until(fillers_in_file(logged))
            if len(stalls()) >= stalls_told:
                steps_after -= 1
                if not steps_after:
                    return
        raise AssertionError(f"{logged} events logged, {len(stalls())} stalls told")

    log_until(stalls_told=1)
    assert [(e["output"], e["level"]) for e in stalls()] == [("stderr", "warning")]
    dropped = log_events_dropped()
    assert dropped > 0

    # A reader again: standard error drains, then reports its drops, and never the stall.
    seen = log_pipe.read_events(until="log_events_dropped")
    assert not [e for e in seen if e["event"] == "log_output_stalled"]
    assert [e["count"] for e in seen if e["event"] == "log_events_dropped"] == [dropped]

    log_until(stalls_told=2)  # nobody reads again: a second outage, told once more
    assert [e["output"] for e in stalls()] == ["stderr", "stderr"]


def test_events_after_the_exit_flush_are_counted(log_pipe: LogPipe) -> None:
    """flush_logging stops the writer: an event logged after it (another atexit handler, a
    thread still running) cannot be written, and is counted rather than queued for nobody."""
    configure_logging("info", "json", stream=log_pipe.stream)
    structlog.get_logger().info("before")
    flush_logging(2.0)
    structlog.get_logger().info("after")
    assert log_events_dropped() == 1


def test_dropped_count_is_zero_when_logging_was_never_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An application embedding the server keeps its own logging: the counter reads 0."""
    monkeypatch.setattr(logconfig, "_sink", None)
    assert log_events_dropped() == 0


def test_a_log_file_on_a_full_disk_does_not_stop_standard_error(log_pipe: LogPipe) -> None:
    """A log file whose writes fail (``/dev/full``: ENOSPC every time) loses its lines, which
    are counted as dropped, while standard error gets every one: one output failing never
    stalls or silences the other."""
    configure_logging("info", "json", stream=log_pipe.stream, log_file=Path("/dev/full"))
    for n in range(20):
        structlog.get_logger().info("line", n=n)
    events = log_pipe.read_events(until=lambda events: len(events) >= 20)
    assert [e["n"] for e in events[:20]] == list(range(20))
    poll_until(lambda: log_events_dropped() >= 20)


def test_a_failing_output_is_reported_at_once_and_once(log_pipe: LogPipe) -> None:
    """A log file whose writes fail (``/dev/full``) is named on standard error as soon as a
    write fails (``log_output_failed``, with the error), once however many writes fail after
    it: the operator learns why the file has gaps while it lasts, without a flood."""
    configure_logging("info", "json", stream=log_pipe.stream, log_file=Path("/dev/full"))
    log = structlog.get_logger()
    log.info("first")
    events = log_pipe.read_events(until="log_output_failed")
    for n in range(3):  # later batches, each of which fails too
        log.info("line", n=n)
        events += log_pipe.read_events(until="line")
    failures = [e for e in events if e["event"] == "log_output_failed"]
    assert [(e["output"], e["error"]) for e in failures] == [
        ("/dev/full", "No space left on device")
    ]


def test_reopen_moves_to_a_new_file_and_survives_a_failure(
    log_pipe: LogPipe, tmp_path: Path
) -> None:
    """reopen_log_file: after the file was renamed, the writer opens the path anew and says
    so there (``log_file_reopened``); when the path cannot be opened it says so and keeps
    writing to the file it had."""
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "server.log"
    configure_logging("info", "json", stream=log_pipe.stream, log_file=path)
    structlog.get_logger().info("before")
    poll_until(lambda: "before" in path.read_text())
    path.rename(tmp_path / "server.log.1")
    assert reopen_log_file()
    structlog.get_logger().info("after")
    poll_until(lambda: path.exists() and "log_file_reopened" in path.read_text())
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == [
        "after",  # queued before the writer reopened, so written first
        "log_file_reopened",
    ]
    assert "after" not in (tmp_path / "server.log.1").read_text()
    # The directory disappears: the reopen fails, lines still reach the open file.
    path.unlink()
    directory.rmdir()
    assert reopen_log_file()
    structlog.get_logger().info("still")
    seen = log_pipe.read_events(until="still")
    failed = [e["path"] for e in seen if e["event"] == "log_file_reopen_failed"]
    assert failed == [str(path)]
    assert log_events_dropped() == 0


def test_the_writers_own_events_say_which_process_they_come_from(
    log_pipe: LogPipe, tmp_path: Path
) -> None:
    """Events the writer thread logs itself (``log_file_reopened``, ``log_file_reopen_failed``,
    ``log_output_failed``, ``log_events_dropped``) carry the fields bound for the whole
    process (``worker``), as every other event does: with --workers all processes write
    one file, and a failed reopen must say whose it was. Before, the thread's events had
    none of them (contextvars are not shared with a thread)."""
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "server.log"
    configure_logging("info", "json", stream=log_pipe.stream, log_file=path)
    # In a context of its own, so that the binding does not reach the other tests.
    contextvars.copy_context().run(bind_process_fields, worker=3)
    structlog.get_logger().info("before")
    poll_until(lambda: "before" in path.read_text())
    path.rename(tmp_path / "server.log.1")
    assert reopen_log_file()
    poll_until(lambda: path.exists() and "log_file_reopened" in path.read_text())
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e.get("worker")) for e in events] == [("log_file_reopened", 3)]
    path.unlink()
    directory.rmdir()
    assert reopen_log_file()
    structlog.get_logger().info("still")
    seen = log_pipe.read_events(until="still")
    failed = [e.get("worker") for e in seen if e["event"] == "log_file_reopen_failed"]
    assert failed == [3]


def test_reopen_without_a_log_file_says_so(log_pipe: LogPipe) -> None:
    """No --log-file: nothing to reopen (the CLI then logs SIGHUP as ignored)."""
    configure_logging("info", "json", stream=log_pipe.stream)
    assert not reopen_log_file()


def test_bytes_and_text_lines_reach_every_output(log_pipe: LogPipe, tmp_path: Path) -> None:
    """The sink takes rendered lines as bytes (JSON: written as they are) and as str (the
    console's: encoded for the stream); both reach standard error and the log file, whole
    and in order, each ended by one newline."""
    path = tmp_path / "server.log"
    sink = logconfig._LogSink(
        [
            logconfig._Output(os.dup(log_pipe.stream.fileno())),
            logconfig._Output(logconfig.open_log_file(path), path),
        ],
        "utf-8",
        max_queued_events=100,
    )
    sink.put(b'{"event":"caf\xc3\xa9"}')
    sink.put("plain text line é")
    sink.put(b'{"event":"last"}')
    sink.stop(2.0)
    expected = '{"event":"café"}\nplain text line é\n{"event":"last"}\n'.encode()
    assert os.read(log_pipe.read_fd, 1 << 16) == expected
    assert path.read_bytes() == expected
    assert sink.dropped == 0


def test_bytes_lines_that_cannot_be_written_are_counted() -> None:
    """Bytes lines count as str ones do: beyond the queue's bound, and on a failing output
    (``/dev/full``), each line lost is counted once."""
    sink = logconfig._LogSink(
        [logconfig._Output(logconfig.open_log_file(Path("/dev/full")), Path("/dev/full"))],
        "utf-8",
        max_queued_events=10,
    )
    # Usually 20 are dropped at once (the writer lets lines gather for ~10 ms before it
    # writes), and 10 when their write fails; however the threads interleave, all 30 count.
    for n in range(30):
        sink.put(b'{"event":"lost","n":%d}' % n)
    sink.stop(2.0)
    assert sink.dropped == 30


def test_json_lines_are_utf8_whatever_the_streams_encoding(log_pipe: LogPipe) -> None:
    """JSON is UTF-8: non-ASCII text in events and in Trio's records is written so (not
    escaped per the stream's encoding, which would make invalid JSON), even to an ASCII
    stream."""
    ascii_stream = os.fdopen(os.dup(log_pipe.stream.fileno()), "w", encoding="ascii")
    try:
        configure_logging("info", "json", stream=ascii_stream)
        structlog.get_logger().info("café", peer="naïve")
        logging.getLogger("trio").warning("réseau %s", "coupé")
        events = log_pipe.read_events(until=lambda events: len(events) == 2)
    finally:
        flush_logging(2.0)
        ascii_stream.close()
    assert [(e["event"], e.get("peer")) for e in events] == [
        ("café", "naïve"),
        ("réseau coupé", None),
    ]


def test_json_lines_are_compact(log_pipe: LogPipe) -> None:
    """One JSON object per line, with orjson's compact separators; the fields in structlog's
    order (the event's own, then the context's, then level and timestamp)."""
    configure_logging("info", "json", stream=log_pipe.stream)
    with structlog.contextvars.bound_contextvars(conn_id=7):
        structlog.get_logger().info("connection_closed", reason="eof", duration=0.25)
    flush_logging(2.0)
    (line,) = os.read(log_pipe.read_fd, 1 << 16).splitlines()
    timestamp = json.loads(line)["timestamp"]
    assert line == (
        b'{"reason":"eof","duration":0.25,"event":"connection_closed","conn_id":7,'
        b'"level":"info","timestamp":"%s"}' % timestamp.encode()
    )


def test_exceptions_become_one_field(log_pipe: LogPipe) -> None:
    """``log.exception`` (and ``exc_info``) renders the traceback as one ``exception`` string,
    so the event stays one line; events without one get no such field."""
    configure_logging("info", "json", stream=log_pipe.stream)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("connection_failed")
    structlog.get_logger().info("after")
    events = log_pipe.read_events(until="after")
    assert events[0]["event"] == "connection_failed"
    assert "ValueError: boom" in events[0]["exception"]
    assert "exc_info" not in events[0]
    assert "exception" not in events[1]
