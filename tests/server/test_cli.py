"""``python -m ackservice.server`` as a real process: signals, settings, logging."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import structlog
import trio
from structlog.testing import capture_logs

import ackservice
from ackservice.logconfig import configure_logging
from ackservice.protocol import parse_reply
from ackservice.server import ServerConfig
from ackservice.server.cli import (
    build_parser,
    config_from_args,
    serve_until_signalled,
    write_port_file,
)
from support import LineReader, run_with_stderr_closed, server_process, wait_until
from tls_support import TLSFiles

# The server CLI with getaddrinfo failing for ``.invalid`` names, so that no test asks the
# network's resolver about a name (only loopback traffic leaves a test).
_NO_NAME_LOOKUPS = """
import socket, sys
real = socket.getaddrinfo
def fake(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)
socket.getaddrinfo = fake
from ackservice.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_server_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A fresh working directory: a server that starts creates its default store there.
    with tempfile.TemporaryDirectory() as workdir:
        return subprocess.run(
            [sys.executable, "-c", _NO_NAME_LOOKUPS, *args],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            check=False,
            cwd=workdir,
        )


def test_serves_and_logs_json_lines_when_not_a_terminal(tmp_path: Path) -> None:
    """With stderr not a terminal, logs are JSON lines; the listen event gives the port."""
    with server_process(tmp_path / "log") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"hello\n")
            assert sock.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
        listening = server.events()[0]
        assert listening["event"] == "listening"
        assert listening["level"] == "info"
        assert "timestamp" in listening
        # Start-up says what runs, as which process, with which effective settings.
        assert listening["version"] == ackservice.__version__
        assert listening["pid"] == server.pid
        assert listening["settings"]["idle_timeout"] == 300.0
        assert listening["settings"]["max_connections"] >= 1


async def test_sigterm_answers_everything_read_then_exits_zero(tmp_path: Path) -> None:
    """SIGTERM with 20 clients streaming: each client gets an ACK for every message the server
    read, in order, then ERR 0 shutting-down and a clean close (no reset); new connections
    are refused; the process exits 0 and logs the totals."""
    with server_process(tmp_path / "log") as server:
        acked_by_clients = 0

        async def streaming_client(started: trio.Event) -> None:
            nonlocal acked_by_clients
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream, trio.open_nursery() as nursery:

                async def send_forever() -> None:
                    try:
                        for _ in range(10_000):  # bounded, though shutdown comes much sooner
                            await stream.send_all(b"payload\n" * 100)
                            await trio.sleep(0.001)
                    except trio.BrokenResourceError:
                        pass  # the server closed after its final line, as it should

                nursery.start_soon(send_forever)
                reader = LineReader(stream)
                seq = 0
                while True:
                    reply = parse_reply(await reader.line())
                    started.set()
                    if reply.seq == 0:
                        assert reply.code == "shutting-down"  # type: ignore[union-attr]
                        break
                    seq += 1
                    assert reply.seq == seq
                acked_by_clients += seq
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                started = trio.Event()
                nursery.start_soon(streaming_client, started)
                await started.wait()
            server.signal(signal.SIGTERM)
            server.wait_for_event("shutdown_started")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        assert server.wait() == 0
        done = server.wait_for_event("shutdown_complete")
        assert done["acked"] == done["messages"] == acked_by_clients > 0
        assert done["connections"] == 20
        assert done["forced"] is False
        assert "Traceback" not in server.log_path.read_text()


def test_second_sigint_exits_at_once(tmp_path: Path) -> None:
    """A second SIGINT during a graceful shutdown exits at once (code 130)."""
    with server_process(
        tmp_path / "log", "--shutdown-grace", "60", "--drain-timeout", "60"
    ) as server:
        # This client never closes, so the graceful shutdown would wait for the grace period.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            server.signal(signal.SIGINT)
            server.wait_for_event("shutdown_started")
            start = time.monotonic()
            server.signal(signal.SIGINT)
            assert server.wait(timeout=5) == 130
            assert time.monotonic() - start < 1
            assert sock.recv(100).startswith(b"ERR 0 shutting-down")
        assert server.wait_for_event("forced_exit")["signal"] == "SIGINT"


