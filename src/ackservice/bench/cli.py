"""``python -m ackservice.bench``: load a server, verify every reply, report the numbers.

Exit codes: 0 when every reply was right, 1 when any error was counted (or a worker process
failed), 2 for a bad setting, 3 when no connection could be opened (or ``--spawn`` could not
start the server), 130 when the run was interrupted (Ctrl-C or SIGTERM). A first signal ends
the measurement early and still reports (marked interrupted); a second abandons the run. A
spawned server is always stopped.

With ``--json`` stdout is always one JSON object: the report, or on any failure (usage
errors included) ``{"error": "...", "exit_code": N}``; the error line is also on stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final, NoReturn

import trio

from .. import _cli
from ..client.tls import context_from_flags
from ..errors import ConnectError
from .load import LoadGenerator, raise_open_file_limit
from .report import ProgressLine, render_text, to_json
from .result import LoadResult, Progress
from .spawn import SpawnedServer, SpawnError, start_server
from .spec import MAX_CONNECTIONS, MAX_RUN_SECONDS, MAX_SIZE, MAX_WINDOW, LoadSpec, TLSSpec
from .workers import STOP_SIGNALS, Interrupted, WorkerError, run_workers

__all__ = ["build_parser", "main"]

EXIT_OK: Final = 0
EXIT_ERRORS: Final = 1
EXIT_USAGE: Final = _cli.EXIT_USAGE
EXIT_CANNOT_CONNECT: Final = 3
EXIT_INTERRUPTED: Final = 130

ENV_PREFIX: Final = "ACKSERVICE_BENCH_"
PROG: Final = "python -m ackservice.bench"
MAX_PROCS: Final = 64
DEFAULT_DURATION: Final = 5.0

_EPILOG = """\
examples:
  python -m ackservice.bench --spawn                      one-command benchmark
  python -m ackservice.bench --connections 16 --window 64 pipelined throughput
  python -m ackservice.bench --rate 20000 --duration 30   latency at a fixed load
  python -m ackservice.bench --churn --connections 16     connections per second
  python -m ackservice.bench --tls-ca ca.pem --port 9443  over TLS (a server you started)

Every setting is also an ACKSERVICE_BENCH_* environment variable (flags win); switches
take 1/0, true/false, yes/no or on/off. See docs/bench.md."""


def bench_port(text: str) -> int:
    """A TCP port to load, 1 to 65535."""
    try:
        return _cli.server_port(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; --spawn picks a free one") from None


class _BenchParser(_cli.SettingsParser):
    """With ``--json``, a usage error is also a JSON object on stdout."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            _print_json_error(f"{message} (see --help)", EXIT_USAGE)
        super().error(message)


# -- value parsers (ValueError messages become one-line usage errors) ---------------------------


def _bounded(parse: Callable[[str], int], highest: int) -> Callable[[str], int]:
    def parse_bounded(text: str) -> int:
        value = parse(text)
        if value > highest:
            raise ValueError(f"expected at most {highest:,}, got {text!r}")
        return value

    parse_bounded.__name__ = parse.__name__
    return parse_bounded


def run_seconds(text: str) -> float:
    """A positive duration, at most an hour."""
    value = _cli.seconds(text)
    if value > MAX_RUN_SECONDS:
        raise ValueError(f"expected at most {MAX_RUN_SECONDS:g} seconds, got {text!r}")
    return value


