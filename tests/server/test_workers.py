"""--workers: a supervisor and worker processes on one port, as an operator runs them. One
supervisor serves the module's tests, in order; the last one stops it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio
import trio.testing
from server_support import run_cli, scrape, value
from structlog.testing import capture_logs

from ackservice.server.cli import _workers
from ackservice.server.workers import cpu_count
from support import ServerProcess, poll_until, server_process, wait_until
from systemd_support import notify_fields, notify_socket, socket_activated


class Supervised:
    """The module's supervisor and what its log says about the workers."""

    def __init__(self, server: ServerProcess, metrics_port: int, store: Path) -> None:
        self.server = server
        self.metrics_port = metrics_port
        self.store = store

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            event
            for event in self.server.events()
            if event["event"] == name and all(event.get(k) == v for k, v in fields.items())
        ]

    def worker_pids(self) -> dict[int, int]:
        """The pid now serving as each worker (the latest worker_started of each)."""
        return {event["worker"]: event["pid"] for event in self.events("worker_started")}

    def serving(self, worker: int, pid: int) -> bool:
        """Whether that process has said it listens (its `listening` event)."""
        return bool(self.events("listening", worker=worker, pid=pid))


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    directory = tmp_path_factory.mktemp("workers")
    store = directory / "acks.db"
    with server_process(
        directory / "log",
        "--workers",
        "2",
        "--worker-timeout",
        "1",
        "--metrics-port",
        "0",
        "--drain-timeout",
        "1",
        "--shutdown-grace",
        "5",
        "--store",
        f"sqlite:{store}",
    ) as server:
        (metrics,) = server.wait_for_event("metrics_listening")["addresses"]
        supervised = Supervised(server, int(metrics.rsplit(":", 1)[1]), store)
        poll_until(lambda: bool(supervised.events("listening", worker=0)), what="all ready")
        yield supervised


