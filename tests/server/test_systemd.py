"""systemd's part played by the tests: readiness notification to a datagram socket, sockets
inherited by socket activation, and a log file reopened on SIGHUP as logrotate expects."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import run_cli
from structlog.testing import capture_logs

import systemd_support
from ackservice.server.systemd import Notifier, take_listen_fds
from support import poll_until, server_process
from systemd_support import notify_fields, socket_activated


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """systemd's NOTIFY_SOCKET and its ``@name``."""
    with systemd_support.notify_socket() as notify:
        yield notify


def test_notifier_sends_key_value_lines_to_an_abstract_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """notify(ready=1, status=...) is one datagram READY=1 / STATUS=... to the @ name."""
    sock, name = notify_socket
    assert Notifier(name).notify(ready=1, status="serving on 127.0.0.1:1")
    assert notify_fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving on 127.0.0.1:1"}


def test_notifier_to_a_missing_socket_logs_once_and_goes_on(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that names nothing: one notify_failed warning, then silence."""
    notifier = Notifier(str(tmp_path / "missing.sock"))
    with capture_logs() as logs:
        assert not notifier.notify(ready=1)
        assert not notifier.notify(stopping=1)
    assert [entry["event"] for entry in logs] == ["notify_failed"]
    assert not Notifier(None).notify(ready=1)  # not under systemd: nothing to do


def test_listen_fds_for_another_process_are_left_alone() -> None:
    """LISTEN_PID of another process (an inherited environment): no sockets, and the
    variables are removed all the same, as sd_listen_fds(1) does."""
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "x"}
    assert take_listen_fds(environ) == []
    assert environ == {}
    with pytest.raises(ValueError, match="must be integers"):
        take_listen_fds({"LISTEN_FDS": "one", "LISTEN_PID": str(os.getpid())})


def test_socket_activated_server_notifies_ready_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Given a listening socket as fd 3 (LISTEN_FDS=1, LISTEN_PID its pid), the server binds
    nothing itself, says so in `listening`, sends READY=1 with a STATUS once it serves,
    STOPPING=1 on SIGTERM, and leaves the inherited socket listening for the next start."""
    notify, notify_name = notify_socket
    with socket.create_server(("127.0.0.1", 0)) as inherited:
        port = inherited.getsockname()[1]
        fd = inherited.fileno()
        with server_process(
            tmp_path / "log",
            "--host",
            "127.0.0.1",
            "--store",
            "none",
            **socket_activated(fd),
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ack", "NOTIFY_SOCKET": notify_name},
        ) as server:
            assert server.port == port
            listening = server.wait_for_event("listening")
            assert listening["socket_activation"] is True
            assert listening["fd_names"] == ["ack"]
            ready = notify_fields(notify.recv(4096))
            assert ready == {"READY": "1", "STATUS": f"serving on 127.0.0.1:{port}"}
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"hello\n")
                assert client.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
            server.signal(signal.SIGTERM)
            stopping = notify_fields(notify.recv(4096))
            assert stopping["STOPPING"] == "1"
            assert server.wait() == 0
        # systemd keeps the socket: still listening after the server is gone.
        assert inherited.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_host_and_port_beside_activated_sockets_are_ignored_with_one_warning(
    tmp_path: Path, workers: str
) -> None:
    """--port (flag) and ACKSERVICE_HOST (variable) given while systemd passes a socket: the
    server serves the socket, logs one listen_address_ignored warning naming what it ignored
    and what it serves, and every `listening` event (the supervisor's too) reports the
    socket's real port, not --port's."""
    with socket.create_server(("127.0.0.1", 0)) as inherited:
        port = inherited.getsockname()[1]
        fd = inherited.fileno()
        with server_process(
            tmp_path / "log",
            "--workers",
            workers,
            "--store",
            "none",
            "--port",
            "9876",  # after server_process's --port 0: the last one counts
            **socket_activated(fd),
            env={"LISTEN_FDS": "1", "ACKSERVICE_HOST": "127.0.0.1"},
        ) as server:
            expected_listening = {"0"} if workers == "1" else {"0", "1", "2"}

            def listening() -> list[dict[str, object]]:
                return [e for e in server.events() if e["event"] == "listening"]

            poll_until(
                lambda: {str(e.get("worker", 0)) for e in listening()} == expected_listening,
                what="every process listening",
            )
            assert {e["port"] for e in listening()} == {port}
            assert all(e["addresses"] == [f"127.0.0.1:{port}"] for e in listening())
            warnings = [e for e in server.events() if e["event"] == "listen_address_ignored"]
            assert len(warnings) == 1
            assert warnings[0]["level"] == "warning"
            assert warnings[0]["ignored"] == {"host": "127.0.0.1", "port": 9876}
            assert warnings[0]["serving"] == [f"127.0.0.1:{port}"]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"hello\n")
                assert client.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
            server.signal(signal.SIGTERM)
            assert server.wait() == 0


