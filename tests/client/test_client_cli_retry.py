"""The command-line client rides out what passes: a store answering ``unavailable`` for a
while, and a server restarted under a piped run; it gives up on what does not pass (a
store down past ``--retry-for``, a host name that does not resolve) with the documented
exit code. Real client processes, fake or real servers on loopback."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import trio
from client_fakes import FlakyStore, RunClient, StartFake, client_env
from client_support import STARTUP_SLACK, assert_one_line_error

# The restart scenario: lines are fed for about 5 s, the server is away for 2 s of them.
FEED_BATCHES = 100
FEED_LINES = 50
FEED_PAUSE = 0.05
RESTART_AFTER = 1.0
AWAY_FOR = 2.0


def message_numbers(stdout: bytes) -> Counter[int]:
    """How many reply lines each input line (``message N:``) got."""
    return Counter(int(line.split(b":")[0].split()[1]) for line in stdout.splitlines())


async def test_piped_run_rides_out_unavailable_answers(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """Every tenth line is ``unavailable`` for its first two writes: the piped run exits 0,
    every line has exactly one reply line, an ACK, and the summary counts each line once
    as acked, with the resends after it."""
    store = FlakyStore(lambda payload: payload.endswith(b"3"), times=2)
    port = await start_fake(store.handle)
    count = 1000
    stdin = b"".join(b"line %d\n" % i for i in range(count))
    run = await run_client("--port", str(port), "--backoff-base", "0.01", stdin=stdin)
    assert run.returncode == 0, run.stderr[-500:]
    assert message_numbers(run.stdout) == Counter(range(1, count + 1))
    assert all(b": ACK " in line for line in run.stdout.splitlines())
    (summary,) = run.stderr.decode().splitlines()
    assert summary.startswith(
        f"sent {count}, acked {count}, rejected 0, unacked 0, resent 200 (duplicates possible) in "
    )
    assert sorted(store.acked) == sorted(stdin.splitlines())  # each stored once
    assert store.connections == 1


async def test_store_down_past_retry_for_exits_1_with_those_messages_unacked(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """Two lines stay ``unavailable``: after ``--retry-for`` they are given up on, shown as
    ``gave up``, counted unacked (not rejected) in the summary, and the run exits 1, soon."""
    store = FlakyStore(lambda payload: payload.startswith(b"down"), times=math.inf)
    port = await start_fake(store.handle)
    started = trio.current_time()
    run = await run_client(
        "--port", str(port), "--retry-for", "0.5", "--backoff-base", "0.05",
        stdin=b"ok 1\ndown 1\nok 2\ndown 2\n",
    )  # fmt: skip
    elapsed = trio.current_time() - started
    assert run.returncode == 1
    replies = run.stdout.decode().splitlines()
    assert [line.split(":")[0] for line in replies] == [f"message {n}" for n in range(1, 5)]
    assert "ERR" in replies[1]
    assert "unavailable store is down (gave up, sent " in replies[1]
    assert "unavailable store is down (gave up, sent " in replies[3]
    summary = run.stderr.decode().splitlines()[-1]
    assert summary.startswith("sent 4, acked 2, rejected 0, unacked 2, resent ")
    assert store.acked == [b"ok 1", b"ok 2"]
    assert elapsed < 0.5 + STARTUP_SLACK


async def test_rejected_lines_are_never_resent_while_unavailable_ones_are(
    start_fake: StartFake, run_client: RunClient
) -> None:
    """In one run, an ``unavailable`` line is written again and a ``rejected`` one never."""
    store = FlakyStore(lambda payload: payload == b"flaky", times=1)
    port = await start_fake(store.handle)
    run = await run_client("--port", str(port), "flaky", "refused", "fine")
    assert run.returncode == 1
    assert store.writes == {b"flaky": 2, b"refused": 1, b"fine": 1}
    assert run.stdout.decode().splitlines()[1] == "message 2: ERR 2 rejected not wanted"


# Runs the CLI with getaddrinfo failing for one name, so that no test resolves a name on
# the network.
_UNRESOLVABLE = """
import socket, sys
real = socket.getaddrinfo
def fake(host, *args, **kwargs):
    if host in ("no-such-host.invalid", b"no-such-host.invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)
socket.getaddrinfo = fake
from ackservice.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_an_unresolvable_host_exits_3_at_once() -> None:
    """A host name that does not resolve is not retried like a refused connection: one
    line saying so, exit 3, without waiting out ``--retry-for``."""
    started = trio.current_time()
    with trio.fail_after(30):
        run = await trio.run_process(
            [sys.executable, "-c", _UNRESOLVABLE, "--host", "no-such-host.invalid", "hi"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=client_env(),
        )
    assert run.returncode == 3
    assert_one_line_error(
        run, "cannot connect to no-such-host.invalid:9876: cannot resolve host (Name or service"
    )
    assert "tried" not in run.stderr.decode()
    assert trio.current_time() - started < STARTUP_SLACK


class ServerProcess:
    """``python -m ackservice.server`` as a real process, JSON logs in a file."""

    def __init__(self, log_path: Path, port: int) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        command = [sys.executable, "-m", "ackservice.server", "--port", str(port)]
        self.process = subprocess.Popen(
            [*command, "--log-format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=client_env(),
            cwd=log_path.parent,  # the default store (sqlite:ackservice.db) goes there
        )

    async def port(self) -> int:
        """Wait for the ``listening`` event; the port it reports."""
        with trio.fail_after(20):
            while True:
                text = self.log_path.read_text()
                for line in text[: text.rfind("\n") + 1].splitlines():  # complete lines
                    if line.startswith("{") and json.loads(line).get("event") == "listening":
                        return int(json.loads(line)["port"])
                await trio.sleep(0.02)

    async def stop(self) -> int:
        """SIGTERM (a graceful stop, as a service manager restarts it); the exit code."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            while self.process.poll() is None:  # noqa: ASYNC110 - another process's exit
                await trio.sleep(0.02)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


async def test_default_client_rides_out_a_server_restart(tmp_path: Path) -> None:
    """A piped run with default settings while the real server is stopped (SIGTERM) and
    started again on the same port 2 s later: the client reconnects when it is back and
    exits 0 with every line acknowledged."""
    servers = [ServerProcess(tmp_path / "server-1.log", 0)]
    client: trio.Process | None = None
    try:
        port = await servers[0].port()
        client = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ackservice.client", "--port", str(port), "--quiet"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
        assert client.stdin is not None
        assert client.stderr is not None
        client_stdin = client.stdin

        async def feed() -> None:
            for batch in range(FEED_BATCHES):
                lines = range(batch * FEED_LINES, (batch + 1) * FEED_LINES)
                await client_stdin.send_all(b"".join(b"line %d\n" % i for i in lines))
                await trio.sleep(FEED_PAUSE)
            await client_stdin.aclose()

        async def restart() -> None:
            await trio.sleep(RESTART_AFTER)
            assert await servers[0].stop() == 0
            await trio.sleep(AWAY_FOR)
            servers.append(ServerProcess(tmp_path / "server-2.log", port))
            assert await servers[1].port() == port

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(restart)
            stderr = b""
            while chunk := await client.stderr.receive_some():
                stderr += chunk
            assert await client.wait() == 0, stderr.decode()[-1000:]
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
        for server in servers:
            server.kill()
    count = FEED_BATCHES * FEED_LINES
    summary = stderr.decode().splitlines()[-1]
    assert summary.startswith(f"sent {count}, acked {count}, rejected 0, unacked 0")
    # Both servers had the client: it reconnected to the second one mid-run.
    for server in servers:
        text = server.log_path.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # not a line still being written
        events = [json.loads(line) for line in lines if line.startswith("{")]
        assert "connection_opened" in [event["event"] for event in events]
