"""``python -m ackservice.store``: read back, count and prune what a store keeps.

Subcommands:

* ``export``: every stored message, oldest first, as protocol lines (pipe them into
  ``python -m ackservice.client`` to send the same payloads again) or as JSON lines;
  ``--follow`` keeps going as new messages are stored.
* ``stats``: how many messages and bytes, and the first and last.
* ``prune``: delete messages below an id or older than a duration.

Any store ``--store`` names works (``sqlite:PATH``, ``nats://HOST:PORT/STREAM``).

Exit codes: 0 done; 1 the store failed (no such store, unreachable, a read error) or
standard output could not be written (a full disk);
2 usage error; 130 interrupted (Ctrl-C); 141 whoever read standard output stopped
(``export | head``). 141 is what a shell reports for ``cat`` or ``seq`` killed by SIGPIPE
in the same place, so ``set -o pipefail`` scripts see the same thing as with those tools;
nothing is printed, since stopping early is the reader's choice.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, BinaryIO, Final, TypeVar

import trio

try:
    import orjson
except ImportError:  # a platform it is not installed on (pyproject.toml): the stdlib writes
    orjson = None  # type: ignore[assignment]

from .. import __version__, _cli
from .._stop_signals import StopSignals
from ..errors import AckServiceError
from ..protocol import message_line
from .base import StoredMessage, StoreStats
from .opening import DEFAULT_MAX_PULL_BYTES, open_reader
from .sqlite import NoStoreError
from .url import DEFAULT_STORE_URL, JetStreamURL, SQLiteURL, StoreURL, parse_store_url

T = TypeVar("T")

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT_CLOSED",
    "EXIT_STORE_FAILED",
    "EXIT_TERMINATED",
    "build_parser",
    "duration",
    "main",
]

PROG: Final = "python -m ackservice.store"
STORE_ENV: Final = "ACKSERVICE_STORE"
TIMEOUT_ENV: Final = "ACKSERVICE_STORE_CLI_TIMEOUT"
DEFAULT_NATS_TIMEOUT: Final = 5.0
_MAX_NATS_TIMEOUT: Final = 3600.0
PULL_BYTES_ENV: Final = "ACKSERVICE_STORE_CLI_MAX_PULL_BYTES"
# Past a few MiB a larger pull is no faster; the ceiling only turns a unit mistake (a
# count of GiB taken for bytes, say) into a usage error.
_MAX_PULL_BYTES: Final = 1 << 40

EXIT_OK: Final = 0
EXIT_STORE_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM: the same clean end as Ctrl-C
EXIT_OUTPUT_CLOSED: Final = 141  # 128 + SIGPIPE, as the shell reports for cat or seq

# How often ``export --follow`` flushes standard output: new messages reach a pipe within
# the same time the reader takes to notice them, and a backlog still goes out in large writes.
FOLLOW_FLUSH_INTERVAL: Final = 0.2

_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# The largest message id: SQLite's INTEGER is signed 64-bit, and a larger --after or
# --before reached the database as an OverflowError traceback instead of a usage error.
MAX_ID: Final = 2**63 - 1

_DESCRIPTION = """\
Read back, count and prune the messages a store keeps.
"""

_EPILOG = """\
exit codes: 0 done; 1 the store failed, or standard output could not be written;
2 usage error; 130 interrupted (Ctrl-C); 141 standard output was closed by its reader
(export | head); 143 terminated (SIGTERM), ended as Ctrl-C does.
"""


def duration(text: str) -> float:
    """A positive duration: ``30d``, ``12h``, ``90m``, ``45s`` or plain seconds."""
    number = text.strip().lower()
    scale = _DURATION_UNITS.get(number[-1:], 1)
    if number[-1:] in _DURATION_UNITS:
        number = number[:-1]
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(
            f"expected a duration like 30d, 12h, 90m, 45s or a number of seconds, got {text!r}"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value


def build_parser(environ: dict[str, str] | None = None) -> _cli.SettingsParser:
    """The command-line parser: one subparser per command, each taking ``--store``."""
    parser = _cli.SettingsParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        environ=environ,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export",
        environ=environ,
        help="write the stored messages to standard output",
        description="Write the stored messages with id > --after to standard output, "
        "oldest first. 'lines' writes each payload as one protocol message, so the output "
        "piped into 'python -m ackservice.client' sends the same payloads again; 'json' "
        "writes one object per message with its metadata.",
    )
    _add_store(export)
    export.set_defaults(command_parser=export)
    export.add_argument(
        "--after",
        type=_cli._argparse_type(_cli.int_in_range(0, MAX_ID)),
        default=0,
        metavar="ID",
        help="start after this id, e.g. the last one processed (default: 0, from the start)",
    )
    export.add_argument(
        "--follow", action="store_true", help="keep writing new messages as they are stored"
    )
    export.add_argument(
        "--format",
        choices=("lines", "json"),
        default="lines",
        help="lines: the payloads, as protocol messages; or json: one object per message, "
        "with its metadata (default: lines)",
    )
    export.add_argument(
        "--max-pull-bytes",
        type=_cli._argparse_type(_cli.int_in_range(1, _MAX_PULL_BYTES)),
        default=None,
        metavar="BYTES",
        help=f"with a nats:// store, the most bytes of messages one pull from NATS asks for, "
        f"which bounds what the export holds in memory; a larger message comes alone "
        f"(range: 1 to {_MAX_PULL_BYTES}; default: {DEFAULT_MAX_PULL_BYTES}, 16 MiB; "
        f"env: {PULL_BYTES_ENV})",
    )

    stats = commands.add_parser(
        "stats", environ=environ, help="count the stored messages and bytes"
    )
    _add_store(stats)
    stats.set_defaults(command_parser=stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    prune = commands.add_parser(
        "prune",
        environ=environ,
        help="delete old messages",
        description="Delete messages below an id or older than a duration; print how many. "
        "A sqlite: store deletes whole commits, and keeps one that straddles the limit, so a "
        "few messages below the id, or older than the duration, may stay (docs/store.md).",
    )
    _add_store(prune)
    prune.set_defaults(command_parser=prune)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--before",
        type=_cli._argparse_type(_cli.int_in_range(1, MAX_ID)),
        metavar="ID",
        help="delete the messages with an id below ID",
    )
    which.add_argument(
        "--older-than",
        type=_cli._argparse_type(duration),
        metavar="DURATION",
        help="delete the messages received longer ago than DURATION: 30d, 12h, 90m, 45s or "
        "a number of seconds",
    )
    return parser


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help=f"the store: sqlite:PATH or nats://HOST:PORT/STREAM "
        f"(default: {DEFAULT_STORE_URL}; env: {STORE_ENV})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_cli._argparse_type(_cli.seconds_up_to(_MAX_NATS_TIMEOUT)),
        default=None,
        help=f"with a nats:// store, seconds to wait for NATS: to connect, and for each "
        f"answer (range: above 0, at most {_MAX_NATS_TIMEOUT:g}; "
        f"default: {DEFAULT_NATS_TIMEOUT:g}; env: {TIMEOUT_ENV})",
    )


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run one command; return the process exit code."""
    env = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    command: argparse.ArgumentParser = args.command_parser  # its errors name the command
    url = args.store if args.store is not None else (env.get(STORE_ENV) or DEFAULT_STORE_URL)
    # What errors call the store's setting: as the user gave it, the flag or the variable.
    from_env = args.store is None and bool(env.get(STORE_ENV))
    store_setting = STORE_ENV if from_env else "--store"
    source = f"environment variable {STORE_ENV}" if from_env else "--store"
    try:
        parsed = parse_store_url(url, none_allowed=False)
    except AckServiceError as exc:
        command.error(f"{source}: {exc}")
    if parsed is None:
        command.error(f"{source}: the store 'none' keeps nothing; name a sqlite: or nats:// store")
    if sys.stdout is None:  # started with stdout closed (``>&-``)
        command.error("no standard output to write to")
    _cli.buffered_stdout()
    nats_timeout = _flag_or_environment(
        command,
        args.timeout,
        env,
        TIMEOUT_ENV,
        _cli.seconds_up_to(_MAX_NATS_TIMEOUT),
        DEFAULT_NATS_TIMEOUT,
    )
    run = _Run(url, _describe(parsed), sys.stdout.buffer, nats_timeout, store_setting)
    if args.command == "export":
        run.max_pull_bytes = _flag_or_environment(
            command,
            args.max_pull_bytes,
            env,
            PULL_BYTES_ENV,
            _cli.int_in_range(1, _MAX_PULL_BYTES),
            DEFAULT_MAX_PULL_BYTES,
        )
    body: Callable[[], Awaitable[None]]
    if args.command == "export":
        body = partial(run.export, args.after, args.follow, args.format)
    elif args.command == "stats":
        body = partial(run.stats, args.json)
    else:
        body = partial(run.prune, args.before, args.older_than)
    with run.signals.installed():
        return trio.run(run.session, body)