def test_forced_exit_logs_connections_truly_and_the_totals(tmp_path: Path) -> None:
    """After a second signal, a connection that was already told ERR 0 shutting-down (and
    was draining) is logged as such, not as cancelled, and shutdown_complete still gives
    the totals, with forced=true."""
    with server_process(
        tmp_path / "log", "--shutdown-grace", "60", "--drain-timeout", "60"
    ) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"hello\n")
            assert sock.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
            server.signal(signal.SIGTERM)
            assert sock.recv(100).startswith(b"ERR 0 shutting-down")
            server.signal(signal.SIGTERM)
            assert server.wait(timeout=5) == 130
        closed = server.wait_for_event("connection_closed")
        assert closed["reason"] == "shutting-down"
        assert closed["acked"] == 1
        done = server.wait_for_event("shutdown_complete")
        assert done["forced"] is True
        assert (done["connections"], done["messages"], done["acked"]) == (1, 1, 1)


def test_sighup_is_logged_and_ignored(tmp_path: Path) -> None:
    """SIGHUP (the terminal that started the server closed) does not stop the server: it
    logs signal_ignored and goes on serving; SIGTERM still stops it gracefully."""
    with server_process(tmp_path / "log") as server:
        server.signal(signal.SIGHUP)
        ignored = server.wait_for_event("signal_ignored")
        assert (ignored["signal"], ignored["level"]) == ("SIGHUP", "info")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"hello\n")
            assert sock.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_signals_during_start_up_are_handled_as_documented(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """While the server starts (here: waiting for a NATS server that accepts and never
    answers, up to --store-connect-timeout), SIGHUP does not kill it (logrotate or a closed
    terminal may send it at any time), and SIGTERM or SIGINT stop it at once, with exit
    code 0 and no traceback. Before, each signal's default action applied until serving
    began: SIGHUP and SIGTERM killed it without a word, SIGINT printed a traceback."""
    with socket.create_server(("127.0.0.1", 0)) as silent_nats:
        nats_port = silent_nats.getsockname()[1]
        with server_process(
            tmp_path / "server.log",
            "--store",
            f"nats://127.0.0.1:{nats_port}/ACKS",
            "--store-connect-timeout",
            "30",
            started_event=None,  # it cannot start: NATS never answers
        ) as server:
            silent_nats.settimeout(20)
            connection, _ = silent_nats.accept()  # the server is opening its store now
            with connection:
                server.signal(signal.SIGHUP)
                with pytest.raises(subprocess.TimeoutExpired):
                    server.wait(0.5)
                server.signal(stop)
                assert server.wait(10) == 0
            # Every line is a JSON event (a traceback fails the parse).
            assert "signal_received" in [event["event"] for event in server.events()]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "-1"], {}, "--port: expected an integer from 0 to 65535, got '-1'"),
        (["--max-message-bytes", "-5"], {}, "expected an integer from 0 to 1073741824, got '-5'"),
        # Linux caps TCP_KEEPIDLE at 32767: not silently ignored, not a traceback.
        (["--tcp-keepalive", "40000"], {}, "expected an integer from 0 to 32767, got '40000'"),
        (["--tcp-keepalive", "2147483648"], {}, "from 0 to 32767, got '2147483648'"),
        (["--max-connections", "0"], {}, "expected an integer from 1 to 1000000, got '0'"),
        (["--store-max-pending", "99999999999999"], {}, "from 1 to 17179869184"),
        (["--send-timeout", "1e300"], {}, "at most 86400, got '1e300'"),
        ([], {"ACKSERVICE_IDLE_TIMEOUT": "1e9"}, "ACKSERVICE_IDLE_TIMEOUT: expected a number"),
        (["--idle-timeout", "0"], {}, "expected a positive number of seconds"),
        (["--log-level", "loud"], {}, "expected one of debug, info, warning"),
        ([], {"ACKSERVICE_SEND_TIMEOUT": "soon"}, "ACKSERVICE_SEND_TIMEOUT: expected a number"),
        (["--host", "no-such-host.invalid"], {}, "cannot resolve host 'no-such-host.invalid'"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--host", "127.0.0.1,"], {}, "an empty address between commas in '127.0.0.1,'"),
        (["--port-file", "/"], {}, "argument --port-file: '/' is a directory, expected a file"),
        (["--store", "sqlite:/"], {}, "'/' is a directory; sqlite:PATH names the database file"),
    ],
)
def test_bad_settings_are_one_clear_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """A bad setting, from a flag or the environment, exits non-zero with one line on stderr
    that says what is wrong, never a traceback."""
    result = run_server_cli("--port", "0", *args, env={**_base_env(), **env})
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# A path that can never be created, even by root: /proc takes no new files. The settings'
# own checks pass (its directory exists), so the failure comes when it is opened.
_UNCREATABLE = "/proc/ackservice-test"


