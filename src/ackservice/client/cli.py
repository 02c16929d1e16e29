"""``python -m ackservice.client``: send messages and show their acknowledgments.

Modes, chosen by what is given:

* arguments: each one is a message (``python -m ackservice.client hello "second one"``);
* stdin is a terminal: an interactive prompt, one message per line typed;
* stdin is a pipe or file: every line is a message, pipelined, with a summary at the end.

Exit codes: 0 every message acknowledged; 1 some message refused, skipped or never
acknowledged; 2 usage error; 3 the server could not be reached at all; 130 interrupted
(Ctrl-C, SIGINT) and 143 terminated (SIGTERM) while sending arguments or piped input; either
signal still prints a summary of what was and was not acknowledged.

Failures that may pass (a refused connection, ``ERR 0 busy``/``shutting-down``, a message
answered ``unavailable``) are retried for ``--retry-for`` seconds (30 by default), so a
server restart or a short store outage does not fail a long piped run. Refusals that cannot
pass are not: a TLS failure (certificate, handshake, an alert refusing the client
certificate), ``ERR 0 forbidden`` and ``ERR 0 tls-required`` end the run at once with one
line, exit 3 when no message was answered.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import NoReturn

import trio

from .. import _cli
from .._stop_signals import StopSignals
from ..errors import (
    AckServiceError,
    ConnectError,
    ConnectionLostError,
    ProtocolError,
    ServerRefusedError,
    TLSError,
)
from ..logconfig import DEFAULT_MAX_QUEUED_EVENTS, MAX_LOG_QUEUE, configure_logging
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES, OVERSIZED, Ack, ErrorCode, Oversized
from .config import ClientConfig
from .connection import Client, open_client
from .message import Receipt
from .output import ERROR_PREFIX, Reporter, Tally, error_json
from .stdin import LineReader, StdinError, read_lines
from .tls import context_from_flags

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NOT_ACKNOWLEDGED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_UNREACHABLE",
    "build_parser",
    "host_and_port",
    "main",
]

_Body = Callable[[Client], Awaitable[None]]

EXIT_OK = 0
EXIT_NOT_ACKNOWLEDGED = 1
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process killed by it


# How often buffered reply lines are flushed and the progress line redrawn: live enough
# for a person or a ``| while read`` loop downstream, and one write per tick instead of one
# per reply when thousands arrive per second.
TICK_INTERVAL = 0.1

_DESCRIPTION = """\
Send messages to an ackservice server and verify every acknowledgment.
Each MESSAGE argument is one message. Without arguments, every line of stdin is
one: an interactive prompt when stdin is a terminal, pipelined when it is a pipe.
"""

_EPILOG = """\
exit codes: 0 every message acknowledged; 1 some message refused, skipped or never
acknowledged; 2 usage error; 3 server never reached (or it refused this client: TLS,
ERR 0 forbidden or tls-required); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
Delivery is at-least-once: after a reconnect, unacknowledged messages are sent again.
"""


# The client's own namespace: a shell that exports a server's ACKSERVICE_LOG_LEVEL or
# ACKSERVICE_MAX_MESSAGE_BYTES must not change every client started from it.
ENV_PREFIX = "ACKSERVICE_CLIENT_"


def build_parser(environ: dict[str, str] | None = None) -> _ClientParser:
    """The client's command-line parser (flags backed by ACKSERVICE_CLIENT_* variables)."""
    defaults = ClientConfig()
    parser = _ClientParser(
        prog="python -m ackservice.client",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        environ=environ,
        env_prefix=ENV_PREFIX,
    )
    parser.add_argument("messages", nargs="*", metavar="MESSAGE", help="a message to send")
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('ackservice')}",
    )
    add = _cli.with_plain_defaults(parser)
    add(
        "--host",
        host_and_port,
        (defaults.host, None),
        "server name or address, optionally with :PORT; [IPV6]:PORT for IPv6",
        default_text=defaults.host,
    )
    add("--port", _cli.server_port, None, "server TCP port", default_text=str(defaults.port))
    add(
        "--connect-timeout",
        _cli.seconds_up_to(3600),
        defaults.connect_timeout,
        "seconds one connection attempt may take",
    )
    add(
        "--ack-timeout",
        _cli.seconds_up_to(86400),
        defaults.ack_timeout,
        "seconds the oldest unacknowledged message may wait for its reply",
    )
    add(
        "--retries",
        _cli.int_in_range(0, 1_000_000),
        defaults.retries,
        "connection attempts after a failed one, counted afresh after any reply, and "
        "resends of a message answered 'unavailable'",
        default_text="unlimited within --retry-for",
    )
    add(
        "--retry-for",
        _non_negative_seconds,
        defaults.retry_for,
        "seconds to keep retrying a refused connection or a message answered "
        "'unavailable', from the first failure; 0: never retry",
    )
    add("--window", _cli.int_in_range(1, 65536), defaults.window, "messages in flight, at most")
    add(
        "--max-message-bytes",
        _cli.int_in_range(0, 1 << 30),
        DEFAULT_MAX_MESSAGE_BYTES,
        "longest message sent; a longer line is reported and skipped. Set it to the server's limit",
    )
    add(
        "--backoff-base",
        _cli.seconds_up_to(3600),
        defaults.backoff_base,
        "first reconnect backoff bound in seconds; it doubles per failure, with full jitter",
    )
    add(
        "--backoff-cap",
        _cli.seconds_up_to(3600),
        defaults.backoff_cap,
        "largest backoff bound in seconds",
    )
    parser.add_switch(
        "--tls", "connect over TLS, verifying the server's certificate against the system's CAs"
    )
    add(
        "--tls-ca",
        _file_path,
        None,
        "PEM file of a private CA to verify the server with, instead of the system's; "
        "implies --tls",
        metavar="PATH",
        default_text="the system's CAs",
    )
    add(
        "--tls-cert",
        _file_path,
        None,
        "client certificate in PEM, which may hold the key too, for servers that require "
        "one: mutual TLS",
        metavar="PATH",
        default_text="none",
    )
    add(
        "--tls-key",
        _file_path,
        None,
        "private key of --tls-cert, in PEM and not passphrase-protected",
        metavar="PATH",
        default_text="in the --tls-cert file",
    )
    add(
        "--tls-server-name",
        _cli.host_name,
        None,
        "name the server's certificate must carry, also sent as SNI; for connecting by address",
        metavar="NAME",
        default_text="the host",
    )
    add(
        "--log-level",
        _cli.log_level,
        None,
        "debug, info, warning, error or critical; connection events are debug, possible "
        "duplicates a warning",
        default_text="warning; error with --quiet",
    )
    add(
        "--log-format",
        _cli.log_format,
        "auto",
        "auto: JSON lines with --json, else console; console; or json. With json, the "
        "summary and errors on stderr are JSON objects too",
    )
    add(
        "--log-queue",
        _cli.int_in_range(1, MAX_LOG_QUEUE),
        DEFAULT_MAX_QUEUED_EVENTS,
        "log lines held while stderr is slow or stalled; beyond it new lines are dropped "
        "and counted in log_events_dropped",
        metavar="LINES",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per reply on stdout, and JSON lines on stderr (default: off)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and the summary (default: off)",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run the client; return the process exit code."""
    parser = build_parser(environ)
    parser.json_errors = _wants_json(
        sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ
    )
    args = parser.parse_args(argv)
    # Arguments come back as str decoded with surrogateescape; fsencode restores the
    # exact bytes that were typed, whatever the locale.
    messages = [os.fsencode(text) for text in args.messages]
    for number, payload in enumerate(messages, 1):
        if b"\n" in payload:
            parser.error(
                f"message {number} contains a newline, and a message is one line; "
                "pipe multi-line input through stdin instead (one message per line)"
            )
    host, host_port = args.host
    if host_port is not None and args.port is not None and args.port != host_port:
        parser.error(
            f"--host gives port {host_port} but --port gives {args.port}; give the port once"
        )
    port = host_port or args.port or ClientConfig().port
    tls = context_from_flags(args, parser.error)
    # stderr is either all JSON or all human text: "auto" follows --json rather than the
    # terminal, so that JSON log lines never mix with a human summary (or the reverse).
    log_format = args.log_format
    if log_format == "auto":
        log_format = "json" if args.json else "console"
    configure_logging(
        args.log_level or ("error" if args.quiet else "warning"),
        log_format,
        max_queued_events=args.log_queue,
    )
    config = ClientConfig(
        host=host,
        port=port,
        connect_timeout=args.connect_timeout,
        ack_timeout=args.ack_timeout,
        retries=args.retries,
        retry_for=args.retry_for,
        window=args.window,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        tls=tls,
        tls_server_name=args.tls_server_name,
    )
    _cli.buffered_stdout()
    reporter = Reporter(
        sys.stdout,
        sys.stderr,
        json_lines=args.json,
        quiet=args.quiet,
        json_err=log_format == "json",
    )
    if not messages and sys.stdin is None:  # started with stdin closed (``<&-``)
        parser.error("no MESSAGE arguments, and no standard input to read messages from")
    cut_short = (
        "stopped at once by a signal; replies not yet written, and the summary, are not shown"
    )
    farewell = error_json(cut_short) if log_format == "json" else ERROR_PREFIX + cut_short
    signals = StopSignals((farewell + "\n").encode())
    run = _Run(config, reporter, args.max_message_bytes, signals)
    with signals.installed():
        if messages:
            return trio.run(run.send_arguments, messages)
        stdin_fd = sys.stdin.fileno()
        if os.isatty(stdin_fd):
            return trio.run(run.interactive, stdin_fd)
        return trio.run(run.send_lines, stdin_fd)


class _Run:
    """One invocation: connects, sends, reports, and turns the outcome into an exit code."""

    def __init__(
        self,
        config: ClientConfig,
        reporter: Reporter,
        max_message_bytes: int,
        signals: StopSignals,
    ) -> None:
        self.config = config
        self.reporter = reporter
        self.max_message_bytes = max_message_bytes
        self.tally = Tally()
        self.client: Client | None = None
        self.started = 0.0
        self.interrupted = False
        self.stop_signal: int | None = None
        self.shown_acked = 0  # replies printed: after a signal, the summary counts only these
        self.shown_rejected = 0
        self.lines_read = 0
        self.input_done = False  # the whole input was read
        self.error: str | None = None
        self.unreachable = False
        self._nursery: trio.Nursery | None = None
        self.signals = signals

    # -- the three modes ---------------------------------------------------------------

    async def send_arguments(self, messages: list[bytes]) -> int:
        """One message per argument, pipelined; one line per reply."""
        frames = _arguments(messages, self.max_message_bytes)
        await self._session(lambda client: self._pipeline(client, frames))
        self._flush_output()
        if self.interrupted and not self.unreachable:
            self._summary()
        return self._exit_code(interactive=False)

    async def send_lines(self, stdin_fd: int) -> int:
        """Every line of piped stdin, pipelined; progress on a terminal, then a summary."""
        frames = read_lines(stdin_fd, self.max_message_bytes)
        await self._session(lambda client: self._pipeline(client, frames, progress=True))
        self._flush_output()
        if not self.unreachable:
            self._summary()
        return self._exit_code(interactive=False)

    async def interactive(self, stdin_fd: int) -> int:
        """A prompt: each line typed is sent and its reply shown with the round-trip time."""
        reader = LineReader(stdin_fd, self.max_message_bytes)
        await self._session(lambda client: self._prompt_loop(client, reader))
        self._flush_output()
        self.reporter.err.write("\n")  # leave the shell's prompt on a line of its own
        self.reporter.err.flush()
        return self._exit_code(interactive=True)

    # -- shared machinery --------------------------------------------------------------

    def _summary(self) -> None:
        if self.interrupted:
            # Verified but never printed (still queued behind an unanswered message, or
            # answered after the signal) is not acknowledged as far as the user can tell.
            self.tally.acked = self.shown_acked
            self.tally.rejected = self.shown_rejected
        if not self.input_done:
            self.tally.read_to = self.lines_read
        elapsed = trio.current_time() - self.started
        self.reporter.summary(self.tally, elapsed, interrupted=self.interrupted)

    async def _session(self, body: _Body) -> None:
        """Connect and run ``body``; Ctrl-C ends it early. Errors are recorded, not raised.

        The nursery also runs the output ticker, so that the body needs no nursery of its
        own (whose exception groups would hide the client's typed errors).
        """
        with trio.CancelScope() as scope:

            def stop(signum: int) -> None:
                self.interrupted = True
                self.stop_signal = signum
                scope.cancel()

            with self.signals.stopping(stop):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._connected(body)
                    nursery.cancel_scope.cancel()

    async def _connected(self, body: _Body) -> None:
        self.started = trio.current_time()
        try:
            async with open_client(
                self.config.host,
                self.config.port,
                connect_timeout=self.config.connect_timeout,
                ack_timeout=self.config.ack_timeout,
                retries=self.config.retries,
                retry_for=self.config.retry_for,
                window=self.config.window,
                backoff_base=self.config.backoff_base,
                backoff_cap=self.config.backoff_cap,
                tls=self.config.tls,
                tls_server_name=self.config.tls_server_name,
            ) as client:
                self.client = client
                self.started = trio.current_time()
                try:
                    await body(client)
                finally:
                    self._take_counts(client)
        except (TLSError, ServerRefusedError) as exc:
            # Refused for good: "never reached" unless some message was answered before
            # (a reconnect met a changed certificate or allow list).
            self.unreachable = self.client is None or not (
                self.client.stats.acked or self.client.stats.rejected
            )
            self._fail(str(exc))
        except ConnectError as exc:
            self.unreachable = self.client is None
            self._fail(str(exc))
        except ConnectionLostError as exc:
            self._fail(f"connection to {self.config.address} lost: {exc}")
        except ProtocolError as exc:
            self._fail(f"{self.config.address} does not speak the ackservice protocol: {exc}")
        except AckServiceError as exc:
            self._fail(str(exc))
        except StdinError as exc:
            self._fail(f"cannot read standard input: {exc.strerror or exc}")
        except OSError as exc:
            # Not input: the replies' own writes (stdout on a full disk, an I/O error) were
            # reported as "cannot read standard input" before, sending the user to the wrong end.
            self._output_failed(exc)

    def _flush_output(self) -> None:
        """Write out the replies still buffered, here, where a failure (a full disk) is the
        run's one-line error: at the interpreter's last flush it was a traceback and exit
        code 120 (after Ctrl-C, from the summary's own flush)."""
        try:
            self.reporter.out.flush()
        except OSError as exc:
            if self.error is None:
                self._output_failed(exc)
            else:  # said already (the write that failed first): only keep exit quiet
                _silence_stdout()

    def _output_failed(self, exc: OSError) -> None:
        # What is still buffered must not fail again in the interpreter's last flush.
        _silence_stdout()
        if isinstance(exc, BrokenPipeError):
            # Whoever read our stdout stopped (``| head``): nothing more can be shown there.
            self._fail("standard output was closed")
        else:
            self._fail(
                f"cannot write the output: {exc.strerror or exc}; check where standard output goes"
            )

    def _fail(self, text: str) -> None:
        if self.tally.unacked and self.client is not None:
            text += f"; {_messages(self.tally.unacked)} not acknowledged"
        self.error = text
        self.reporter.error(text)

    def _take_counts(self, client: Client) -> None:
        """Copy the client's totals: what it verified, not only what was shown (if stdout
        broke, the acknowledgments still happened)."""
        stats = client.stats
        self.tally.sent = stats.submitted
        self.tally.acked = stats.acked
        self.tally.rejected = stats.rejected
        self.tally.resent = stats.resent
        self.tally.retried = stats.retried

    def _exit_code(self, *, interactive: bool) -> int:
        if self.unreachable:
            return EXIT_UNREACHABLE
        if self.interrupted and not interactive:
            return EXIT_TERMINATED if self.stop_signal == signal.SIGTERM else EXIT_INTERRUPTED
        if self.error is not None or not self.tally.all_acked:
            return EXIT_NOT_ACKNOWLEDGED
        return EXIT_OK

    async def _pipeline(
        self,
        client: Client,
        frames: AsyncIterator[bytes | Oversized],
        *,
        progress: bool = False,
    ) -> None:
        """Send every frame through ``send_many`` and report each reply in input order."""
        reporter = self.reporter
        tally = self.tally
        numbers: deque[int] = deque()  # input positions of the messages handed over
        skipped: deque[int] = deque()  # input positions of lines too long to send

        async def payloads() -> AsyncIterator[bytes]:
            number = 0
            async for frame in frames:
                number += 1
                self.lines_read = number
                if isinstance(frame, Oversized):
                    skipped.append(number)
                    tally.not_sent += 1
                    continue
                numbers.append(number)
                yield frame
            self.input_done = True

        def report_skipped(before: float) -> None:
            while skipped and skipped[0] < before:
                reporter.not_sent(skipped.popleft(), self.max_message_bytes)

        ticker = trio.CancelScope()
        if self._nursery is not None:
            show_progress = progress and _show_progress(reporter)
            self._nursery.start_soon(self._tick, client, show_progress, ticker)

        def report(receipt: Receipt) -> None:
            number = numbers.popleft()
            report_skipped(number)
            if isinstance(receipt.reply, Ack):
                self.shown_acked += 1
            elif receipt.reply.code != ErrorCode.UNAVAILABLE:
                self.shown_rejected += 1
            reporter.reply(number, receipt.reply, receipt.rtt, receipt.attempts)

        deliveries = client.send_many(payloads())
        try:
            async for receipt in deliveries:
                report(receipt)
        finally:
            ticker.cancel()
            if self.interrupted:
                # Cancelled by a signal: print the replies that had already arrived, in
                # order, so that the summary counts nothing the user has not seen.
                for receipt in deliveries.take_answered():
                    report(receipt)
                # Too-long lines before the first unanswered message; later ones are not
                # counted, since they were never reached as far as the output shows.
                report_skipped(numbers[0] if numbers else float("inf"))
                tally.not_sent -= len(skipped)
            else:
                report_skipped(float("inf"))

    async def _tick(self, client: Client, show_progress: bool, scope: trio.CancelScope) -> None:
        """Flush the reply lines written so far and redraw the progress line, periodically."""
        with scope:
            while True:
                try:
                    self.reporter.out.flush()
                except OSError:
                    break  # the next reply's write fails too, where it is reported
                if show_progress:
                    self._take_counts(client)
                    elapsed = trio.current_time() - self.started
                    self.reporter.progress(self.tally, client.in_flight, elapsed)
                await trio.sleep(TICK_INTERVAL)
        self.reporter.clear_progress()

    async def _prompt_loop(self, client: Client, reader: LineReader) -> None:
        reporter = self.reporter
        over = " over TLS" if self.config.tls is not None else ""
        reporter.notice(
            f"connected to {self.config.address}{over}: each line you type is one message; "
            "Ctrl-D or Ctrl-C to quit"
        )
        number = 0
        while True:
            reporter.prompt()
            batch = await reader.read_batch()
            if not batch:
                return
            for frame in batch:
                number += 1
                if isinstance(frame, Oversized):
                    self.tally.not_sent += 1
                    reporter.not_sent(number, self.max_message_bytes)
                    continue
                receipt = await client.deliver(frame)
                reporter.reply(number, receipt.reply, receipt.rtt, receipt.attempts)
                reporter.out.flush()


async def _arguments(messages: list[bytes], limit: int) -> AsyncIterator[bytes | Oversized]:
    for payload in messages:
        yield payload if len(payload) <= limit else OVERSIZED


def host_and_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address (no port).

    A bare IPv6 address has several colons, so only brackets can add a port to one:
    ``::1:9876`` is itself a valid address, and guessing would connect somewhere else.
    """
    text = _cli.host_name(text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"expected [IPV6] or [IPV6]:PORT, got {text!r}")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        return host, _port_in_host(rest[1:], text)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return host, _port_in_host(port, text)
    return text, None


def _port_in_host(port: str, text: str) -> int:
    try:
        return _cli.server_port(port)
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {text!r}") from None


def _non_negative_seconds(text: str) -> float:
    """A finite duration in seconds from 0 (``--retry-for 0``: never retry) to 1e9."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    # Says "from 0": "a positive number" for -1 hid that 0 (never retry) is allowed.
    if not 0 <= value <= 1e9:  # also refuses nan
        raise ValueError(f"expected a number of seconds from 0 to 1000000000, got {text!r}")
    return 0.0 if value == 0 else value


def _file_path(text: str) -> str:
    """A file name (whether it can be read is checked when the TLS context is made)."""
    if not text.strip():
        raise ValueError("expected a file name, got an empty string")
    return text


def _messages(count: int) -> str:
    return "1 message" if count == 1 else f"{count} messages"


class _ClientParser(_cli.SettingsParser):
    """Usage errors as one JSON object on stderr when the output is machine-readable."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            text = f"{message} (see --help)"
            if sys.stderr is not None:  # closed: not onto stdout, among the JSON replies
                print(error_json(text), file=sys.stderr)
            sys.exit(_cli.EXIT_USAGE)
        super().error(message)


def _wants_json(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether ``--json`` or ``--log-format json`` was asked for, before parsing (a usage
    error must already come out as JSON then). Flags win over the environment."""
    wants = environ.get(ENV_PREFIX + "LOG_FORMAT", "").lower() == "json"
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--json":
            wants = True
        elif arg.startswith("--log-format="):
            wants = arg.partition("=")[2].lower() == "json" or "--json" in argv
        elif arg == "--log-format" and index + 1 < len(argv):
            wants = argv[index + 1].lower() == "json" or "--json" in argv
    return wants


def _show_progress(reporter: Reporter) -> bool:
    """A live line only on a terminal, and not where it would tangle with reply lines."""
    if reporter.json_err or not reporter.err.isatty():
        return False
    return reporter.quiet or not reporter.out.isatty()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