def exchange(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections, each sending one message and reading its ACK; left open."""
    sockets = []
    for n in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(sock)
        sock.sendall(b"hello %d\n" % n)
    for sock in sockets:
        assert sock.recv(100).startswith(b"ACK 1 ")
    return sockets


def test_the_supervisors_listening_event_names_the_metrics_address(
    supervised: Supervised,
) -> None:
    """With ``--metrics-port 0`` the port picked is in the supervisor's ``listening`` event
    (``metrics``), where the README sends operators, as a single server's is: before, only
    an undocumented ``metrics_listening`` event had it."""
    (listening,) = supervised.events("listening", worker=0)
    assert listening["metrics"] == [f"127.0.0.1:{supervised.metrics_port}"]


def test_a_second_instance_on_the_same_port_is_refused(
    supervised: Supervised, tmp_path: Path
) -> None:
    """Another ``--workers`` server started on a port that one already serves exits 1 with
    one line (address in use), as a single server does: before, its workers joined the
    running ones' SO_REUSEPORT group, took a share of the connections and stored them in
    another store, without a word."""
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "ackservice.server",
                "--workers",
                "2",
                "--port",
                str(supervised.server.port),
                "--store",
                "none",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=15,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a second server started on a port in use")
    assert second.returncode == 1
    (line,) = second.stderr.splitlines()
    assert "address already in use" in line


def test_two_workers_serve_one_port(supervised: Supervised) -> None:
    """Both workers get connections on the one port (16 connections all hashed to one
    worker: 1 in 32,768), each in a session of its own; the supervisor's /metrics has both,
    labelled, and their sum is what the clients were told."""
    server = supervised.server
    pids = supervised.worker_pids()
    assert sorted(pids) == [1, 2]
    for pid in pids.values():
        assert os.getsid(pid) == pid != os.getsid(server.pid)
    sockets = exchange(server.port, 16)
    try:
        poll_until(
            lambda: {e["worker"] for e in supervised.events("connection_opened")} == {1, 2},
            what="connections on both workers",
        )

        # Heartbeats carry the counts (every 0.25 s here): the scrape catches up.
        def counted() -> bool:
            text = scrape(supervised.metrics_port)[1]
            acked = sum(
                value(text, "ackservice_messages_total", worker=str(w), result="acked")
                for w in (1, 2)
            )
            return acked == 16

        poll_until(counted, what="16 acked in /metrics")
        text = scrape(supervised.metrics_port)[1]
        assert value(text, "ackservice_worker_up", worker="1") == 1
        for worker in ("1", "2"):  # each worker's own process, not the supervisor's
            assert value(text, "ackservice_process_resident_memory_bytes", worker=worker) > 1e6
            assert value(text, "ackservice_process_cpu_seconds_total", worker=worker) > 0
        assert (
            value(text, "ackservice_connections_active", worker="1")
            + value(text, "ackservice_connections_active", worker="2")
            == 16
        )
    finally:
        for sock in sockets:
            sock.close()
    assert all("worker" in event for event in server.events())


def test_a_killed_worker_is_replaced_and_serves(supervised: Supervised) -> None:
    """SIGKILL of a worker: the supervisor logs its exit, starts a replacement under the
    same worker number, and the replacement serves."""
    old = supervised.worker_pids()[1]
    os.kill(old, signal.SIGKILL)
    poll_until(lambda: supervised.events("worker_exited", pid=old, signal="SIGKILL"))
    poll_until(lambda: supervised.worker_pids()[1] != old, what="a replacement")
    new = supervised.worker_pids()[1]
    poll_until(lambda: supervised.serving(1, new), what="the replacement listening")
    before = len(supervised.events("connection_opened", worker=1))
    for sock in exchange(supervised.server.port, 16):
        sock.close()
    poll_until(lambda: len(supervised.events("connection_opened", worker=1)) > before)


def test_a_stopped_worker_is_replaced_by_the_heartbeat_check(supervised: Supervised) -> None:
    """A SIGSTOPped worker (still holding its share of the port) stops sending heartbeats:
    after --worker-timeout it is killed and replaced."""
    stopped = supervised.worker_pids()[2]
    os.kill(stopped, signal.SIGSTOP)
    try:
        poll_until(lambda: supervised.events("worker_unresponsive", pid=stopped), timeout=10)
        poll_until(lambda: supervised.worker_pids()[2] != stopped, what="a replacement")
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the supervisor
            os.kill(stopped, signal.SIGCONT)
    new = supervised.worker_pids()[2]
    poll_until(lambda: supervised.serving(2, new), what="the replacement listening")


def _pipeline(port: int, result: dict[str, Any], started: threading.Event) -> None:
    """Send messages as fast as the server reads them until told ERR 0; count the ACKs.
    Sets `started` at the first ACK."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setblocking(True)
        stop = threading.Event()

        def send() -> None:
            batch = b"".join(b"pipelined %d\n" % n for n in range(100))
            try:
                while not stop.is_set():
                    sock.sendall(batch)
            except OSError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        replies = sock.makefile("rb")
        acked = 0
        last = b""
        for line in replies:
            if line.startswith(b"ACK "):
                acked += 1
                started.set()
            else:
                last = line
                break
        stop.set()
        sock.shutdown(socket.SHUT_WR)
        sender.join(10)
        result["acked"].append(acked)  # list.append is atomic; += on a dict item is not
        result["last"].append(last)


@pytest.mark.timing  # its clients must read ~10k ACKs within the 1 s drain timeout
def test_sigterm_drains_every_worker_and_exits_zero(supervised: Supervised) -> None:
    """SIGTERM to the supervisor: every worker answers what it read, says ERR 0
    shutting-down and exits 0; the supervisor exits 0; every ACKed message is in the store
    (nothing acknowledged is lost). Stops the module's supervisor."""
    server = supervised.server
    stored_before = _stored(supervised.store)
    result: dict[str, Any] = {"acked": [], "last": []}
    # Every client has its first ACK before the signal: one still connecting when the
    # listener closes is refused, which is right but not what this test is about.
    started = [threading.Event() for _ in range(4)]
    clients = [threading.Thread(target=_pipeline, args=(server.port, result, s)) for s in started]
    for client in clients:
        client.start()
    assert all(s.wait(10) for s in started)
    server.signal(signal.SIGTERM)
    for client in clients:
        client.join(20)
    assert server.wait(20) == 0
    assert all(last.startswith(b"ERR 0 shutting-down") for last in result["last"])
    assert len(result["acked"]) == 4
    assert sum(result["acked"]) > 0
    assert _stored(supervised.store) - stored_before == sum(result["acked"])
    exits = supervised.events("worker_exited")[-2:]
    assert sorted((e["worker"], e.get("exit_code")) for e in exits) == [(1, 0), (2, 0)]


def _stored(store: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "ackservice.store", "stats", "--store", f"sqlite:{store}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("messages"):
            return int(line.split()[-1].replace(",", ""))
    raise AssertionError(done.stdout)


def test_workers_setting() -> None:
    """--workers takes a count from 1 or auto (the CPUs this process may use)."""
    assert _workers("auto") == cpu_count() >= 1
    assert _workers("3") == 3
    for bad in ("0", "many", "-1"):
        with pytest.raises(ValueError, match="workers"):
            _workers(bad)


def test_socket_activated_workers_notify_ready_and_a_second_signal_forces(
    tmp_path: Path,
) -> None:
    """Under systemd with --workers 2: the inherited socket is handed to both workers, every
    `listening` event names it (`fd_names`), the supervisor (the main process) sends READY=1
    once both serve and STOPPING=1 on SIGTERM; a second SIGTERM during the drain exits at
    once with 130."""
    with notify_socket() as (notify, name), socket.create_server(("127.0.0.1", 0)) as inherited:
        fd = inherited.fileno()
        with server_process(
            tmp_path / "log",
            "--workers",
            "2",
            "--store",
            "none",
            "--drain-timeout",
            "10",
            **socket_activated(fd),
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ack", "NOTIFY_SOCKET": name},
        ) as server:
            ready = notify_fields(notify.recv(4096))
            assert ready["READY"] == "1"
            assert ready["STATUS"].startswith("2 workers serving on 127.0.0.1:")

            def listening() -> list[dict[str, Any]]:
                return [e for e in server.events() if e["event"] == "listening"]

            # The log lines follow the datagram by a few ms (the log writer thread).
            poll_until(lambda: sorted(e["worker"] for e in listening()) == [0, 1, 2])
            assert all(e["socket_activation"] for e in listening())
            # The supervisor's too (docs/deploy.md), as a single server's: which socket is which.
            assert [e.get("fd_names") for e in listening()] == [["ack"]] * 3
            # A client that never closes keeps its worker draining after SIGTERM.
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                client.sendall(b"hi\n")
                replies = client.makefile("rb")
                assert replies.readline().startswith(b"ACK 1")
                server.signal(signal.SIGTERM)
                assert notify_fields(notify.recv(4096))["STOPPING"] == "1"
                assert replies.readline().startswith(b"ERR 0 shutting-down")
                server.signal(signal.SIGTERM)
                assert server.wait(10) == 130


def test_workers_of_a_killed_supervisor_shut_down(tmp_path: Path) -> None:
    """A supervisor killed outright (SIGKILL: no chance to stop anything) leaves no worker
    behind holding the port: each sees its channel close and shuts down gracefully."""
    with server_process(tmp_path / "log", "--workers", "2", "--store", "none") as server:
        poll_until(
            # Both workers listening and reporting (the supervisor's own is worker 0).
            lambda: {1, 2} <= {e["worker"] for e in server.events() if e["event"] == "listening"}
        )
        pids = [e["pid"] for e in server.events() if e["event"] == "worker_started"]
        server.process.kill()
        server.wait()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        poll_until(lambda: all(gone(pid) for pid in pids), what="the workers gone")
        events = server.events()
        assert sorted(e["worker"] for e in events if e["event"] == "supervisor_gone") == [1, 2]
        assert sum(e["event"] == "shutdown_complete" for e in events) == 2


def test_sighup_during_start_up_does_not_kill_a_starting_worker(tmp_path: Path) -> None:
    """SIGHUP (logrotate) while the workers are still starting: a worker with no handler
    yet is not sent it (the default action would kill it, and with it the service's
    start-up); it gets it once ready, and the service serves."""
    log_file = tmp_path / "service.log"
    with server_process(
        tmp_path / "log",
        "--workers",
        "2",
        "--store",
        "none",
        "--log-file",
        str(log_file),
        started_event="worker_started",
    ) as server:
        # worker_started is logged as the process is spawned: it is still importing. Both
        # spawned first: a worker not spawned yet is not sent the signal at all (it will
        # open the file anew), and would reopen nothing.
        poll_until(
            lambda: (
                {1, 2} <= {e["worker"] for e in server.events() if e["event"] == "worker_started"}
            ),
            what="both workers spawned",
        )
        server.signal(signal.SIGHUP)
        server.wait_for_event("signal_forwarded")
        poll_until(
            lambda: {1, 2} <= {e["worker"] for e in server.events() if e["event"] == "listening"},
            what="both workers serving",
        )
        assert server.process.poll() is None
        assert not [e for e in server.events() if e["event"] == "worker_exited"]
        # Deferred, not dropped: each worker reopens its log file once it is ready (the
        # writer thread's event names no worker: the supervisor's and two more).
        poll_until(
            lambda: sum(e["event"] == "log_file_reopened" for e in server.events()) == 3,
            what="both workers reopened the log file",
        )
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0


def test_a_paused_supervisor_does_not_kill_healthy_workers(tmp_path: Path) -> None:
    """A supervisor paused (SIGSTOP, a stalled VM) for longer than --worker-timeout finds,
    when it resumes, the heartbeats its workers sent meanwhile: it reads them before
    judging anyone silent, and kills no worker."""
    with server_process(
        tmp_path / "log", "--workers", "2", "--worker-timeout", "1", "--store", "none"
    ) as server:
        poll_until(lambda: len([e for e in server.events() if e["event"] == "listening"]) == 3)
        pids = {e["worker"]: e["pid"] for e in server.events() if e["event"] == "worker_started"}
        server.signal(signal.SIGSTOP)
        try:
            time.sleep(1.15)  # the pause itself: over --worker-timeout, heartbeats queue up
        finally:
            server.signal(signal.SIGCONT)
        # A SIGHUP after the resume, passed on to every worker (each logs signal_ignored):
        # by then the supervisor has long run its heartbeat checks.
        server.signal(signal.SIGHUP)

        def settled() -> bool:
            events = [e["event"] for e in server.events()]
            return events.count("signal_ignored") == 2 or "worker_unresponsive" in events

        poll_until(settled, timeout=5, what="every worker got the SIGHUP")
        events = server.events()
        assert not [e for e in events if e["event"] in ("worker_unresponsive", "worker_exited")]
        assert {e["worker"]: e["pid"] for e in events if e["event"] == "worker_started"} == pids


@pytest.mark.parametrize(
    "failure", ["metrics port in use", "port file cannot be written", "store is not a database"]
)
def test_a_supervisors_start_up_error_is_one_line(tmp_path: Path, failure: str) -> None:
    """A start-up error of --workers is one line on stderr and exit 1, as without workers,
    not a traceback of the exception group trio wraps a nursery's errors in (nor one line from
    each worker); a metrics port in use and an unusable store file are found before any
    worker starts."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        if failure == "metrics port in use":
            args = ["--metrics-port", str(taken.getsockname()[1])]
            expected = "cannot serve metrics on 127.0.0.1:"
        elif failure == "port file cannot be written":
            # /proc takes no new files, even from root (a directory is refused at parsing).
            args = ["--port-file", "/proc/ackservice-test"]
            expected = "cannot write --port-file '/proc/ackservice-test': No such file"
        else:
            not_a_database = tmp_path / "store.db"
            not_a_database.write_text("not a database\n" * 100)
            args = ["--store", f"sqlite:{not_a_database}"]
            expected = f"{not_a_database} is not a SQLite database"
        done = run_cli(tmp_path, ["--workers", "2", *args], {})
    assert done.returncode == 1
    not_logs = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(not_logs) == 1, done.stderr
    assert done.stderr.splitlines()[-1] == not_logs[0]  # the last line, after every log line
    assert not_logs[0].startswith("python -m ackservice.server: error: ")
    assert expected in not_logs[0]
    if failure != "port file cannot be written":  # found before any worker starts
        assert "worker_started" not in done.stderr


def test_a_worker_that_never_starts_again_stops_the_supervisor(tmp_path: Path) -> None:
    """Once the service served, a worker whose replacements all fail at start-up (here its
    store's directory became a file) is not retried forever: after
    --worker-start-attempts failed starts in a row (ACKSERVICE_WORKER_START_ATTEMPTS=3), the
    supervisor logs worker_start_abandoned, lets the serving worker drain and exit 0, and
    exits with the failed worker's code (1), so that systemd's Restart= takes over."""
    store_directory = tmp_path / "store"
    with server_process(
        tmp_path / "log",
        "--workers",
        "2",
        "--store",
        f"sqlite:{store_directory / 'acks.db'}",
        env={"ACKSERVICE_WORKER_START_ATTEMPTS": "3"},
    ) as server:

        def events(name: str) -> list[dict[str, Any]]:
            # Each failed worker, and the supervisor at the end, say why in one plain line.
            text = server.log_path.read_text()
            lines = text[: text.rfind("\n") + 1].splitlines()  # not a line still being written
            parsed = [json.loads(line) for line in lines if line.startswith("{")]
            return [e for e in parsed if e["event"] == name]

        poll_until(lambda: any(e["worker"] == 0 for e in events("listening")), what="ready")
        # The serving workers keep their open database; a new one cannot create the directory.
        store_directory.rename(tmp_path / "moved")
        store_directory.write_text("not a directory")
        doomed = {e["worker"]: e["pid"] for e in events("worker_started")}[1]
        os.kill(doomed, signal.SIGKILL)
        assert server.wait(10) == 1
        (abandoned,) = events("worker_start_abandoned")
        assert abandoned["level"] == "error"
        assert abandoned["worker"] == 1
        assert abandoned["attempts"] == 3
        assert abandoned["exit_code"] == 1
        failed_starts = [e for e in events("worker_exited") if e["worker"] == 1][1:]
        assert [e.get("exit_code") for e in failed_starts] == [1, 1, 1]
        # Worker 2 served throughout: stopped gracefully, not killed.
        assert [e.get("exit_code") for e in events("worker_exited") if e["worker"] == 2] == [0]
        assert events("shutdown_complete")
        errors = [line for line in server.log_path.read_text().splitlines() if line[:1] != "{"]
        assert errors[-1] == (
            "python -m ackservice.server: error: worker 1 failed to start 3 times in a row "
            "(last: exit code 1) (its log says why)"
        )
        assert errors[0].startswith(
            "python -m ackservice.server: error: cannot create the directory"
        )


@pytest.mark.parametrize("failing", ["socketpair", "open_process"])
async def test_a_worker_that_cannot_be_started_is_retried_after_a_backoff(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, failing: str
) -> None:
    """Out of file descriptors (EMFILE) when starting a worker: logged as
    worker_start_failed and tried again after the usual backoff (0.1 s, then doubling),
    with no descriptor left open; it does not end the supervisor (it is not the settings'
    fault, unlike a worker that exits before serving)."""
    from ackservice.server import workers

    def out_of_descriptors(*args: object, **kwargs: object) -> NoReturn:
        raise OSError(errno.EMFILE, "Too many open files")

    async def no_process(*args: object, **kwargs: object) -> NoReturn:
        out_of_descriptors()

    if failing == "socketpair":
        monkeypatch.setattr(workers.socket, "socketpair", out_of_descriptors)
    else:
        monkeypatch.setattr(trio.lowlevel, "open_process", no_process)
    settings = workers.SupervisorSettings(
        workers=1,
        worker_argv=[sys.executable, "-c", "pass"],
        environ={},
        host="127.0.0.1",
        port=0,
        worker_timeout=1.0,
        shutdown_grace=1.0,
    )
    supervisor = workers._Supervisor(settings)
    descriptors = len(os.listdir("/proc/self/fd"))
    with capture_logs() as logs, trio.move_on_after(0.35):  # tries at 0, 0.1 and 0.3 s
        await supervisor._keep_running(supervisor.slots[0], trio.CancelScope())
    failures = [e for e in logs if e["event"] == "worker_start_failed"]
    assert len(failures) == 3
    assert failures[0]["error"] == "Too many open files"
    assert not supervisor.stopping
    assert len(os.listdir("/proc/self/fd")) == descriptors


def _fake_worker_supervisor(script: str) -> Any:
    """A one-worker supervisor (not started) whose worker runs ``script`` (Python), with the
    channel to the supervisor as ``channel``."""
    from ackservice.server import workers

    prelude = (
        "import json, os, signal, socket, sys, time\n"
        "role = json.loads(os.environ['_ACKSERVICE_WORKER'])\n"
        "channel = socket.socket(fileno=role['fd'])\n"
    )
    settings = workers.SupervisorSettings(
        workers=1,
        worker_argv=[sys.executable, "-c", prelude + script],
        environ=dict(os.environ),
        host="127.0.0.1",
        port=0,
        worker_timeout=5.0,
        shutdown_grace=1.0,
    )
    return workers._Supervisor(settings)


async def test_a_dead_workers_figures_are_not_reported(nursery: trio.Nursery) -> None:
    """Once a worker exits, its last heartbeat's figures are dropped: /metrics and /readyz
    must not go on reporting a dead worker's connections and store."""
    supervisor = _fake_worker_supervisor(
        'channel.sendall(b\'{"snapshot": {"store": null}}\\n\')\ntime.sleep(10)\n'
    )
    slot = supervisor.slots[0]
    exited = trio.Event()

    async def run_worker() -> None:
        await supervisor._run_worker(slot)
        exited.set()

    nursery.start_soon(run_worker)
    await wait_until(lambda: slot.snapshot is not None)
    assert supervisor.snapshots() == [("1", {"store": None})]
    slot.process.kill()
    with trio.fail_after(5):
        await exited.wait()
    assert slot.snapshot is None
    assert supervisor.snapshots() == []


@pytest.mark.parametrize(
    ("worker_script", "start_failed"),
    [("sys.exit(3)", 3), ("os.kill(os.getpid(), signal.SIGKILL)", None)],
)
async def test_only_an_exit_code_before_serving_means_the_settings_are_wrong(
    worker_script: str, start_failed: int | None
) -> None:
    """A worker that exits with a code > 0 before any worker served stops the supervisor
    (its settings or store are wrong); one killed by a signal before serving (the OOM
    killer, an operator) is restarted after the backoff like any other."""
    supervisor = _fake_worker_supervisor(worker_script)
    with capture_logs() as logs, trio.move_on_after(0.5):
        await supervisor._keep_running(supervisor.slots[0], trio.CancelScope())
    failed = supervisor._start_failed
    assert (failed.code if failed else None) == start_failed
    restarts = sum(e["event"] == "worker_restarting" for e in logs)
    assert restarts == 0 if start_failed else restarts >= 1


@pytest.mark.parametrize(
    ("worker_script", "gives_up"),
    [
        ("os.kill(os.getpid(), signal.SIGKILL)", True),
        ("channel.sendall(b'{\"ready\": true}\\n')\ntime.sleep(0.1)\nsys.exit(3)", False),
    ],
    ids=["killed-at-each-start", "ready-then-dies"],
)
async def test_only_failed_starts_in_a_row_stop_the_supervisor(
    worker_script: str, *, gives_up: bool
) -> None:
    """A worker that never says it is ready (here killed by a signal at each start, which
    alone does not mean the settings are wrong) is given up after worker_start_attempts
    starts in a row: worker_start_abandoned, and the supervisor stops. One that is ready
    each time before it dies is restarted with the backoff, however often."""
    supervisor = _fake_worker_supervisor(worker_script)
    supervisor.settings.worker_start_attempts = 2
    with capture_logs() as logs, trio.move_on_after(2):
        await supervisor._keep_running(supervisor.slots[0], trio.CancelScope())
    starts = sum(e["event"] == "worker_started" for e in logs)
    abandoned = [e for e in logs if e["event"] == "worker_start_abandoned"]
    if gives_up:
        assert starts == 2
        assert [(e["attempts"], e["signal"]) for e in abandoned] == [(2, "SIGKILL")]
        assert supervisor.stopping
        assert supervisor._start_failed.code == -signal.SIGKILL
    else:
        assert starts >= 3
        assert not abandoned
        assert supervisor._start_failed is None


def test_sigterm_while_workers_start_exits_zero(tmp_path: Path) -> None:
    """SIGTERM while the workers are still starting (no handler yet: the signal ends them)
    is a clean stop: exit 0, as when they serve."""
    with server_process(
        tmp_path / "log", "--workers", "2", "--store", "none", started_event="worker_started"
    ) as server:
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0


def test_sigterm_while_a_worker_restarts_exits_zero(tmp_path: Path) -> None:
    """SIGTERM while a killed worker waits out its restart backoff (or its replacement is
    still starting): that slot has nothing to stop, so the supervisor still exits 0 once the
    serving worker exited 0; its earlier death by SIGKILL is not the shutdown's result."""
    with server_process(tmp_path / "log", "--workers", "2", "--store", "none") as server:

        def started() -> dict[int, int]:
            return {
                e["worker"]: e["pid"] for e in server.events() if e["event"] == "worker_started"
            }

        # Both serving (the supervisor's own listening event): worker 2 must drain.
        poll_until(
            lambda: any(e["event"] == "listening" and e["worker"] == 0 for e in server.events()),
            what="both workers serving",
        )
        killed = started()[1]
        os.kill(killed, signal.SIGKILL)
        poll_until(
            lambda: any(
                e.get("pid") == killed and e["event"] == "worker_exited" for e in server.events()
            ),
            what="the killed worker's exit",
        )
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0
        stopped = [e for e in server.events() if e["event"] == "supervisor_stopped"]
        assert stopped[0]["worker_exit_codes"][1] == 0  # worker 2 drained and exited 0