@pytest.mark.parametrize(
    ("settings", "code", "message"),
    [
        ({"TLS_CERT": "{missing}"}, 2, "cannot read ACKSERVICE_TLS_CERT '{missing}': No such file"),
        (
            {"TLS_CERT": "{server_cert}", "TLS_KEY": "{missing}"},
            2,
            "cannot read ACKSERVICE_TLS_KEY '{missing}': No such file",
        ),
        (
            {"TLS_CERT": "{server_cert}", "TLS_KEY": "{server_key}", "TLS_CLIENT_CA": "{tmp}"},
            2,
            "cannot read ACKSERVICE_TLS_CLIENT_CA '{tmp}': it is a directory",
        ),
        (
            {"TLS_CERT": "{server_cert}"},
            2,
            "no private key in ACKSERVICE_TLS_CERT '{server_cert}': give it with --tls-key",
        ),
        ({"TLS_KEY": "{server_key}"}, 2, "ACKSERVICE_TLS_KEY needs --tls-cert"),
        ({"TLS_CLIENT_CA": "{server_cert}"}, 2, "ACKSERVICE_TLS_CLIENT_CA needs --tls-cert"),
        ({"LOG_FILE": _UNCREATABLE}, 1, f"cannot open ACKSERVICE_LOG_FILE '{_UNCREATABLE}': "),
        ({"PORT_FILE": _UNCREATABLE}, 1, f"cannot write ACKSERVICE_PORT_FILE '{_UNCREATABLE}': "),
        ({"HOST": "no-such-host.invalid"}, 1, "; check ACKSERVICE_HOST"),
        (
            {"PORT": "{taken}"},
            1,
            "address already in use; stop the other process or choose another ACKSERVICE_PORT",
        ),
        ({"METRICS_PORT": "{taken}"}, 1, "; check --metrics-host and ACKSERVICE_METRICS_PORT"),
        # With --workers the supervisor writes the port file and binds the metrics port.
        (
            {"WORKERS": "2", "PORT_FILE": _UNCREATABLE},
            1,
            f"cannot write ACKSERVICE_PORT_FILE '{_UNCREATABLE}': ",
        ),
        (
            {"WORKERS": "2", "METRICS_PORT": "{taken}"},
            1,
            "; check --metrics-host and ACKSERVICE_METRICS_PORT",
        ),
    ],
    ids=[
        "tls-cert",
        "tls-key",
        "tls-client-ca",
        "tls-cert-without-key",
        "tls-key-without-cert",
        "tls-client-ca-without-cert",
        "log-file",
        "port-file",
        "host",
        "port",
        "metrics-port",
        "workers-port-file",
        "workers-metrics-port",
    ],
)
def test_an_error_about_a_value_from_the_environment_names_its_variable(
    tls_files: TLSFiles,
    tmp_path: Path,
    settings: dict[str, str],
    code: int,
    message: str,
) -> None:
    """A value that came from an ``ACKSERVICE_*`` variable is called by that variable in the
    error line, not by its flag: the flag is on no command line the reader could look at."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        values = {
            "missing": str(tmp_path / "missing.pem"),
            "server_cert": str(tls_files.server_cert),
            "server_key": str(tls_files.server_key),
            "tmp": str(tmp_path),
            "taken": str(holder.getsockname()[1]),
        }
        env = {f"ACKSERVICE_{k}": v.format(**values) for k, v in settings.items()}
        port = [] if "ACKSERVICE_PORT" in env else ["--port", "0"]
        result = run_server_cli(*port, "--store", "none", env={**_base_env(), **env})
    assert result.returncode == code, result.stderr
    not_logs = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(not_logs) == 1, result.stderr
    assert not_logs[0].startswith("python -m ackservice.server: error: "), result.stderr
    assert message.format(**values) in not_logs[0]


def test_a_flag_given_over_a_variable_is_named_as_the_flag(tmp_path: Path) -> None:
    """With both the flag and its variable set, the flag's value is used, and an error about
    it names the flag."""
    missing = tmp_path / "flag.pem"
    env = {**_base_env(), "ACKSERVICE_TLS_CERT": str(tmp_path / "variable.pem")}
    result = run_server_cli("--port", "0", "--tls-cert", str(missing), env=env)
    assert result.returncode == 2
    assert result.stderr == (
        f"python -m ackservice.server: error: cannot read --tls-cert {str(missing)!r}: "
        "No such file or directory\n"
    )


def test_port_in_use_is_one_clear_line() -> None:
    """A port already in use is reported in one line with what to do, exit code 1."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_server_cli("--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "python -m ackservice.server: error: "
        f"cannot listen on 127.0.0.1:{port}: address already in use; "
        "stop the other process or choose another --port"
    )


