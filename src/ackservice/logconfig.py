"""Logging set-up for the command-line programs; the only module that configures structlog.

Library code only calls ``structlog.get_logger()``: an application that embeds ackservice
keeps whatever logging configuration it already has (structlog's library/application split).

Log output never reaches the event loop's thread as a write: events are rendered where they
are logged (as before), then handed to a bounded queue per output (standard error, the log
file) that its own writer thread empties onto the output's file descriptor. A stream that
blocks (a pipe nobody reads) or fails (a reader that exited, a full disk) therefore cannot
stall or end the program, nor silence the other output: when a queue is full the event is
dropped (for that output) and counted, a failed write is counted and the next one tried, and
the count is reported (``log_events_dropped``) once output works again. The first event an
output's full queue drops is announced at once to the other outputs (``log_output_stalled``):
a pipe nobody reads never makes a write fail, so nothing else would say so while it lasts.

At exit the writers get a bounded time; an output that did not drain by then (that pipe) is
given up, what it still held is counted as dropped, and the outputs that did drain get a last
``log_events_dropped`` for it, with ``at_exit``: ``shutdown_complete`` was logged before the
loss was known.

With a log file (``--log-file``) every line goes to standard error and to the file, neither
waiting for the other; the file is reopened by its writer thread when asked
(``reopen_log_file``, the CLI's SIGHUP), so that logrotate can move it away and the next line
starts the new one.

Rendering is the part of logging the event loop's thread pays for, twice per connection
(``connection_opened``, ``connection_closed``), so JSON lines are rendered by orjson and
timestamps formatted once per second rather than once per event (``scripts/bench_logging.py``
measures both against structlog's stock processors).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import datetime
import itertools
import json
import logging
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, WrappedLogger

try:
    import orjson
except ImportError:  # a platform it is not installed on (pyproject.toml): the stdlib renders
    orjson = None  # type: ignore[assignment]

__all__ = [
    "configure_logging",
    "flush_logging",
    "log_events_dropped",
    "open_log_file",
    "reopen_log_file",
]

# Events waiting for an output's writer thread, beyond which new ones are dropped (for that
# output). Log lines are typically 150 to 400 bytes, so this holds a few MB at most, and
# several seconds of the busiest info-level logging (a connection_opened/connection_closed
# pair per connection at ~1,000 connections/s) while the output is slow.
DEFAULT_MAX_QUEUED_EVENTS = 10_000
# The largest --log-queue: a few GB of lines held per stalled output (stderr and --log-file
# each have one; so does each worker).
MAX_LOG_QUEUE = 10_000_000

# How long process exit waits for queued events to be written. Bounded, because the output
# may never drain (a pipe nobody reads): exit must not hang on it.
DEFAULT_EXIT_FLUSH_SECONDS = 1.0

# Of that time, what is kept back (at most) for writing the last line about an output that did
# not drain to the outputs that did: a line to a working file takes far less, but the writer
# thread still has to be scheduled on a busy machine.
_EXIT_REPORT_SECONDS = 0.25

# One write() carries at most this many queued lines: fewer system calls than one per event
# when logging is busy, without building huge buffers.
_MAX_BATCH_LINES = 256

# How long a writer thread lets lines gather once woken: log lines reach the output at
# most this much later, and the writer runs at most 100 times a second however busy logging is.
_BATCH_DELAY = 0.01

# A log file is created readable by its owner and group only: lines name peers' addresses.
_LOG_FILE_MODE = 0o640
_LOG_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC

_sink: _LogSink | None = None
_exit_flush_registered = False
# Fields every event of this process carries (``worker``), for the events the writer threads
# log themselves: a thread does not see the contextvars bound in the main one.
_process_fields: dict[str, Any] = {}


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    max_queued_events: int = DEFAULT_MAX_QUEUED_EVENTS,
    log_file: Path | None = None,
) -> None:
    """Send structlog events, and stdlib ``logging`` records (Trio's own), to ``stream``.

    When ``stream`` has a file descriptor (standard error, a file), lines are written by a
    background thread through a bounded queue: logging never blocks the caller and never
    raises into it. A stream without one (``io.StringIO``) cannot block or fail, and is
    written directly.

    Args:
        level: the least severe level shown (``debug`` ... ``critical``).
        fmt: ``console`` (human-readable), ``json`` (one JSON object per line) or ``auto``
            (console when ``stream`` is a terminal, JSON lines otherwise, as for a daemon
            whose stderr goes to a journal or a file).
        stream: where log lines go; standard error by default.
        max_queued_events: events waiting to be written beyond which new ones are dropped
            (and counted: see ``log_events_dropped``).
        log_file: also append every line to this file (created if missing), reopened by
            ``reopen_log_file``. Rendered as for ``stream``, which must then have a file
            descriptor.

    Raises:
        OSError: ``log_file`` could not be opened.
    """
    global _sink, _exit_flush_registered
    _process_fields.clear()
    out = sys.stderr if stream is None else stream
    if out is None:
        # Python leaves sys.stderr None when the program starts with descriptor 2 closed
        # (``2>&-``, a service manager's "closed" standard error): lines go to the log file
        # alone, or nowhere, rather than the first log call failing. Opened now, /dev/null
        # also takes descriptor 2, so no socket opened later becomes "standard error".
        out = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the process's life
    is_tty = out.isatty()
    use_console = fmt == "console" or (fmt == "auto" and is_tty)
    levelno = logging.getLevelNamesMapping()[level.upper()]

    renderer: structlog.types.Processor
    # The stdlib bridge (ProcessorFormatter) wants a str from its last processor.
    record_renderer: structlog.types.Processor
    if use_console:
        renderer = record_renderer = _never_failing(structlog.dev.ConsoleRenderer(colors=is_tty))
        exception_formatter: list[structlog.types.Processor] = []
    else:
        renderer, record_renderer = _render_json, _render_json_str
        # Tracebacks become one "exception" string field, so each event stays one line.
        exception_formatter = [_format_exc_info]

    file_fd = None if log_file is None else open_log_file(log_file)  # may fail: first
    if _sink is not None:  # configured again (tests do): the previous writer finishes first
        _sink.stop(DEFAULT_EXIT_FLUSH_SECONDS)
    fd = _file_descriptor(out)
    outputs = [] if fd is None else [_Output(os.dup(fd))]
    if file_fd is not None:
        outputs.append(_Output(file_fd, log_file))
    # JSON text is UTF-8 whatever the locale (RFC 8259, section 8.1): orjson's lines are, and
    # Trio's records (rendered to str for the stdlib formatter) are encoded the same way.
    encoding = (getattr(out, "encoding", None) or "utf-8") if use_console else "utf-8"
    _sink = _LogSink(outputs, encoding, max_queued_events) if outputs else None
    if _sink is not None and not _exit_flush_registered:
        atexit.register(flush_logging)
        _exit_flush_registered = True

    logger_factory: Any
    handler: logging.Handler
    if _sink is None:
        logger_factory = structlog.WriteLoggerFactory(file=out)  # writes str
        renderer = record_renderer
        handler = logging.StreamHandler(out)
    else:
        logger_factory = _QueueLoggerFactory(_sink)
        handler = _QueueingHandler(_sink)

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _iso_utc_stamper(),  # TimeStamper(fmt="iso", utc=True)'s very strings, cheaper
    ]
    structlog.configure(
        processors=[*shared, *exception_formatter, renderer],
        # Calls below the level are no-op methods, so disabled debug events cost one call.
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )

    # Trio reports some trouble through the stdlib (e.g. "trio.serve_listeners" when out of
    # file descriptors); render those records exactly like our own events, on the same stream.
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exception_formatter,
                record_renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levelno)


def bind_process_fields(**fields: Any) -> None:
    """Bind ``fields`` to every event of this process: the caller's context (and so every
    task started from it) and the events the log writer threads log themselves."""
    structlog.contextvars.bind_contextvars(**fields)
    _process_fields.update(fields)


def _own_logger() -> Any:
    """The logger for the sink's own events, with the process's fields bound."""
    return structlog.get_logger(__name__).bind(**_process_fields)


def log_events_dropped() -> int:
    """Log events dropped so far (queue full, or their write failed); 0 when
    ``configure_logging`` never ran, as in an application that embeds the server."""
    return 0 if _sink is None else _sink.dropped


def open_log_file(path: Path) -> int:
    """Open ``path`` for appending log lines (created if missing); its descriptor.

    Raises:
        OSError: it could not be opened (no such directory, permission denied, ...).
    """
    return os.open(path, _LOG_FILE_FLAGS, _LOG_FILE_MODE)


def reopen_log_file() -> bool:
    """Ask the writer thread to reopen the log file before its next write (logrotate has
    moved it away); whether there is a log file. The writer logs ``log_file_reopened`` into the
    new file, or ``log_file_reopen_failed`` and keeps the old one."""
    if _sink is None or not any(output.path for output in _sink.outputs):
        return False
    _sink.request_reopen()
    return True


def flush_logging(timeout: float = DEFAULT_EXIT_FLUSH_SECONDS) -> None:
    """Write what is queued, waiting at most ``timeout`` seconds, and stop the writer thread
    (registered to run at process exit). Later events are dropped and counted."""
    if _sink is not None:
        _sink.stop(timeout)


def _never_failing(render: Callable[..., Any]) -> structlog.types.Processor:
    """``render`` (the console's), except that a field it cannot show (a ``__repr__`` that
    raises) is shown as ``_plain_or_repr`` makes it, as the JSON renderer does: a log call
    must not fail because of what it logs."""

    def render_or_plain(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        try:
            # A copy: the renderer pops the fields it shows, and the retry needs them all.
            return render(logger, method_name, dict(event_dict))
        except Exception:
            plain = {str(key): _plain_or_repr(value) for key, value in event_dict.items()}
            return render(logger, method_name, plain)

    return render_or_plain


def _format_exc_info(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """``structlog.processors.format_exc_info``, called only for the events that carry
    ``exc_info`` (``log.exception`` sets it): for the others it costs ~0.3 us doing nothing."""
    if "exc_info" in event_dict:
        return structlog.processors.format_exc_info(logger, method_name, event_dict)
    return event_dict


def _iso_utc_stamper(clock: Callable[[], int] = time.time_ns) -> structlog.types.Processor:
    """A processor adding a ``timestamp``: exactly the string
    ``structlog.processors.TimeStamper(fmt="iso", utc=True)`` gives for the same clock
    reading, at a fraction of the cost.

    That is ``datetime.now(timezone.utc).isoformat()`` with ``+00:00`` written ``Z``:
    ``2025-01-02T03:04:05.678901Z``, and no fraction at all when the microsecond is 0
    (``2025-01-02T03:04:05Z``, as ``isoformat`` does). ``datetime.now`` reads the same clock
    as ``time.time_ns`` and truncates it to the microsecond, as done here.

    Building a datetime and formatting it costs a few microseconds an event; here the date and
    time of day are formatted once per second, and the microseconds are two table look-ups
    (the cheapest form measured: ``f"{us:06d}"`` costs three times as much).

    Args:
        clock: nanoseconds since the epoch (tests pass their own).
    """
    # One tuple (second, "...T03:04:05.", "...T03:04:05Z"), replaced whole, so that threads
    # logging at once (the log writer's own events) never see half an update. A closure
    # rather than a class: calling a function is cheaper than an instance's __call__.
    cached = _iso_second(0)

    def stamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        nonlocal cached
        second, microsecond = divmod(clock() // 1_000, 1_000_000)
        current = cached
        if current[0] != second:
            current = cached = _iso_second(second)
        event_dict["timestamp"] = (
            f"{current[1]}{_THREE_DIGITS[microsecond // 1_000]}"
            f"{_THREE_DIGITS[microsecond % 1_000]}Z"
            if microsecond
            else current[2]
        )
        return event_dict

    return stamp


_THREE_DIGITS = [f"{number:03d}" for number in range(1_000)]


# Naive, so that isoformat() writes no offset (the "Z" is added instead).
_EPOCH = datetime.datetime(1970, 1, 1)


def _iso_second(second: int) -> tuple[int, str, str]:
    """``second`` (since the epoch), and its ISO 8601 form to append microseconds to, and
    with none (``isoformat``'s form for microsecond 0)."""
    # isoformat, not strftime: strftime("%Y") does not pad years below 1000 to four digits.
    whole = (_EPOCH + datetime.timedelta(seconds=second)).isoformat()
    return second, f"{whole}.", f"{whole}Z"


# Datetimes and dataclasses go to _json_fallback (their repr), as they did with json.dumps,
# rather than becoming orjson's ISO strings and objects.
_ORJSON_OPTIONS = (
    0 if orjson is None else orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _render_json(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> bytes:
    """Render ``event_dict`` as one compact JSON line (UTF-8, no newline), by orjson.

    Never raises, as a log call must not fail because of what it logs: objects JSON has no
    form for become their ``__structlog__()`` or ``repr()`` (as structlog's JSONRenderer
    does); what orjson refuses (integers beyond 64 bits, non-str keys, unpaired surrogates)
    is rendered by the stdlib's json module instead.
    """
    if orjson is None:
        return _render_json_stdlib(event_dict).encode("ascii")
    try:
        return orjson.dumps(event_dict, default=_json_fallback, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _render_json_stdlib(event_dict).encode("ascii")


def _render_json_str(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    """``_render_json`` as str, for what wants text (the stdlib logging bridge)."""
    return _render_json(logger, method_name, event_dict).decode("utf-8")


def _json_fallback(value: Any) -> Any:
    """What to render for ``value``, which JSON has no form for (structlog's convention)."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# orjson's compact form, so that a line rendered by either looks the same.
_COMPACT_SEPARATORS = (",", ":")


def _render_json_stdlib(event_dict: EventDict) -> str:
    """The stdlib's rendering of ``event_dict`` (ASCII: other characters are escaped)."""
    # allow_nan=False: json.dumps would write NaN and Infinity, which are not JSON, and a
    # log shipper rejects the whole line; such floats become null, as orjson renders them.
    try:
        return json.dumps(
            event_dict, default=_json_fallback, separators=_COMPACT_SEPARATORS, allow_nan=False
        )
    except Exception:
        # Keys json cannot encode either (a tuple), a reference cycle, a __repr__ or
        # __structlog__ that raises, a float that is not finite: every field that is not a
        # plain value is its repr().
        fields = {str(key): _plain_or_repr(value) for key, value in event_dict.items()}
        return json.dumps(fields, separators=_COMPACT_SEPARATORS, allow_nan=False)


def _plain_or_repr(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        return repr(value)
    except Exception:  # a broken __repr__ still must not fail the log call
        return f"<{type(value).__name__} without a repr>"


def _file_descriptor(stream: TextIO) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    # Whatever the stream already buffered goes first, in order.
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
    return fd


class _Output:
    """One descriptor lines are written to, with its own queue and writer thread: an output
    that blocks (standard error a pipe nobody reads, a log file on a hung NFS server) holds
    up no other, so the log file still gets every line while standard error is stalled."""

    __slots__ = (
        "abandoned",
        "drained",
        "dropped",
        "failing",
        "fd",
        "in_flight",
        "lines",
        "path",
        "reopen_requested",
        "reported",
        "stalled",
        "torn",
        "wakeup",
    )

    def __init__(self, fd: int, path: Path | None = None) -> None:
        self.fd = fd
        self.path = path
        """The file's path, for reopening; None for standard error."""
        self.torn = False
        """A failed write left a partial line on this output."""
        self.failing = False
        """The last write failed (``log_output_failed`` was logged)."""
        # A deque, not queue.Queue: append() and popleft() are atomic and take no lock, and
        # the writer is woken only when it sleeps (see _LogSink._run), not at every event.
        # The bound is enforced by the producers (len() before append()), exactly for one
        # producer and to within a line per racing thread otherwise.
        # Lines are bytes (JSON, already UTF-8) or str (the console's, encoded when written).
        self.lines: collections.deque[bytes | str] = collections.deque()
        self.wakeup = threading.Event()
        self.dropped = 0
        """Lines meant for this output and lost (queue full, or their write failed)."""
        self.reported = 0
        self.reopen_requested = False
        self.stalled = False
        """Its queue overflowed since it last caught up (``log_output_stalled`` was said)."""
        self.drained = threading.Event()
        """Set by the writer once it has written everything queued after ``stop()``."""
        self.abandoned = False
        """``stop()`` gave up waiting for it; what it held was counted as dropped."""
        self.in_flight: tuple[list[int], int] = ([], 0)
        """The batch being written: where each of its lines ends, and the bytes written so
        far; one tuple, replaced whole, so that ``stop()`` never reads half an update."""

    @property
    def name(self) -> str:
        return "stderr" if self.path is None else str(self.path)


class _LogSink:
    """The rendered lines, queued for every output (standard error, and the log file if
    any), each written by its own thread."""

    def __init__(self, outputs: list[_Output], encoding: str, max_queued_events: int) -> None:
        # The sink owns its descriptors (standard error's is a duplicate): if the stream is
        # closed and its number reused (a test's captured stderr), lines still go where they
        # were meant to, never into another file.
        self.outputs = outputs
        self._encoding = encoding
        self._max_queued = max_queued_events
        self._count_lock = threading.Lock()
        self._stopped = False
        self._closing = False
        """``stop()`` is done waiting: writers write what they hold and finish."""
        self._threads = [
            threading.Thread(
                target=self._run, args=(output,), name="ackservice-log-writer", daemon=True
            )
            for output in outputs
        ]
        self._writer_idents: set[int | None] = set()
        for thread in self._threads:
            thread.start()
            self._writer_idents.add(thread.ident)

    @property
    def dropped(self) -> int:
        """Lines lost, counted once for each output that lost them."""
        return sum(output.dropped for output in self.outputs)

    def put(self, line: bytes | str) -> None:
        """Queue a rendered line (without its newline) for writing to every output; drop
        (and count) it for an output whose queue is full."""
        # The writers' own events (drop reports) always go in: were a report dropped, the
        # count it carries would be lost with it.
        # After stop() the writers finish with what they hold: a line queued then might never
        # be written, so it is counted instead (flush_logging's promise), not lost unseen.
        # An output given up at exit takes nobody's lines, its writer's own reports included.
        for output in self.outputs:
            if (self._stopped or len(output.lines) >= self._max_queued) and (
                output.abandoned or threading.get_ident() not in self._writer_idents
            ):
                self._drop(output)
                continue
            output.lines.append(line)
            if not output.wakeup.is_set():  # a plain attribute read: the common case is cheap
                output.wakeup.set()

    def request_reopen(self) -> None:
        """Have the log file's writer reopen it before it writes anything more."""
        for output in self.outputs:
            if output.path is not None:
                output.reopen_requested = True
                output.wakeup.set()

    def stop(self, timeout: float) -> None:
        """Let the writers write what is queued (and a final drop report), for at most
        ``timeout`` seconds in all; a writer stuck on a blocked output is abandoned (a daemon
        thread, blocked in os.write without holding any Python lock, so exit proceeds).

        What an abandoned output still held (queued, or in the write it is stuck in) is
        counted as dropped, and reported to the outputs that drained (``log_events_dropped``
        with ``at_exit``). Called again (the client CLI flushes before its summary, then at
        exit), it waits for no output it gave up on before.
        """
        deadline = time.monotonic() + timeout
        self._stopped = True
        for output in self.outputs:
            output.wakeup.set()
        waited_for = [output for output in self.outputs if not output.abandoned]
        give_up_at = deadline - min(_EXIT_REPORT_SECONDS, timeout / 4)
        for output in waited_for:
            output.drained.wait(max(0.0, give_up_at - time.monotonic()))
        stalled = [output for output in waited_for if not output.drained.is_set()]
        drained = [output for output in waited_for if output.drained.is_set()]
        for output in stalled:
            self._report_lost_at_exit(output, self._abandon(output), drained)
        self._closing = True
        for output in self.outputs:
            output.wakeup.set()
        for output, thread in zip(self.outputs, self._threads, strict=True):
            if not output.abandoned:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _abandon(self, output: _Output) -> int:
        """Give ``output`` up: count what it holds as dropped (the rest of the batch its
        writer is stuck in, and its queue), and have its writer write nothing more; how many."""
        with self._count_lock:
            output.abandoned = True
            line_ends, written = output.in_flight
            lost = sum(1 for end in line_ends if end > written)
            while output.lines:
                output.lines.popleft()
                lost += 1
            output.dropped += lost
        return lost

    def _report_lost_at_exit(self, output: _Output, lost: int, to: list[_Output]) -> None:
        # A log_events_dropped like the others (its count: every drop not yet reported, which
        # for an output that never recovered includes the earlier ones), so that the reports'
        # counts still add up to the total; at_exit tells the part lost now.
        if not to:
            return
        with self._count_lock:
            count = output.dropped - output.reported
            output.reported += count
        if count:
            self._tell(
                to,
                "warning",
                "log_events_dropped",
                count=count,
                output=output.name,
                at_exit=lost,
                hint="the output did not drain within the exit flush time",
            )

    def _drop(self, output: _Output) -> None:
        """Count a line ``output`` could not queue; on its queue's first overflow since it
        last caught up, say so to the other outputs."""
        with self._count_lock:
            output.dropped += 1
            newly_stalled = not (output.stalled or self._stopped)
            output.stalled = True
        if newly_stalled:
            # To the others only, past their bound (once per outage): queued to the stalled
            # output it would wait behind the very backlog it is about, or be dropped and
            # counted by its own report.
            others = [other for other in self.outputs if other is not output]
            self._tell(
                others,
                "warning",
                "log_output_stalled",
                output=output.name,
                queued=len(output.lines),
                hint="its lines are dropped and counted until it drains (log_events_dropped)",
            )

    def _tell(self, outputs: list[_Output], level: str, event: str, **fields: Any) -> None:
        """Log ``event`` to ``outputs`` alone, rendered as every other event is."""
        if not outputs:
            return
        try:
            line = _render_event(level, event, **fields)
        except Exception:  # called from put(): a log call never fails, the count still stands
            return
        if line is None:  # below the configured level
            return
        for output in outputs:
            if not output.abandoned:
                output.lines.append(line)
                output.wakeup.set()

    def _count_unwritten(self, output: _Output, count: int) -> None:
        with self._count_lock:
            if not output.abandoned:  # if it is, _abandon counted them already
                output.dropped += count

    def _run(self, output: _Output) -> None:
        try:
            self._write_until_stopped(output)
        finally:
            os.close(output.fd)

    def _write_until_stopped(self, output: _Output) -> None:
        lines, wakeup = output.lines, output.wakeup
        while not output.abandoned:
            if output.reopen_requested:
                output.reopen_requested = False
                self._reopen(output)
            if not lines:
                if self._stopped:  # everything queued has been written or dropped
                    output.drained.set()
                    # Not finished yet: stop() may still have a line for this output about
                    # another one that did not drain.
                    if self._closing:
                        return
                # Cleared before the last look at the queue, so a line queued in between
                # sets it again and the wait returns at once: no wake-up is lost.
                wakeup.clear()
                if not lines and not self._closing and not output.reopen_requested:
                    wakeup.wait()
                continue
            if not self._stopped:
                # Let lines gather: at most one wake-up per _BATCH_DELAY under load rather
                # than one per event, each of which would cost the event loop's thread a
                # GIL hand-off and a context switch (measured: +50% CPU per connection).
                time.sleep(_BATCH_DELAY)
            written = True
            for _ in range(0, len(lines), _MAX_BATCH_LINES):
                count = min(_MAX_BATCH_LINES, len(lines))
                batch = [lines.popleft() for _ in range(count)]
                written = self._write(output, batch) and written
            # Output works again (everything queued went out): time to say what was lost
            # (unless stop() gave it up meanwhile, and reported it to the others).
            if written and output.dropped > output.reported and not output.abandoned:
                self._report_dropped(output)

    def _report_dropped(self, output: _Output) -> None:
        # Logged like any other event, so it is rendered the same way and reaches every
        # output; it goes through the queues (put), past their bound.
        with self._count_lock:
            count = output.dropped - output.reported
            output.reported += count
            # Caught up: the outage is over, and the next overflow is announced anew.
            output.stalled = False
        _own_logger().warning("log_events_dropped", count=count, output=output.name)

    def _reopen(self, output: _Output) -> None:
        """Open the log file's path anew and write there from now on (in its writer's thread,
        so no line is ever written to a descriptor being closed); keep the old one on failure."""
        assert output.path is not None
        event = _own_logger()
        try:
            fd = open_log_file(output.path)
        except OSError as exc:
            event.warning(
                "log_file_reopen_failed",
                path=str(output.path),
                error=exc.strerror or str(exc),
                hint="lines go on to the file that was open",
            )
            return
        os.close(output.fd)
        output.fd, output.torn = fd, False
        event.info("log_file_reopened", path=str(output.path))

    def _write(self, output: _Output, lines: list[bytes | str]) -> bool:
        """Write ``lines`` to ``output``; count the ones not written whole as dropped. True
        if all were."""
        if not lines:
            return True
        encoding = self._encoding
        chunks = [
            line + b"\n"
            if isinstance(line, bytes)
            else f"{line}\n".encode(encoding, "backslashreplace")
            for line in lines
        ]
        lost = self._write_to(output, chunks)
        if lost:
            self._count_unwritten(output, lost)
        return not lost

    def _write_to(self, output: _Output, chunks: list[bytes]) -> int:
        """Write ``chunks`` (whole lines) to ``output``; how many were not written whole."""
        first = chunks[0]
        if output.torn:  # end the partial line a failed write left, so this one stands alone
            first = b"\n" + first
        data = memoryview(b"".join([first, *chunks[1:]]))
        line_ends = list(itertools.accumulate(len(chunk) for chunk in [first, *chunks[1:]]))
        done = 0
        # What stop() counts as lost if it gives this output up while the write is stuck.
        output.in_flight = (line_ends, done)
        try:
            for end in _atomic_pieces([first, *chunks[1:]]):
                if output.abandoned:  # given up at exit: what is left was counted
                    return sum(1 for line_end in line_ends if line_end > done)
                while done < end:
                    try:
                        done += os.write(output.fd, data[done:end])
                    except BlockingIOError:  # someone made the descriptor non-blocking
                        select.select([], [output.fd], [], 1.0)
                    output.in_flight = (line_ends, done)
        except Exception as exc:  # whatever the output does (EPIPE, ENOSPC, EIO), never fail
            if done:
                output.torn = data[done - 1] != ord("\n")
            self._report_failure(output, exc)
            return sum(1 for line_end in line_ends if line_end > done)
        finally:
            output.in_flight = ([], 0)
        output.torn = output.failing = False
        return 0

    def _report_failure(self, output: _Output, exc: Exception) -> None:
        # Said at once and once per outage, so that the other output (standard error, for a
        # log file on a full disk) tells why lines are missing while it lasts, not only when
        # it is over (log_events_dropped, after the next write that succeeds).
        if output.failing or output.abandoned:  # abandoned: its loss is reported already
            return
        output.failing = True
        error = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        _own_logger().warning(
            "log_output_failed",
            output=output.name,
            error=error,
            hint="its lines are dropped and counted until a write succeeds",
        )


def _render_event(level: str, event: str, **fields: Any) -> bytes | str | None:
    """``event`` rendered by the configured processors, as any event logged now would be,
    but handed back rather than queued (the sink decides which outputs get it); None when
    ``level`` is filtered out."""
    rendered: list[bytes | str] = []
    config = structlog.get_config()
    logger = structlog.wrap_logger(
        _QueueLogger(rendered.append),
        processors=config["processors"],
        wrapper_class=config["wrapper_class"],
        context_class=config["context_class"],
    )
    # An empty context: the event is about logging, not about the connection whose event
    # happened to find the queue full.
    contextvars.Context().run(getattr(logger, level), event, **_process_fields, **fields)
    return rendered[0] if rendered else None


def _atomic_pieces(chunks: list[bytes]) -> list[int]:
    """Where to end each write of ``chunks`` joined: at line ends, at most PIPE_BUF bytes
    apart where lines allow. A pipe writes up to PIPE_BUF bytes at once, so the lines of
    several processes sharing one standard error (``--workers``) never interleave mid-line."""
    ends: list[int] = []
    start = position = 0
    for chunk in chunks:
        if position + len(chunk) - start > select.PIPE_BUF and position > start:
            ends.append(position)
            start = position
        position += len(chunk)
    ends.append(position)
    return ends


class _QueueLogger:
    """The structlog logger at the end of the processor chain: hands the rendered line to
    ``put`` (the sink's; every level ends up here, the level is already in the line)."""

    def __init__(self, put: Callable[[bytes | str], None]) -> None:
        self.msg = self.debug = self.info = self.warning = self.warn = put
        self.error = self.err = self.critical = self.fatal = self.exception = put
        self.failure = self.log = put


class _QueueLoggerFactory:
    def __init__(self, sink: _LogSink) -> None:
        self._logger = _QueueLogger(sink.put)

    def __call__(self, *args: Any) -> _QueueLogger:
        return self._logger


class _QueueingHandler(logging.Handler):
    """The stdlib handler for Trio's records: rendered, then queued like our own events."""

    def __init__(self, sink: _LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging.Handler's own convention
            self.handleError(record)
            return
        self._sink.put(line)