def _flag_or_environment(
    command: argparse.ArgumentParser,
    given: T | None,
    env: Mapping[str, str],
    variable: str,
    parse: Callable[[str], T],
    default: T,
) -> T:
    """A subcommand's setting: its flag if given, else its environment variable (a bad
    value of it is a usage error naming it), else ``default``."""
    if given is not None:
        return given
    text = env.get(variable)
    if not text:
        return default
    try:
        return parse(text)
    except ValueError as exc:
        command.error(f"environment variable {variable}: {exc}")


def _describe(parsed: StoreURL) -> str:
    """The store as shown by ``stats``: an absolute path, or a NATS URL without secrets."""
    if isinstance(parsed, SQLiteURL):
        return f"sqlite:{os.path.abspath(parsed.path)}"
    assert isinstance(parsed, JetStreamURL)
    return str(parsed)


class _Run:
    """One invocation: opens the reader, runs the command, turns the outcome into a code."""

    def __init__(
        self,
        url: str,
        description: str,
        out: BinaryIO,
        nats_timeout: float,
        store_setting: str = "--store",
    ) -> None:
        self.url = url
        self.store_setting = store_setting
        self.nats_timeout = nats_timeout
        self.max_pull_bytes = DEFAULT_MAX_PULL_BYTES
        """For ``export`` from a nats:// store: the bytes one pull asks for at most."""
        self.description = description
        self.out = _Output(out)
        self.code = EXIT_OK
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.signals = StopSignals(
            f"{PROG}: error: stopped at once by a signal; "
            "the output may end in the middle of a message\n".encode()
        )

    async def session(self, body: Callable[[], Awaitable[None]]) -> int:
        """Run ``body``; Ctrl-C, SIGTERM and a closed stdout end it early. Errors become exit
        codes, caught inside the nursery so that none arrives wrapped in an exception group.

        SIGTERM (systemd stopping a unit, ``timeout``) ends it as Ctrl-C does, so the output
        ends on a whole message: killed by the signal, an ``export`` lost what it had buffered
        and could leave a line cut where its buffer last filled."""
        with self.signals.stopping(self._stop), self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._guarded(body)
                nursery.cancel_scope.cancel()
        if self._scope.cancelled_caught and not self.out.failed:
            self._flush_after_interrupt()
        if self.code == EXIT_OUTPUT_CLOSED or self.out.failed:
            _silence_stdout()
        return self.code

    def _flush_after_interrupt(self) -> None:
        """Write out what the interrupted body had buffered (whole messages), here, where a
        failure (a full disk) is one line: at the interpreter's exit it was "Exception
        ignored" and exit code 120. The interrupt's exit code stays."""
        try:
            self.out.flush()
        except BrokenPipeError:
            self.out.failed = True  # the reader is gone: nothing to say, nothing to retry
        except _OutputFailed as exc:
            _say("error", str(exc))

    async def _guarded(self, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
            self.out.flush()
        except BrokenPipeError:
            self._output_closed()
        except ImportError as exc:  # a store whose client library is not installed
            self._fail(f"cannot open {self.description}: {exc}")
        except NoStoreError as exc:
            self._fail(exc.describe(self.store_setting))
        except AckServiceError as exc:
            self._fail(str(exc))

    def _stop(self, signum: int) -> None:
        self.code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
        self._scope.cancel()

    def _fail(self, text: str) -> None:
        self.code = EXIT_STORE_FAILED
        _say("error", text)

    def _output_closed(self) -> None:
        self.code = EXIT_OUTPUT_CLOSED
        self._scope.cancel()

    # -- the commands ------------------------------------------------------------------

    async def export(self, after: int, follow: bool, fmt: str) -> None:
        """Write every message with ``id > after``; with ``follow``, keep waiting for more."""
        encode = _json_line if fmt == "json" else _protocol_line
        write = self.out.write
        async with open_reader(
            self.url,
            nats_wait=self.nats_timeout,
            notice=_warn,
            max_pull_bytes=self.max_pull_bytes,
            follow=follow,
        ) as reader:
            if follow and self._nursery is not None:
                self._nursery.start_soon(self._flush_periodically)
            messages = reader.messages(after=after, follow=follow)
            try:
                async for message in messages:
                    write(encode(message))
            finally:
                # An async generator left open when the loop raises would be finalized
                # later, outside this task; close it here (the protocol promises only an
                # AsyncIterator, so only when it has aclose).
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def _flush_periodically(self) -> None:
        while True:
            await trio.sleep(FOLLOW_FLUSH_INTERVAL)
            try:
                self.out.flush()
            except BrokenPipeError:
                self._output_closed()
                return
            except _OutputFailed as exc:
                self._fail(str(exc))
                self._scope.cancel()
                return

    async def stats(self, as_json: bool) -> None:
        """Print the count, bytes and the first and last message."""
        async with open_reader(self.url, nats_wait=self.nats_timeout) as reader:
            stats = await reader.stats()
        if as_json:
            self.out.write(_dumps(self._stats_record(stats)))
        else:
            self.out.write(self._stats_text(stats).encode())

    def _stats_record(self, stats: StoreStats) -> dict[str, Any]:
        return {
            "store": self.description,
            "count": stats.messages,
            "bytes": stats.stored_bytes,
            "first_id": stats.first_id,
            "last_id": stats.last_id,
            "first_received_at": _rfc3339_or_none(stats.first_received_at),
            "last_received_at": _rfc3339_or_none(stats.last_received_at),
        }

    def _stats_text(self, stats: StoreStats) -> str:
        lines = [
            f"store:    {self.description}",
            f"messages: {stats.messages}",
            f"bytes:    {stats.stored_bytes}",
        ]
        if stats.first_id is not None:
            lines.append(
                f"first:    id {stats.first_id}, {_rfc3339_or_none(stats.first_received_at)}"
            )
            lines.append(
                f"last:     id {stats.last_id}, {_rfc3339_or_none(stats.last_received_at)}"
            )
        return "\n".join(lines) + "\n"

    async def prune(self, before: int | None, older_than: float | None) -> None:
        """Delete the messages below ``before`` or older than ``older_than`` seconds."""
        async with open_reader(self.url, nats_wait=self.nats_timeout) as reader:
            deleted = await reader.prune(before_id=before, older_than=older_than)
        noun = "message" if deleted == 1 else "messages"
        self.out.write(f"deleted {deleted} {noun}\n".encode())


class _OutputFailed(AckServiceError):
    """Standard output could not be written (a full disk, an I/O error)."""


class _Output:
    """Standard output whose failed writes are an ``_OutputFailed`` (one line, exit 1)
    rather than an ``OSError`` traceback; a closed pipe stays a ``BrokenPipeError``, the
    reader's choice (exit 141)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.failed = False

    def write(self, data: bytes) -> None:
        try:
            self._out.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failure(exc) from exc

    def flush(self) -> None:
        try:
            self._out.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: OSError) -> _OutputFailed:
        self.failed = True  # what is still buffered must not fail again at exit
        return _OutputFailed(
            f"cannot write standard output: {exc.strerror or exc}; check where it goes"
        )


class _NewlineInPayload(AckServiceError):
    """A stored payload holds a newline, so it cannot be written as one protocol line."""


def _protocol_line(message: StoredMessage) -> bytes:
    try:
        return message_line(message.payload)
    except ValueError:
        raise _NewlineInPayload(
            f"message {message.id} contains a newline, so it is not one protocol line; "
            "export it with --format json"
        ) from None


def _json_line(message: StoredMessage) -> bytes:
    record: dict[str, Any] = {
        "id": message.id,
        "received_at": _rfc3339(message.received_at),
        "peer": message.peer,
        "conn_id": message.conn_id,
        "seq": message.seq,
        "nbytes": len(message.payload),
        "crc32": f"{message.crc32:08x}",
    }
    if message.identity is not None:
        record["identity"] = message.identity
    try:
        record["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(message.payload).decode("ascii")
    return _dumps(record)


# Compact, UTF-8 rather than \u escapes. Made once: json.dumps with these arguments makes
# an encoder per call.
_JSON_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(record: dict[str, Any]) -> bytes:
    """``record`` as one JSON line. orjson, where installed, writes the same bytes as the
    standard library's encoder above (a test holds them to it) in a tenth of the time: most
    of a JSON export's time went there."""
    if orjson is not None:
        try:
            return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits: the stdlib writes those
            pass
    return _JSON_ENCODER.encode(record).encode() + b"\n"


@lru_cache(maxsize=64)
def _rfc3339(timestamp: float) -> str:
    """``2026-05-01T12:00:00.123456Z``: UTC, microseconds."""
    # Cached: the messages of one read share their time. isoformat is one C call (strftime
    # was a quarter of a JSON export's time); its "+00:00" becomes "Z".
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    return text[:-6] + "Z"


def _rfc3339_or_none(timestamp: float | None) -> str | None:
    return None if timestamp is None else _rfc3339(timestamp)


def _warn(text: str) -> None:
    """One line on stderr about something that goes on (``export --follow`` waiting for
    NATS); standard output carries only the export."""
    _say("warning", text)


def _say(kind: str, text: str) -> None:
    """``text`` as one ``kind`` line on stderr; nowhere if stderr is closed (Python leaves
    ``sys.stderr`` None, and ``print`` would then write to standard output, into the export)
    or fails (nobody reads it: the command goes on regardless)."""
    if sys.stderr is None:
        return
    with contextlib.suppress(OSError):
        # One write, newline included (print's two could be split by another writer).
        sys.stderr.write(f"{PROG}: {kind}: {' '.join(text.split())}\n")
        sys.stderr.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing will flush it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