def test_flags_win_over_environment() -> None:
    """Each setting reads ACKSERVICE_<NAME>; a flag given on the command line wins."""
    env = {"ACKSERVICE_MAX_MESSAGE_BYTES": "10", "ACKSERVICE_PORT": "1234"}
    args = build_parser(env).parse_args(["--port", "0"])
    assert args.max_message_bytes == 10
    assert args.port == 0
    assert build_parser({}).parse_args([]).max_message_bytes == 65536


def test_environment_settings_reach_the_server(tmp_path: Path) -> None:
    """A limit set only in the environment is enforced by the running server."""
    with (
        server_process(tmp_path / "log", env={"ACKSERVICE_MAX_MESSAGE_BYTES": "3"}) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(b"abcd\n")
        assert sock.makefile("rb").readline().startswith(b"ERR 1 too-large ")


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))


def test_connection_limit_is_fitted_to_the_open_file_limit(tmp_path: Path) -> None:
    """When the open-file limit cannot hold --max-connections, the limit is lowered with a
    warning at start-up, and connections past it are told busy rather than failing."""
    log_path = tmp_path / "log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ackservice.server", "--port", "0", "--log-format", "json"],
            stderr=log_file,
            preexec_fn=_low_fd_limit,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 15
        while "listening" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        events = [json.loads(line) for line in log_path.read_text().splitlines()]
        lowered = next(e for e in events if e["event"] == "max_connections_lowered")
        assert (lowered["requested"], lowered["allowed"]) == (10_000, 200 - 64)
        assert lowered["level"] == "warning"
    finally:
        process.kill()
        process.wait()