def warmup_seconds(text: str) -> float:
    """A duration >= 0, at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    # Says "from 0": "a positive number" for -1 hid that 0 (no warm-up) is allowed.
    if not 0 <= value <= MAX_RUN_SECONDS:  # also refuses nan
        raise ValueError(
            f"expected a number of seconds from 0 to {MAX_RUN_SECONDS:g}, got {text!r}"
        )
    return 0.0 if value == 0 else value


def messages_per_second(text: str) -> float:
    """A positive, finite rate."""
    try:
        return _cli.seconds(text)  # the same rules: a positive, finite number
    except ValueError:
        raise ValueError(f"expected a positive number of messages/s, got {text!r}") from None


def file_path(text: str) -> str:
    """A file name (whether it can be used is checked when the TLS context is made)."""
    if not text.strip():
        raise ValueError("expected a file name, got an empty string")
    return text


def build_parser(environ: dict[str, str] | None = None) -> _BenchParser:
    """The benchmark's command-line parser (flags backed by ACKSERVICE_BENCH_* variables)."""
    parser = _BenchParser(
        env_prefix=ENV_PREFIX,
        prog=PROG,
        description="Load an ackservice server with many connections, verify every reply "
        "(seq, length, CRC-32), and report acks/s, MB/s, latency percentiles and errors.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        environ=environ,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('ackservice')}",
    )
    add = _cli.with_plain_defaults(parser)
    add("--host", _cli.host_name, "127.0.0.1", "server address; the only one ever connected to")
    add("--port", bench_port, 9876, "server TCP port; not used with --spawn")
    add(
        "--connections",
        _bounded(_cli.positive_int, MAX_CONNECTIONS),
        16,
        "connections at once; with --churn, connections open at any moment",
    )
    add(
        "--window",
        _bounded(_cli.positive_int, MAX_WINDOW),
        1,
        "messages in flight per connection; 1 is request/response",
    )
    add("--size", _bounded(_cli.non_negative_int, MAX_SIZE), 64, "payload bytes per message")
    add(
        "--duration",
        run_seconds,
        None,
        "seconds of measurement",
        default_text=f"{DEFAULT_DURATION:g}, or until --messages",
    )
    add(
        "--messages",
        _cli.positive_int,
        None,
        "stop after this many messages sent after the warm-up",
        default_text="no limit",
    )
    add("--warmup", warmup_seconds, 1.0, "seconds of load before measuring, not counted")
    add(
        "--rate",
        messages_per_second,
        None,
        "open loop: send this many messages per second in all, on a fixed schedule, and "
        "measure latency from each message's scheduled time",
        default_text="closed loop, as fast as replies come",
    )
    add(
        "--procs",
        _bounded(_cli.positive_int, MAX_PROCS),
        1,
        "spread the connections over this many processes",
    )
    # The client's bounds for the same waits: a typo such as 1e30 is refused instead of
    # meaning "wait forever" for a server that stopped answering.
    add(
        "--timeout",
        _cli.seconds_up_to(86400),
        10.0,
        "seconds a message may wait for its reply",
    )
    add(
        "--connect-timeout",
        _cli.seconds_up_to(3600),
        5.0,
        "seconds a connection attempt may take",
    )
    parser.add_switch(
        "--tls", "connect over TLS, verifying the server's certificate against the system's CAs"
    )
    add(
        "--tls-ca",
        file_path,
        None,
        "PEM file of a private CA to verify the server with; implies --tls",
        metavar="PATH",
        default_text="the system's CAs",
    )
    add(
        "--tls-cert",
        file_path,
        None,
        "client certificate in PEM, which may hold the key too, for mutual TLS",
        metavar="PATH",
        default_text="none",
    )
    add(
        "--tls-key",
        file_path,
        None,
        "private key of --tls-cert",
        metavar="PATH",
        default_text="in the --tls-cert file",
    )
    add(
        "--tls-server-name",
        _cli.host_name,
        None,
        "name the server's certificate must carry, also sent as SNI",
        metavar="NAME",
        default_text="--host",
    )
    parser.add_switch("--churn", "connect, send one message, read its reply, close; repeat")
    parser.add_switch(
        "--spawn", "start python -m ackservice.server on a free port for the run, stop it after"
    )
    parser.add_list("--server-arg", "an extra flag for the --spawn server", metavar="ARG")
    parser.add_switch("--json", "print the report as one JSON object on stdout")
    return parser


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    parser = build_parser(environ)
    env = os.environ if environ is None else environ
    words = sys.argv[1:] if argv is None else list(argv)
    parser.json_errors = "--json" in words or _is_on(env.get(ENV_PREFIX + "JSON", ""))
    args = parser.parse_args(argv)
    parser.json_errors = bool(args.json)
    spec = _load_spec(args, parser)
    if args.procs > spec.connections:
        parser.error(f"--procs {args.procs} needs at least {args.procs} --connections")
    if args.server_arg and not args.spawn:
        parser.error("--server-arg only applies with --spawn")
    if spec.tls is not None and args.spawn and not _has_flag(args.server_arg, "--tls-cert"):
        # The spawned server is plain unless told otherwise, and its certificate is not the
        # bench's to invent: passing it through is explicit.
        parser.error(
            "--tls with --spawn needs a TLS server: add --server-arg=--tls-cert=PATH "
            "--server-arg=--tls-key=PATH, or start the server yourself and give --port"
        )
    for server_arg in args.server_arg:
        flag = server_arg.partition("=")[0]
        if len(flag) > 3 and "--port".startswith(flag):  # argparse takes --por for --port
            parser.error(
                f"--server-arg {server_arg}: --spawn picks the server's port itself; "
                "to load a server on a port of your choosing, start it and give --port"
            )
    fail = _fail_json if args.json else _fail

    progress = ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    server: SpawnedServer | None = None
    result: LoadResult | None = None
    try:
        if args.spawn:
            server = start_server(spec.host, args.server_arg)
            spec = replace(spec, port=server.port)
        result = _run(spec, args.procs, progress.update if progress else None)
    except (ConnectError, SpawnError) as exc:
        return fail(str(exc), EXIT_CANNOT_CONNECT)
    except WorkerError as exc:
        return fail(str(exc), EXIT_ERRORS)
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: before Trio took over SIGINT
        return fail("interrupted", EXIT_INTERRUPTED)
    finally:
        if progress is not None:
            progress.clear()
        if server is not None:
            server.stop()

    assert result is not None  # every failure above has returned
    if args.json:
        print(json.dumps(to_json(result, spec, procs=args.procs, server=server), indent=2))
    else:
        sys.stdout.write(render_text(result, spec, procs=args.procs, server=server))
    sys.stdout.flush()
    if result.interrupted:
        # The report is printed (and says so), but a run cut short did not do what was
        # asked: a script must not take it for a completed measurement.
        return EXIT_INTERRUPTED
    return EXIT_OK if result.error_total == 0 else EXIT_ERRORS


