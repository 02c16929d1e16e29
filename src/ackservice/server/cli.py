"""``python -m ackservice.server``: run the server as a daemon.

Exit codes: 0 after a graceful shutdown, 1 when the server cannot start (the address is in
use, cannot be resolved, the store or log file cannot be opened, with ``--workers`` a worker
failed ``--worker-start-attempts`` starts in a row, ...), 2 for a bad setting (a
TLS certificate or key that cannot be used, malformed socket-activation variables), 130 when a
second signal forced an immediate exit.

Under systemd it is a ``Type=notify`` service (``READY=1`` once serving, ``STOPPING=1`` at
shutdown) and takes socket-activated sockets (``LISTEN_FDS``) instead of binding its own.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Final

import structlog
import trio

from .. import __version__, _cli
from ..logconfig import (
    DEFAULT_MAX_QUEUED_EVENTS,
    MAX_LOG_QUEUE,
    bind_process_fields,
    configure_logging,
    flush_logging,
    reopen_log_file,
)
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES
from ..store import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STORE_URL,
    Store,
    StoreError,
    open_store,
    parse_store_url,
)
from ..store.url import SQLiteURL
from .config import LIMITS, ServerConfig
from .hook import MessageHook
from .listener import Server, serve
from .monitoring import MetricsPortError, format_address, open_monitoring_listeners
from .sockets import EVERY_INTERFACE, open_listeners, parse_hosts
from .systemd import ActivatedSocket, Notifier, take_listen_fds
from .tls import TLSConfigError, server_tls_context
from .workers import DEFAULT_WORKER_START_ATTEMPTS, WorkerRole, cpu_count

# The most --workers: past any core count this server will meet.
_MAX_WORKERS = 1024

__all__ = ["main"]

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_FORCED = 130

# File descriptors the process needs besides its connections: stdio, the listening
# sockets, Trio's epoll and wakeup fds, and connections briefly held to send "busy".
_RESERVED_FDS = 64

# What each signal does; this is the one place that decides it.
# SIGTERM and SIGINT: a graceful shutdown, and a second one exits at once.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGHUP: closing the terminal or SSH session that started the server sends it, and its
# default action kills the process at once, without a log line or a word to the clients.
# A daemon outlives its terminal, so it never stops on it: with --log-file it reopens the
# file (logrotate's convention), otherwise it is logged and ignored.
_IGNORED_SIGNALS = (signal.SIGHUP,)

log = structlog.get_logger(__name__)

PROG: Final = "python -m ackservice.server"
"""How the program names itself in usage lines and every error line (argparse's and ours)."""


_DESCRIPTION = """\
Acknowledge every newline-terminated message with ACK <seq> <nbytes> <crc32>,
once the store keeps it. Stop with SIGTERM or Ctrl-C, a graceful shutdown; a
second signal exits at once. SIGHUP reopens --log-file.
"""

# As the client's and the store CLI's --help do: the codes a unit file or script tests.
_EPILOG = """\
exit codes: 0 stopped after a graceful shutdown; 1 could not start (address in use,
host not resolvable, store or log file unusable, a worker failing its starts);
2 bad setting; 130 a second signal forced an immediate exit.
"""


def build_parser(environ: dict[str, str] | None = None) -> _cli.SettingsParser:
    """The server's command-line parser (flags backed by ACKSERVICE_* variables)."""
    defaults = ServerConfig()
    parser = _cli.SettingsParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        environ=environ,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add = _cli.with_plain_defaults(parser)
    # --host and --port default to None, as the client's --port does: given (by flag or
    # variable) or not matters when systemd passes the sockets (_warn_address_ignored).
    add(
        "--host",
        _hosts,
        None,
        f"address to listen on; several: repeat the flag or separate them with commas; "
        f"{EVERY_INTERFACE} is every interface, IPv4 and IPv6, 0.0.0.0 every IPv4 one and :: "
        "every IPv6 one; IPv6 addresses may be bracketed, as [::1]; ignored, with a warning, "
        "when systemd passes the sockets",
        repeatable=True,
        default_text=defaults.host,
    )
    add(
        "--port",
        _int_setting("port"),
        None,
        "TCP port; 0 picks a free one; ignored, with a warning, when systemd passes the sockets",
        default_text=str(defaults.port),
    )
    add(
        "--max-message-bytes",
        _int_setting("max_message_bytes"),
        DEFAULT_MAX_MESSAGE_BYTES,
        "largest payload accepted; longer ones get ERR too-large",
    )
    add(
        "--max-connections",
        _int_setting("max_connections"),
        defaults.max_connections,
        "connections served at once, lowered to fit the open-file limit; "
        "beyond it new ones get ERR 0 busy",
    )
    add(
        "--idle-timeout",
        _seconds_setting("idle_timeout"),
        defaults.idle_timeout,
        "seconds without a complete message before a connection is closed",
    )
    add(
        "--send-timeout",
        _seconds_setting("send_timeout"),
        defaults.send_timeout,
        "seconds a client may leave its replies unread before it is disconnected",
    )
    add(
        "--shutdown-grace",
        _seconds_setting("shutdown_grace"),
        defaults.shutdown_grace,
        "seconds a graceful shutdown waits for connections before cancelling them",
    )
    add(
        "--drain-timeout",
        _seconds_setting("drain_timeout"),
        defaults.drain_timeout,
        "seconds to wait for a client to close after a final ERR 0 line",
    )
    add(
        "--tcp-keepalive",
        _int_setting("tcp_keepalive"),
        defaults.tcp_keepalive,
        "seconds of silence before TCP keepalive probes; 0 keeps the system's default",
    )
    add(
        "--store",
        _store_url,
        DEFAULT_STORE_URL,
        "where every message is kept before its ACK: sqlite:PATH or nats://HOST:PORT/STREAM; "
        "none keeps nothing",
        metavar="URL",
    )
    add(
        "--store-timeout",
        _seconds_setting("store_timeout"),
        defaults.store_timeout,
        "seconds a store commit may take before its messages get ERR unavailable",
    )
    add(
        "--store-connect-timeout",
        _cli.seconds_up_to(3600),
        DEFAULT_CONNECT_TIMEOUT,
        "with a nats:// store, seconds start-up waits for NATS; if it is not there by then "
        "the server serves without it, answering ERR unavailable until it connects",
    )
    add(
        "--store-max-pending",
        _int_setting("max_pending_store_bytes"),
        defaults.max_pending_store_bytes,
        "payload bytes waiting for the store beyond which the server stops reading",
    )
    add(
        "--tls-cert",
        _file_path,
        None,
        "serve TLS, 1.2 or later, with this PEM certificate chain; the file holds the key too "
        "unless --tls-key is given",
        metavar="PATH",
        default_text="none: plain TCP",
    )
    add(
        "--tls-key",
        _file_path,
        None,
        "PEM private key of --tls-cert",
        metavar="PATH",
        default_text="in --tls-cert",
    )
    add(
        "--tls-client-ca",
        _file_path,
        None,
        "require of every client a certificate signed by this PEM CA, mutual TLS; its subject "
        "is logged and stored with each message",
        metavar="PATH",
        default_text="none: no client certificates",
    )
    add(
        "--tls-handshake-timeout",
        _seconds_setting("tls_handshake_timeout"),
        defaults.tls_handshake_timeout,
        "seconds a client has to complete its TLS handshake",
    )
    add(
        "--allow",
        _networks,
        (),
        "serve only clients in these networks, CIDRs such as 10.0.0.0/8 or 2001:db8::/32; "
        "several: repeat the flag or separate them with commas; others get ERR 0 forbidden",
        repeatable=True,
        metavar="CIDR",
        default_text="everyone",
    )
    add(
        "--max-connections-per-ip",
        _int_setting("max_connections_per_ip"),
        defaults.max_connections_per_ip,
        "connections one client address may hold at once; beyond it ERR 0 busy; 0: no limit",
    )
    add(
        "--port-file",
        _port_file,
        None,
        "once listening, write every bound address to this file, atomically, one HOST:PORT "
        "a line, IPv6 in brackets; removed at exit",
        metavar="PATH",
        default_text="none",
    )
    add(
        "--workers",
        _workers,
        1,
        "worker processes sharing the port with SO_REUSEPORT, under a supervisor that "
        "restarts them; auto: one per CPU; 1: one process, no supervisor",
        metavar="N",
    )
    add(
        "--worker-timeout",
        _cli.seconds_up_to(3600),
        10.0,
        "with --workers: seconds a worker may go without a heartbeat before it is killed and "
        "replaced",
        default_text="10",
    )
    add(
        "--worker-start-attempts",
        _cli.int_in_range(1, 1000),
        DEFAULT_WORKER_START_ATTEMPTS,
        "with --workers: starts in a row one worker may fail, exiting or killed before it "
        "is ready; then the supervisor stops the others and exits non-zero",
    )
    add(
        "--metrics-port",
        _cli.int_in_range(0, 65535),
        None,
        "serve GET /metrics for Prometheus, /healthz and /readyz over HTTP on this port; 0 "
        "picks a free one, given in the listening event",
        metavar="PORT",
        default_text="none: off",
    )
    add(
        "--metrics-host",
        _cli.host_name,
        "127.0.0.1",
        "address of the metrics and health endpoint of --metrics-port",
        metavar="HOST",
    )
    add(
        "--log-file",
        _log_file,
        None,
        "also append every log line to this file, created if missing; SIGHUP reopens it, "
        "for logrotate",
        metavar="PATH",
        default_text="none: standard error only",
    )
    add("--log-level", _cli.log_level, "info", "debug, info, warning, error or critical")
    add(
        "--log-format",
        _cli.log_format,
        "auto",
        "auto: console on a terminal, else JSON lines; console; or json",
    )
    add(
        "--log-queue",
        _cli.int_in_range(1, MAX_LOG_QUEUE),
        DEFAULT_MAX_QUEUED_EVENTS,
        "log lines each output, standard error and --log-file, holds while it is slow or "
        "stalled; beyond it new lines are dropped and counted in log_events_dropped",
        metavar="LINES",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run the server until a signal stops it; return the process exit code."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    # Errors name each setting as it was given: a flag, or its ACKSERVICE_* variable.
    name = functools.partial(_cli.setting_name, args)
    if args.tls_cert is None:
        for dest in ("tls_key", "tls_client_ca"):
            if getattr(args, dest) is not None:
                parser.error(
                    f"{name(dest)} needs --tls-cert (or ACKSERVICE_TLS_CERT): give the "
                    f"certificate to serve TLS with, or remove {name(dest)}"
                )
    tls = None
    if args.tls_cert is not None:
        # Loaded here, in the supervisor too: a bad file is one line and exit 2 at once,
        # not a worker failing at start-up.
        try:
            tls = server_tls_context(
                args.tls_cert,
                args.tls_key,
                args.tls_client_ca,
                names=_cli.setting_names(args, ("--tls-cert", "--tls-key", "--tls-client-ca")),
            )
        except TLSConfigError as exc:
            return _fail(str(exc), _cli.EXIT_USAGE)
    role = WorkerRole.from_environment(os.environ)
    if role is not None and "LISTEN_FDS" in os.environ:
        # The supervisor handed on its activated sockets; they are for this process.
        os.environ["LISTEN_PID"] = str(os.getpid())
    # Taken (and the variables removed) before anything else runs, so no child inherits them.
    try:
        activated = take_listen_fds()
    except ValueError as exc:
        return _fail(str(exc), _cli.EXIT_USAGE)
    notifier = Notifier.from_environment()
    try:
        configure_logging(
            args.log_level,
            args.log_format,
            max_queued_events=args.log_queue,
            log_file=args.log_file,
        )
    except OSError as exc:
        return _fail(
            f"cannot open {name('log_file')} {str(args.log_file)!r}: {exc.strerror or exc}",
            EXIT_START_FAILED,
        )
    if activated and role is None:  # a worker: its supervisor has said it
        _warn_address_ignored(args, activated)
    if role is not None:
        # Every event of this process says which worker it is (tasks copy this context).
        bind_process_fields(worker=role.worker_id)
    elif args.workers > 1:
        return _supervise(args, argv, environ, activated, notifier)
    config = config_from_args(args, max_connections=_fit_to_fd_limit(args.max_connections))
    try:
        with _single_errors_unwrapped():
            return trio.run(
                functools.partial(
                    _open_store_and_serve,
                    config,
                    args.store,
                    args.port_file,
                    activated,
                    notifier,
                    metrics=(args.metrics_host, args.metrics_port),
                    role=role,
                    tls=tls,
                    store_connect_timeout=args.store_connect_timeout,
                )
            )
    except (StoreError, PortFileError, MetricsPortError, OSError) as exc:
        return _fail(_describe_start_error(exc, config, args), EXIT_START_FAILED)


def _supervise(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    environ: dict[str, str] | None,
    activated: Sequence[ActivatedSocket],
    notifier: Notifier,
) -> int:
    """Run ``args.workers`` workers under a supervisor (``workers.py``); the exit code."""
    from .workers import StartFailed, SupervisorSettings, supervise, worker_argv

    # The supervisor's own events say worker 0; those about a worker name it.
    bind_process_fields(worker=0)
    # Opened here first, as the TLS files are: a store file that cannot be used is one
    # line, not one from each worker and then the supervisor's.
    try:
        trio.run(_check_sqlite_store_opens, args.store)
    except StoreError as exc:
        return _fail(str(exc), EXIT_START_FAILED)
    host, port = _host_and_port(args)
    settings = SupervisorSettings(
        workers=args.workers,
        worker_argv=worker_argv(argv),
        environ=dict(os.environ if environ is None else environ),
        host=host,
        port=port,
        worker_timeout=args.worker_timeout,
        shutdown_grace=args.shutdown_grace,
        activated=activated,
        notifier=notifier,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        port_file=args.port_file,
        worker_start_attempts=args.worker_start_attempts,
    )
    try:
        with _single_errors_unwrapped():
            return trio.run(supervise, settings)
    except StartFailed as exc:
        return _fail(f"{exc} (its log says why)", exc.code if exc.code > 0 else EXIT_START_FAILED)
    except (PortFileError, MetricsPortError, OSError) as exc:
        config = ServerConfig(host=settings.host, port=settings.port)
        return _fail(_describe_start_error(exc, config, args), EXIT_START_FAILED)
    finally:
        if args.port_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(args.port_file)


async def _check_sqlite_store_opens(url: str) -> None:
    """Open and close the store ``url`` names if it is a SQLite file (creating it, as the
    workers would); a NATS store is left to the workers, which start without it."""
    if isinstance(parse_store_url(url), SQLiteURL):
        async with open_store(url):
            pass


@contextlib.contextmanager
def _single_errors_unwrapped() -> Iterator[None]:
    """Re-raise an exception group holding one exception (through nested groups of one) as
    that exception.

    Trio raises what fails inside a nursery (writing the port file once listening, the
    supervisor's tasks) wrapped in an ``ExceptionGroup``, which ``except OSError`` and the
    like never match: the one-line start-up errors became tracebacks.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from error.__cause__  # keeps its own cause; the group adds nothing


def _workers(text: str) -> int:
    """A ``--workers`` value: a count, or ``auto`` (one per CPU)."""
    if text.strip().lower() == "auto":
        return cpu_count()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a number of workers or auto, got {text!r}") from None
    if not 1 <= value <= _MAX_WORKERS:
        raise ValueError(f"expected from 1 to {_MAX_WORKERS} workers or auto, got {text!r}")
    return value


_workers.range_text = f"1 to {_MAX_WORKERS}, or auto"  # type: ignore[attr-defined]


def _hosts(text: str) -> str:
    """A ``--host`` value, checked here (``parse_hosts``) and kept as the text it was."""
    return ",".join(parse_hosts(text))


def _int_setting(name: str) -> Callable[[str], int]:
    """The parser of integer setting ``name``, range-checked as ``ServerConfig`` does."""
    lowest, highest = LIMITS[name]
    return _cli.int_in_range(int(lowest), int(highest))


def _seconds_setting(name: str) -> Callable[[str], float]:
    """The parser of duration setting ``name``, range-checked as ``ServerConfig`` does."""
    return _cli.seconds_up_to(LIMITS[name][1])


def _file_path(text: str) -> str:
    """A file named on the command line (read once the settings are complete)."""
    if not text.strip():
        raise ValueError("expected a file path, got an empty string")
    return text


def _networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """``--allow`` networks: CIDRs (or single addresses), comma-separated."""
    networks = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            networks.append(ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{part.strip()!r} is not a network; write an address or CIDR such as "
                "10.0.0.0/8 or 2001:db8::/32"
            ) from None
    if not networks:
        raise ValueError("expected at least one network")
    return tuple(networks)


def _store_url(text: str) -> str:
    """A ``--store`` value (checked here, opened at start-up)."""
    try:
        parsed = parse_store_url(text)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(parsed, SQLiteURL) and parsed.path.is_dir():
        # SQLite's own word for it is "unable to open database file".
        raise ValueError(
            f"{str(parsed.path)!r} is a directory; sqlite:PATH names the database file, "
            f"e.g. sqlite:{parsed.path / 'ackservice.db'}"
        )
    return text.strip()


async def _open_store_and_serve(
    config: ServerConfig,
    store_url: str,
    port_file: Path | None,
    activated: Sequence[ActivatedSocket],
    notifier: Notifier,
    *,
    metrics: tuple[str, int | None],
    role: WorkerRole | None,
    tls: ssl.SSLContext | None,
    store_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> int:
    # Signals are ours from the start, not only once serving: opening the store can take
    # up to --store-connect-timeout, and meanwhile SIGHUP's default action (logrotate, a
    # closed terminal) would kill the server, and SIGINT print a traceback.
    with trio.open_signal_receiver(*_STOP_SIGNALS, *_IGNORED_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            starting, watching = trio.CancelScope(), trio.CancelScope()
            watcher_done = trio.Event()
            nursery.start_soon(_watch_start_up, signals, starting, watching, watcher_done)
            with starting:
                async with open_store(
                    store_url,
                    commit_timeout=config.store_timeout,
                    connect_timeout=store_connect_timeout,
                ) as store:
                    # One reader of the signals at a time: the watcher stops, then the
                    # serving loop reads them (a signal pending meanwhile stays queued).
                    watching.cancel()
                    await watcher_done.wait()
                    if role is not None:
                        port_file = None  # the supervisor's to write
                        metrics = (metrics[0], None)  # the supervisor serves it for all workers
                    return await serve_until_signalled(
                        config,
                        store=store,
                        port_file=port_file,
                        activated=activated,
                        notifier=notifier,
                        metrics_host=metrics[0],
                        metrics_port=metrics[1],
                        role=role,
                        tls=tls,
                        signals=signals,
                    )
    return EXIT_OK  # stopped by a signal before serving: nothing to drain


async def _watch_start_up(
    signals: AsyncIterator[int],
    starting: trio.CancelScope,
    watching: trio.CancelScope,
    done: trio.Event,
) -> None:
    """Until ``watching`` is cancelled (serving begins): SIGTERM or SIGINT cancels
    ``starting``, SIGHUP reopens the log file or is ignored, as once serving (``_on_signal``)."""
    try:
        with watching:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum in _IGNORED_SIGNALS:
                    if not reopen_log_file():
                        log.info("signal_ignored", signal=name, hint="stop the server with SIGTERM")
                    continue
                log.info("signal_received", signal=name, during="start-up")
                starting.cancel()
                return
    finally:
        done.set()


class PortFileError(Exception):
    """The ``--port-file`` could not be written.

    Attributes:
        path: the file.
        reason: why, in words.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(self.describe())

    def describe(self, setting: str = "--port-file") -> str:
        """The one-line error, naming the setting as the user gave it."""
        return f"cannot write {setting} {str(self.path)!r}: {self.reason}"


def _fail(message: str, code: int) -> int:
    """Say ``message`` as the one error line on standard error; ``code``, the exit status.
    Not a word, rather than a traceback or a line on standard output, when standard error
    is closed (Python then leaves ``sys.stderr`` None) or fails."""
    # The log lines queued before the failure go out first (a writer thread writes them),
    # so the error is the last line, where one looks for it, not followed by a "listening".
    flush_logging()
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            # One write, newline included: under PYTHONUNBUFFERED print's two writes could
            # take a log line from the writer thread between them (seen with --workers).
            sys.stderr.write(f"{PROG}: error: {message}\n")
            sys.stderr.flush()
    return code


def _log_file(text: str) -> Path:
    """A ``--log-file`` path (opened at start-up, so its directory must exist)."""
    if not text.strip():
        raise ValueError("expected a file path, got an empty string")
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text!r} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise ValueError(f"no directory {str(path.parent)!r} to write {text!r} in")
    return path


def _port_file(text: str) -> Path:
    """A ``--port-file`` path (written once listening, so its directory must exist)."""
    if not text.strip():
        raise ValueError("expected a file path, got an empty string")
    path = Path(text)
    # Refused now, as --log-file is: found once listening, it stopped a server that had
    # already said it was serving.
    if path.is_dir():
        raise ValueError(f"{text!r} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise ValueError(f"no directory {str(path.parent)!r} to write {text!r} in")
    return path


def write_port_file(path: Path, addresses: Sequence[tuple[str, int]]) -> None:
    """Write ``addresses`` to ``path``, one ``host:port`` a line, atomically: a reader sees
    no file or the whole file, never a partial one (written beside it, then renamed).

    Raises:
        PortFileError: the file could not be written.
    """
    text = "".join(f"{host}:{port}\n" for host, port in addresses)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise PortFileError(path, exc.strerror or str(exc)) from exc


def config_from_args(args: argparse.Namespace, *, max_connections: int) -> ServerConfig:
    """The ``ServerConfig`` that parsed command-line settings describe."""
    host, port = _host_and_port(args)
    return ServerConfig(
        host=host,
        port=port,
        max_message_bytes=args.max_message_bytes,
        max_connections=max_connections,
        idle_timeout=args.idle_timeout,
        send_timeout=args.send_timeout,
        shutdown_grace=args.shutdown_grace,
        drain_timeout=args.drain_timeout,
        tcp_keepalive=args.tcp_keepalive,
        store_timeout=args.store_timeout,
        max_pending_store_bytes=args.store_max_pending,
        tls_handshake_timeout=args.tls_handshake_timeout,
        allow=_flatten_networks(args.allow),
        max_connections_per_ip=args.max_connections_per_ip,
    )


def _host_and_port(args: argparse.Namespace) -> tuple[str, int]:
    """``--host`` (one comma-separated text, however given) and ``--port``, or their
    defaults when neither flag nor variable set them."""
    defaults = ServerConfig()
    if args.host is None:
        host = defaults.host
    else:
        host = args.host if isinstance(args.host, str) else ",".join(args.host)
    return host, defaults.port if args.port is None else args.port


def _warn_address_ignored(args: argparse.Namespace, activated: Sequence[ActivatedSocket]) -> None:
    """One warning when ``--host`` or ``--port`` (or their variables) was set although the
    service manager passed the sockets: they are ignored, not an error, since a unit often
    keeps its ``--port`` when a ``.socket`` unit is added, and failing would stop a service
    that can serve."""
    ignored: dict[str, object] = {}
    if args.host is not None:
        ignored["host"] = args.host if isinstance(args.host, str) else ",".join(args.host)
    if args.port is not None:
        ignored["port"] = args.port
    if not ignored:
        return
    log.warning(
        "listen_address_ignored",
        ignored=ignored,
        serving=[format_address(inherited.sock.getsockname()) for inherited in activated],
        reason="the service manager passed the listening sockets (LISTEN_FDS)",
        hint="remove --host and --port (ACKSERVICE_HOST, ACKSERVICE_PORT) from the unit",
    )


def _flatten_networks(
    value: tuple[IPv4Network | IPv6Network, ...] | list[tuple[IPv4Network | IPv6Network, ...]],
) -> tuple[IPv4Network | IPv6Network, ...]:
    """``--allow`` as one tuple, whether it came from repeated flags or one value."""
    if isinstance(value, tuple):
        return value
    return tuple(network for networks in value for network in networks)


async def serve_until_signalled(
    config: ServerConfig,
    *,
    store: Store | None = None,
    on_message: MessageHook | None = None,
    port_file: Path | None = None,
    tls: ssl.SSLContext | None = None,
    activated: Sequence[ActivatedSocket] = (),
    notifier: Notifier | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    role: WorkerRole | None = None,
    signals: AsyncIterator[int] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (graceful; a second one exits at once); return the exit code.

    SIGHUP reopens the log file (``--log-file``), or is logged (``signal_ignored``) and
    otherwise ignored. ``port_file``, if given, is written once listening
    (``write_port_file``) and removed at exit.

    Args:
        activated: sockets from the service manager (``take_listen_fds``), served instead
            of binding ``config.host`` and ``config.port``.
        notifier: told ``READY=1`` once connections are served and ``STOPPING=1`` when a
            graceful shutdown begins.
        metrics_host, metrics_port: where to serve ``/metrics``, ``/healthz`` and
            ``/readyz``; ``metrics_port`` None: nowhere.
        role: this process is a worker under a supervisor (``workers.py``): it binds the
            port with ``SO_REUSEPORT`` and reports to the supervisor.
        signals: a receiver of ``_STOP_SIGNALS`` and ``_IGNORED_SIGNALS`` opened by the
            caller (to handle them during its own start-up); else one is opened here.

    Raises:
        OSError: the address could not be bound.
        MetricsPortError: the metrics address could not be bound.
    """
    notifier = Notifier(None) if notifier is None else notifier
    start_up_fields: dict[str, object] = {}
    if activated:
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(inherited.sock))
            for inherited in activated
        ]
        start_up_fields = {
            "socket_activation": True,
            "fd_names": [inherited.name for inherited in activated],
        }
    else:
        # Bound outside the nursery so that a bind failure surfaces as a plain OSError.
        if role is None:
            listeners = await open_listeners(config.host, config.port)
        else:
            listeners = await open_listeners(config.host, role.port, reuse_port=True)
    metrics_listeners: list[trio.SocketListener] = []
    if metrics_port is not None:
        try:
            metrics_listeners = await open_monitoring_listeners(metrics_host, metrics_port)
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        start_up_fields["metrics"] = [
            format_address(listener.socket.getsockname()) for listener in metrics_listeners
        ]
    # Installed before serving starts, so no signal can arrive unhandled in between.
    with (
        contextlib.nullcontext(signals)
        if signals is not None
        else trio.open_signal_receiver(*_STOP_SIGNALS, *_IGNORED_SIGNALS)
    ) as signals:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                _serve_then_stop_watching,
                config,
                store,
                on_message,
                listeners,
                nursery.cancel_scope,
                start_up_fields,
                tls,
            )
            if metrics_listeners:
                # Started in the same nursery: it answers during the graceful shutdown
                # (/healthz says 503) and ends with the server.
                # Imported here: prometheus-client costs ~20 ms to load, for every server.
                from .metrics import serve_metrics

                await nursery.start(serve_metrics, metrics_listeners, server.handler)
            if role is not None:
                from .metrics import snapshot
                from .workers import report_to_supervisor

                handler = server.handler
                await nursery.start(
                    report_to_supervisor, role, lambda: snapshot(handler), server.shutdown
                )
            try:
                if port_file is not None:
                    write_port_file(port_file, server.addresses)
                # The accept loops run: a connection made now is served (systemd's READY=1
                # promises that, and NotifyAccess=main wants it from this process).
                where = ", ".join(f"{host}:{port}" for host, port in server.addresses)
                notifier.notify(ready=1, status=f"serving on {where}")
                async for signum in signals:
                    if _on_signal(signal.Signals(signum), server, notifier):
                        nursery.cancel_scope.cancel()
                        return EXIT_FORCED
            finally:
                if port_file is not None:
                    # A port file left behind would name a port nobody listens on.
                    with contextlib.suppress(OSError):
                        os.unlink(port_file)
    return EXIT_OK


def _on_signal(signum: signal.Signals, server: Server, notifier: Notifier) -> bool:
    """Act on ``signum``; return whether the server must exit at once (a second stop signal)."""
    if signum in _IGNORED_SIGNALS:
        if not reopen_log_file():  # the writer logs log_file_reopened
            log.info("signal_ignored", signal=signum.name, hint="stop the server with SIGTERM")
        return False
    if server.handler.shutting_down:
        log.warning("forced_exit", signal=signum.name)
        return True
    log.info("signal_received", signal=signum.name)
    notifier.notify(
        stopping=1, status=f"shutting down, {server.handler.stats.active} connections to finish"
    )
    server.shutdown()
    return False


async def _serve_then_stop_watching(
    config: ServerConfig,
    store: Store | None,
    on_message: MessageHook | None,
    listeners: list[trio.SocketListener],
    signal_watch: trio.CancelScope,
    start_up_fields: dict[str, object],
    tls: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[Server],
) -> None:
    await serve(
        config,
        store=store,
        on_message=on_message,
        listeners=listeners,
        tls=tls,
        # Bound just now, by us alone; an activated socket's queue is systemd's (it keeps
        # the socket open and starts us again for the connections waiting there).
        # A worker's own SO_REUSEPORT queue is its own to refuse, too.
        refuse_queued_at_shutdown="socket_activation" not in start_up_fields,
        start_up_fields=start_up_fields,
        task_status=task_status,
    )
    signal_watch.cancel()  # the graceful shutdown completed: stop waiting for signals


def _fit_to_fd_limit(max_connections: int) -> int:
    """Raise the soft open-file limit as far as needed and allowed; lower the connection
    limit (with a warning) if it still does not fit, so running out of descriptors is a
    polite ``ERR 0 busy`` instead of failed accepts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    allowed = max(1, soft - _RESERVED_FDS)
    log.warning(
        "max_connections_lowered",
        requested=max_connections,
        allowed=allowed,
        open_file_limit=soft,
        hint="raise the open-file limit (ulimit -n) to serve more connections",
    )
    return allowed


def _describe_start_error(
    exc: StoreError | PortFileError | MetricsPortError | OSError,
    config: ServerConfig,
    args: argparse.Namespace,
) -> str:
    """The one error line for a failed start, naming each setting as it was given."""
    name = functools.partial(_cli.setting_name, args)
    if isinstance(exc, PortFileError):
        return exc.describe(name("port_file"))
    if isinstance(exc, MetricsPortError):
        if exc.errno == errno.EADDRINUSE and exc.port != 0 and exc.port == config.port:
            # The usual mistake behind "address already in use" here: say it.
            return (
                f"{name('metrics_port')} {exc.port} is the port the server listens on "
                f"({name('port')}); choose another"
            )
        return exc.describe(name("metrics_host"), name("metrics_port"))
    if isinstance(exc, StoreError):
        return str(exc)
    return _describe_listen_error(config, exc, name("host"), name("port"))


def _describe_listen_error(
    config: ServerConfig, exc: OSError, host_setting: str = "--host", port_setting: str = "--port"
) -> str:
    where = ", ".join(
        f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
        for host in parse_hosts(config.host)
    )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {config.host!r} ({exc.strerror}); check {host_setting}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: address already in use; "
            f"stop the other process or choose another {port_setting}"
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied; "
            f"ports below 1024 need privileges, choose another {port_setting}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: this machine has no such address; check {host_setting}"
    return f"cannot listen on {where}: {exc.strerror or exc}"