def test_trio_stdlib_warnings_reach_the_same_output() -> None:
    """Records Trio logs through the stdlib come out as the same JSON lines as our events."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        logging.getLogger("trio.serve_listeners").error("accept returned %s", "EMFILE")
        structlog.get_logger().info("ours")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        assert first["event"] == "accept returned EMFILE"
        assert first["logger"] == "trio.serve_listeners"
        assert first["level"] == "error"
        assert second["event"] == "ours"
        assert set(first) >= {"timestamp", "level"}
        assert set(second) >= {"timestamp", "level"}
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


def test_console_format_is_human_readable() -> None:
    """--log-format console gives readable key=value lines rather than JSON."""
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    try:
        structlog.get_logger().info("listening", port=9876)
        line = out.getvalue()
        assert "listening" in line
        assert "port=9876" in line
        assert not line.startswith("{")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


def test_console_format_never_fails_the_log_call() -> None:
    """A value whose repr() raises fails neither the log call nor the line (as in JSON lines):
    the console shows the rest and says the value has no repr."""

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    try:
        structlog.get_logger().info("hook_event", value=Broken(), port=9876)
        line = out.getvalue()
        assert "hook_event" in line
        assert "port=9876" in line
        assert "<Broken without a repr>" in line
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACKSERVICE_")}


@pytest.mark.skipif(sys.platform != "linux", reason="the plain-socket accept path is Linux's")
@pytest.mark.usefixtures("accept_nothing")
async def test_signalled_server_tells_its_listen_queue(nursery: trio.Nursery) -> None:
    """The CLI's server binds its own listening socket, so at SIGTERM the connections still
    waiting in its queue are told ERR 0 shutting-down rather than reset."""

    with capture_logs() as logs:
        nursery.start_soon(serve_until_signalled, ServerConfig(port=0))
        await wait_until(lambda: any(event["event"] == "listening" for event in logs))
        [listening] = [event for event in logs if event["event"] == "listening"]
        with trio.socket.socket() as client:
            await client.connect(("127.0.0.1", listening["port"]))  # never accepted
            os.kill(os.getpid(), signal.SIGTERM)  # the receiver is installed before listening
            with trio.fail_after(5):
                reply = await LineReader(trio.SocketStream(client)).line()
    assert reply.startswith(b"ERR 0 shutting-down ")


def test_every_numeric_setting_has_a_documented_range() -> None:
    """Each numeric server flag shows its range in --help, and ServerConfig refuses what the
    CLI refuses (an embedding application gets the same bounds)."""
    parser = build_parser({})
    numeric = [
        action
        for action in parser._actions
        if action.option_strings[0] not in ("-h", "--version", "--host", "--store", "--log-level")
        and action.option_strings[0]
        not in ("--log-format", "--port-file", "--log-file", "--metrics-host", "--allow")
        and not action.option_strings[0].startswith(("--tls-cert", "--tls-key", "--tls-client"))
    ]
    assert numeric
    for action in numeric:
        assert "range: " in (action.help or ""), action.option_strings[0]
    with pytest.raises(ValueError, match="tcp_keepalive must be from 0 to 32767"):
        ServerConfig(tcp_keepalive=40000)
    with pytest.raises(ValueError, match="idle_timeout must be above 0"):
        ServerConfig(idle_timeout=float("inf"))


def test_several_hosts_from_repeated_flags_or_the_environment() -> None:
    """--host may be repeated or comma-separated, ACKSERVICE_HOST comma-separated; IPv6
    addresses may be bracketed."""
    args = build_parser({}).parse_args(["--host", "127.0.0.1", "--host", "[::1]"])
    assert config_from_args(args, max_connections=1).host == "127.0.0.1,::1"
    args = build_parser({"ACKSERVICE_HOST": "127.0.0.1, [::1]"}).parse_args([])
    assert config_from_args(args, max_connections=1).host == "127.0.0.1,::1"
    args = build_parser({}).parse_args([])
    assert config_from_args(args, max_connections=1).host == "127.0.0.1"


def _wait_for_file(path: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert process.poll() is None, f"server exited with {process.returncode}"
        assert time.monotonic() < deadline, "no port file within 15 s"
        time.sleep(0.02)
    return path.read_text()


@pytest.mark.parametrize("via_env", [False, True])
def test_port_file_tells_the_port_when_logs_do_not(tmp_path: Path, via_env: bool) -> None:
    """With --log-level warning the listening event is hidden; --port-file (or
    ACKSERVICE_PORT_FILE) still tells every bound address, one host:port a line, and is
    removed when the server exits."""
    port_file = tmp_path / "server.port"
    args = ["--port", "0", "--store", "none", "--log-level", "warning"]
    env = _base_env()
    if via_env:
        env["ACKSERVICE_PORT_FILE"] = str(port_file)
    else:
        args += ["--port-file", str(port_file)]
    process = subprocess.Popen(
        [sys.executable, "-m", "ackservice.server", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        lines = _wait_for_file(port_file, process).splitlines()
        assert len(lines) == 1
        host, port = lines[0].rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"hello\n")
            assert sock.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not port_file.exists()
        assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
        assert process.stderr is not None
        assert process.stderr.read() == b""  # nothing at warning level
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


def test_port_file_is_replaced_whole(tmp_path: Path) -> None:
    """The port file is written beside its place and renamed over it: an old file is
    replaced at once, and no partial or temporary file remains."""
    port_file = tmp_path / "port"
    port_file.write_text("stale:1\n")
    write_port_file(port_file, [("127.0.0.1", 9876), ("[::1]", 9876)])
    assert port_file.read_text() == "127.0.0.1:9876\n[::1]:9876\n"
    assert [p.name for p in tmp_path.iterdir()] == ["port"]


def test_port_file_that_cannot_be_written_is_one_line() -> None:
    """A --port-file that turns out unwritable once listening is one line and exit 1, not a
    traceback of the exception group trio wraps it in."""
    result = run_server_cli("--port", "0", "--store", "none", "--port-file", _UNCREATABLE)
    assert result.returncode == 1
    not_logs = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert not_logs == [
        "python -m ackservice.server: error: "
        f"cannot write --port-file '{_UNCREATABLE}': No such file or directory"
    ], result.stderr


def test_port_file_that_is_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    """A --port-file that is a directory is refused before the server starts, as a
    directory --log-file is: not after it has said it is serving."""
    result = run_server_cli("--port", "0", "--store", "none", "--port-file", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (
        "python -m ackservice.server: error: argument --port-file: "
        f"{str(tmp_path)!r} is a directory, expected a file path (see --help)\n"
    )


def test_metrics_port_on_the_servers_own_port_says_so() -> None:
    """``--metrics-port`` equal to ``--port`` is one line saying that, not only
    "address already in use" and the settings to check."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = run_server_cli("--store", "none", "--port", port, "--metrics-port", port)
    assert result.returncode == 1
    not_logs = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert not_logs == [
        f"python -m ackservice.server: error: --metrics-port {port} is the port the server "
        "listens on (--port); choose another"
    ], result.stderr