def _load_spec(args: argparse.Namespace, parser: _cli.SettingsParser) -> LoadSpec:
    if args.churn and args.window != 1:
        parser.error("--window does not apply to --churn, which sends one message per connection")
    duration = args.duration
    if duration is None and args.messages is None:
        duration = DEFAULT_DURATION
    tls = _tls_spec(args, parser)
    try:
        return LoadSpec(
            host=args.host,
            port=args.port,
            connections=args.connections,
            window=args.window,
            size=args.size,
            duration=duration,
            messages=args.messages,
            warmup=args.warmup,
            churn=args.churn,
            rate=args.rate,
            reply_timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            tls=tls,
        )
    except ValueError as exc:
        parser.error(str(exc))


def _tls_spec(args: argparse.Namespace, parser: _cli.SettingsParser) -> TLSSpec | None:
    """The TLS settings the flags ask for, checked here (a usage error, exit 2) rather
    than in every worker."""
    if context_from_flags(args, parser.error) is None:
        return None
    return TLSSpec(
        ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
    )


def _has_flag(words: list[str], flag: str) -> bool:
    """Whether ``flag`` (or ``flag=VALUE``) is among ``words``."""
    return any(word == flag or word.startswith(flag + "=") for word in words)


def _run(spec: LoadSpec, procs: int, progress: Progress | None) -> LoadResult:
    if procs > 1:
        return run_workers(spec, procs, progress)
    raise_open_file_limit(spec.connections)
    return trio.run(_run_here, spec, progress)


async def _run_here(spec: LoadSpec, progress: Progress | None) -> LoadResult:
    """One process: a first Ctrl-C (or SIGTERM) ends the measurement early and still
    reports; a second abandons the run."""
    generator = LoadGenerator(spec)
    result: LoadResult | None = None
    failure: ConnectError | None = None
    abandoned = False
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_interrupts() -> None:
                nonlocal abandoned
                async for _ in signals:
                    if generator.stopped:
                        abandoned = True
                        nursery.cancel_scope.cancel()
                        return
                    generator.stop()

            nursery.start_soon(watch_interrupts)
            try:
                await generator.connect()
            except ConnectError as exc:
                failure = exc
            else:
                result = await generator.run(on_progress=progress)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if abandoned or result is None:
        raise Interrupted
    return result


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _fail_json(message: str, code: int) -> int:
    """``--json``: the error line on stderr, and an error object on stdout."""
    _fail(message, code)
    print(json.dumps({"error": message, "exit_code": code}), flush=True)
    return code


def _print_json_error(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    print(json.dumps({"error": message, "exit_code": code}), flush=True)
    sys.exit(code)


def _is_on(text: str) -> bool:
    try:
        return _cli.switch(text)
    except ValueError:
        return False