def test_activated_sockets_alone_log_no_address_warning() -> None:
    """Neither --host nor --port given (nor their variables): socket activation is no reason
    to warn; a setting from either source is."""
    from ackservice.server.cli import _warn_address_ignored, build_parser
    from ackservice.server.systemd import ActivatedSocket

    with socket.create_server(("::1", 0), family=socket.AF_INET6) as sock:
        activated = [ActivatedSocket(sock, "ack")]
        port = sock.getsockname()[1]
        with capture_logs() as logs:
            _warn_address_ignored(build_parser({}).parse_args([]), activated)
        assert logs == []
        with capture_logs() as logs:
            args = build_parser({"ACKSERVICE_PORT": "9876"}).parse_args([])
            _warn_address_ignored(args, activated)
        assert [(e["ignored"], e["serving"]) for e in logs] == [({"port": 9876}, [f"[::1]:{port}"])]


def test_log_file_is_reopened_on_sighup(tmp_path: Path) -> None:
    """With --log-file, lines go to stderr and the file; after logrotate renames the file,
    SIGHUP makes the server write a new one (saying log_file_reopened). A
    NOTIFY_SOCKET naming nothing costs one notify_failed warning, and serving goes on."""
    log_file = tmp_path / "server.log"
    with server_process(
        tmp_path / "stderr",
        "--store",
        "none",
        "--log-file",
        str(log_file),
        env={"NOTIFY_SOCKET": str(tmp_path / "no-such.sock")},
    ) as server:
        # The file has its own writer thread: "listening" on stderr does not mean it is there.
        poll_until(lambda: "listening" in _event_names(log_file), what="listening in the file")
        assert server.wait_for_event("notify_failed")["socket"].endswith("no-such.sock")
        rotated = tmp_path / "server.log.1"
        log_file.rename(rotated)
        server.signal(signal.SIGHUP)
        poll_until(log_file.exists, what="the log file reopened")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"hello\n")
            assert client.makefile("rb").readline() == b"ACK 1 5 3610a686\n"
        server.wait_for_event("connection_closed")
        poll_until(lambda: "connection_closed" in log_file.read_text())
        assert "log_file_reopened" in _event_names(log_file)
        assert "connection_closed" not in rotated.read_text()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert [e["event"] for e in server.events()].count("notify_failed") == 1
        assert "shutdown_complete" in log_file.read_text()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-file", "/no/such/dir/server.log"], {}, "no directory '/no/such/dir'"),
        ([], {"ACKSERVICE_LOG_FILE": "/no/such/dir/x"}, "ACKSERVICE_LOG_FILE"),
        ([], {"LISTEN_FDS": "two", "LISTEN_PID": "1"}, "LISTEN_FDS='two'"),
    ],
)
def test_bad_log_file_or_activation_variables_are_one_line_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """A log file in a missing directory, or malformed LISTEN_* variables: one line on
    stderr, exit code 2, before anything is bound."""
    done = run_cli(tmp_path, args, env)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.splitlines()) == 1


def _event_names(log_file: Path) -> list[str]:
    """The events in a JSON log file, in order (a line still being written is left out)."""
    text = log_file.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line)["event"] for line in complete.splitlines()]