def test_port_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    """A --port-file that could never be written is refused before the server starts."""
    result = run_server_cli("--port", "0", "--port-file", str(tmp_path / "nope" / "port"))
    assert result.returncode == 2
    assert "--port-file: no directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_text_is_uniform() -> None:
    """Every option's help is one sentence and at most one parenthesis, the range/default/env
    note, as the client's and bench's are; every setting shows its default; and no metavar is
    the dest spelled in capitals where a word the other commands use fits (URL, HOST)."""
    parser = build_parser({})
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        text = str(action.help)
        assert text.count("(") <= 1, text
        if action.nargs is None:  # a valued setting, not --help or --version
            assert "default: " in text, text
    usage = parser.format_usage()
    assert "[--store URL]" in usage  # as python -m ackservice.store calls it
    assert "[--metrics-host HOST]" in usage  # as --host is


def test_help_ends_with_the_exit_codes() -> None:
    """``--help`` lists the exit codes, as the client's and the store CLI's do."""
    text = build_parser({}).format_help()
    assert "exit codes: 0 stopped after a graceful shutdown; 1 could not start" in text
    assert "2 bad setting; 130 a second signal" in text


def test_help_prints_float_defaults_as_people_write_them() -> None:
    """``--send-timeout ... (default: 10; ...)``, not ``10.0``, as the client and bench do."""
    from ackservice.server.cli import build_parser

    text = build_parser({}).format_help()
    assert "default: 10;" in text  # --send-timeout, --shutdown-grace, ...
    assert not re.search(r"default: \d+\.0[;)]", " ".join(text.split())), text


def test_an_error_with_standard_error_closed_stays_off_standard_output(tmp_path: Path) -> None:
    """Started with descriptor 2 closed (``2>&-``), an error at start-up still exits with its
    code; its line goes nowhere rather than into standard output (``print`` to a ``None``
    ``sys.stderr`` writes to standard output), where it would pass for the program's output."""
    done = run_with_stderr_closed("ackservice.server", "--tls-cert", str(tmp_path / "none.pem"))
    assert done.returncode == 2
    assert done.stdout == b""
