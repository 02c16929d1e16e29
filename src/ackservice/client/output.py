"""What the command-line client prints: reply lines, JSON objects, progress and summary.

Human output is printed, not logged: stdout carries one line (or JSON object) per reply,
stderr carries errors, the prompt, the live progress line and the final summary. The
formatting functions are pure, so tests check them without a terminal.

Text a server sent (an ERR code and detail, quoted in an error) is printed with its
control characters escaped (``escape_controls``): a hostile or broken server must not be
able to drive the user's terminal with ESC, BEL or OSC sequences. JSON output is escaped by
``json.dumps`` already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from ..logconfig import flush_logging
from ..protocol import Ack, Err, ErrorCode, escape_controls

__all__ = [
    "ERROR_PREFIX",
    "Reporter",
    "Tally",
    "error_json",
    "format_progress",
    "format_reply",
    "format_summary",
    "not_sent_detail",
    "reply_json",
    "summary_json",
]

# The same prefix as the command's usage errors: one prefix per command.
ERROR_PREFIX = "python -m ackservice.client: error: "

# "\r" back to the start of the line, ESC[K erase to its end: the progress line redraws
# in place and leaves nothing behind when it shrinks or is cleared.
_REDRAW = "\r\x1b[K"
# How long the summary waits for queued log lines to be written first (a stuck stderr would
# block the summary's own write anyway).
_LOG_FLUSH_SECONDS = 1.0


@dataclass(slots=True)
class Tally:
    """The outcome of a run, as the summary reports it.

    ``sent`` counts each message once, however often it was resent, so that
    ``sent == acked + rejected + unacked``; ``not_sent`` lines were too long to send.
    A message the server kept answering ``unavailable`` until the retry budget ran out is
    not acknowledged (``unacked``), not refused. ``resent`` counts extra writes after a lost
    connection, ``retried`` after an ``unavailable`` answer; either may duplicate.
    """

    sent: int = 0
    acked: int = 0
    rejected: int = 0
    not_sent: int = 0
    resent: int = 0
    retried: int = 0
    read_to: int | None = None
    """When the run ended before the end of its input: the last input line read. Lines
    after it were never read (nor sent)."""

    @property
    def unacked(self) -> int:
        """Messages sent that got neither an ACK nor an ERR."""
        return self.sent - self.acked - self.rejected

    @property
    def all_acked(self) -> bool:
        """Whether every message was acknowledged (the condition for exit code 0)."""
        return self.acked == self.sent and not self.not_sent


def format_reply(number: int, reply: Ack | Err, rtt: float, attempts: int) -> str:
    """``message 1: ACK 1 5 3610a686 (0.42 ms)``, or the ``ERR`` line as received."""
    if isinstance(reply, Ack):
        resent = f", sent {attempts} times" if attempts > 1 else ""
        return (
            f"message {number}: ACK {reply.seq} {reply.nbytes} {reply.crc32:08x} "
            f"({rtt * 1000:.2f} ms{resent})"
        )
    line = f"message {number}: ERR {reply.seq} {reply.code} {reply.detail}".rstrip()
    line = escape_controls(line)  # the code and detail come from the server
    if reply.code == ErrorCode.UNAVAILABLE:
        line += f" (gave up, sent {attempts} times)" if attempts > 1 else " (gave up)"
    return line


def reply_json(number: int, reply: Ack | Err, rtt: float, attempts: int) -> str:
    """One JSON object per reply, for scripts (``--json``)."""
    if isinstance(reply, Ack):
        # What json.dumps makes of these fields, byte for byte (a float as its repr), at a
        # fraction of its cost: an ACK per input line is most of what --json prints.
        rtt_ms = repr(round(rtt * 1000, 3))
        return _ACK_JSON % (number, reply.seq, reply.nbytes, reply.crc32, rtt_ms, attempts)
    # Given up on after ``unavailable`` answers: not acknowledged, but not refused either.
    status = "unacked" if reply.code == ErrorCode.UNAVAILABLE else "rejected"
    fields: dict[str, object] = {
        "message": number,
        "seq": reply.seq,
        "status": status,
        "code": reply.code,
        "detail": reply.detail,
        "rtt_ms": round(rtt * 1000, 3),
        "attempts": attempts,
    }
    return json.dumps(fields)


_ACK_JSON = (
    '{"message": %d, "seq": %d, "status": "acked", "nbytes": %d, "crc32": "%08x", '
    '"rtt_ms": %s, "attempts": %d}'
)


def not_sent_detail(limit: int) -> str:
    """Why a line was skipped rather than sent."""
    return f"longer than --max-message-bytes ({limit} bytes)"


def format_summary(tally: Tally, elapsed: float, *, interrupted: bool = False) -> str:
    """``sent 3, acked 3, rejected 0, unacked 0 in 0.01 s (300 msg/s)``.

    Resends, after a lost connection or an ``unavailable`` answer, are counted after
    ``unacked`` when there were any: ``resent 7 (duplicates possible)``. Either may have
    reached the store already (a connection lost after the commit, a commit that completed
    after its store timeout), so neither rules a duplicate out.
    """
    parts = [
        f"sent {tally.sent}",
        f"acked {tally.acked}",
        f"rejected {tally.rejected}",
        f"unacked {tally.unacked}",
    ]
    if tally.not_sent:
        parts.append(f"not sent {tally.not_sent} (too long)")
    resent = tally.resent + tally.retried
    if resent:
        parts.append(f"resent {resent} (duplicates possible)")
    if tally.read_to is not None:
        parts.append(f"input not read after line {tally.read_to}")
    line = f"{', '.join(parts)} in {elapsed:.2f} s ({_rate(tally, elapsed)} msg/s)"
    return f"interrupted: {line}" if interrupted else line


def summary_json(tally: Tally, elapsed: float, *, interrupted: bool = False) -> str:
    """The summary as one JSON object, shaped like a log event (``"event": "summary"``)."""
    return json.dumps(
        {
            "event": "summary",
            "level": "warning" if interrupted else "info",
            "sent": tally.sent,
            "acked": tally.acked,
            "rejected": tally.rejected,
            "unacked": tally.unacked,
            "not_sent": tally.not_sent,
            "resent": tally.resent + tally.retried,
            "read_to": tally.read_to,
            "elapsed_s": round(elapsed, 3),
            "rate": _rate(tally, elapsed),
            "interrupted": interrupted,
        }
    )


def error_json(text: str) -> str:
    """An error line as one JSON object, shaped like a log event (``"event": "error"``)."""
    return json.dumps({"event": "error", "level": "error", "error": text})


def format_progress(tally: Tally, in_flight: int, elapsed: float) -> str:
    """The live line: ``sent 1200  acked 1100  rejected 0  in flight 100  9000 msg/s``."""
    return (
        f"sent {tally.sent}  acked {tally.acked}  rejected {tally.rejected}  "
        f"in flight {in_flight}  {_rate(tally, elapsed)} msg/s"
    )


def _rate(tally: Tally, elapsed: float) -> int:
    answered = tally.acked + tally.rejected
    return round(answered / elapsed) if elapsed > 0 else 0


class Reporter:
    """Prints a run's output according to ``--json``, ``--quiet`` and the log format.

    Args:
        out, err: standard output and standard error.
        json_lines: print each reply as a JSON object instead of a human line.
        quiet: print only errors (refused or skipped messages, on stderr) and the summary.
        json_err: stderr is machine-readable (``--json`` or ``--log-format json``): the
            summary, errors and notices are JSON objects there too, and no prompt or
            progress line is drawn.
    """

    def __init__(
        self, out: TextIO, err: TextIO, *, json_lines: bool, quiet: bool, json_err: bool = False
    ) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.quiet = quiet
        self.json_err = json_err
        self._progress_shown = False

    def reply(self, number: int, reply: Ack | Err, rtt: float, attempts: int) -> None:
        """Report one reply: an ACK is output, an ERR is an error."""
        if self.quiet and isinstance(reply, Ack):
            return
        if self.json_lines:
            line = reply_json(number, reply, rtt, attempts)
        else:
            line = format_reply(number, reply, rtt, attempts)
        self._print(line, to_err=self.quiet and not self.json_lines)

    def not_sent(self, number: int, limit: int) -> None:
        """Report a line that was too long to send."""
        detail = not_sent_detail(limit)
        if self.json_lines:
            fields = {"message": number, "status": "not-sent", "code": "too-large"}
            line = json.dumps({**fields, "detail": detail})
        else:
            line = f"message {number}: not sent: {detail}"
        self._print(line, to_err=self.quiet and not self.json_lines)

    def error(self, text: str) -> None:
        """The one line that says why the run failed."""
        self.clear_progress()
        # Errors may quote what the server sent.
        line = error_json(text) if self.json_err else f"{ERROR_PREFIX}{escape_controls(text)}"
        self._err_line(line)

    def notice(self, text: str) -> None:
        """A line for the person at the terminal (not shown with ``--quiet``)."""
        if not self.quiet:
            line = json.dumps({"event": "notice", "level": "info", "text": text})
            self._err_line(line if self.json_err else escape_controls(text))

    def prompt(self) -> None:
        """The interactive prompt, on stderr so that stdout stays pure output."""
        self.out.flush()
        if not self.json_err:
            self.err.write("> ")
            self.err.flush()

    def progress(self, tally: Tally, in_flight: int, elapsed: float) -> None:
        """Redraw the live progress line."""
        self.err.write(_REDRAW + format_progress(tally, in_flight, elapsed))
        self.err.flush()
        self._progress_shown = True

    def clear_progress(self) -> None:
        """Erase the progress line, if one is shown."""
        if self._progress_shown:
            self.err.write(_REDRAW)
            self.err.flush()
            self._progress_shown = False

    def summary(self, tally: Tally, elapsed: float, *, interrupted: bool = False) -> None:
        """The final summary line (shown even with ``--quiet``), after every log line: those
        leave through a writer thread, so without waiting for it one could follow the
        summary."""
        self.clear_progress()
        self.out.flush()
        flush_logging(_LOG_FLUSH_SECONDS)
        render = summary_json if self.json_err else format_summary
        self._err_line(render(tally, elapsed, interrupted=interrupted))

    def _err_line(self, line: str) -> None:
        # One write, newline included: under PYTHONUNBUFFERED print's two writes (the text,
        # then the newline) each reach the descriptor, and a log line from the writer
        # thread could land between them, on the same line.
        self.err.write(line + "\n")
        self.err.flush()

    def _print(self, line: str, *, to_err: bool) -> None:
        if to_err:
            self.clear_progress()
            self.out.flush()
            self._err_line(line)
        else:
            self.out.write(line + "\n")
